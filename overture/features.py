"""Feature extraction from any encoder checkpoint: ``overture.load(DIR).encode(texts)``
and ``overture features``.

Texts are sorted by length and batched (less padding, faster), then returned in input
order. Mean and max pooling ignore padding exactly, so a text's embedding does not
depend on what else is in its batch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, first_line
from .hub import load_pretrained, load_tokenizer, resolve_checkpoint
from .native_encoder import native_forward, native_layers, weights_key

POOLINGS = ("cls", "mean", "max", "pooler")
OUTPUT_FORMATS = (".npy", ".safetensors", ".parquet")


class Encoder:
    """A checkpoint's base model (task heads dropped) and tokenizer, for embeddings."""

    def __init__(self, checkpoint: str | Path, device: str | None = None,
                 max_length: int | None = None):
        import torch
        from transformers import AutoModel

        path, config = check_checkpoint(checkpoint, max_length)  # before any loading
        positions = position_limit(config)
        self.tokenizer = load_tokenizer(path, "--checkpoint")  # its own one-line errors
        try:
            self.model = load_pretrained(AutoModel, path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--checkpoint {checkpoint}: cannot load its model "
                              f"({first_line(err)})") from err
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        # torch's fused encoder layers where the model is BERT-style (overture/native_encoder.py);
        # False: transformers' forward always
        self.fused = True
        self._fused: tuple | None = None  # (weights_key, layers)
        if max_length is None:
            limit = self.tokenizer.model_max_length
            limits = [n for n in (positions, limit if limit < 1_000_000 else None) if n]
            max_length = min(limits) if limits else 512
        self.max_length = max_length
        if self.tokenizer.pad_token is None:  # GPT-2 style: padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def fused_layers(self):
        """``native_layers(self.model)`` (None where the model is not BERT-style, or
        ``fused`` is False), built again whenever the model's weights were replaced, moved,
        cast or loaded into since (the fused layers copy query, key and value)."""
        if not self.fused:
            return None
        key = weights_key(self.model)
        if self._fused is None or self._fused[0] != key:
            self._fused = key, native_layers(self.model)
        return self._fused[1]

    @property
    def _last(self) -> tuple[int, int]:
        """The layer indices that mean the model's output (last_hidden_state, after any
        final norm, as sentence-transformers takes it); the others index hidden_states."""
        return -1, self.model.config.num_hidden_layers

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def encode(self, texts: Sequence[str], pooling: str = "mean",
               layer: int | Sequence[int] = -1, normalize: bool = False,
               batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embeddings [N, hidden] (float32) of ``texts`` in input order.

        pooling: ``cls`` (first token), ``mean`` / ``max`` over real tokens, or
        ``pooler`` (the model's pooler output, BERT / ALBERT). layer: a hidden-state
        index (0 = embeddings, -1 = last) or several, averaged. normalize: unit L2 norm.
        """
        import torch
        from tqdm.auto import tqdm

        from .data.prepare import pad_rows

        check_arguments(pooling=pooling, batch_size=batch_size)
        layers = [layer] if isinstance(layer, int) else list(layer)
        check_layers(layers, self.model.config)
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # tokenized once, in one call (the fast tokenizer's batch), then padded per batch
        tokenized = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        encoded = tokenized["input_ids"]
        segments = tokenized.get("token_type_ids")  # a tokenizer may set them for one text
        lengths = np.array([len(ids) for ids in encoded])
        order = np.argsort(lengths, kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), unit="text", disable=not progress)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad  # padding is masked: any id will do
        # every layer's output only when a layer other than the last is asked for
        hidden_states = any(i not in self._last for i in layers)
        fused = self.fused_layers()
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = order[start:start + batch_size]
                # right padding to the longest of the batch (sorted: little padding)
                ids = pad_rows([encoded[i] for i in index], pad, multiple=1)  # [B, L]
                mask = (torch.arange(ids.shape[1])[None, :]
                        < torch.as_tensor(lengths[index])[:, None]).long()
                inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
                if segments is not None:
                    inputs["token_type_ids"] = pad_rows([segments[i] for i in index], 0,
                                                        multiple=1).to(self.device)
                if fused is not None:
                    output = native_forward(self.model, fused, **inputs,
                                            hidden_states=hidden_states,
                                            pooler=pooling == "pooler")
                else:
                    output = self.model(**inputs, output_hidden_states=hidden_states)
                mask = inputs["attention_mask"]
                out[index] = pool(output, mask, pooling, layers, self._last).float().cpu().numpy()
                bar.update(len(index))
        bar.close()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def pool(output, mask, pooling: str, layers: list[int], last: tuple[int, ...]):
    """[B, hidden] sentence embeddings from a transformers model's ``output`` and the
    attention ``mask`` [B, L] (right padding): ``cls``, ``mean`` / ``max`` over real
    tokens, or ``pooler``; ``layers`` are averaged, ``last`` are the indices that mean
    last_hidden_state. Shared by ``overture features`` and the GAN text encoder."""
    import torch

    if pooling == "pooler":
        if getattr(output, "pooler_output", None) is None:
            raise ConfigError("--pooling=pooler: this model has no pooler; use cls, "
                              "mean or max")
        return output.pooler_output
    hidden = torch.stack([output.last_hidden_state if i in last
                          else output.hidden_states[i] for i in layers]).mean(0)  # [B, L, H]
    keep = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1], 0 at padding
    if pooling == "cls":
        # the first real token (padding is on the right: position 0)
        first = mask.argmax(dim=1)
        return hidden[torch.arange(len(hidden)), first]
    if pooling == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
    top = hidden.masked_fill(keep == 0, float("-inf")).max(1).values
    return top.masked_fill(keep.sum(1) == 0, 0)  # a text of no tokens: 0, as mean gives


# model types that number positions from pad_token_id + 1, as RoBERTa does
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm",
                        "camembert", "data2vec-text", "xmod", "ibert", "longformer", "mpnet")


def position_limit(config) -> int | None:
    """The longest input (in tokens) a model's position table holds: its
    max_position_embeddings, less pad_token_id + 1 for RoBERTa-style models; None when
    the config gives no such size."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    if config.model_type in PADDING_OFFSET_TYPES:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def check_arguments(pooling: str = "mean", batch_size: int = 1,
                    max_length: int | None = None) -> None:
    """Refuse a bad --pooling, --batch-size or --max-length before any model loads."""
    if pooling not in POOLINGS:
        raise ConfigError(f"--pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be an integer of at least 1")
    if max_length is not None and (isinstance(max_length, bool)
                                   or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"--max-length={max_length} must be a positive integer (leave it "
                          "out for the model's limit)")


def check_layers(layers: Sequence[int], config) -> None:
    """Refuse hidden-state indices that ``config``'s model does not have."""
    count = config.num_hidden_layers + 1
    bad = [i for i in layers if not -count <= i < count]
    if bad or not layers:
        raise ConfigError(f"--layer {bad or list(layers)}: this model has hidden states "
                          f"0..{count - 1} (or -{count}..-1)")


def check_checkpoint(checkpoint: str | Path, max_length: int | None = None,
                     layers: Sequence[int] | None = None):
    """(path, config) of an encoder checkpoint, read without its weights, after checking
    ``max_length`` against its positions and ``layers`` against its depth: bad
    arguments are one line before any model loads."""
    from transformers import AutoConfig

    check_arguments(max_length=max_length)
    path = resolve_checkpoint(str(checkpoint))
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--checkpoint {checkpoint}: not a transformers checkpoint "
                          f"({first_line(err)})") from err
    positions = position_limit(config)
    if max_length is not None and positions is not None and max_length > positions:
        raise ConfigError(f"--max-length={max_length} exceeds the {positions} positions of "
                          f"--checkpoint {checkpoint}; give at most {positions}")
    if layers is not None and hasattr(config, "num_hidden_layers"):
        check_layers(layers, config)
    return path, config


def load(checkpoint: str | Path, device: str | None = None,
         max_length: int | None = None) -> Encoder:
    """An ``Encoder`` for a final/ folder, a run folder holding one, any transformers
    encoder folder or a Hub model name."""
    return Encoder(checkpoint, device=device, max_length=max_length)


# --------------------------------------------------------------------------- files


def read_texts(path: Path, column: str | None, id_column: str | None
               ) -> tuple[list[str], list[str]]:
    """(ids, texts) of an input file: .txt one text per line (ids are the 1-based line
    numbers; empty lines are skipped and counted), or a column of .csv / .tsv / .jsonl /
    .parquet (ids from ``id_column``, which every row must have, or the row number)."""
    from overture.data.corpus import check_text_file
    from overture.tasks.custom import iter_records

    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    suffix = path.suffix.lower()
    if suffix != ".parquet":
        check_text_file(path, "--input")  # UTF-16, binary: refused, not read as garbage
    if suffix not in (".csv", ".tsv", ".jsonl", ".parquet"):
        given = [o for o, v in (("--column", column), ("--id-column", id_column))
                 if v is not None]
        if given:  # a plain text file has no columns: the option would do nothing
            raise ConfigError(f"{' and '.join(given)} given, but --input {path} is plain "
                              "text (one text per line, no columns); leave "
                              f"{'them' if len(given) > 1 else 'it'} out, or give a .csv / "
                              ".tsv / .jsonl / .parquet input")
        ids, texts, empty = [], [], 0
        # utf-8-sig: a byte-order mark is not part of the first text; lines end at \n
        # (or \r\n, \r) only, so that ids are the line numbers an editor shows
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\n")
                if not line.strip():
                    empty += 1
                    continue
                ids.append(str(number))
                texts.append(line)
        if empty and texts:
            lines = "line" if empty == 1 else "lines"
            print(f"--input {path}: skipped {empty} empty {lines} (ids are line numbers)",
                  file=sys.stderr)
    else:
        column = column or "text"
        ids, texts = [], []
        for number, (where, row) in enumerate(iter_records(path), start=1):
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: not a JSON object ({type(row).__name__})")
            if row.get(column) is None:
                raise ConfigError(f"{where}: no field {column!r} (fields: "
                                  f"{', '.join(row)}); choose one with --column")
            if id_column is not None and row.get(id_column) is None:
                raise ConfigError(f"{where}: no field {id_column!r} (fields: "
                                  f"{', '.join(row)}); choose the ids with --id-column")
            ids.append(str(row[id_column]) if id_column is not None else str(number))
            texts.append(str(row[column]))
    if not texts:
        raise ConfigError(f"--input {path}: holds no texts")
    return ids, texts


def check_output(path: Path, overwrite: bool = False) -> None:
    """Refuse an --output that is a folder (--overwrite replaces files only) or an
    existing file without --overwrite."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; give a file path (e.g. "
                          f"{path / ('features' + path.suffix.lower())})")
    if path.exists() and not overwrite:
        raise ConfigError(f"--output {path} exists; remove it or pass --overwrite")


def write_features(path: Path, ids: list[str], embeddings: np.ndarray,
                   overwrite: bool = False) -> None:
    """Write embeddings in input order: .npy (the matrix; row i is input row i),
    .safetensors ("embeddings", ids in the metadata) or .parquet (id, embedding)."""
    import json

    from .atomic import atomic_file

    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {path}: use one of {', '.join(OUTPUT_FORMATS)}")
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, embeddings)
        elif suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file({"embeddings": embeddings}, str(tmp), metadata={"ids": json.dumps(ids)})
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pa.table({"id": ids, "embedding": list(embeddings)})
            pq.write_table(table, tmp)
    # .npy holds no ids: say so when its rows are not the input's rows 1..N
    unnumbered = suffix == ".npy" and ids != [str(i) for i in range(1, len(ids) + 1)]
    print(f"{path}: {len(ids)} embeddings of {embeddings.shape[1]}" + (
        "; .npy keeps no ids, so row i is the i-th text kept (not line i): use .parquet "
        "or .safetensors to keep the ids" if unnumbered else ""), file=sys.stderr)
