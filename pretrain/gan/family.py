"""Text-to-image GANs on the shared engine: GAN-INT-CLS ("gan-int-cls", Reed et al. 2016)
and a DF-GAN-style one-stage model ("dfgan", Tao et al. 2022).

Two updates: the discriminator every step, the generator every ``objective.d_steps``-th
(``Update.every``), each with its own optimizer settings (``train.updates.NAME``). The
text encoder is frozen by default: captions are embedded once while preparing
(``pretrain/gan/text.py``). With ``objective.train_text_encoder`` it is a third model,
stepped by a third update, ``text_encoder``, on the discriminator's backward
(``Update.with_previous``) with its own settings (lr 1e-4 and Adam's usual betas unless
``train.updates.text_encoder`` says otherwise). An EMA of the generator makes every
sample, the evaluation's and final/'s. Everything random in a step (noise, wrong captions, the augmentation's
noise) is drawn by the collator from (seed, epoch, example), so a resumed run and an
accumulated step are the uninterrupted run and the one big batch.
With ``objective.diff_augment``, every image D scores while training, real or generated,
is first augmented (DiffAugment, pretrain/gan/augment.py), with uniforms the collator
draws in the same way.

Discriminator losses (per example, summed; the engine divides by the batch):
  gan-int-cls: the matching-aware loss
      -log D(x, h) - 1/2 [log(1 - D(x, h_wrong)) + log(1 - D(G(z, h), h))]
  dfgan: the hinge loss with the matching-aware gradient penalty
      relu(1 - D(x, h)) + 1/2 [relu(1 + D(x, h_wrong)) + relu(1 + D(G(z, h), h))]
      + k ||grad_(x, h) D(x, h)||^p
Generator losses: -log D(G(z, h), h) plus the INT term -log D(G(z, h_int), h_int) on
h_int = b h + (1 - b) h_other, and the conditioning augmentation's KL (gan-int-cls);
-D(G(z, h), h) (dfgan).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from overture.config import Phase, choice_value, fraction
from overture.errors import ConfigError
from overture.objective import Update

from . import augment, networks
from .captions import (ATTRIBUTES, CaptionedImagesConfig, Captions, attribute_classes,
                       captions_for, measure)

log = logging.getLogger(__name__)

GENERATOR_FILE, DISCRIMINATOR_FILE, ENCODER_FOLDER = ("generator.safetensors",
                                                      "discriminator.safetensors", "text_encoder")


@dataclass
class GanModelConfig:
    """model: section of a text-to-image recipe (the family picks the architecture)."""

    noise_dim: int = 100
    """Size of the noise z."""
    condition_dim: int = 128
    """Size the text embedding is projected to (gan-int-cls, a backbone discriminator and
    the conditioning augmentation; dfgan's generator otherwise fuses it whole)."""
    generator_width: int = 64
    """Channels of the generator's last block (doubled towards 4x4)."""
    discriminator_width: int = 64
    """Channels of the discriminator's first block (doubled towards 4x4)."""
    init_from: str | None = None
    """Start both players from an earlier GAN checkpoint of this family (a final/ or a run
    folder holding one), to fine-tune on new images and captions."""
    discriminator_backbone: str | None = None
    """An overture image checkpoint (timm; supervised or SimCLR final/) whose backbone
    becomes the discriminator's image encoder."""

    def validate(self) -> None:
        for key in ("noise_dim", "condition_dim", "generator_width", "discriminator_width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.init_from is not None:
            folder = _final(self.init_from)
            if not (folder / GENERATOR_FILE).is_file():
                raise ConfigError(f"model.init_from={self.init_from!r}: not a GAN checkpoint "
                                  f"(no {GENERATOR_FILE} there or in its final/)")
        if self.discriminator_backbone is not None:
            from overture.pretrain.image import models as image_models

            folder = image_models.final_folder(Path(self.discriminator_backbone))
            if not image_models.is_image_checkpoint(folder):
                raise ConfigError(f"model.discriminator_backbone={self.discriminator_backbone!r}"
                                  ": not an image checkpoint (an image or simclr final/)")
            library = json.loads((folder / "config.json").read_text()).get("library", "timm")
            if library != "timm":
                raise ConfigError(f"model.discriminator_backbone={self.discriminator_backbone!r}"
                                  ": a torchvision model; the backbone must be a timm one "
                                  "(its forward_features gives the feature map)")

    def position_limit(self) -> tuple[str, int]:
        return "image_size", 1 << 30  # images have no position table


FAMILY_KEYS = {"gan-int-cls": {"interpolation_weight": 1.0, "interpolation_beta": 0.5},
               "dfgan": {"gp_weight": 2.0, "gp_power": 6.0}}
"""Objective keys of one family, with its defaults; the other family refuses them."""


@dataclass
class GanObjectiveConfig:
    """objective: section of a text-to-image recipe."""

    name: str = "gan-int-cls"
    text_encoder: str = ""
    """The text encoder: an overture final/ (or run folder), a transformers encoder folder
    or a Hub name."""
    text_encoder_init: str = "pretrained"
    """pretrained, or random (the same architecture, fresh weights: an ablation)."""
    text_pooling: str = "mean"
    """cls, mean, max or pooler, as `overture features --pooling`."""
    text_layer: int = -1
    """Hidden state pooled (-1: the last)."""
    train_text_encoder: bool = False
    """Fine-tune the text encoder on the discriminator's matching-aware loss (a third
    update, ``text_encoder``, on D's backward, with its own ``train.updates.text_encoder``
    settings); it is exported in final/text_encoder. false: frozen, captions embedded
    once."""
    d_steps: int = 1
    """Discriminator steps per generator step (the generator's Update.every)."""
    # The keys of one family are refused by the other, not ignored; null is the family's
    # default, filled in by validate.
    interpolation_weight: float | None = None
    """gan-int-cls: weight of the INT term (0: off; null: 1)."""
    interpolation_beta: float | None = None
    """gan-int-cls: h_int = beta h + (1 - beta) h_other (null: 0.5)."""
    conditioning_augmentation: bool = False
    """StackGAN's sampled condition with its KL term: gan-int-cls's projection, or a
    ``model.condition_dim`` projection in front of dfgan's fusion blocks."""
    kl_weight: float | None = None
    """Weight of the conditioning augmentation's KL term (null: StackGAN's 2)."""
    gp_weight: float | None = None
    """dfgan: k of the matching-aware gradient penalty (0: off; null: 2)."""
    gp_power: float | None = None
    """dfgan: p of the matching-aware gradient penalty (null: 6)."""
    ema_decay: float = 0.999
    """Decay of the generator's EMA, which makes every sample (0: the generator itself)."""
    hflip: float = 0.0
    """Horizontal-flip probability of training images (0 for digits and text)."""
    diff_augment: list[str] = field(default_factory=list)
    """DiffAugment (Zhao et al. 2020) of every image D sees while training, real and
    generated: any of color, translation, cutout, applied in the order given ([]: off).
    Keeps D from memorising a small image set."""
    judge: str | None = None
    """An image classifier checkpoint trained on these images' classes (an image final/):
    caption consistency, and FID's feature network unless Inception-v3 is present."""
    fid_network: str = "auto"
    """auto (Inception-v3 when torch-fidelity's weights are on this machine, else the
    judge), inception, or judge."""
    grid_prompts: list[str] | None = None
    """Rows of the sample grid; null: one held-out caption per class (or the first 8)."""
    grid_columns: int = 8
    """Noise draws per prompt in the sample grid."""

    def validate(self) -> None:
        choice_value("objective.name", self.name, ("gan-int-cls", "dfgan"))
        if not self.text_encoder:
            raise ConfigError("objective.text_encoder is empty: give an overture final/ (e.g. "
                              "runs/bert-tiny after `overture pretrain bert-tiny`), a "
                              "transformers encoder folder or a Hub name")
        choice_value("objective.text_encoder_init", self.text_encoder_init,
                     ("pretrained", "random"))
        choice_value("objective.text_pooling", self.text_pooling, ("cls", "mean", "max", "pooler"))
        choice_value("objective.fid_network", self.fid_network, ("auto", "inception", "judge"))
        if not isinstance(self.d_steps, int) or self.d_steps < 1:
            raise ConfigError(f"objective.d_steps={self.d_steps} must be a positive integer "
                              "(discriminator steps per generator step)")
        self._family_defaults()
        fraction(self, "objective", "hflip")
        if self.interpolation_beta is not None:
            fraction(self, "objective", "interpolation_beta")
        for key in ("interpolation_weight", "kl_weight", "gp_weight", "gp_power"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"objective.{key}={value} must be a finite number >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"objective.ema_decay={self.ema_decay} must be in [0, 1)")
        for name in self.diff_augment:
            choice_value("objective.diff_augment", name, tuple(augment.OPERATIONS))
        if len(set(self.diff_augment)) < len(self.diff_augment):
            raise ConfigError(f"objective.diff_augment={self.diff_augment}: name each "
                              "operation once")
        if self.grid_columns < 1:
            raise ConfigError(f"objective.grid_columns={self.grid_columns} must be >= 1")
        if self.fid_network == "judge" and self.judge is None:
            raise ConfigError("objective.fid_network=judge needs objective.judge")

    def _family_defaults(self) -> None:
        """Refuse the other family's keys and a KL weight without the augmentation; fill
        in this family's defaults where the recipe left them null."""
        for family, keys in FAMILY_KEYS.items():
            for key, default in keys.items():
                if family == self.name:
                    if getattr(self, key) is None:
                        setattr(self, key, default)
                elif getattr(self, key) is not None:
                    raise ConfigError(f"objective.{key}={getattr(self, key)}: a {family} "
                                      f"setting, unused by {self.name}; remove it")
        if self.conditioning_augmentation:
            if self.kl_weight is None:
                self.kl_weight = 2.0
        elif self.kl_weight is not None:
            raise ConfigError(f"objective.kl_weight={self.kl_weight}: the weight of the "
                              "conditioning augmentation's KL term, which is off; set "
                              "objective.conditioning_augmentation=true or remove it")


class CaptionCollator:
    """Rows -> a batch: ``images`` [B, 3, S, S] in [-1, 1]; ``text`` [B, E] (one of the
    image's captions), ``wrong`` [B, E] (a caption of another image, of another class when
    labelled), ``other`` [B, E] (for the INT term); ``noise`` [B, Z], ``eps`` and
    ``eps_int`` [B, C] (the conditioning augmentation's); ``labels`` [B] (-1: none),
    ``attributes`` [B, 3] (-1: none); ``text_index``, ``wrong_index``, ``other_index`` [B]
    (the three captions' rows of the table, for a trained text encoder); while training
    with DiffAugment, ``augment_real`` and ``augment_fake`` [B, A] (its uniforms, for the
    real and the generated images; pretrain/gan/augment.py). Each example's
    draws are seeded by (seed, epoch, index); at evaluation (epoch -1) they are the same
    at every evaluation.

    It holds only arrays (the embedding table, caption indices, labels), so that loader
    workers receive those, not the objective and its models."""

    def __init__(self, table: np.ndarray, captions: Captions, labels: dict[str, np.ndarray],
                 image_size: int, noise_dim: int, cond_dim: int, hflip: float, seed: int,
                 augment_width: int = 0):
        self.table, self.captions, self.labels = table, captions, labels
        self.size, self.noise_dim, self.cond_dim = image_size, noise_dim, cond_dim
        self.hflip, self.seed, self.augment_width = hflip, seed, augment_width
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        from overture.pretrain.image.data import decode_row

        columns, indices, table = rows["columns"], rows["indices"], self.table
        held_out = self.epoch < 0
        split = "eval" if held_out else "train"
        captions, labels = getattr(self.captions, split), self.labels[split]
        attributes = getattr(self.captions, f"{split}_attributes")
        augmenting = self.augment_width > 0 and not held_out
        out: dict[str, list] = {k: [] for k in ("images", "text", "wrong", "other", "noise",
                                                "eps", "eps_int")}
        if augmenting:
            out.update(augment_real=[], augment_fake=[])
        chosen: dict[str, list] = {"text_index": [], "wrong_index": [], "other_index": []}
        for index, item in zip(indices, zip(columns["image"], columns["path"],
                                            columns["height"], columns["width"])):
            rng = np.random.default_rng([self.seed, self.epoch + 1, int(index)])
            image = _to_tensor(decode_row(*item), self.size)
            if not held_out and rng.random() < self.hflip:
                image = image.flip(-1)
            mine = captions[index]
            caption = mine[index % len(mine)] if held_out else mine[rng.integers(len(mine))]
            wrong = _other(rng, labels, index)
            other = _other(rng, labels, index, same_class_ok=True)
            picked = (caption, _pick(rng, captions[wrong]), _pick(rng, captions[other]))
            out["images"].append(image)
            for key, row in zip(("text", "wrong", "other"), picked):
                out[key].append(table[row])
                chosen[f"{key}_index"].append(row)
            out["noise"].append(rng.standard_normal(self.noise_dim, dtype=np.float32))
            out["eps"].append(rng.standard_normal(self.cond_dim, dtype=np.float32))
            out["eps_int"].append(rng.standard_normal(self.cond_dim, dtype=np.float32))
            if augmenting:  # drawn last: without DiffAugment the other draws are unchanged
                for key in ("augment_real", "augment_fake"):
                    out[key].append(rng.random(self.augment_width, dtype=np.float32))
        batch = {"images": torch.stack(out.pop("images"))}
        batch.update({k: torch.from_numpy(np.stack(v)) for k, v in out.items()})
        batch.update({k: torch.tensor(v, dtype=torch.long) for k, v in chosen.items()})
        index = np.asarray(indices)
        batch["labels"] = torch.from_numpy(labels[index].astype(np.int64))
        batch["attributes"] = (torch.from_numpy(attributes[index].astype(np.int64))
                               if attributes is not None
                               else torch.full((len(index), 3), -1, dtype=torch.long))
        return batch


def _pick(rng, choices: list[int]) -> int:
    return choices[rng.integers(len(choices))]


def _other(rng, labels: np.ndarray, index: int, same_class_ok: bool = False) -> int:
    """Another image's index: of another class when the images are labelled (a few tries;
    a one-class set takes any other image)."""
    n = len(labels)
    if n < 2:
        return index
    for _ in range(16):
        j = int(rng.integers(n - 1))
        j += j >= index  # never the image itself
        if same_class_ok or labels[index] < 0 or labels[j] != labels[index]:
            return j
    return j


def _to_tensor(image, size: int) -> torch.Tensor:
    """A PIL image -> [3, size, size] in [-1, 1] (bilinear resize of the whole image)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1


def _final(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / "final" if (path / "final" / GENERATOR_FILE).is_file() else path


class TextToImage:
    """What the two text-to-image families share: data, collation, the two updates, the
    EMA, evaluation metrics, the sample grid, export and ``overture generate``."""

    model_config = GanModelConfig
    objective_config = GanObjectiveConfig
    data_config = CaptionedImagesConfig
    unit: ClassVar[str] = "images"
    auto_class: ClassVar[str | None] = None
    heads = ("d", "g")
    tokenizer = None
    makes_images: ClassVar[bool] = True
    # D runs several times (real, wrong, fake) before one backward: DDP must not
    # re-broadcast its batch-norm buffers in between (an in-place change autograd refuses)
    ddp_options: ClassVar[dict] = {"broadcast_buffers": False}
    sizes: ClassVar[tuple[int, ...]] = ()

    def __init__(self, recipe):
        self.recipe = recipe
        obj, size = recipe.objective, recipe.data.image_size
        if obj.name != self.name:
            raise ConfigError(f"objective.name={obj.name!r}: this section is for {self.name!r}")
        if size not in self.sizes:
            raise ConfigError(f"data.image_size={size}: the {self.name} generator makes "
                              f"{', '.join(map(str, self.sizes))} pixel images")
        for i, phase in enumerate(recipe.resolved_phases()):
            if phase.batch_size < 2:  # batch norm, and a wrong caption needs another image
                where = f"phases[{i}].batch_size" if recipe.phases else "train.batch_size"
                raise ConfigError(f"{where}={phase.batch_size}: use at least 2 images")
        if obj.train_text_encoder and recipe.train.mixed_precision == "fp16":
            raise ConfigError("objective.train_text_encoder=true with train.mixed_precision="
                              "fp16: the encoder steps on the discriminator's backward, which "
                              "one fp16 loss scaler cannot serve twice; use bf16 or no")
        _check_init_encoder(recipe)
        if recipe.train.best_metric in ("caption_consistency", "judge_real_top1") and not obj.judge:
            raise ConfigError(f"train.best_metric={recipe.train.best_metric} needs "
                              "objective.judge (the classifier that measures it); give one "
                              "or set train.best_metric=null")
        self.stats: dict | None = None
        self.captions = self.table = self.labels = None
        self.ema = self._generator = None
        self._prepared = None
        self._frozen: dict[str, nn.Module] | None = None
        self._flops: float | None = None
        self._grid: np.ndarray | None = None

    # ------------------------------------------------------------------ data
    def prepare(self, phase: Phase, progress: bool = True):
        """The prepared images (pretrain/image/data.py), their captions and the caption
        embedding table."""
        if self._prepared is not None:
            return self._prepared
        from overture.pretrain.image.data import prepare_images

        from .captions import check_captions
        from .text import check_encoder, embed_captions

        cfg, obj = self.recipe.data, self.recipe.objective
        if obj.judge is not None and not Path(obj.judge).expanduser().exists():
            raise ConfigError(f"objective.judge={obj.judge!r}: no such folder; train one first "
                              "(`overture pretrain resnet-tiny-digits` for the digits) or set "
                              "objective.judge=null (no caption consistency, no FID)")
        # every check that reads no image comes first: bad input is one line, before work
        self.frozen_models()  # a judge that is not a classifier
        check_encoder(obj.text_encoder)  # its config and tokenizer, not its weights
        check_captions(cfg)
        data = prepare_images(cfg, labelled=False, progress=progress)
        self.captions = captions_for(cfg, data, lambda rows: _images(rows, cfg.image_size))
        self.labels = {"train": np.asarray(data.train["label"], np.int64),
                       "eval": np.asarray(data.eval["label"], np.int64)}
        table = embed_captions(self.captions.texts, self.recipe.objective,
                               cfg.resolved_cache_dir, self.recipe.train.seed, progress)
        # Pooled sentence embeddings share a large common part (mean cosine 0.99 between
        # the digits' captions under bert-tiny): centred and scaled per dimension over
        # the training captions, what differs between captions reaches the networks at
        # the scale of the noise. final/config.json keeps the two vectors for generate.
        used = sorted({i for image in self.captions.train for i in image})
        self.text_mean = table[used].mean(0)
        self.text_std = table[used].std(0) + 1e-6
        self.table = self.standardize(table)
        per_image = [len(c) for c in self.captions.train]
        self.stats = {**data.stats, "captions": len(self.captions.texts),
                      "captions_per_image": float(np.mean(per_image)) if per_image else 0.0,
                      "text_dim": int(self.table.shape[1])}
        self._prepared = data
        return data

    def collator(self, phase: Phase) -> CaptionCollator:
        model = self.recipe.model
        return CaptionCollator(self.table, self.captions, self.labels, self.recipe.data.image_size,
                               model.noise_dim, model.condition_dim,
                               self.recipe.objective.hflip, self.recipe.train.seed,
                               augment.width(self.recipe.objective.diff_augment))

    def data_report(self, data, phase: Phase) -> dict[str, float]:
        stats = self.stats
        report = {"train_examples": stats["train_examples"],
                  "eval_examples": stats["eval_examples"], "classes": stats["classes"],
                  "captions": stats["captions"],
                  "captions_per_image": stats["captions_per_image"],
                  "text_dim": stats["text_dim"],
                  "unreadable_skipped": stats.get("train_unreadable_skipped", 0)
                  + stats.get("eval_unreadable_skipped", 0)}
        if self.captions.train_attributes is not None:
            for i, name in enumerate(ATTRIBUTES):
                values = self.captions.train_attributes[:, i]
                report[f"{name}_largest_class_fraction"] = float(
                    np.bincount(values).max() / len(values))
        return report

    def standardize(self, embeddings: np.ndarray) -> np.ndarray:
        """Encoder embeddings [N, E] -> what the networks take (centred, scaled)."""
        return ((embeddings - self.text_mean) / self.text_std).astype(np.float32)

    # ------------------------------------------------------------------ models
    @property
    def text_dim(self) -> int:
        """Width of the caption embeddings: the table's, or before preparing, the hidden
        size in the encoder folder's config.json (a size estimate)."""
        if self.table is not None:
            return int(self.table.shape[1])
        from .text import encoder_width

        return encoder_width(self.recipe.objective.text_encoder)

    def generator_args(self) -> dict:
        """Constructor arguments of the generator (written to final/config.json)."""
        raise NotImplementedError

    def build_discriminator(self) -> nn.Module:
        raise NotImplementedError

    def build_models(self, vocab_size: int | None = None) -> dict[str, nn.Module]:
        generator = build_generator(self.name, self.generator_args())
        discriminator = self.build_discriminator()
        init = self.recipe.model.init_from
        if init is not None and torch.empty(0).device.type != "meta":
            _load(generator, _final(init) / GENERATOR_FILE, "model.init_from")
            _load(discriminator, _final(init) / DISCRIMINATOR_FILE, "model.init_from")
        models = {"generator": generator, "discriminator": discriminator}
        if self.recipe.objective.train_text_encoder:
            models["text_encoder"] = self._text_encoder()
        return models

    def _text_encoder(self) -> nn.Module:
        """The trained text encoder over every caption (before preparing, for a size
        estimate: over no caption, with the identity standardisation)."""
        from .text import trainable_encoder

        if self.captions is None:
            texts, mean, std = [], np.zeros(self.text_dim), np.ones(self.text_dim)
        else:
            texts, mean, std = self.captions.texts, self.text_mean, self.text_std
        return trainable_encoder(self.recipe.objective, texts, mean, std,
                                 self.recipe.train.seed)

    def _backbone_discriminator(self) -> nn.Module | None:
        """model.discriminator_backbone's D, or None."""
        source = self.recipe.model.discriminator_backbone
        if source is None:
            return None
        from overture.pretrain.image import models as image_models

        folder = image_models.final_folder(Path(source))
        name, args = image_models.checkpoint_architecture(folder)
        if torch.empty(0).device.type == "meta":
            backbone, config = image_models.create(name, 0, args), {}
        else:
            backbone, config = image_models.load(folder, num_classes=0)
        cfg = config.get("pretrained_cfg", {})
        model = self.recipe.model
        return networks.BackboneDiscriminator(
            backbone, image_models.num_features(backbone), cfg.get("mean", [0.5] * 3),
            cfg.get("std", [0.5] * 3), int(cfg.get("input_size", [3, 32, 32])[-1]),
            self.text_dim, model.condition_dim, 2 * model.discriminator_width)

    def frozen_models(self) -> dict[str, nn.Module]:
        """The judge and the FID feature network (when objective.judge / Inception are
        there): used at evaluation, never trained."""
        if self._frozen is None:
            from .metrics import Inception, Judge, local_inception_weights

            obj, self._frozen = self.recipe.objective, {}
            if obj.judge is not None:
                self._frozen["judge"] = Judge(obj.judge)
            weights = local_inception_weights() if obj.fid_network != "judge" else None
            if obj.fid_network == "inception" and weights is None:
                raise ConfigError("objective.fid_network=inception: torch-fidelity's Inception "
                                  "weights are not on this machine; use judge")
            if weights is not None:
                self._frozen["fid"] = Inception(weights)
            elif "judge" in self._frozen:
                self._frozen["fid"] = self._frozen["judge"]
        return self._frozen

    def updates(self) -> list[Update]:
        updates = [Update("discriminator", ("discriminator",), ("d",))]
        if self.recipe.objective.train_text_encoder:
            # on D's backward (the matching-aware loss), with an optimizer of its own: a
            # pretrained encoder wants a smaller lr and Adam's usual betas, not DCGAN's
            updates.append(Update("text_encoder", ("text_encoder",), ("d",), options={
                "lr": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.999}, with_previous=True))
        updates.append(Update("generator", ("generator",), ("g",),
                              every=self.recipe.objective.d_steps))
        return updates

    def stateful(self, models: dict[str, nn.Module]) -> list:
        """The generator's EMA, saved in every checkpoint."""
        self._generator = models["generator"]
        if not self.recipe.objective.ema_decay:
            return []
        from timm.utils import ModelEmaV3

        # timm's warmup: the decay grows as 1 - (1 + n)^(-2/3) up to ema_decay, so that the
        # EMA follows the generator from the start instead of its random first weights
        self.ema = ModelEmaV3(self._generator, decay=self.recipe.objective.ema_decay,
                              use_warmup=True)
        return [self.ema]

    def after_update(self, update: Update, step: int) -> None:
        if update.name == "generator" and self.ema is not None:
            self.ema.update(self._generator, step=step // update.every + 1)

    def sampler(self, models) -> nn.Module:
        """The generator that makes samples: the EMA when there is one."""
        return self.ema.module if self.ema is not None else models["generator"]

    # ------------------------------------------------------------------ losses
    def forward(self, models, batch, update) -> dict[str, torch.Tensor]:
        generator, discriminator = models["generator"], models["discriminator"]
        if "text_encoder" in models:
            batch = self.embedded(models["text_encoder"], batch, update)
        out: dict[str, torch.Tensor] = {}
        if update is None or update.name == "discriminator":
            with torch.no_grad():
                fake, _ = generator(batch["noise"], batch["text"], batch["eps"])
            out["d_loss_sum"] = self.discriminator_loss(discriminator, batch, fake).sum()
        if update is None or update.name == "generator":
            out["g_loss_sum"] = self.generator_loss(generator, discriminator, batch).sum()
        if update is None:
            out.update(self.evaluation_outputs(models, batch))
        return out

    @staticmethod
    def embedded(encoder, batch: dict, update) -> dict:
        """``batch`` with the captions a step uses embedded by the trained ``encoder``:
        with gradients in the discriminator's backward (which the encoder's update
        shares), without in the generator's."""
        name = update.name if update is not None else None
        keys = {"discriminator": ("text", "wrong"),
                "generator": ("text", "other")}.get(name, ("text", "wrong", "other"))
        index = torch.cat([batch[f"{k}_index"] for k in keys])  # [len(keys) * B]
        with torch.set_grad_enabled(name == "discriminator" and torch.is_grad_enabled()):
            rows = encoder(index).split(len(batch["text_index"]))
        return {**batch, **dict(zip(keys, rows))}

    def discriminator_loss(self, discriminator, batch, fake) -> torch.Tensor:
        raise NotImplementedError

    def augmented(self, images: torch.Tensor, batch: dict, which: str) -> torch.Tensor:
        """``images`` as D sees them: through DiffAugment with the batch's ``which``
        ("real" or "fake") uniforms while training, unchanged otherwise."""
        u = batch.get(f"augment_{which}")
        return images if u is None else augment.augment(images, u,
                                                        self.recipe.objective.diff_augment)

    def generator_loss(self, generator, discriminator, batch) -> torch.Tensor:
        raise NotImplementedError

    def target_counts(self, batch) -> dict[str, torch.Tensor]:
        n = torch.tensor(len(batch["images"]), device=batch["images"].device)
        return {"d": n, "g": n}

    def count_units(self, batch) -> torch.Tensor:
        return torch.tensor(len(batch["images"]))

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """``loss`` is the discriminator's (logged at every step); the generator's is
        logged on the steps it ran."""
        out = {}
        if counts.get("d"):
            out["d_loss"] = out["loss"] = sums["d_loss_sum"] / counts["d"]
        if counts.get("g") and "g_loss_sum" in sums:
            out["g_loss"] = sums["g_loss_sum"] / counts["g"]
        return out

    # ------------------------------------------------------------------ evaluation
    @property
    def example_outputs(self) -> tuple[str, ...]:
        keys = ["caption_label"]
        frozen = self.frozen_models()
        if "judge" in frozen:
            keys += ["real_class", "fake_class"]
        if "fid" in frozen:
            keys += ["fid_real", "fid_fake"]
        if self.captions is not None and self.captions.thresholds is not None:
            keys += ["caption_attributes", "fake_attributes"]
        return tuple(keys)

    def evaluation_outputs(self, models, batch) -> dict[str, torch.Tensor]:
        """Per example: the EMA generator's image for the held-out caption, as the judge
        and the FID network see it, beside the real image."""
        frozen = self.frozen_models()
        fake, _ = self.sampler(models)(batch["noise"], batch["text"], None)
        out = {"caption_label": batch["labels"]}
        if "judge" in frozen:
            real_logits, real_features = frozen["judge"](batch["images"])
            fake_logits, fake_features = frozen["judge"](fake)
            out.update(real_class=real_logits.argmax(-1), fake_class=fake_logits.argmax(-1))
        if "fid" in frozen:
            if frozen["fid"] is frozen.get("judge"):
                out.update(fid_real=real_features.float(), fid_fake=fake_features.float())
            else:
                out.update(fid_real=frozen["fid"](batch["images"]).float(),
                           fid_fake=frozen["fid"](fake).float())
        if self.captions is not None and self.captions.thresholds is not None:
            out["caption_attributes"] = batch["attributes"]
            out["fake_attributes"] = attribute_classes(measure(fake), self.captions.thresholds)
        return out

    def score(self, examples: dict[str, np.ndarray]) -> dict[str, float]:
        """Caption consistency (with the judge's top-1 on real images, its ceiling),
        attribute agreement (digits) and FID."""
        from .metrics import consistency, fid

        out = consistency(examples, tuple(ATTRIBUTES))
        if "fid_real" in examples:
            out["fid"] = fid(examples["fid_real"], examples["fid_fake"])
        return out

    def fid_network(self) -> str:
        """The name of FID's feature network, for the reports."""
        network = self.frozen_models().get("fid")
        return getattr(network, "name", "none (no objective.judge, no local Inception-v3)")

    def grid_prompts(self) -> list[str]:
        """objective.grid_prompts, or the first held-out caption of each of the first ten
        classes (the first 8 held-out captions for unlabelled images)."""
        given = self.recipe.objective.grid_prompts
        if given:
            return list(given)
        labels = self.labels["eval"]
        first = {}  # class (or image, unlabelled) -> its first held-out caption
        for i, captions in enumerate(self.captions.eval):
            first.setdefault(int(labels[i]) if labels[i] >= 0 else -1 - i,
                             self.captions.texts[captions[0]])
        if len(labels) and labels[0] >= 0:
            return [first[k] for k in sorted(first)[:10]]
        return list(first.values())[:8]

    def grid_embeddings(self) -> np.ndarray:
        """[prompts, E]: the grid prompts as the networks take them (embedded once; a
        prompt that is not a caption goes through the text encoder)."""
        if self._grid is None:
            prompts = self.grid_prompts()
            known = {t: i for i, t in enumerate(self.captions.texts)}
            missing = [p for p in prompts if p not in known]
            extra = {}
            if missing:
                from .text import load_encoder

                obj = self.recipe.objective
                encoder = load_encoder(obj.text_encoder, obj.text_encoder_init,
                                       self.recipe.train.seed)
                extra = dict(zip(missing, self.standardize(encoder.encode(
                    missing, pooling=obj.text_pooling, layer=obj.text_layer))))
            self._grid = np.stack([self.table[known[p]] if p in known else extra[p]
                                   for p in prompts])
        return self._grid

    def after_evaluate(self, models, step: int, run_dir: Path) -> dict[str, Path]:
        """samples/step-NNNNNN.png: prompts (rows) x fixed noise (columns), by the EMA
        generator; the prompts are in the .txt beside it."""
        path = Path(run_dir) / "samples" / f"step-{step:06d}.png"
        generator = self.sampler(models)
        device = next(generator.parameters()).device
        if "text_encoder" in models:  # trained: the prompts as the encoder reads them now
            with torch.no_grad():
                h = models["text_encoder"].encode_texts(self.grid_prompts())
        else:
            h = torch.from_numpy(self.grid_embeddings()).float()
        images = _sample(generator, h.to(device), self.recipe.objective.grid_columns,
                         self.recipe.model.noise_dim, self.recipe.train.seed)
        _write_grid(images, path, self.recipe.objective.grid_columns)
        path.with_suffix(".txt").write_text("".join(f"{p}\n" for p in self.grid_prompts()),
                                            encoding="utf-8")
        return {"samples": path}

    # ------------------------------------------------------------------ size
    def flops_per_unit(self, phase: Phase) -> float:
        """FLOPs of one image's share of a step: the discriminator update, plus
        1/d_steps of the generator update, each forward and backward as this objective
        runs them (three discriminator pairings, the INT term, the gradient penalty's
        double backward), counted by torch's FlopCounterMode on the meta device."""
        if self._flops is None:
            try:
                self._flops = self._step_flops(batch_size=2) / 2
            except Exception:  # noqa: BLE001  (an operator without a meta kernel)
                self._flops = 0.0
        return self._flops

    def _step_flops(self, batch_size: int, device: str = "meta") -> float:
        """FLOPs of one optimizer step's updates on a batch of ``batch_size`` (the
        generator's weighted by 1/d_steps)."""
        model, size = self.recipe.model, self.recipe.data.image_size
        n = batch_size
        with torch.device(device):
            models = self.build_models()
            batch = {"images": torch.zeros(n, 3, size, size),
                     **{k: torch.zeros(n, self.text_dim) for k in ("text", "wrong", "other")},
                     **{f"{k}_index": torch.zeros(n, dtype=torch.long)
                        for k in ("text", "wrong", "other")},
                     "noise": torch.zeros(n, model.noise_dim),
                     "eps": torch.zeros(n, model.condition_dim),
                     "eps_int": torch.zeros(n, model.condition_dim)}
            total = 0.0
            for update in self.updates():
                if update.with_previous:  # stepped on the previous update's backward
                    continue
                with flop_counter() as counter:
                    out = self.forward(models, batch, update)
                    sum(out[f"{h}_loss_sum"] for h in update.heads).backward()
                total += counter.get_total_flops() / update.every
        return total

    # ------------------------------------------------------------------ export
    def export(self, models, state_dicts, folder: Path) -> None:
        """final/: the generator (its EMA), the discriminator, config.json (what
        ``overture generate`` rebuilds the generator from) and text_encoder/ (the encoder,
        fine-tuned when it was trained, and its tokenizer, so that final/ generates on its
        own)."""
        from safetensors.torch import save_file

        from .text import load_encoder

        obj = self.recipe.objective
        generator = (self.ema.module.state_dict() if self.ema is not None
                     else state_dicts["generator"])
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in generator.items()},
                  str(folder / GENERATOR_FILE))
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dicts["discriminator"].items()},
                  str(folder / DISCRIMINATOR_FILE))
        encoder = load_encoder(obj.text_encoder, obj.text_encoder_init, self.recipe.train.seed)
        if "text_encoder" in state_dicts:  # trained: TextEncoder keeps the model under model.
            encoder.model.load_state_dict({k.removeprefix("model."): v for k, v in
                                           state_dicts["text_encoder"].items()})
        encoder.model.save_pretrained(folder / ENCODER_FOLDER)
        encoder.tokenizer.save_pretrained(folder / ENCODER_FOLDER)
        config = {"overture_gan": self.name, "generator": self.generator_args(),
                  "image_size": self.recipe.data.image_size,
                  "text_pooling": obj.text_pooling, "text_layer": obj.text_layer,
                  "text_encoder": obj.text_encoder, "text_encoder_init": obj.text_encoder_init,
                  "text_encoder_trained": obj.train_text_encoder,
                  "text_mean": self.text_mean.tolist(), "text_std": self.text_std.tolist(),
                  "fid_network": self.fid_network(), "seed": self.recipe.train.seed}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @staticmethod
    def sample(checkpoint: str, prompt: str, n: int = 16, seed: int = 0,
               output: str | None = None) -> str:
        """``overture generate`` for a text-to-image checkpoint: ``n`` images of ``prompt``
        by the exported (EMA) generator, as one PNG grid; returns what was written."""
        from overture.config import check_seed

        from .text import load_encoder

        if output is None or Path(output).suffix.lower() != ".png":
            raise ConfigError(f"--output {output}: give a .png file for the images")
        if not 1 <= n <= 1024:
            raise ConfigError(f"--n={n} must be between 1 and 1024")
        check_seed("--seed", seed)
        if not prompt.strip():
            raise ConfigError("--prompt is empty: describe the image to make")
        if Path(output).exists():
            raise ConfigError(f"--output {output} exists; give a new file name")
        folder = _final(checkpoint)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            kind = config["overture_gan"]
        except (OSError, ValueError, KeyError):
            raise ConfigError(f"--checkpoint {checkpoint}: not a text-to-image final/ "
                              "(no config.json with overture_gan)") from None
        generator = build_generator(kind, config["generator"])
        _load(generator, folder / GENERATOR_FILE, "--checkpoint")
        encoder = load_encoder(str(folder / ENCODER_FOLDER))
        h = encoder.encode([prompt], pooling=config["text_pooling"], layer=config["text_layer"])
        h = (h - np.asarray(config["text_mean"])) / np.asarray(config["text_std"])
        images = _sample(generator.eval(), torch.from_numpy(h).float(), n,
                         config["generator"]["noise_dim"], seed)
        columns = math.ceil(math.sqrt(n))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        _write_grid(images, Path(output), columns, padding=0)
        size = config["image_size"]
        return (f"wrote {output}: {n} images of {size}x{size} in {math.ceil(n / columns)} rows "
                f"of {columns}")


class _Unattributed:
    """Stands for FlopCounterMode's module tracker: totals only. The tracker's hooks fail
    on autograd.grad with respect to inputs (the gradient penalty), which it does not
    support; the total count does not need them."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flop_counter():
    """torch's FlopCounterMode counting totals (``get_total_flops``), gradient penalties
    included."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Unattributed()
    return counter


def _check_init_encoder(recipe) -> None:
    """model.init_from of a run that fine-tuned its text encoder: its players read that
    encoder's embeddings, so objective.text_encoder must be its final/text_encoder."""
    init = recipe.model.init_from
    if init is None:
        return
    folder = _final(init)
    try:
        trained = json.loads((folder / "config.json").read_text()).get("text_encoder_trained")
    except (OSError, ValueError):
        return  # model.init_from's own check names what is wrong
    encoder = folder / ENCODER_FOLDER
    given = Path(recipe.objective.text_encoder).expanduser()
    if trained and given.resolve() != encoder.resolve():
        raise ConfigError(f"model.init_from={init!r} fine-tuned its text encoder, and its "
                          f"players read that encoder's embeddings: set "
                          f"objective.text_encoder={str(encoder)!r} (it stays frozen "
                          "unless objective.train_text_encoder=true)")


def build_generator(kind: str, args: dict) -> nn.Module:
    """A generator of family ``kind`` from its constructor arguments."""
    if kind == "dfgan":
        return networks.DFGANGenerator(**args)
    return networks.DCGANGenerator(**args)


@torch.no_grad()
def _sample(generator: nn.Module, h: torch.Tensor, columns: int, noise_dim: int,
            seed: int) -> torch.Tensor:
    """[len(h) * columns, 3, S, S]: each row one embedding, each column one fixed noise."""
    noise = torch.randn(columns, noise_dim, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(h.device)
    z = noise.repeat(len(h), 1)
    text = h.repeat_interleave(columns, 0)
    training = generator.training
    generator.eval()
    try:
        images, _ = generator(z, text, None)
    finally:
        generator.train(training)
    return images


def _write_grid(images: torch.Tensor, path: Path, columns: int, padding: int = 2) -> None:
    """A PNG grid of [-1, 1] images, written atomically."""
    from torchvision.utils import save_image

    from overture.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_image((images.float().cpu() + 1) / 2, str(tmp), nrow=columns, padding=padding,
                   format="png")


def _load(module: nn.Module, path: Path, key: str) -> None:
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as err:
        raise ConfigError(f"{key}: {path} does not fit this model "
                          f"({str(err).strip().splitlines()[-1].strip()}); the sizes "
                          "(model:, data.image_size, the text encoder) must be the "
                          "checkpoint's") from None


def _images(dataset, size: int) -> torch.Tensor:
    """Every image of a prepared index as [N, 3, size, size] in [-1, 1]."""
    from overture.pretrain.image.data import decode_row

    return torch.stack([_to_tensor(decode_row(*item), size) for item in zip(
        dataset["image"], dataset["path"], dataset["height"], dataset["width"])])


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target),
                                              reduction="none")


class GanIntCls(TextToImage):
    """GAN-INT-CLS (Reed et al. 2016): DCGAN players, the matching-aware discriminator,
    the INT term, and optionally StackGAN's conditioning augmentation."""

    name = "gan-int-cls"
    sizes = (16, 32, 64, 128)

    def generator_args(self) -> dict:
        model = self.recipe.model
        return {"image_size": self.recipe.data.image_size, "noise_dim": model.noise_dim,
                "text_dim": self.text_dim, "cond_dim": model.condition_dim,
                "width": model.generator_width,
                "augment": self.recipe.objective.conditioning_augmentation}

    def build_discriminator(self) -> nn.Module:
        model = self.recipe.model
        return self._backbone_discriminator() or networks.DCGANDiscriminator(
            self.recipe.data.image_size, self.text_dim, model.condition_dim,
            model.discriminator_width)

    def discriminator_loss(self, discriminator, batch, fake) -> torch.Tensor:
        real = self.augmented(batch["images"], batch, "real")
        right, wrong = discriminator(real, [batch["text"], batch["wrong"]])
        (fake_right,) = discriminator(self.augmented(fake, batch, "fake"), [batch["text"]])
        return _bce(right, 1.0) + 0.5 * (_bce(wrong, 0.0) + _bce(fake_right, 0.0))  # [B]

    def generator_loss(self, generator, discriminator, batch) -> torch.Tensor:
        obj = self.recipe.objective
        fake, kl = generator(batch["noise"], batch["text"], batch["eps"])
        (score,) = discriminator(self.augmented(fake, batch, "fake"), [batch["text"]])
        loss = _bce(score, 1.0)
        if obj.interpolation_weight:
            b = obj.interpolation_beta
            h_int = b * batch["text"] + (1 - b) * batch["other"]
            fake_int, kl_int = generator(batch["noise"], h_int, batch["eps_int"])
            (score_int,) = discriminator(self.augmented(fake_int, batch, "fake"), [h_int])
            loss = loss + obj.interpolation_weight * _bce(score_int, 1.0)
            if kl_int is not None:
                kl = kl + kl_int
        if kl is not None:
            loss = loss + obj.kl_weight * kl
        return loss


class DFGan(TextToImage):
    """A DF-GAN-style one-stage model: deep text-image fusion blocks in G, the hinge loss
    and the matching-aware gradient penalty."""

    name = "dfgan"
    sizes = (16, 32, 64, 128, 256)

    def generator_args(self) -> dict:
        model, obj = self.recipe.model, self.recipe.objective
        args = {"image_size": self.recipe.data.image_size, "noise_dim": model.noise_dim,
                "text_dim": self.text_dim, "width": model.generator_width}
        if obj.conditioning_augmentation:  # absent otherwise: older exports read the same
            args.update(cond_dim=model.condition_dim, augment=True)
        return args

    def build_discriminator(self) -> nn.Module:
        return self._backbone_discriminator() or networks.DFGANDiscriminator(
            self.recipe.data.image_size, self.text_dim, self.recipe.model.discriminator_width)

    def discriminator_loss(self, discriminator, batch, fake) -> torch.Tensor:
        obj = self.recipe.objective
        images, text = self.augmented(batch["images"], batch, "real"), batch["text"]
        penalty = obj.gp_weight > 0 and torch.is_grad_enabled()
        if penalty:  # the gradient of D(x, h) at the real pair as D sees it, wrt image and text
            images = images.detach().requires_grad_(True)
            if not text.requires_grad:  # a trained encoder's embedding stays in its graph
                text = text.detach().requires_grad_(True)
        right, wrong = discriminator(images, [text, batch["wrong"]])
        (fake_right,) = discriminator(self.augmented(fake, batch, "fake"), [batch["text"]])
        loss = F.relu(1 - right) + 0.5 * (F.relu(1 + wrong) + F.relu(1 + fake_right))
        if penalty:
            grads = torch.autograd.grad(right.sum(), (images, text), create_graph=True)
            norm = torch.cat([g.flatten(1) for g in grads], 1).norm(2, dim=1)  # [B]
            loss = loss + obj.gp_weight * norm.pow(obj.gp_power)
        return loss

    def generator_loss(self, generator, discriminator, batch) -> torch.Tensor:
        fake, kl = generator(batch["noise"], batch["text"], batch["eps"])
        (score,) = discriminator(self.augmented(fake, batch, "fake"), [batch["text"]])
        if kl is not None:
            return -score + self.recipe.objective.kl_weight * kl
        return -score
