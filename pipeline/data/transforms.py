"""Training augmentation that remembers what it did.

Every sample records the crop box in *original-image* coordinates and the flip, so that a cached
teacher map (computed once on the whole, unaugmented image) can be resampled to exactly the region
the student sees (see ``pipeline.cache.replay``).

Parameters are drawn from a generator seeded by (seed, epoch, index): the same sample gets the same
augmentation whatever the number of loader workers, and a resumed run replays the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> float, ImageNet mean/std (what torchvision backbones expect)."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: tuple[int, int] | None = None  # (H, W); None trains on whole images
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    color_jitter: float = 0.0  # max relative change of brightness / contrast / saturation


@dataclass(frozen=True)
class CropParams:
    """Where a training sample comes from: the scaled image's size, the crop origin in it, the flip."""

    scaled_hw: tuple[int, int]
    top: int
    left: int
    flip: bool


def sample_params(cfg: AugmentConfig, image_hw: tuple[int, int], rng: np.random.Generator) -> CropParams:
    height, width = image_hw
    scale = float(rng.uniform(*cfg.scale_range)) if cfg.scale_range[0] != cfg.scale_range[1] else cfg.scale_range[0]
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
    crop = cfg.crop_size or scaled
    # The crop may be larger than the scaled image: then the image is padded at the bottom/right.
    top = int(rng.integers(0, max(scaled[0] - crop[0], 0) + 1))
    left = int(rng.integers(0, max(scaled[1] - crop[1], 0) + 1))
    flip = bool(cfg.flip and rng.random() < 0.5)
    return CropParams(scaled, top, left, flip)


def crop_box(params: CropParams, image_hw: tuple[int, int], extent_hw: tuple[int, int]) -> torch.Tensor:
    """Box (x0, y0, x1, y1) in original-image pixels covered by ``extent_hw`` pixels of the crop.

    ``extent_hw`` is usually the student's output grid times its stride, which may overhang the crop.
    """
    sy = params.scaled_hw[0] / image_hw[0]
    sx = params.scaled_hw[1] / image_hw[1]
    x0, y0 = params.left / sx, params.top / sy
    return torch.tensor([x0, y0, x0 + extent_hw[1] / sx, y0 + extent_hw[0] / sy], dtype=torch.float64)


def apply_params(
    image: torch.Tensor, label: torch.Tensor, params: CropParams, crop_size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, pad (image 0, label ignore), crop and flip a uint8 image and its int64 label."""
    if tuple(image.shape[-2:]) != params.scaled_hw:
        image = F.interpolate(image[None].float(), size=params.scaled_hw, mode="bilinear",
                              align_corners=False, antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        label = F.interpolate(label[None, None].float(), size=params.scaled_hw, mode="nearest")[0, 0].long()
    crop = crop_size or params.scaled_hw
    pad_h = max(params.top + crop[0] - image.shape[-2], 0)
    pad_w = max(params.left + crop[1] - image.shape[-1], 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    image = image[:, params.top : params.top + crop[0], params.left : params.left + crop[1]]
    label = label[params.top : params.top + crop[0], params.left : params.left + crop[1]]
    if params.flip:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()


def sample_jitter(strength: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Random (brightness, contrast, saturation) factors; (1, 1, 1), drawing nothing, without jitter."""
    if strength <= 0:
        return (1.0, 1.0, 1.0)
    b, c, s = (1.0 + rng.uniform(-strength, strength, size=3)).tolist()
    return (b, c, s)


def apply_jitter(image: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    """Scale brightness, contrast and saturation of a uint8 image; the teacher target depends on the
    scene, not on its colours, but a teacher run on the jittered image sees them."""
    if tuple(factors) == (1.0, 1.0, 1.0):
        return image
    b, c, s = factors
    x = image.float() * b
    mean = x.mean()
    x = (x - mean) * c + mean
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = (x - gray) * s + gray
    return x.round().clamp(0, 255).to(torch.uint8)
