"""The text encoder of the text-to-image families: any overture final/ or transformers
encoder, pooled with the code of ``overture features`` (``overture.features.Encoder``).

It is frozen, so every caption is embedded once while preparing and the table is cached
(keyed by the encoder's files, the pooling and the captions). ``init: random`` keeps the
architecture and tokenizer with freshly initialised weights (the ablation "does the
pretrained encoder help?").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from overture.errors import ConfigError


def check_encoder(checkpoint: str) -> None:
    """objective.text_encoder names a transformers encoder with a tokenizer: read from
    its config and tokenizer files, without the weights."""
    from overture.features import check_checkpoint
    from overture.hub import load_tokenizer

    try:
        path, config = check_checkpoint(checkpoint)
        load_tokenizer(path, "--checkpoint")
    except ConfigError as err:
        message = str(err).split(": ", 1)[-1]
        raise ConfigError(f"objective.text_encoder={checkpoint!r}: {message}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"objective.text_encoder={checkpoint!r}: an encoder-decoder model; "
                          "give an encoder (a BERT-style final/ or transformers folder)")


def load_encoder(checkpoint: str, init: str = "pretrained", seed: int = 0):
    """An ``overture.features.Encoder`` on the CPU; its errors name objective.text_encoder."""
    import torch

    from overture.features import Encoder
    from overture.hub import quiet_transformers

    try:
        with quiet_transformers(progress_bars=False):
            encoder = Encoder(checkpoint, device="cpu")
    except ConfigError as err:
        message = str(err).split(": ", 1)[-1]
        raise ConfigError(f"objective.text_encoder={checkpoint!r}: {message}") from None
    if init == "random":
        from transformers import AutoModel

        torch.manual_seed(seed)
        encoder.model = AutoModel.from_config(encoder.model.config).eval()
    return encoder


def fingerprint(checkpoint: str) -> dict:
    """What identifies an encoder's weights: its resolved folder's files (sizes, times)."""
    from overture.hub import resolve_checkpoint

    path = Path(resolve_checkpoint(str(checkpoint)))
    folder = path / "final" if (path / "final" / "config.json").is_file() else path
    files = sorted(p for p in folder.glob("*") if p.is_file())
    return {"path": str(folder.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def embed_captions(texts: list[str], objective, cache: Path, seed: int,
                   progress: bool = False) -> np.ndarray:
    """[len(texts), dim] float32 embeddings of the captions, computed once and cached."""
    from overture.atomic import atomic_file

    key = {"encoder": fingerprint(objective.text_encoder), "init": objective.text_encoder_init,
           "seed": seed, "pooling": objective.text_pooling, "layer": objective.text_layer,
           "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / "caption-embeddings" / f"{digest}.npy"
    if path.is_file():
        return np.load(path)
    encoder = load_encoder(objective.text_encoder, objective.text_encoder_init, seed)
    table = encoder.encode(texts, pooling=objective.text_pooling, layer=objective.text_layer,
                           progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:  # np.save on a name would append ".npy"
            np.save(handle, table)
    return table


def encoder_width(checkpoint: str) -> int:
    """hidden_size of a local encoder folder's config.json (no weights read)."""
    path = Path(str(checkpoint)).expanduser()
    for folder in (path / "final", path):
        config = folder / "config.json"
        if config.is_file():
            try:
                return int(json.loads(config.read_text())["hidden_size"])
            except (ValueError, KeyError, TypeError):
                break
    raise ConfigError(f"objective.text_encoder={checkpoint!r}: no local config.json with a "
                      "hidden_size; the sizes are known once the captions are embedded")
