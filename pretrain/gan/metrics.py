"""What the text-to-image evaluation measures on generated images.

- **Caption consistency**: the share of generated images that a classifier trained on the
  real images (the *judge*, an overture image final/) assigns to the class the caption
  names; chance is 1 / classes. Its top-1 on the real held-out images is reported beside
  it, as the ceiling.
- **FID** (Frechet distance between the feature statistics of real and generated images)
  from torchmetrics' ``FrechetInceptionDistance``, over a named feature network: the
  judge's pooled features, or Inception-v3 when torch-fidelity and its weights are
  present locally.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from overture.errors import ConfigError


class Judge(nn.Module):
    """An image classifier checkpoint seen from [-1, 1] images: ``forward`` gives
    (logits [B, classes], pooled features [B, F])."""

    measures_only = True  # not part of the model (``overture recipes`` does not count it)

    def __init__(self, checkpoint: str):
        super().__init__()
        from overture.pretrain.image import models as image_models

        folder = image_models.final_folder(Path(checkpoint))
        if not image_models.is_image_checkpoint(folder):
            raise ConfigError(f"objective.judge={checkpoint!r}: not an image checkpoint (the "
                              "final/ of an image-family run, e.g. `overture pretrain "
                              "resnet-tiny-digits`)")
        self.model, config = image_models.load(folder)
        if not config.get("num_classes"):
            raise ConfigError(f"objective.judge={checkpoint!r}: has no classifier (a SimCLR "
                              "backbone?); the judge must be trained on the images' classes")
        cfg = config.get("pretrained_cfg", {})
        self.size = int(cfg.get("input_size", [3, 224, 224])[-1])
        self.register_buffer("mean", torch.tensor(cfg.get("mean", [0.5] * 3))[None, :, None, None],
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", [0.5] * 3))[None, :, None, None],
                             persistent=False)
        self.class_names = config.get("label_names") or []
        self.name = f"judge {folder} ({config.get('architecture')})"
        self.num_classes = int(config["num_classes"])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from overture.pretrain.image import models as image_models

        x = ((images.float() + 1) / 2 - self.mean) / self.std
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        features = image_models.pooled_features(self.model, x)
        head = image_models._last_linear(self.model)[2]
        return head(features), features


class Inception(nn.Module):
    """torchmetrics' FID Inception-v3 (torch-fidelity's port of the TF graph), on [-1, 1]
    images: [B, 2048] pool features."""

    measures_only = True

    def __init__(self, weights: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights)
        self.name = f"Inception-v3 ({weights})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8))


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def local_inception_weights() -> str | None:
    """torch-fidelity's Inception weights when installed and cached on this machine."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return str(path) if path.is_file() else None


class _Given(nn.Module):
    """The feature network of torchmetrics' FID when the features are already computed."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two sets of features [N, F] (torchmetrics' FrechetInceptionDistance, in
    float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    return float(metric.compute())


def consistency(examples: dict[str, np.ndarray], attributes: tuple[str, ...]) -> dict:
    """Caption consistency and attribute agreement from the gathered per-example outputs."""
    out = {}
    labelled = examples["caption_label"] >= 0
    if "fake_class" in examples and labelled.any():
        out["caption_consistency"] = float(
            (examples["fake_class"][labelled] == examples["caption_label"][labelled]).mean())
        out["judge_real_top1"] = float(
            (examples["real_class"][labelled] == examples["caption_label"][labelled]).mean())
    if "fake_attributes" in examples and (examples["caption_attributes"] >= 0).all():
        agree = examples["fake_attributes"] == examples["caption_attributes"]  # [N, 3]
        for i, name in enumerate(attributes):
            out[f"{name}_agreement"] = float(agree[:, i].mean())
    return out
