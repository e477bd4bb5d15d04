"""Images with captions for the text-to-image families.

The images come from the image families' prepared index (``pretrain/image/data.py``:
digits, an image folder, hf:NAME, Parquet); this module gives every prepared image its
captions, in the index's order:

  - ``digits`` (the offline default): captions written from the label and from properties
    *measured* on each image (stroke thickness from the amount of ink, slant from the
    image moments, size from the bounding box), in several phrasings. Training images are
    described in the training phrasings, held-out images in phrasings never trained on,
    so evaluation asks the generator for sentences it has not seen;
  - an image folder: ``captions.jsonl`` in it (or ``data.captions``), one JSON object a
    line, ``{"image": "relative/path.png", "captions": ["...", ...]}`` (``"caption"`` or
    ``"text"`` for one); an image may appear on several lines;
  - ``hf:NAME`` or Parquet: ``data.caption_column`` (a string or a list of strings a row).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from overture.errors import ConfigError
from overture.pretrain.image.data import ImageDataConfig

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "medium", "thick")
SLANT = ("slanted left", "upright", "slanted right")
SIZE = ("small", "large")
ATTRIBUTES = {"thickness": THICKNESS, "slant": SLANT, "size": SIZE}

TRAIN_PHRASINGS = (
    "a {size} handwritten {word} with a {thickness} stroke, {slant}",
    "the digit {number}, {thickness} and {size}, {slant}",
    "{slant} {word} drawn with a {thickness} pen, {size}",
    "a scan of the number {number}: {size}, {thickness} lines, {slant}",
)
HELD_OUT_PHRASINGS = (
    "handwritten {number} in {thickness} strokes, {slant}, {size} on the page",
    "an image of a {size}, {slant} {word} written with a {thickness} pen",
)
"""Phrasings of the held-out images only: evaluation prompts the model never saw."""


@dataclass
class CaptionedImagesConfig(ImageDataConfig):
    """data: section of a text-to-image recipe: the image source (as for the image
    families) and where its captions are."""

    captions: str | None = None
    """captions.jsonl of a folder source; null: ``captions.jsonl`` inside the folder."""
    caption_column: str = "text"
    """Caption column of hf: / Parquet sources (a string or a list of strings a row)."""

    def validate(self) -> None:
        super().validate()
        if self.captions is not None and not Path(self.captions).expanduser().is_file():
            raise ConfigError(f"data.captions={self.captions!r}: no such file")


@dataclass
class Captions:
    """Captions of the prepared images: per image, indices into ``texts``; and for the
    digits, each image's measured attributes (class indices into ``ATTRIBUTES``)."""

    texts: list[str]
    """Every distinct caption (the rows of the text-embedding table)."""
    train: list[list[int]]
    eval: list[list[int]]
    train_attributes: np.ndarray | None = None  # [N, 3]: thickness, slant, size
    eval_attributes: np.ndarray | None = None
    thresholds: dict | None = None
    """The training images' attribute cut points, to measure generated images alike."""


# --------------------------------------------------------------------------- digits


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw attributes of ``images`` [B, 3, H, W] in [-1, 1] (ink bright on dark, as the
    digits scans): ``thickness`` (mean ink), ``slant`` (how far the top leans right:
    -mu11 / mu02 of the ink's second moments) and ``size`` (the fraction of the image the
    ink's bounding box covers, the box's sides sqrt(12 mu02) and sqrt(12 mu20)). Each [B]."""
    ink = ((images.float() + 1) / 2).mean(1).clamp(0, 1)  # [B, H, W]
    _, h, w = ink.shape
    ys = torch.linspace(0, 1, h, device=ink.device)[None, :, None]
    xs = torch.linspace(0, 1, w, device=ink.device)[None, None, :]
    mass = ink.sum((1, 2)).clamp(min=1e-6)
    cy = (ink * ys).sum((1, 2)) / mass
    cx = (ink * xs).sum((1, 2)) / mass
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    mu11 = (ink * dx * dy).sum((1, 2)) / mass
    mu02 = (ink * dy * dy).sum((1, 2)) / mass
    mu20 = (ink * dx * dx).sum((1, 2)) / mass
    # the ink's bounding box from its second moments (a uniform run of length L has
    # variance L^2 / 12): continuous, where a thresholded box would tie on small scans
    extent = (12 * mu02).sqrt() * (12 * mu20).sqrt()
    return {"thickness": ink.mean((1, 2)), "slant": -mu11 / mu02.clamp(min=1e-6),
            "size": extent}


def attribute_classes(raw: dict[str, torch.Tensor], thresholds: dict) -> torch.Tensor:
    """[B, 3] class of each attribute (thickness, slant, size) from measured values."""
    columns = [torch.bucketize(raw[name].float().contiguous(),
                               torch.tensor(thresholds[name], device=raw[name].device))
               for name in ATTRIBUTES]
    return torch.stack(columns, 1)


def digit_captions(train_images: torch.Tensor, train_labels: list[int],
                   eval_images: torch.Tensor, eval_labels: list[int]) -> Captions:
    """Captions of the digits from their labels and measured attributes. Cut points are
    the training images' tertiles (thickness, slant) and median (size)."""
    raw = measure(train_images)
    thresholds = {
        "thickness": np.quantile(raw["thickness"].numpy(), [1 / 3, 2 / 3]).tolist(),
        "slant": np.quantile(raw["slant"].numpy(), [1 / 3, 2 / 3]).tolist(),
        "size": np.quantile(raw["size"].numpy(), [0.5]).tolist()}
    train_attr = attribute_classes(raw, thresholds).numpy()
    eval_attr = attribute_classes(measure(eval_images), thresholds).numpy()
    texts: dict[str, int] = {}

    def describe(labels, attributes, phrasings):
        out = []
        for label, (t, s, z) in zip(labels, attributes):
            words = {"word": WORDS[label], "number": str(label), "thickness": THICKNESS[t],
                     "slant": SLANT[s], "size": SIZE[z]}
            out.append([texts.setdefault(p.format(**words), len(texts)) for p in phrasings])
        return out

    train = describe(train_labels, train_attr, TRAIN_PHRASINGS)
    evaluation = describe(eval_labels, eval_attr, HELD_OUT_PHRASINGS)
    return Captions(list(texts), train, evaluation, train_attr, eval_attr, thresholds)


# --------------------------------------------------------------------------- files


def read_captions_file(path: Path) -> dict[str, list[str]]:
    """image path (relative to the file's folder, as written) -> its captions, from a
    captions.jsonl. Empty lines are skipped; any other unreadable line is named."""
    from overture.data.corpus import check_text_file

    check_text_file(path, "data.captions")
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ConfigError(f"{path}:{number}: not a JSON object ({err.msg}); one "
                                  '{"image": ..., "captions": [...]} a line') from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ConfigError(f"{path}:{number}: no \"image\" path (one "
                                  '{"image": ..., "captions": [...]} a line)')
            given = record.get("captions", record.get("caption", record.get("text")))
            given = [given] if isinstance(given, str) else given
            if (not isinstance(given, list) or not given
                    or not all(isinstance(c, str) and c.strip() for c in given)):
                raise ConfigError(f"{path}:{number}: give \"captions\" as a list of non-empty "
                                  "strings (or \"caption\": one string)")
            key = os.path.normpath(record["image"])
            captions.setdefault(key, []).extend(c.strip() for c in given)
    if not captions:
        raise ConfigError(f"{path}: holds no captions")
    return captions


def folder_captions(root: Path, captions_file: Path, paths: list[list[str]]) -> list:
    """Per split, per image (``paths``: the prepared images' files): the captions that
    ``captions_file`` gives it. Images without a caption and captions of missing images
    are refused, each naming the first case."""
    table = read_captions_file(captions_file)
    base = captions_file.parent
    for name in table:
        if not (base / name).is_file():
            raise ConfigError(f"{captions_file}: names {name!r}, which is not an image file "
                              f"under {base}")
    out = []
    for split in paths:
        found = []
        for path in split:
            key = os.path.normpath(os.path.relpath(path, base))
            if key not in table:
                missing = [p for p in split if os.path.normpath(os.path.relpath(p, base))
                           not in table]
                raise ConfigError(f"data.source {root}: {len(missing)} images have no caption "
                                  f"in {captions_file} (first: {missing[0]})")
            found.append(table[key])
        out.append(found)
    return out


def table_captions(cfg: CaptionedImagesConfig, specs: list[str], split: str,
                   rows: list[int]) -> list[list[str]]:
    """Captions of rows ``rows`` of the hf: / Parquet sources ``specs`` (merged in order)."""
    import datasets

    texts: list = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        try:
            if kind == "hf":
                name, _, config = rest.partition(":")
                table = datasets.load_dataset(name, config or None, split=split)
            else:
                import glob

                files = sorted(glob.glob(os.path.expanduser(spec)))
                table = datasets.load_dataset("parquet", data_files=files, split="train")
        except Exception as err:  # noqa: BLE001  (it loaded once already, for the images)
            raise ConfigError(f"data.source={spec}: cannot read its captions "
                              f"({str(err).splitlines()[0]})") from None
        if cfg.caption_column not in table.column_names:
            raise ConfigError(f"data.source={spec}: no caption column {cfg.caption_column!r} "
                              f"(columns: {', '.join(table.column_names)}); set "
                              "data.caption_column")
        texts.extend(table[cfg.caption_column])
    out = []
    for row in rows:
        cell = texts[row]
        cell = [cell] if isinstance(cell, str) else list(cell or [])
        cell = [c.strip() for c in cell if isinstance(c, str) and c.strip()]
        if not cell:
            raise ConfigError(f"data.source {specs}: row {row} has no caption in "
                              f"{cfg.caption_column!r}")
        out.append(cell)
    return out


def index_texts(train: list[list[str]], evaluation: list[list[str]]) -> Captions:
    """Captions given as strings -> the shared text table and per-image indices."""
    texts: dict[str, int] = {}
    pick = [[[texts.setdefault(t, len(texts)) for t in image] for image in split]
            for split in (train, evaluation)]
    return Captions(list(texts), pick[0], pick[1])


def _captions_file(cfg: CaptionedImagesConfig) -> tuple[Path, Path] | None:
    """(folder, its captions.jsonl) for a one-folder source; None for other sources. A
    folder without a captions file is refused here."""
    specs = cfg.source
    if len(specs) != 1 or not Path(specs[0]).expanduser().is_dir():
        return None
    root = Path(specs[0]).expanduser()
    captions_file = Path(cfg.captions).expanduser() if cfg.captions else root / "captions.jsonl"
    if not captions_file.is_file():
        raise ConfigError(f"data.source {root}: images without captions; write "
                          f"{root / 'captions.jsonl'} ({{\"image\": \"relative/path.png\", "
                          "\"captions\": [...]} a line) or set data.captions")
    return root, captions_file


def check_captions(cfg: CaptionedImagesConfig) -> None:
    """Before any image is prepared: a folder's captions file exists, every line is
    readable, names an existing file, and every image of the folder has a caption."""
    found = _captions_file(cfg)
    if found is not None:
        from overture.pretrain.image.data import read_source

        root, captions_file = found
        listed = read_source(str(root), cfg, cfg.hf_split).paths  # file names, no decoding
        folder_captions(root, captions_file, [listed])


def captions_for(cfg: CaptionedImagesConfig, data, load_images) -> Captions:
    """The captions of prepared image data (``PreparedData``: train / eval index), by
    the kind of source. ``load_images(dataset)`` returns its images as a [N, 3, H, W]
    tensor in [-1, 1] at data.image_size (for measuring the digits)."""
    specs = cfg.source
    if specs == ["digits"]:
        return digit_captions(load_images(data.train), data.train["label"],
                              load_images(data.eval), data.eval["label"])
    if "digits" in specs:
        raise ConfigError("data.source: digits cannot be mixed with other sources (its "
                          "captions are written from measurements, the others' are read)")
    if all(s.startswith("hf:") or s.endswith(".parquet") or "*" in s for s in specs):
        held_out = (cfg.eval_source, cfg.hf_eval_split) if cfg.eval_source else (specs, cfg.hf_split)
        return index_texts(table_captions(cfg, specs, cfg.hf_split, data.train["row"]),
                           table_captions(cfg, *held_out, data.eval["row"]))
    found = _captions_file(cfg)
    if found is not None:
        root, captions_file = found
        train, evaluation = folder_captions(root, captions_file,
                                            [data.train["path"], data.eval["path"]])
        return index_texts(train, evaluation)
    raise ConfigError(f"data.source {specs}: captions come from digits, one image folder "
                      "with captions.jsonl, or hf: / Parquet sources with a caption column")
