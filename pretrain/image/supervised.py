"""Supervised image classification ("image"): any timm / torchvision model trained from
scratch, or fine-tuned from a checkpoint (transfer), on the shared engine.

The training recipe is timm's: RandAugment / random erasing (``create_transform``),
mixup / cutmix with label smoothing (``timm.data.Mixup``; soft-target cross-entropy),
a weight EMA (``timm.utils.ModelEmaV3``) that is evaluated and exported, cosine decay
after warmup (train.lr_schedule), channels-last and mixed precision. Evaluation reports
top-1 and top-5 accuracy. Transfer: ``model.init_from`` names the checkpoint, the
classifier is new, and ``objective.freeze_backbone_epochs`` trains only the classifier
for the first epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from overture.config import ConfigError, Phase, fraction
from overture.objective import Update

from . import models as image_models
from .family import ImageFamily, augment_from, ceil_steps, validate_transform_settings
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageCollator


@dataclass
class ClassifyImagesConfig:
    """objective: section of supervised image training."""

    name: str = "image"
    num_classes: int | None = None
    """Classes of the classifier; null: the number of classes in the data."""
    label_smoothing: float = 0.1
    """Label smoothing of the training targets (also inside mixup's targets)."""
    mixup_alpha: float = 0.0
    """Beta(alpha, alpha) of mixup; 0 turns it off."""
    cutmix_alpha: float = 0.0
    """Beta(alpha, alpha) of cutmix; 0 turns it off."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (mixup or cutmix on)."""
    switch_prob: float = 0.5
    """With both on: probability of cutmix instead of mixup for a batch."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy (RandAugment "rand-m9-mstd0.5-inc1", "augmix-...",
    "original"); null: none."""
    re_prob: float = 0.0
    """Random-erasing probability."""
    hflip: float = 0.5
    """Horizontal-flip probability (0 for digits and text-like images)."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Random-resized-crop area range."""
    color_jitter: float = 0.4
    """Colour-jitter strength (ignored when auto_augment is set, as in timm)."""
    crop_pct: float = 0.875
    """Evaluation: resize to image_size / crop_pct, centre-crop image_size."""
    interpolation: str = "bilinear"
    """bilinear, bicubic, nearest or random."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel normalisation mean."""
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel normalisation std."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights (e.g. 0.9998); 0: off. The
    EMA is what evaluation reports and final/ holds."""
    ema_warmup: bool = False
    """Ramp the EMA decay up over the first steps (timm's warmup)."""
    freeze_backbone_epochs: float = 0.0
    """Transfer: train only the new classifier for this many epochs first."""

    def validate(self) -> None:
        if self.name != "image":
            raise ConfigError(f"objective.name={self.name!r}: this section is for 'image'")
        fraction(self, "objective", "label_smoothing", "mix_prob", "switch_prob", "re_prob")
        for key in ("mixup_alpha", "cutmix_alpha", "freeze_backbone_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)} must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"objective.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"objective.num_classes={self.num_classes} must be at least 2")
        validate_transform_settings(self)


class ClassifyImages(ImageFamily):
    """The objective contract for supervised image classification."""

    objective_config = ClassifyImagesConfig
    heads = ("cls",)

    def __init__(self, recipe):
        super().__init__(recipe)
        self.ema = None
        self._model: nn.Module | None = None
        obj = recipe.objective
        for i, phase in enumerate(recipe.resolved_phases()):
            where = f"phases[{i}].batch_size" if recipe.phases else "train.batch_size"
            if phase.batch_size < 2:  # BatchNorm needs two images to normalise a batch
                raise ConfigError(f"{where}={phase.batch_size}: use at least 2 images")
            if (obj.mixup_alpha or obj.cutmix_alpha) and phase.batch_size % 2:
                raise ConfigError(f"{where}={phase.batch_size} must be even with mixup / "
                                  "cutmix (timm's Mixup mixes each image with its mirror in "
                                  "the batch)")

    @property
    def num_classes(self) -> int:
        """objective.num_classes, or the data's (once prepared; 1,000 for a size estimate
        before it)."""
        given = self.recipe.objective.num_classes
        if self.stats is None:
            return given or 1000
        found = self.stats["classes"]
        if found < 2 and given is None:
            raise ConfigError(f"data.source {self.recipe.data.source}: {found} class found; a "
                              "classifier needs at least 2 (an ImageFolder tree has one "
                              "subfolder per class)")
        if given is not None and found and given < found:
            raise ConfigError(f"objective.num_classes={given} but data.source has {found} "
                              f"classes; raise it or leave it null")
        return given or found

    def collator(self, phase: Phase) -> ImageCollator:
        obj = self.recipe.objective
        mixup = None
        if obj.mixup_alpha > 0 or obj.cutmix_alpha > 0:
            from timm.data import Mixup

            mixup = Mixup(mixup_alpha=obj.mixup_alpha, cutmix_alpha=obj.cutmix_alpha,
                          prob=obj.mix_prob, switch_prob=obj.switch_prob,
                          label_smoothing=obj.label_smoothing, num_classes=self.num_classes)
        augment = augment_from(obj, self.recipe.data, auto_augment=obj.auto_augment)
        return ImageCollator(augment, self.recipe.train.seed, mixup=mixup,
                             channels_last=self.recipe.model.channels_last)

    # ------------------------------------------------------------------ model
    def build_models(self, vocab_size: int | None = None) -> dict[str, nn.Module]:
        return {"model": self._backbone(self.num_classes)}

    def updates(self) -> list[Update]:
        return [Update("model", ("model",), self.heads)]

    def stateful(self, models: dict[str, nn.Module]) -> list:
        """The weight EMA (objective.ema_decay), saved in every checkpoint."""
        self._model = models["model"]
        if not self.recipe.objective.ema_decay:
            return []
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(self._model, decay=self.recipe.objective.ema_decay,
                              use_warmup=self.recipe.objective.ema_warmup)
        return [self.ema]

    def after_update(self, update: Update, step: int) -> None:
        """The EMA takes the weights of this optimizer step."""
        if self.ema is not None:
            self.ema.update(self._model, step=step + 1)

    def held_parameters(self, models, step: int) -> list[nn.Parameter]:
        """The backbone during the first objective.freeze_backbone_epochs."""
        epochs = self.recipe.objective.freeze_backbone_epochs
        if not epochs or step >= ceil_steps(epochs, self.steps_per_epoch()):
            return []
        model = models["model"]
        inner = getattr(model, "module", model)  # DDP
        head = image_models.classifier_parameters(inner)
        return [p for p in inner.parameters() if id(p) not in head]

    # ------------------------------------------------------------------ loss
    def forward(self, models, batch, update) -> dict[str, torch.Tensor]:
        training = update is not None
        model = models["model"] if training or self.ema is None else self.ema.module
        logits = model(batch["images"]).float()  # [B, C]
        labels = batch["labels"]
        if training and "targets" in batch:  # mixup / cutmix: soft (smoothed) targets
            loss = -(batch["targets"] * F.log_softmax(logits, -1)).sum()
        else:
            smoothing = self.recipe.objective.label_smoothing if training else 0.0
            loss = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="sum")
        out = {"cls_loss_sum": loss,
               "cls_top1": (logits.argmax(-1) == labels).sum().float()}
        if logits.shape[1] > 5:  # top-5 of 5 classes or fewer is always 1
            hits = logits.topk(5, dim=-1).indices == labels[:, None]  # [B, 5]
            out["cls_top5"] = hits.any(-1).sum().float()
        return out

    def target_counts(self, batch) -> dict[str, torch.Tensor]:
        return {"cls": torch.tensor(len(batch["labels"]), device=batch["labels"].device)}

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        n = max(counts.get("cls", 0.0), 1.0)
        loss = sums["cls_loss_sum"] / n
        out = {"loss": loss, "cls_loss": loss, "top1": sums["cls_top1"] / n}
        if "cls_top5" in sums:
            out["top5"] = sums["cls_top5"] / n
        return out

    # ------------------------------------------------------------------ export
    def export(self, models, state_dicts, folder: Path) -> None:
        """final/: the classifier (its EMA when objective.ema_decay is on) in timm's or
        torchvision's format, with the class names."""
        state = (self.ema.module.state_dict() if self.ema is not None
                 else state_dicts["model"])
        self.export_model(models["model"], state, folder, self.num_classes)
