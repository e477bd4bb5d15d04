"""Labelled (or unlabelled) images for the image families: sources, the cached index,
decoding, and the held-out split.

Sources (``data.source``), each one of:
  - ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real scans, 10
    classes), stored as PNG; it exists on any machine after install (the offline default);
  - a folder in ``ImageFolder`` layout (``DIR/<class>/<image>``), or of images without
    classes (self-supervised);
  - ``hf:NAME[:CONFIG]``: a Hugging Face image dataset (image + label columns), from the
    Hub or a local copy; a ``.parquet`` file or glob in the same layout (image bytes);
  - ``cifar10:ROOT`` / ``cifar100:ROOT``: torchvision's CIFAR files under ROOT
    (``cifar-10-batches-py``), when present.

Preparing writes an Arrow index (image bytes, or a file path for folders; label; row)
into the cache, published atomically. Every image is decoded once there: an unreadable
or corrupt one is skipped and counted, with its path in the log, or stops the run with
``data.strict``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from overture.atomic import COMPLETE, building_dir, publish_dir
from overture.config import (DEFAULT_CACHE, ConfigError, cache_folder, check_seed, fraction,
                             positive)
from overture.data.prepare import PreparedData
from overture.workers import worker_pool

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
POOL_MIN_IMAGES = 2000
"""Fewer images are checked in this process (starting workers would cost more)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm")
SCHEMA = pa.schema([("image", pa.binary()), ("path", pa.string()), ("label", pa.int64()),
                    ("row", pa.int64()), ("height", pa.int32()), ("width", pa.int32())])


@dataclass
class ImageDataConfig:
    """data: section of an image recipe: where the images come from, the held-out split,
    the input size and the loader."""

    source: list[str] = field(default_factory=lambda: ["digits"])
    """Training images: digits, an ImageFolder folder, hf:NAME[:CONFIG], a .parquet
    file / glob, or cifar10:ROOT / cifar100:ROOT."""
    eval_source: list[str] = field(default_factory=list)
    """Held-out images (same forms, e.g. ImageNet's val/ folder); when empty,
    data.eval_fraction of the source is held out."""
    hf_split: str = "train"
    """Split read from Hub datasets for data.source."""
    hf_eval_split: str = "validation"
    """Split read from Hub datasets for data.eval_source."""
    image_column: str = "image"
    """Image column of Hub / Parquet sources."""
    label_column: str = "label"
    """Label column of Hub / Parquet sources (absent: unlabelled images)."""
    image_size: int = 224
    """Side of the square model input, in pixels."""
    eval_fraction: float = 0.1
    """Fraction of the source held out for evaluation when data.eval_source is empty."""
    eval_max_examples: int = 50000
    """Cap on held-out images kept."""
    max_train_examples: int = 0
    """Keep only the first N training images of the shuffled source (0: all), for quick
    experiments."""
    strict: bool = False
    """Stop at the first unreadable image instead of skipping and counting it."""
    cache_mb: float = 2048.0
    """When the decoded images fit in this many MB (digits, CIFAR), the prepared cache
    holds their pixels, memory-mapped and shared by the loader workers: nothing is
    decoded while training. Larger sets keep the encoded files, decoded on every read."""
    num_proc: int = 0
    """Processes that check the images while preparing; 0 uses every core."""
    cache_dir: str = DEFAULT_CACHE
    """Where the prepared index is cached; env OVERTURE_CACHE replaces the default, not a
    folder the recipe or the command line names."""
    seed: int = 12345
    """Seed of the held-out split and of the max_train_examples subset."""

    def validate(self) -> None:
        check_seed("data.seed", self.seed)
        if not self.source:
            raise ConfigError("data.source is empty: give digits, an image folder, hf:NAME, "
                              "a .parquet file or cifar10:ROOT")
        positive(self, "data", "image_size", "eval_max_examples", "cache_mb")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size={self.image_size} is too small: use at least 8")
        fraction(self, "data", "eval_fraction")
        for name in ("num_proc", "max_train_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 0")

    @property
    def resolved_cache_dir(self) -> Path:
        return cache_folder(self.cache_dir)


@dataclass
class Images:
    """Images read from a source: encoded bytes or file paths, labels (-1: none)."""

    data: list[bytes | None]
    paths: list[str | None]
    labels: list[int]
    classes: list[str]


# --------------------------------------------------------------------------- sources


def read_source(spec: str, cfg: ImageDataConfig, split: str) -> Images:
    """The images of one source (see the module docstring for the forms)."""
    if spec == "digits":
        return _digits()
    kind, _, rest = spec.partition(":")
    if kind in ("cifar10", "cifar100") and rest:
        return _cifar(kind, rest, train=split == "train")
    if kind == "hf" and rest:
        name, _, config = rest.partition(":")
        return _hub(name, config or None, split, cfg)
    matches = sorted(glob.glob(os.path.expanduser(spec))) if glob.has_magic(spec) else [spec]
    if not matches:
        raise ConfigError(f"data.source: {spec!r} matches no file")
    if all(m.endswith(".parquet") for m in matches):
        return _parquet(matches, cfg)
    if len(matches) == 1 and Path(matches[0]).is_dir():
        return _folder(Path(matches[0]))
    missing = [m for m in matches if not Path(m).exists()]
    raise ConfigError(f"data.source: {missing[0] if missing else spec!r} " + (
        "does not exist" if missing else "is not an image folder, .parquet file, digits, "
        "hf:NAME or cifar10:ROOT"))


def _digits() -> Images:
    """scikit-learn's 8x8 digits (grey levels 0..16) as 8-bit greyscale PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = []
    for pixels in digits.images:
        buffer = io.BytesIO()
        Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L").save(buffer, "PNG")
        data.append(buffer.getvalue())
    return Images(data, [None] * len(data), [int(y) for y in digits.target],
                  [str(i) for i in range(10)])


def _folder(root: Path) -> Images:
    """ImageFolder layout (class = subfolder, sorted as torchvision does), or a flat
    folder of unlabelled images."""
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[str, int]] = []
    if subdirs:
        for label, name in enumerate(subdirs):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    files.append((str(path), label))
    else:
        files = [(str(p), -1) for p in sorted(root.rglob("*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise ConfigError(f"data.source: {root} holds no images ({', '.join(IMAGE_SUFFIXES[:4])}"
                          ", ...), neither in class subfolders nor directly")
    return Images([None] * len(files), [f for f, _ in files], [y for _, y in files],
                  subdirs)


def _cifar(kind: str, root: str, train: bool) -> Images:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    try:
        dataset = cls(os.path.expanduser(root), train=train, download=False)
    except RuntimeError as err:
        raise ConfigError(f"data.source={kind}:{root}: {err} (download it once with torchvision"
                          f".datasets.{cls.__name__}({root!r}, download=True))") from None
    from PIL import Image

    data = []
    for pixels in dataset.data:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        data.append(buffer.getvalue())
    return Images(data, [None] * len(data), [int(y) for y in dataset.targets],
                  list(dataset.classes))


def _hub(name: str, config: str | None, split: str, cfg: ImageDataConfig) -> Images:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001  (offline, unknown name, missing split, ...)
        raise ConfigError(f"data.source=hf:{name}: cannot load split {split!r} "
                          f"({str(err).splitlines()[0]})") from None
    return _table_images(dataset, f"hf:{name}", cfg)


def _parquet(paths: list[str], cfg: ImageDataConfig) -> Images:
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()  # local files: quick, and stderr stays clean
    try:
        dataset = datasets.load_dataset("parquet", data_files=paths, split="train")
    except Exception as err:  # noqa: BLE001  (not Parquet, truncated, unreadable)
        raise ConfigError(f"data.source: {paths[0]}" + (f" (and {len(paths) - 1} more)"
                          if len(paths) > 1 else "") + f" cannot be read as Parquet "
                          f"({str(err).splitlines()[0]})") from None
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()
    return _table_images(dataset, paths[0], cfg)


def _table_images(dataset, where: str, cfg: ImageDataConfig) -> Images:
    """Images of a datasets.Dataset with an image column (Image feature, or a struct of
    bytes / path) and an optional label column (ClassLabel names kept)."""
    import datasets

    columns = dataset.column_names
    if cfg.image_column not in columns:
        raise ConfigError(f"{where}: no image column {cfg.image_column!r} (columns: "
                          f"{', '.join(columns)}); set data.image_column")
    if isinstance(dataset.features[cfg.image_column], datasets.Image):
        dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
    cells = dataset[cfg.image_column]
    data, paths = [], []
    for cell in cells:
        if isinstance(cell, dict):
            data.append(cell.get("bytes"))
            paths.append(None if cell.get("bytes") else cell.get("path"))
        else:
            data.append(cell if isinstance(cell, bytes) else None)
            paths.append(None)
    classes: list[str] = []
    if cfg.label_column in columns:
        raw = dataset[cfg.label_column]
        missing = next((i for i, y in enumerate(raw) if y is None), None)
        if missing is not None:
            raise ConfigError(f"{where}: row {missing} has no {cfg.label_column!r}; give every "
                              "image a label, or drop the column for unlabelled images")
        feature = dataset.features[cfg.label_column]
        if isinstance(feature, datasets.ClassLabel):
            labels, classes = [int(y) for y in raw], list(feature.names)
        elif raw and all(isinstance(y, str) for y in raw):  # class names: sorted, as folders
            classes = sorted(set(raw))
            number = {name: i for i, name in enumerate(classes)}
            labels = [number[y] for y in raw]
        else:
            try:
                labels = [int(y) for y in raw]
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: column {cfg.label_column!r} holds neither class "
                                  "numbers nor class names") from None
            if labels and min(labels) < 0:
                raise ConfigError(f"{where}: column {cfg.label_column!r} has a negative label")
            classes = [str(i) for i in range(max(labels) + 1)] if labels else []
    else:
        labels = [-1] * len(data)
    return Images(data, paths, labels, classes)


# --------------------------------------------------------------------------- decoding


def decode(data: bytes | None, path: str | None):
    """An RGB PIL image from encoded bytes or a file (every model takes 3 channels)."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if data is not None else path) as img:
        img.load()
        return img.convert("RGB")


def decode_row(image: bytes | None, path: str | None, height: int, width: int):
    """The RGB image of a prepared row: raw pixels (height x width x 3) when the cache
    holds them decoded (height > 0), else the encoded bytes or file."""
    from PIL import Image

    if height > 0:
        return Image.fromarray(np.frombuffer(image, np.uint8).reshape(height, width, 3), "RGB")
    return decode(image, path)


def _check(item: tuple[bytes | None, str | None]) -> tuple[str | None, int, int]:
    """(None, height, width) when the image decodes, else (the reason, 0, 0)."""
    try:
        img = decode(*item)
        return None, img.height, img.width
    except Exception as err:  # noqa: BLE001  (PIL raises many kinds for a bad file)
        return f"{type(err).__name__}: {err}", 0, 0


# --------------------------------------------------------------------------- prepare


def prepare_images(cfg: ImageDataConfig, labelled: bool, progress: bool = True) -> PreparedData:
    """The cached train / eval index for ``cfg`` (built on first use); ``labelled``
    refuses a source without labels (supervised training)."""
    import datasets

    cache = cfg.resolved_cache_dir
    key = {"format": FORMAT_VERSION,
           "sources": [_fingerprint(s) for s in cfg.source],
           "eval_sources": [_fingerprint(s) for s in cfg.eval_source],
           "data": {k: v for k, v in asdict(cfg).items()
                    if k not in ("image_size", "num_proc", "cache_dir")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / "images" / digest
    if not (folder / COMPLETE).exists():
        _build(cfg, folder, progress)
    stats = json.loads((folder / "stats.json").read_text())
    if labelled and stats["unlabelled"]:
        raise ConfigError(f"data.source {cfg.source}: {stats['unlabelled']} images have no "
                          "label; supervised training needs class subfolders or a label "
                          "column (self-supervised families take unlabelled images)")
    return PreparedData(folder=folder,
                        train=datasets.Dataset.from_file(str(folder / "train.arrow")),
                        eval=datasets.Dataset.from_file(str(folder / "eval.arrow")),
                        stats=stats)


def _fingerprint(spec: str) -> dict:
    """What identifies a source's content: for files and folders, their paths, sizes and
    modification times (a changed image changes the cache key)."""
    path = Path(os.path.expanduser(spec))
    if spec == "digits" or spec.startswith(("hf:", "cifar10:", "cifar100:")):
        return {"spec": spec}
    files = ([p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else
             [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec)))])
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"spec": spec, "files": len(files), "digest": digest.hexdigest()}


def _build(cfg: ImageDataConfig, folder: Path, progress: bool) -> None:
    stats: Counter = Counter()
    train = _merge([read_source(s, cfg, cfg.hf_split) for s in cfg.source])
    if cfg.eval_source:
        evaluation = _merge([read_source(s, cfg, cfg.hf_eval_split) for s in cfg.eval_source])
        if evaluation.classes and train.classes and evaluation.classes != train.classes:
            raise ConfigError(f"data.eval_source {cfg.eval_source} has classes "
                              f"{evaluation.classes[:5]}... but data.source has "
                              f"{train.classes[:5]}...; they must be the same, in order")
    else:
        evaluation = None
    # rows are chosen first (a random held-out split, a random max_train_examples subset),
    # then only those are checked; both keep their random order, so the first
    # train.eval_batches held-out batches are a random sample, not the first classes
    order = np.random.default_rng(cfg.seed).permutation(len(train.labels))
    if evaluation is None:
        cut = min(int(round(len(order) * cfg.eval_fraction)), cfg.eval_max_examples)
        eval_rows, train_rows = order[:cut], order[cut:]
        evaluation = train
    else:
        eval_order = np.random.default_rng(cfg.seed + 1).permutation(len(evaluation.labels))
        eval_rows, train_rows = eval_order[:cfg.eval_max_examples], order
    if cfg.max_train_examples:
        train_rows = train_rows[:cfg.max_train_examples]
    train, train_sizes, train_rows = _drop_unreadable(_subset(train, train_rows), train_rows,
                                                      cfg, stats, "train", progress)
    evaluation, eval_sizes, eval_rows = _drop_unreadable(_subset(evaluation, eval_rows),
                                                         eval_rows, cfg, stats, "eval", progress)
    if len(train_rows) == 0:
        raise ConfigError(f"data.source {cfg.source}: no readable training images")
    # small sets are stored decoded: no decoding in the loader at all
    pixels = sum(h * w * 3 for h, w in train_sizes) + sum(h * w * 3 for h, w in eval_sizes)
    decoded = pixels <= cfg.cache_mb * 2**20
    with building_dir(folder) as tmp:
        _write(tmp / "train.arrow", train, train_rows, train_sizes if decoded else None)
        _write(tmp / "eval.arrow", evaluation, eval_rows, eval_sizes if decoded else None)
        stats["decoded"] = int(decoded)
        labels = train.labels
        stats.update({"train_examples": len(train_rows), "eval_examples": len(eval_rows),
                      "classes": len(train.classes),
                      "unlabelled": sum(1 for y in labels if y < 0)})
        for y in labels:
            stats[f"train_label_{y}"] += 1
        (tmp / "stats.json").write_text(json.dumps({**stats, "class_names": train.classes},
                                                   indent=2))
        (tmp / COMPLETE).write_text("")
        publish_dir(tmp, folder, replace=False)


def _merge(parts: list[Images]) -> Images:
    if len(parts) == 1:
        return parts[0]
    classes = parts[0].classes
    for part in parts[1:]:
        if part.classes != classes:
            raise ConfigError("data.source: the sources have different classes "
                              f"({classes[:5]}... vs {part.classes[:5]}...)")
    return Images([d for p in parts for d in p.data], [q for p in parts for q in p.paths],
                  [y for p in parts for y in p.labels], classes)


def _subset(images: Images, rows: np.ndarray) -> Images:
    return Images([images.data[i] for i in rows], [images.paths[i] for i in rows],
                  [images.labels[i] for i in rows], images.classes)


def _drop_unreadable(images: Images, rows: np.ndarray, cfg: ImageDataConfig, stats: Counter,
                     split: str, progress: bool
                     ) -> tuple[Images, list[tuple[int, int]], np.ndarray]:
    """Decode every image once; skip (and count, naming the file) those that fail, or
    stop at the first with data.strict."""
    from tqdm.auto import tqdm

    items = list(zip(images.data, images.paths))
    workers = cfg.num_proc or os.cpu_count() or 1
    chunks = max(1, len(items) // (workers * 8))
    if workers > 1 and len(items) >= POOL_MIN_IMAGES:
        with worker_pool(workers, _check_worker_ended) as pool:
            reasons = list(tqdm(pool.map(_check, items, chunksize=chunks), total=len(items),
                                desc=f"check {split} images", disable=not progress))
    else:
        reasons = [_check(item) for item in items]
    keep = []
    for i, (reason, _, _) in enumerate(reasons):
        if reason is None:
            keep.append(i)
            continue
        sources = cfg.source if split == "train" else (cfg.eval_source or cfg.source)
        where = images.paths[i] or f"{split} image {rows[i]} of {sources}"
        if cfg.strict:
            raise ConfigError(f"{where}: cannot be read as an image ({reason}); fix or remove "
                              "it, or set data.strict=false to skip unreadable images")
        log.warning("skipping %s: cannot be read as an image (%s)", where, reason)
        stats[f"{split}_unreadable_skipped"] += 1
    sizes = [(reasons[i][1], reasons[i][2]) for i in keep]
    return _subset(images, keep), sizes, rows[keep]


def _check_worker_ended() -> str:
    return ("data preparation: a worker process ended before its images were checked; it "
            "may have been killed, perhaps out of memory. data.num_proc=1 checks them in "
            "this process, without workers")


def _write(path: Path, images: Images, rows: np.ndarray,
           sizes: list[tuple[int, int]] | None) -> None:
    """The index of ``images`` (``rows``: their numbers in the source); with ``sizes``,
    each image's decoded pixels instead of its encoded bytes (height 0 marks an encoded
    row)."""
    if sizes is None:
        data = images.data
        height = width = [0] * len(rows)
    else:
        data = [np.asarray(decode(d, p), np.uint8).tobytes()
                for d, p in zip(images.data, images.paths)]
        height, width = [h for h, _ in sizes], [w for _, w in sizes]
    table = pa.table({"image": pa.array(data, pa.binary()),
                      "path": pa.array(images.paths, pa.string()),
                      "label": pa.array(images.labels, pa.int64()),
                      "row": pa.array(np.asarray(rows, np.int64), pa.int64()),
                      "height": pa.array(height, pa.int32()),
                      "width": pa.array(width, pa.int32())}, schema=SCHEMA)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(table)
