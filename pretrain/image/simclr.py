"""SimCLR (Chen et al. 2020): contrastive self-supervised pretraining of any timm /
torchvision backbone on images without labels.

Each image gives two views (random resized crop, flip, colour jitter with p=0.8,
greyscale with p=0.2, Gaussian blur; timm's ``create_transform``); the backbone's pooled
features go through a 2-layer MLP projection head; the NT-Xent loss asks each view to
pick its partner among the 2N - 1 other views of the batch at temperature tau. On
several processes the projections of every process are gathered (with their gradient),
so the negatives are the whole global batch, as the paper's all-core batch. Gradient
accumulation does not enlarge the set of negatives (each micro-batch is compared
within itself): with it the loss is another one, and the engine says so.

final/ holds the backbone alone (no classifier, no projection head), in timm's or
torchvision's format: the representation the paper evaluates with a linear probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from overture.config import ConfigError, Phase, fraction

from . import models as image_models
from .family import ImageFamily, augment_from, validate_transform_settings
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageCollator


@dataclass
class SimCLRConfig:
    """objective: section of SimCLR pretraining."""

    name: str = "simclr"
    temperature: float = 0.1
    """tau of NT-Xent (the paper: 0.1 for ImageNet at batch 4096, 0.5 for CIFAR-10)."""
    projection_dim: int = 128
    """Output width of the projection head."""
    projection_hidden: int | None = None
    """Hidden width of the projection head; null: the backbone's feature width."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Random-resized-crop area range."""
    hflip: float = 0.5
    """Horizontal-flip probability."""
    color_jitter: list[float] = field(default_factory=lambda: [0.8, 0.8, 0.8, 0.2])
    """Brightness, contrast, saturation, hue jitter (the paper's strength 1.0)."""
    color_jitter_prob: float = 0.8
    """Probability of colour jitter per view."""
    grayscale_prob: float = 0.2
    """Probability of a greyscale view."""
    gaussian_blur_prob: float = 0.5
    """Probability of Gaussian blur per view (the paper: ImageNet yes, CIFAR no)."""
    crop_pct: float = 0.875
    """Evaluation / features: resize to image_size / crop_pct, centre-crop."""
    interpolation: str = "bilinear"
    """bilinear, bicubic, nearest or random."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel normalisation mean."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel normalisation std."""

    def validate(self) -> None:
        if self.name != "simclr":
            raise ConfigError(f"objective.name={self.name!r}: this section is for 'simclr'")
        if not self.temperature > 0:
            raise ConfigError(f"objective.temperature={self.temperature} must be positive")
        if self.projection_dim < 1 or (self.projection_hidden is not None
                                       and self.projection_hidden < 1):
            raise ConfigError("objective.projection_dim and projection_hidden must be >= 1")
        fraction(self, "objective", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob")
        validate_transform_settings(self)


class SimCLRModel(nn.Module):
    """backbone (pooled features [B, F]) -> projection head -> z [B, projection_dim]."""

    def __init__(self, backbone: nn.Module, hidden: int | None, out: int):
        super().__init__()
        width = image_models.num_features(backbone)
        hidden = hidden or width
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden),
                                        nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(images))


def nt_xent_sums(z_local: torch.Tensor, z_all: torch.Tensor, offset: int,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NT-Xent loss, correct count) of the anchors ``z_local`` [2n, D]: rows
    0..n-1 are first views and n..2n-1 second views of the same n images. Candidates are
    ``z_all`` [2N, D], every process's rows in process order, ``z_local`` at ``offset``
    (first views of all processes first, then second views: see ``_arrange``). Rows are
    L2-normalised; the anchor itself is never a candidate."""
    n2 = z_local.shape[0]
    logits = z_local @ z_all.T / temperature  # [2n, 2N]
    own = torch.arange(n2, device=z_local.device)
    self_cols, partner = _columns(own, n2, offset, z_all.shape[0])
    logits[own, self_cols] = float("-inf")
    loss = F.cross_entropy(logits, partner, reduction="sum")
    correct = (logits.argmax(-1) == partner).sum().float()
    return loss, correct


def _columns(own: torch.Tensor, n2: int, offset: int, total: int):
    """Columns of each anchor itself and of its partner view in the gathered matrix."""
    n, half = n2 // 2, total // 2
    first = own < n
    index = torch.where(first, own, own - n) + offset // 2  # image index, global
    self_cols = torch.where(first, index, index + half)
    partner = torch.where(first, index + half, index)
    return self_cols, partner


def _gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows (with their gradient) and this process's offset."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # its deprecation notice; the replacement is private
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(z.contiguous())  # list of [2n, D] per process; backward sums
    return torch.cat(parts), dist.get_rank() * z.shape[0]


def _arrange(z_local: torch.Tensor, z_all: torch.Tensor, world: int):
    """Gathered rows [p0 views a, p0 views b, p1 a, p1 b, ...] reordered to [all a; all
    b], so that image i's second view sits at i + N."""
    n = z_local.shape[0] // 2
    parts = z_all.view(world, 2, n, -1)
    return torch.cat([parts[:, 0].reshape(world * n, -1), parts[:, 1].reshape(world * n, -1)])


class SimCLR(ImageFamily):
    """The objective contract for SimCLR."""

    objective_config = SimCLRConfig
    heads = ("contrastive",)
    labelled = False
    views = 2
    batch_coupled: ClassVar[bool] = True
    example_outputs = ("embedding_a", "embedding_b")

    def __init__(self, recipe):
        super().__init__(recipe)
        self.eval_group = recipe.train.batch_size

    def collator(self, phase: Phase) -> ImageCollator:
        obj = self.recipe.objective
        self.eval_group = phase.batch_size
        augment = augment_from(obj, self.recipe.data, color_jitter_prob=obj.color_jitter_prob,
                               grayscale_prob=obj.grayscale_prob,
                               gaussian_blur_prob=obj.gaussian_blur_prob)
        return ImageCollator(augment, self.recipe.train.seed, views=2,
                             channels_last=self.recipe.model.channels_last)

    def build_models(self, vocab_size: int | None = None) -> dict[str, nn.Module]:
        obj = self.recipe.objective
        return {"model": SimCLRModel(self._backbone(0), obj.projection_hidden,
                                     obj.projection_dim)}

    def updates(self):
        from overture.objective import Update

        return [Update("model", ("model",), self.heads)]

    def forward(self, models, batch, update) -> dict[str, torch.Tensor]:
        a, b = batch["view_a"], batch["view_b"]
        # one pass over both views: BatchNorm statistics cover the 2n views, as in SimCLR
        z = F.normalize(models["model"](torch.cat([a, b])).float(), dim=-1)  # [2n, D]
        if update is None:  # evaluation: scored over fixed groups in score()
            n = len(a)
            return {"contrastive_loss_sum": torch.zeros((), device=z.device),
                    "embedding_a": z[:n].detach(), "embedding_b": z[n:].detach()}
        gathered, offset = _gather(z)
        world = gathered.shape[0] // z.shape[0]
        z_all = _arrange(z, gathered, world) if world > 1 else gathered
        loss, correct = nt_xent_sums(z, z_all, offset, self.recipe.objective.temperature)
        return {"contrastive_loss_sum": loss, "contrastive_correct": correct}

    def target_counts(self, batch) -> dict[str, torch.Tensor]:
        return {"contrastive": torch.tensor(2 * len(batch["view_a"]),
                                            device=batch["view_a"].device)}

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        n = max(counts.get("contrastive", 0.0), 1.0)
        loss = sums["contrastive_loss_sum"] / n
        out = {"loss": loss, "contrastive_loss": loss}
        if "contrastive_correct" in sums:
            out["contrastive_accuracy"] = sums["contrastive_correct"] / n
        return out

    def score(self, examples: dict[str, np.ndarray]) -> dict[str, float]:
        """Held-out NT-Xent and partner accuracy over consecutive groups of
        train.batch_size images (the same groups whatever the number of processes), and
        the mean cosine similarity of the two views (alignment)."""
        a = torch.from_numpy(examples["embedding_a"]).float()
        b = torch.from_numpy(examples["embedding_b"]).float()
        loss = correct = 0.0
        for start in range(0, len(a), self.eval_group):
            z = torch.cat([a[start:start + self.eval_group], b[start:start + self.eval_group]])
            group_loss, group_correct = nt_xent_sums(z, z, 0, self.recipe.objective.temperature)
            loss, correct = loss + group_loss.item(), correct + group_correct.item()
        n = max(2 * len(a), 1)
        return {"loss": loss / n, "contrastive_loss": loss / n,
                "contrastive_accuracy": correct / n,
                "alignment": float((a * b).sum(-1).mean()) if len(a) else 0.0}

    def export(self, models, state_dicts, folder: Path) -> None:
        """final/: the backbone without classifier or projection head."""
        state = {k.removeprefix("backbone."): v for k, v in state_dicts["model"].items()
                 if k.startswith("backbone.")}
        self.export_model(models["model"].backbone, state, folder, 0)
