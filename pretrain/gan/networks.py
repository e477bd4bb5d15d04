"""The generators and discriminators of the text-to-image families, each readable alone.

Shapes: images [B, 3, S, S] in [-1, 1]; noise z [B, Z]; a sentence embedding h [B, E]
(the frozen text encoder's pooled output). Every discriminator splits into
``encode(x) -> features`` and ``score(features, h) -> logits [B]``, so that one real
image's features are scored with the right and with a wrong caption (the matching-aware
discriminator) without encoding the image twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def doublings(image_size: int) -> int:
    """How many 2x up-samplings take 4x4 to ``image_size`` (a power of two >= 8)."""
    n = int(round(math.log2(image_size / 4))) if image_size >= 8 else 0
    if n < 1 or 4 * 2 ** n != image_size:
        raise ValueError(f"image size {image_size} is not 4 x a power of two (8, 16, 32, 64, "
                         "128, 256)")
    return n


class Conditioning(nn.Module):
    """h [B, E] -> the condition [B, C]: a linear projection with leaky ReLU (GAN-INT-CLS),
    or StackGAN's conditioning augmentation (``augment``): c = mu + sigma * eps with mu and
    log sigma^2 predicted from h, and a KL(N(mu, sigma^2) || N(0, I)) term per example."""

    def __init__(self, text_dim: int, dim: int, augment: bool = False):
        super().__init__()
        self.augment = augment
        self.proj = nn.Linear(text_dim, 2 * dim if augment else dim)

    def forward(self, h: torch.Tensor, eps: torch.Tensor | None = None):
        """(condition [B, C], KL [B] or None); ``eps`` [B, C] is the augmentation's noise
        (drawn by the collator, so that a step does not depend on the batch split)."""
        if not self.augment:
            return F.leaky_relu(self.proj(h), 0.2), None
        mu, logvar = self.proj(h).chunk(2, dim=1)
        mu = F.leaky_relu(mu, 0.2)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        c = mu if eps is None else mu + (0.5 * logvar).exp() * eps
        return c, kl


class Discriminator(nn.Module):
    """``forward(images, texts)``: the logits [B] of the images with each of ``texts``
    (a list of [B, E]), the images encoded once. Subclasses give encode and score."""

    def forward(self, images: torch.Tensor, texts: list[torch.Tensor]) -> list[torch.Tensor]:
        features = self.encode(images)
        return [self.score(features, h) for h in texts]


# --------------------------------------------------------------------------- GAN-INT-CLS


class DCGANGenerator(nn.Module):
    """Reed et al. 2016's G(z, phi(t)): the projected text concatenated to the noise, then
    DCGAN's transposed convolutions with batch norm and ReLU (no pooling), tanh out."""

    def __init__(self, image_size: int, noise_dim: int, text_dim: int, cond_dim: int,
                 width: int, augment: bool = False):
        super().__init__()
        n = doublings(image_size)
        self.cond = Conditioning(text_dim, cond_dim, augment)
        channels = [width * 2 ** (n - 1 - i) for i in range(n)]  # 4x4 ... S/2 x S/2
        layers: list[nn.Module] = [nn.ConvTranspose2d(noise_dim + cond_dim, channels[0], 4, 1, 0,
                                                      bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(True)]
        for a, b in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(channels[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor, h: torch.Tensor, eps: torch.Tensor | None = None):
        """(images [B, 3, S, S], KL [B] or None)."""
        c, kl = self.cond(h, eps)
        return self.net(torch.cat([z, c], 1)[:, :, None, None]), kl


class DCGANDiscriminator(Discriminator):
    """Reed et al. 2016's matching-aware D(x, phi(t)): strided convolutions with batch norm
    and leaky ReLU down to 4x4, the projected text replicated over the 4x4 map and
    concatenated, a 1x1 convolution, then a 4x4 one to the logit."""

    def __init__(self, image_size: int, text_dim: int, cond_dim: int, width: int):
        super().__init__()
        n = doublings(image_size)
        channels = [width * 2 ** i for i in range(n)]  # S/2 ... 4x4
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for a, b in zip(channels, channels[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b),
                       nn.LeakyReLU(0.2, True)]
        self.encoder = nn.Sequential(*layers)
        self.text = nn.Linear(text_dim, cond_dim)
        top = channels[-1]
        self.joint = nn.Sequential(nn.Conv2d(top + cond_dim, top, 1, bias=False),
                                   nn.BatchNorm2d(top), nn.LeakyReLU(0.2, True),
                                   nn.Conv2d(top, 1, 4, 1, 0))
        self.apply(_dcgan_init)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # [B, C, 4, 4]

    def score(self, features: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        t = F.leaky_relu(self.text(h), 0.2)[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return self.joint(torch.cat([features, t], 1)).flatten()  # [B]


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- DF-GAN


class Affine(nn.Module):
    """Text-conditioned channel-wise affine transform: x * gamma(y) + beta(y), with gamma
    starting at 1 and beta at 0 (the block starts as the identity)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(True),
                                   nn.Linear(channels, channels))
        self.beta = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(True),
                                  nn.Linear(channels, channels))
        nn.init.zeros_(self.gamma[2].weight)
        nn.init.ones_(self.gamma[2].bias)
        nn.init.zeros_(self.beta[2].weight)
        nn.init.zeros_(self.beta[2].bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class FusionBlock(nn.Module):
    """DF-GAN's deep fusion: (affine, leaky ReLU) twice."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.a0, self.a1 = Affine(cond_dim, channels), Affine(cond_dim, channels)

    def forward(self, x, y):
        x = F.leaky_relu(self.a0(x, y), 0.2)
        return F.leaky_relu(self.a1(x, y), 0.2)


class UpBlock(nn.Module):
    """2x up-sampling, then fusion -> 3x3 conv -> fusion -> 3x3 conv, plus a shortcut."""

    def __init__(self, cond_dim: int, cin: int, cout: int):
        super().__init__()
        self.f0, self.c0 = FusionBlock(cond_dim, cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.f1, self.c1 = FusionBlock(cond_dim, cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, y):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.c1(self.f1(self.c0(self.f0(x, y)), y))
        return self.shortcut(x) + h


def _dfgan_widths(image_size: int, width: int) -> list[int]:
    """Channels from 4x4 to S x S: 8 x width while the map is small, halving after."""
    n = doublings(image_size)
    return [width * min(8, 2 ** (n - i)) for i in range(n + 1)]


class DFGANGenerator(nn.Module):
    """DF-GAN's one-stage generator: noise -> 4x4 map, then up-sampling blocks whose every
    normalisation is a text-conditioned affine fusion of y = [z, h]; with ``augment``,
    y = [z, c], c StackGAN's sampled condition of h (``Conditioning``, ``cond_dim`` wide)."""

    def __init__(self, image_size: int, noise_dim: int, text_dim: int, width: int,
                 cond_dim: int = 0, augment: bool = False):
        super().__init__()
        widths = _dfgan_widths(image_size, width)
        if augment and cond_dim < 1:
            raise ValueError(f"the conditioning augmentation needs cond_dim >= 1, not {cond_dim}")
        # without augmentation the text is fused whole, as DF-GAN does (no projection)
        self.cond = Conditioning(text_dim, cond_dim, True) if augment else None
        cond = noise_dim + (cond_dim if augment else text_dim)
        self.fc = nn.Linear(noise_dim, widths[0] * 16)
        self.blocks = nn.ModuleList(UpBlock(cond, a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Conv2d(widths[-1], 3, 3, 1, 1)

    def forward(self, z: torch.Tensor, h: torch.Tensor, eps: torch.Tensor | None = None):
        """(images [B, 3, S, S], KL [B] or None)."""
        kl = None
        if self.cond is not None:
            h, kl = self.cond(h, eps)
        y = torch.cat([z, h], 1)
        x = self.fc(z).view(len(z), -1, 4, 4)
        for block in self.blocks:
            x = block(x, y)
        return torch.tanh(self.out(F.leaky_relu(x, 0.2))), kl


class DownBlock(nn.Module):
    """DF-GAN's residual down-sampling block (no normalisation); the residual enters
    through a learned gate that starts at 0."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.r = nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
                               nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                               nn.LeakyReLU(0.2, True))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.avg_pool2d(self.shortcut(x), 2) + self.gamma * self.r(x)


class DFGANDiscriminator(Discriminator):
    """DF-GAN's discriminator: residual down-sampling to 4x4, then the sentence embedding
    replicated over the map, concatenated, and two convolutions to the logit."""

    def __init__(self, image_size: int, text_dim: int, width: int):
        super().__init__()
        widths = _dfgan_widths(image_size, width)[::-1]  # S x S ... 4x4
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1)
        self.blocks = nn.Sequential(*(DownBlock(a, b) for a, b in zip(widths, widths[1:])))
        top = widths[-1]
        self.joint = nn.Sequential(nn.Conv2d(top + text_dim, 2 * width, 3, 1, 1, bias=False),
                                   nn.LeakyReLU(0.2, True), nn.Conv2d(2 * width, 1, 4, 1, 0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))  # [B, C, 4, 4]

    def score(self, features: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        t = h[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return self.joint(torch.cat([features, t], 1)).flatten()  # [B]


# --------------------------------------------------------------------------- pretrained D


class BackboneDiscriminator(Discriminator):
    """A discriminator whose image encoder is a pretrained image backbone (an overture
    image final/: supervised or SimCLR), as Projected GANs and Vision-aided GANs use:
    its feature map, the projected text concatenated, a 1x1 convolution, leaky ReLU,
    spatial mean, and a linear logit. Images are mapped from [-1, 1] to the backbone's
    own normalisation and input size."""

    def __init__(self, backbone: nn.Module, num_features: int, mean, std, input_size: int,
                 text_dim: int, cond_dim: int, width: int):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[None, :, None, None],
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[None, :, None, None],
                             persistent=False)
        self.input_size = input_size
        self.text = nn.Linear(text_dim, cond_dim)
        self.joint = nn.Conv2d(num_features + cond_dim, width, 1)
        self.logit = nn.Linear(width, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
        features = self.backbone.forward_features(x)
        if features.dim() == 3:  # a ViT's tokens [B, N, C]: their mean as a 1x1 map
            features = features.mean(1)[:, :, None, None]
        return features

    def score(self, features: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        t = F.leaky_relu(self.text(h), 0.2)[:, :, None, None].expand(-1, -1, *features.shape[2:])
        joint = F.leaky_relu(self.joint(torch.cat([features, t], 1)), 0.2)
        return self.logit(joint.mean((2, 3))).flatten()  # [B]
