"""The text encoder of the text-to-image families: any overture final/ or transformers
encoder, pooled with the code of ``overture features`` (``overture.features.Encoder``).

Frozen (the default), every caption is embedded once while preparing and the table is
cached (keyed by the encoder's files, the pooling and the captions). ``init: random``
keeps the architecture and tokenizer with freshly initialised weights (the ablation "does
the pretrained encoder help?"). With ``objective.train_text_encoder`` the encoder is a
model of its own (``TextEncoder``), stepped on the discriminator's matching-aware loss by
its own optimizer (``train.updates.text_encoder``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
        raise ConfigError(f"objective.text_encoder={checkpoint!r}: {message}"
                          + _recipe_hint(checkpoint)) from None
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"objective.text_encoder={checkpoint!r}: an encoder-decoder model; "
                          "give an encoder (a BERT-style final/ or transformers folder)")


def _recipe_hint(checkpoint: str) -> str:
    """"; make it with `overture pretrain NAME`" when a missing ``runs/NAME/...`` is the
    output of bundled recipe NAME (the digits GANs' fine-tuned encoder)."""
    from overture.config import bundled_recipes

    parts = Path(str(checkpoint)).parts
    if Path(str(checkpoint)).exists() or len(parts) < 2 or parts[0] != "runs":
        return ""
    return (f"; make it with `overture pretrain {parts[1]}`"
            if parts[1] in bundled_recipes() else "")


def load_encoder(checkpoint: str, init: str = "pretrained", seed: int = 0):
    """An ``overture.features.Encoder`` on the CPU; its errors name objective.text_encoder."""
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

        with torch.random.fork_rng(devices=[]):  # the same weights, the caller's stream
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


def tokenize_captions(tokenizer, texts: list[str], max_length: int) -> dict:
    """``texts`` tokenized in one call and right-padded to the longest: ``input_ids``,
    ``attention_mask`` and, when the tokenizer makes them, ``token_type_ids``; each
    [N, L] (long)."""
    from overture.data.prepare import pad_rows

    tokens = tokenizer(list(texts), truncation=True, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked
    out = {"input_ids": pad_rows(tokens["input_ids"], pad, multiple=1)}
    lengths = torch.tensor([len(ids) for ids in tokens["input_ids"]])
    out["attention_mask"] = (torch.arange(out["input_ids"].shape[1])[None, :]
                             < lengths[:, None]).long()
    if "token_type_ids" in tokens:
        out["token_type_ids"] = pad_rows(tokens["token_type_ids"], 0, multiple=1)
    return out


class TextEncoder(nn.Module):
    """The text encoder as a trained model (``objective.train_text_encoder``): caption
    indices [K] -> [K, E] embeddings, pooled as ``overture features`` pools and
    standardised with the frozen table's mean and std, so that training starts from the
    frozen encoder's inputs to the networks.

    Every caption is tokenized once (non-persistent buffers, which move with the module;
    the state dict holds the transformers model under ``model.``). Dropout stays off (the
    inner model is kept in eval mode): a step depends on its batch alone, so resume and
    gradient accumulation stay exact."""

    def __init__(self, encoder, texts: list[str], pooling: str, layer: int,
                 mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.model, self.tokenizer = encoder.model, encoder.tokenizer
        self.max_length, self.last = encoder.max_length, encoder._last
        self.pooling, self.layers = pooling, [layer]
        for key, value in tokenize_captions(self.tokenizer, texts or [""],
                                            self.max_length).items():  # int32: half the memory
            self.register_buffer(key, value.int(), persistent=False)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32),
                             persistent=False)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Freeze the parameters the pooled embedding does not depend on (BERT's pooler
        under mean pooling, the layers above ``layer``): DDP needs a gradient for every
        trained parameter, and the optimizer would only decay them."""
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():  # built under no_grad, too
            used = torch.autograd.grad(self(torch.zeros(1, dtype=torch.long)).sum(), params,
                                       allow_unused=True)
        for param, grad in zip(params, used):
            if grad is None:
                param.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # no dropout, ever
        return self

    def forward(self, index):
        """[K] caption indices -> [K, E] standardised embeddings."""
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if hasattr(self, k)]
        return self._embed({k: getattr(self, k)[index].long() for k in keys})

    def encode_texts(self, texts: list[str]):
        """[len(texts), E] for any texts (grid prompts that are not captions)."""
        tokens = tokenize_captions(self.tokenizer, texts, self.max_length)
        return self._embed({k: v.to(self.mean.device) for k, v in tokens.items()})

    def _embed(self, inputs: dict):
        from overture.features import pool

        hidden = any(i not in self.last for i in self.layers)
        # on the meta device (FLOP counts) transformers' mask check would read a value:
        # the mask only changes which positions are pooled, not the FLOPs
        given = {k: v for k, v in inputs.items()
                 if not (v.is_meta and k == "attention_mask")}
        # float32 under a bf16 / fp16 run as well: the grid, the export and `overture
        # generate` embed in float32, and the standardisation divides by small stds
        device = inputs["input_ids"].device.type
        with (torch.autocast(device, enabled=False) if device != "meta"
              else contextlib.nullcontext()):
            output = self.model(**given, output_hidden_states=hidden)
        pooled = pool(output, inputs["attention_mask"], self.pooling, self.layers, self.last)
        return (pooled.float() - self.mean) / self.std


def trainable_encoder(objective, texts: list[str], mean: np.ndarray, std: np.ndarray,
                      seed: int) -> TextEncoder:
    """objective.text_encoder as a ``TextEncoder`` over ``texts``. Built under the meta
    device (size and FLOP estimates), it is loaded on the CPU, then moved there:
    transformers' from_pretrained refuses a meta context."""
    device = torch.empty(0).device
    with torch.device("cpu"):
        encoder = load_encoder(objective.text_encoder, objective.text_encoder_init, seed)
        module = TextEncoder(encoder, texts, objective.text_pooling, objective.text_layer,
                             mean, std)
    return module.to(device)
