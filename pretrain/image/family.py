"""What the image families share: the model section, preparing the images, and the
parts of the objective contract that do not depend on the loss (units, data report,
FLOPs, export)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from overture.config import ConfigError, Phase, choice_value

from . import models as image_models
from .data import ImageDataConfig, prepare_images
from .transforms import Augment

log = logging.getLogger(__name__)


@dataclass
class ImageModelConfig:
    """model: section of an image recipe: a timm or torchvision model by name."""

    name: str = "resnet50"
    """timm model name (resnet50, vit_small_patch16_224, ...) or torchvision:NAME."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model constructor (timm: drop_path_rate, img_size,
    channels, layers, ...; torchvision: the builder's)."""
    channels_last: bool = False
    """Train in channels-last memory format (faster convolutions on tensor cores)."""
    init_from: str | None = None
    """Start from trained weights: an image final/ folder (its architecture replaces
    model.name; a new classifier is made for this data's classes), or a .safetensors /
    .pth file of model.name's weights (a timm or torchvision release)."""

    def validate(self) -> None:
        library, arch = image_models.split_name(self.name)
        if not arch:
            raise ConfigError(f"model.name={self.name!r}: give a timm name or torchvision:NAME")
        if library == "timm":
            import timm

            if not timm.is_model(arch):
                import difflib

                close = difflib.get_close_matches(arch, timm.list_models(), n=1)
                raise ConfigError(f"model.name={self.name!r} is not a timm model" + (
                    f" (did you mean {close[0]!r}?)" if close else "")
                    + "; torchvision models are named torchvision:NAME")
        else:
            import torchvision

            if arch not in torchvision.models.list_models():
                raise ConfigError(f"model.name={self.name!r}: torchvision has no model {arch!r}")
        if self.init_from is not None:
            source = Path(self.init_from).expanduser()
            if not source.exists():
                raise ConfigError(f"model.init_from={self.init_from!r}: no such folder or file")
            if source.is_dir() and self.args:
                raise ConfigError(f"model.args={self.args} with model.init_from={self.init_from!r}:"
                                  " the architecture is the checkpoint's; drop model.args")

    def init_folder(self) -> Path | None:
        """model.init_from when it is a folder (a run folder: its final/)."""
        if not self.init_from:
            return None
        source = image_models.final_folder(Path(self.init_from))
        return source if source.is_dir() else None

    def position_limit(self) -> tuple[str, int]:
        return "image_size", 1 << 30  # images have no position table


def augment_from(objective, data: ImageDataConfig, **extra) -> Augment:
    """The Augment of an objective section's transform settings."""
    return Augment(image_size=data.image_size, scale=tuple(objective.scale),
                   hflip=objective.hflip, color_jitter=_jitter(objective.color_jitter),
                   re_prob=getattr(objective, "re_prob", 0.0),
                   interpolation=objective.interpolation, crop_pct=objective.crop_pct,
                   mean=tuple(objective.mean), std=tuple(objective.std), **extra)


def _jitter(value):
    return tuple(value) if isinstance(value, list) else value


def validate_transform_settings(objective) -> None:
    """Checks shared by the image objectives' transform settings."""
    scale = list(objective.scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"objective.scale={objective.scale}: give [min, max] with "
                          "0 < min <= max <= 1 (fractions of the image area)")
    if not 0 <= objective.hflip <= 1:
        raise ConfigError(f"objective.hflip={objective.hflip} must be between 0 and 1")
    if not 0 < objective.crop_pct <= 1:
        raise ConfigError(f"objective.crop_pct={objective.crop_pct} must be in (0, 1]")
    if len(objective.mean) != 3 or len(objective.std) != 3 or min(objective.std) <= 0:
        raise ConfigError("objective.mean and objective.std need 3 values, std positive")
    choice_value("objective.interpolation", objective.interpolation,
                 ("bilinear", "bicubic", "nearest", "random"))
    jitter = objective.color_jitter
    if isinstance(jitter, list) and len(jitter) not in (3, 4):
        raise ConfigError(f"objective.color_jitter={jitter}: one strength, or [brightness, "
                          "contrast, saturation] or [brightness, contrast, saturation, hue]")
    policy = getattr(objective, "auto_augment", None)
    if policy:  # timm parses the policy string only when it builds the transform
        from timm.data import create_transform

        try:
            create_transform(32, is_training=True, auto_augment=policy)
        except (AssertionError, ValueError, KeyError) as err:
            raise ConfigError(f"objective.auto_augment={policy!r} is not a timm policy ({err});"
                              " e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0") from None


class ImageFamily:
    """Shared half of the image objectives (subclasses add the loss and the collator)."""

    model_config = ImageModelConfig
    data_config = ImageDataConfig
    unit: ClassVar[str] = "images"
    auto_class: ClassVar[str | None] = None  # loads with timm / torchvision, not transformers
    labelled: ClassVar[bool] = True
    views: ClassVar[int] = 1
    """Views of each image in a batch (SimCLR: 2), for the FLOPs per image."""
    tokenizer = None  # no vocabulary

    @staticmethod
    def encoder(checkpoint, **options):
        """An ``ImageEncoder`` of a checkpoint of this family (``overture features``):
        pooled features with the checkpoint's evaluation transform."""
        from .features import ImageEncoder

        return ImageEncoder(checkpoint, **options)

    @staticmethod
    def inputs(path) -> list[str]:
        """The image files of ``overture features --input`` (a folder or a .txt list)."""
        from .features import list_images

        return list_images(path)

    @staticmethod
    def probe(checkpoint, data, **options) -> dict:
        """``overture probe``: top-1 of a linear classifier on the frozen features."""
        from .probe import probe

        return probe(checkpoint, data, **options)

    def __init__(self, recipe):
        self.recipe = recipe
        self.stats: dict | None = None
        self._flops: float | None = None
        self._prepared = None

    # ------------------------------------------------------------------ data
    def prepare(self, phase: Phase, progress: bool = True):
        """The prepared images (the same for every phase: prepared once per objective)."""
        if self._prepared is not None:
            return self._prepared
        data = prepare_images(self.recipe.data, labelled=self.labelled, progress=progress)
        self._prepared, self.stats = data, data.stats
        if data.stats.get("train_unreadable_skipped") or data.stats.get("eval_unreadable_skipped"):
            log.warning("%d training and %d held-out images could not be read and were "
                        "skipped (listed above when first prepared)",
                        data.stats.get("train_unreadable_skipped", 0),
                        data.stats.get("eval_unreadable_skipped", 0))
        return data

    @property
    def class_names(self) -> list[str]:
        return list((self.stats or {}).get("class_names") or [])

    def data_report(self, data, phase: Phase) -> dict[str, float]:
        stats = data.stats
        train = max(stats["train_examples"], 1)
        report = {"train_examples": stats["train_examples"],
                  "eval_examples": stats["eval_examples"], "classes": stats["classes"],
                  "unreadable_skipped": stats.get("train_unreadable_skipped", 0)
                  + stats.get("eval_unreadable_skipped", 0),
                  "stored_decoded": stats.get("decoded", 0)}
        counts = [stats.get(f"train_label_{i}", 0) for i in range(stats["classes"])]
        if counts:
            report["largest_class_fraction"] = max(counts) / train
        return report

    # ------------------------------------------------------------------ model
    def _backbone(self, num_classes: int) -> nn.Module:
        """model.name freshly initialised, or the weights of model.init_from, with a
        classifier for ``num_classes`` (0: none)."""
        cfg = self.recipe.model
        meta = torch.empty(0).device.type == "meta"  # size estimates: no weights to read
        folder = cfg.init_folder()
        if folder is not None:
            if not image_models.is_image_checkpoint(folder):
                raise ConfigError(f"model.init_from={cfg.init_from!r}: not an image checkpoint "
                                  "(config.json of a timm / torchvision model)")
            if meta:
                name, args = self.architecture()
                return image_models.create(name, num_classes, args)
            model, _ = image_models.load(folder)
            # transfer: a new classifier even for as many classes as the checkpoint's
            # (its rows are the checkpoint's classes, e.g. digits, not this data's)
            image_models.set_head(model, num_classes)
        else:
            name, args = self.architecture()
            model = image_models.create(name, num_classes, args)
            if cfg.init_from and not meta:
                image_models.load_weights_file(model, Path(cfg.init_from).expanduser(),
                                               cfg.name)
        if not meta:
            self._check_input_size(model)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _check_input_size(self, model: nn.Module) -> None:
        """One forward pass of two blank images at data.image_size (in evaluation mode,
        no gradient): a model that cannot take that size fails here, in one line, not at
        the first training step."""
        size = self.recipe.data.image_size
        training = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(2, 3, size, size))
        except (RuntimeError, AssertionError, ValueError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"model.name={self.architecture()[0]!r} cannot take "
                              f"data.image_size={size} inputs ({message}); choose another size "
                              "or set the model's own size in model.args") from None
        finally:
            model.train(training)

    def frozen_models(self) -> dict[str, nn.Module]:
        return {}

    def count_units(self, batch) -> torch.Tensor:
        key = "images" if "images" in batch else "view_a"
        return torch.tensor(len(batch[key]))

    def flops_per_unit(self, phase: Phase) -> float:
        """3x the forward FLOPs of one image (forward + backward), counted once with
        torch's FlopCounterMode on the meta device."""
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            size = self.recipe.data.image_size
            try:
                with torch.device("meta"):
                    models = self.build_models()
                    x = torch.empty(2, 3, size, size)  # BatchNorm needs 2 in training mode
                    with FlopCounterMode(display=False) as counter:
                        for model in models.values():
                            model.eval()(x)  # the same FLOPs; no batch statistics needed
                self._flops = 3.0 * counter.get_total_flops() / 2 * self.views
            except Exception:  # noqa: BLE001  (an operator without a meta kernel)
                self._flops = 0.0
        return self._flops

    def export_model(self, model: nn.Module, state: dict, folder: Path,
                     num_classes: int) -> None:
        """final/ of ``model`` with the weights ``state``, in its library's format, with
        the class names and the evaluation preprocessing (pretrained_cfg)."""
        obj, data = self.recipe.objective, self.recipe.data
        name, args = self.architecture()
        image_models.export(model, state, folder, name, args, num_classes, self.class_names,
                            data.image_size, obj.mean, obj.std, obj.crop_pct,
                            obj.interpolation if obj.interpolation != "random" else "bilinear")

    def architecture(self) -> tuple[str, dict]:
        """(model name, constructor arguments): model.name and model.args, or those of
        model.init_from's folder."""
        cfg = self.recipe.model
        folder = cfg.init_folder()
        if folder is not None:
            return image_models.checkpoint_architecture(folder)
        return cfg.name, image_models.sized_args(cfg.name, cfg.args, self.recipe.data.image_size)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training images on this launch."""
        from overture.launch import world_size

        examples = (self.stats or {}).get("train_examples", 0)
        return self.recipe.steps_per_epoch(examples, world_size())


def ceil_steps(epochs: float, per_epoch: int) -> int:
    """Optimizer steps in ``epochs`` (a fraction counts as a started step)."""
    return math.ceil(epochs * per_epoch) if epochs else 0
