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

from .config import ConfigError
from .generate import resolve_checkpoint

POOLINGS = ("cls", "mean", "max", "pooler")
OUTPUT_FORMATS = (".npy", ".safetensors", ".parquet")


class Encoder:
    """A checkpoint's base model (task heads dropped) and tokenizer, for embeddings."""

    def __init__(self, checkpoint: str | Path, device: str | None = None,
                 max_length: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = resolve_checkpoint(str(checkpoint))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--checkpoint {checkpoint}: cannot load a model and "
                              f"tokenizer ({str(err).splitlines()[0]})") from err
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        limit = self.tokenizer.model_max_length
        self.max_length = max_length or (limit if limit < 1_000_000 else 512)
        if self.tokenizer.pad_token is None:  # GPT-2 style: padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token

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

        if pooling not in POOLINGS:
            raise ConfigError(f"--pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        layers = [layer] if isinstance(layer, int) else list(layer)
        count = self.model.config.num_hidden_layers + 1
        bad = [i for i in layers if not -count <= i < count]
        if bad or not layers:
            raise ConfigError(f"--layer {bad or layers}: this model has hidden states 0..{count - 1} "
                              f"(or -{count}..-1)")
        if batch_size < 1:
            raise ConfigError(f"--batch-size={batch_size} must be at least 1")
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True,
                                                      max_length=self.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), unit="text", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in index], truncation=True,
                                       max_length=self.max_length, padding=True,
                                       return_tensors="pt").to(self.device)
                output = self.model(**batch, output_hidden_states=True)
                out[index] = self._pool(output, batch["attention_mask"], pooling,
                                        layers).float().cpu().numpy()
                bar.update(len(index))
        bar.close()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _pool(self, output, mask, pooling: str, layers: list[int]):
        import torch

        if pooling == "pooler":
            if getattr(output, "pooler_output", None) is None:
                raise ConfigError("--pooling=pooler: this model has no pooler; use cls, "
                                  "mean or max")
            return output.pooler_output
        hidden = torch.stack([output.hidden_states[i] for i in layers]).mean(0)  # [B, L, H]
        keep = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1], 0 at padding
        if pooling == "cls":
            # the first real token (left padding puts it elsewhere)
            first = mask.argmax(dim=1)
            return hidden[torch.arange(len(hidden)), first]
        if pooling == "mean":
            return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        return hidden.masked_fill(keep == 0, float("-inf")).max(1).values


def load(checkpoint: str | Path, device: str | None = None,
         max_length: int | None = None) -> Encoder:
    """An ``Encoder`` for a final/ folder, a run folder holding one, any transformers
    encoder folder or a Hub model name."""
    return Encoder(checkpoint, device=device, max_length=max_length)


# --------------------------------------------------------------------------- files


def read_texts(path: Path, column: str | None, id_column: str | None
               ) -> tuple[list[str], list[str]]:
    """(ids, texts) of an input file: .txt one text per line (ids are line numbers),
    or a column of .csv / .tsv / .jsonl / .parquet (ids from ``id_column`` or the row
    number)."""
    from overture.tasks.custom import iter_records

    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    if path.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".parquet"):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        ids, texts = [str(i) for i in range(1, len(lines) + 1)], lines
    else:
        column = column or "text"
        ids, texts = [], []
        for number, (where, row) in enumerate(iter_records(path), start=1):
            if row.get(column) is None:
                raise ConfigError(f"{where}: no field {column!r} (fields: "
                                  f"{', '.join(row)}); choose one with --column")
            ids.append(str(row[id_column]) if id_column and id_column in row else str(number))
            texts.append(str(row[column]))
    if not texts:
        raise ConfigError(f"--input {path}: holds no texts")
    return ids, texts


def write_features(path: Path, ids: list[str], embeddings: np.ndarray,
                   overwrite: bool = False) -> None:
    """Write embeddings in input order: .npy (the matrix; row i is input row i),
    .safetensors ("embeddings", ids in the metadata) or .parquet (id, embedding)."""
    import json

    from .atomic import atomic_file

    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {path}: use one of {', '.join(OUTPUT_FORMATS)}")
    if path.exists() and not overwrite:
        raise ConfigError(f"--output {path} exists; remove it or pass --overwrite")
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
    print(f"{path}: {len(ids)} embeddings of {embeddings.shape[1]}", file=sys.stderr)
