"""Image transforms (timm's ``create_transform``), applied deterministically, and the
collators that turn prepared rows into batches.

timm's and torchvision's random transforms draw from Python's ``random``, NumPy's and
torch's global generators. Each example is transformed with all three seeded from
(train.seed, epoch, example index) and restored afterwards, so an example's augmentation
does not depend on the batch it falls in, the worker that loads it or a resume: a
resumed run sees the same pixels as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from .data import decode_row

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def restored_generators():
    """Python's, NumPy's and torch's CPU generators as they were before the block, after
    it (saved once around a whole batch of ``reseed``: saving them per image cost as
    much as a tenth of a small model's step)."""
    # the CPU generator alone (torch.manual_seed also seeds every accelerator, slowly):
    # transforms run on the CPU
    cpu = torch.default_generator
    py, npy, pt = random.getstate(), np.random.get_state(), cpu.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        cpu.set_state(pt)


def reseed(*key: int) -> None:
    """Python's, NumPy's and torch's CPU generators seeded from ``key``."""
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded(*key: int):
    """The three global generators seeded from ``key`` inside the block, and as they
    were after it."""
    with restored_generators():
        reseed(*key)
        yield


@dataclass
class Augment:
    """What a training view does (the objective's settings, in one place)."""

    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: str | None = None
    color_jitter: float | tuple[float, ...] = 0.4
    color_jitter_prob: float | None = None
    grayscale_prob: float = 0.0
    gaussian_blur_prob: float = 0.0
    re_prob: float = 0.0
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def train(self):
        """timm's training transform: PIL image -> normalized [3, H, W] tensor."""
        from torchvision.transforms import Compose

        pil, final = self.train_parts()
        return Compose([*pil.transforms, *final.transforms])

    def train_parts(self):
        """``train()`` in two: the PIL part (crop, flip, augmentation) and the last
        (to tensor, normalize, random erasing), timm's ``separate=True``."""
        from timm.data import create_transform
        from torchvision.transforms import Compose

        primary, secondary, final = create_transform(
            self.image_size, is_training=True, scale=tuple(self.scale), hflip=self.hflip,
            auto_augment=self.auto_augment, color_jitter=self.color_jitter,
            color_jitter_prob=self.color_jitter_prob, grayscale_prob=self.grayscale_prob,
            gaussian_blur_prob=self.gaussian_blur_prob, re_prob=self.re_prob,
            interpolation=self.interpolation, mean=self.mean, std=self.std, separate=True)
        return Compose([*primary.transforms, *secondary.transforms]), final

    def eval(self):
        """Resize the short side to image_size / crop_pct, centre-crop image_size."""
        from timm.data import create_transform

        # "random" interpolation is a training augmentation; evaluation is deterministic
        interpolation = "bilinear" if self.interpolation == "random" else self.interpolation
        return create_transform(self.image_size, is_training=False, crop_pct=self.crop_pct,
                                interpolation=interpolation, mean=self.mean, std=self.std)


class ImageCollator:
    """Rows -> ``images`` [B, 3, H, W] (+ ``labels`` [B]); with ``views=2`` (SimCLR) two
    independently augmented views ``view_a`` and ``view_b`` of every image. ``mixup``
    (timm's Mixup) mixes a training batch and adds soft ``targets`` [B, classes]."""

    def __init__(self, augment: Augment, seed: int, views: int = 1, mixup=None,
                 channels_last: bool = False):
        self.augment, self.seed, self.views = augment, seed, views
        self.mixup, self.channels_last = mixup, channels_last
        self.epoch = 0
        self._eval = augment.eval()
        self._pil, self._final = augment.train_parts()
        # the last step draws nothing at random unless it erases: then done per image
        self._batched_final = [type(t).__name__ for t in self._final.transforms] == [
            "MaybeToTensor", "Normalize"]
        self._mean, self._std = (torch.tensor(v, dtype=torch.float32)[:, None, None]
                                 for v in (augment.mean, augment.std))

    def set_epoch(self, epoch: int) -> None:
        """epoch -1: evaluation (no augmentation, no mixing)."""
        self.epoch = epoch

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        columns, indices = rows["columns"], rows["indices"]
        images = [decode_row(*item) for item in zip(columns["image"], columns["path"],
                                                    columns["height"], columns["width"])]
        labels = torch.tensor(columns["label"], dtype=torch.long)
        if self.epoch < 0:
            if self.views == 2:  # held-out views: augmented, but the same at every evaluation
                return {**self._views(images, indices), "labels": labels}
            return {"images": self._layout(torch.stack([self._eval(im) for im in images])),
                    "labels": labels}
        if self.views == 2:
            return {**self._views(images, indices), "labels": labels}
        x = self._augmented(images, indices)[0]
        batch = {"images": x, "labels": labels}
        if self.mixup is not None:
            # timm's Mixup draws from NumPy's global generator: seeded by the batch
            with seeded(self.seed, self.epoch, -1, *indices[:1]):
                mixed, targets = self.mixup(x, labels)
            batch.update(images=mixed, targets=targets)
        batch["images"] = self._layout(batch["images"])
        return batch

    def _views(self, images, indices) -> dict[str, torch.Tensor]:
        a, b = self._augmented(images, indices, views=2)
        return {"view_a": self._layout(a), "view_b": self._layout(b)}

    def _augmented(self, images, indices, views: int = 1) -> list[torch.Tensor]:
        """``views`` training views [B, 3, H, W] of the images, each image's from the
        generators seeded by (seed, epoch, index)."""
        done = [[] for _ in range(views)]
        last = (lambda im: im) if self._batched_final else self._final
        with restored_generators():
            for image, index in zip(images, indices):
                reseed(self.seed, self.epoch, index)
                for view in done:
                    view.append(last(self._pil(image)))
        if not self._batched_final:
            return [torch.stack(view) for view in done]
        return [self._to_normalized(view) for view in done]

    def _to_normalized(self, images) -> torch.Tensor:
        """timm's MaybeToTensor + Normalize on a whole batch of PIL images at once (the
        same operations, so the same values: a third of the collator's time per image)."""
        if any(im.mode != "RGB" or im.size != images[0].size for im in images):
            return torch.stack([self._final(im) for im in images])
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # [B, H, W, 3]
        x = x.permute(0, 3, 1, 2).contiguous().float().div(255)  # as ToTensor
        return x.sub_(self._mean).div_(self._std)  # as Normalize
