"""Pooled features of an image checkpoint (``overture features`` on images, and the
linear probe): the backbone's ``forward_features`` pooled as its classifier sees them,
with the checkpoint's own evaluation transform (size, crop, normalisation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from overture.config import ConfigError

from . import models as image_models
from .data import IMAGE_SUFFIXES, decode, decode_row
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Augment


class ImageEncoder:
    """A checkpoint's backbone (classifier ignored) and its evaluation transform."""

    def __init__(self, checkpoint: str | Path, device: str | None = None,
                 random_init: bool = False, seed: int = 0):
        folder = image_models.final_folder(Path(checkpoint))
        if not image_models.is_image_checkpoint(folder):
            raise ConfigError(f"--checkpoint {checkpoint}: not an image checkpoint (a final/ "
                              "folder of the image or simclr family, or a timm folder)")
        if random_init:  # the same architecture, fresh weights: the probe's baseline
            name, args = image_models.checkpoint_architecture(folder)
            torch.manual_seed(seed)
            self.model = image_models.create(name, 0, args)
            self.config = json.loads((folder / "config.json").read_text())
        else:
            self.model, self.config = image_models.load(folder)
        cfg = self.config.get("pretrained_cfg", {})
        size = int(cfg.get("input_size", [3, 224, 224])[-1])
        self.transform = Augment(image_size=size, crop_pct=float(cfg.get("crop_pct", 0.875)),
                                 interpolation=cfg.get("interpolation", "bilinear"),
                                 mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                                 std=tuple(cfg.get("std", IMAGENET_STD))).eval()
        self.image_size = size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()

    @property
    def dim(self) -> int:
        return image_models.num_features(self.model)

    def encode(self, images: Sequence, batch_size: int = 64, normalize: bool = False,
               progress: bool = False) -> np.ndarray:
        """Features [N, dim] (float32) of ``images`` (PIL images, or file paths), in order."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"--batch-size={batch_size} must be at least 1")
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        bar = tqdm(total=len(images), unit="img", disable=not progress)
        with bar, torch.inference_mode():  # the bar is closed before any error is printed
            for start in range(0, len(images), batch_size):
                chunk = [_open(im) for im in images[start:start + batch_size]]
                x = torch.stack([self.transform(im) for im in chunk]).to(self.device)
                out[start:start + len(chunk)] = image_models.pooled_features(
                    self.model, x).float().cpu().numpy()
                bar.update(len(chunk))
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def encode_rows(self, dataset, batch_size: int = 256) -> np.ndarray:
        """Features of every row of a prepared image index (overture.pretrain.image.data)."""
        parts = []
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start:start + batch_size]
            images = [decode_row(*item) for item in zip(rows["image"], rows["path"],
                                                         rows["height"], rows["width"])]
            parts.append(self.encode(images, batch_size=batch_size))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def _open(image):
    if isinstance(image, (str, Path)):
        try:
            return decode(None, str(image))
        except Exception as err:  # noqa: BLE001  (PIL raises many kinds for a bad file)
            raise ConfigError(f"{image}: cannot be read as an image ({err})") from None
    return image.convert("RGB")


def list_images(path: Path) -> list[str]:
    """Image files of ``--input``: a folder (recursively, sorted) or a .txt list of paths
    (one per line, relative to the list's folder)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"--input {path}: holds no images "
                              f"({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        return files
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file or folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [str(path)]
    from overture.data.corpus import check_text_file

    check_text_file(path, "--input")  # a UTF-16 list is refused, not read as garbage
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig", errors="replace")
             .splitlines() if line.strip()]
    files = [str((path.parent / line) if not Path(line).is_absolute() else Path(line))
             for line in lines]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"--input {path}: {len(missing)} listed images do not exist "
                          f"(first: {missing[0]})")
    if not files:
        raise ConfigError(f"--input {path}: lists no images")
    return files
