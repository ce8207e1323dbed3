"""Training augmentation that remembers what it did.

Every sample records the crop box in *original-image* coordinates and the flip, so that a cached
teacher map (computed once on the whole, unaugmented image) can be resampled to exactly the region
the student sees (see ``pipeline.cache.replay``).

Parameters are drawn from a generator seeded by (seed, epoch, index): the same sample gets the same
augmentation whatever the number of loader workers, and a resumed run replays the same data.
"""

from __future__ import annotations

import math
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


def _resize_taps(in_size: int, out_size: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For output pixels ``first .. first + count`` (those below ``out_size``) of antialiased
    bilinear resizing from ``in_size`` to ``out_size`` (``F.interpolate(..., antialias=True)``,
    PIL's filter): the source pixels each one reads (rows × taps) and their weights."""
    scale = in_size / out_size
    support, inv = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    out = np.arange(first, min(first + count, out_size), dtype=np.float64)
    centre = scale * (out + 0.5)
    lo = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(centre + support + 0.5), in_size).astype(np.int64)
    src = lo[:, None] + np.arange(int((hi - lo).max(initial=1)))[None]
    weights = np.clip(1.0 - np.abs((src - centre[:, None] + 0.5) * inv), 0.0, None) * (src < hi[:, None])
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(np.minimum(src, in_size - 1)), torch.from_numpy(weights).float()


def _resize_crop(image: torch.Tensor, scaled_hw: tuple[int, int], top: int, left: int,
                 crop: tuple[int, int]) -> torch.Tensor:
    """The ``crop`` at (top, left) of ``image`` (3×H×W uint8) resized to ``scaled_hw``, computing
    only the crop's pixels; parts beyond the scaled image are left out (the caller pads)."""
    rows, row_w = _resize_taps(image.shape[-2], scaled_hw[0], top, crop[0])
    cols, col_w = _resize_taps(image.shape[-1], scaled_hw[1], left, crop[1])
    x = image[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1].float()
    rows, cols = rows - rows.min(), cols - cols.min()
    # One tap at a time: a gather and a multiply-add of a crop-sized array each.
    x = sum(x[:, rows[:, k]] * row_w[None, :, k, None] for k in range(rows.shape[1]))  # 3 × out rows × source cols
    x = sum(x[:, :, cols[:, k]] * col_w[None, None, :, k] for k in range(cols.shape[1]))  # 3 × out rows × out cols
    return x.round().clamp(0, 255).to(torch.uint8)


def _nearest_indices(in_size: int, out_size: int, first: int, count: int) -> torch.Tensor:
    """Source pixels of ``F.interpolate(..., mode="nearest")`` for output rows ``first ..``, computed
    in float32 as PyTorch does."""
    scale = np.float32(in_size) / np.float32(out_size)
    out = np.arange(first, min(first + count, out_size)).astype(np.float32)
    return torch.from_numpy(np.minimum(np.floor(out * scale).astype(np.int64), in_size - 1))


def apply_params(
    image: torch.Tensor, label: torch.Tensor, params: CropParams, crop_size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, pad (image 0, label ignore), crop and flip a uint8 image and its int64 label.

    Only the crop is computed: its rows and columns of the resize matrices are applied to the
    source pixels under it (the same numbers as resizing the whole image first, up to float
    rounding, at a fraction of the cost for a small crop of a large image).
    """
    crop = crop_size or params.scaled_hw
    (height, width), (scaled_h, scaled_w) = image.shape[-2:], params.scaled_hw
    if (height, width) == (scaled_h, scaled_w):
        image = image[:, params.top : params.top + crop[0], params.left : params.left + crop[1]]
        label = label[params.top : params.top + crop[0], params.left : params.left + crop[1]]
    else:
        image = _resize_crop(image, (scaled_h, scaled_w), params.top, params.left, crop)
        label = label[_nearest_indices(height, scaled_h, params.top, crop[0])][
            :, _nearest_indices(width, scaled_w, params.left, crop[1])]
    # The crop may reach beyond the scaled image: pad at the bottom/right.
    pad_h, pad_w = crop[0] - image.shape[-2], crop[1] - image.shape[-1]
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
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


def valid_mask(box: torch.Tensor, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """True where an output pixel's centre lies inside the original image (box in image pixels)."""
    x0, y0, x1, y1 = box.tolist()
    ys = y0 + (torch.arange(out_hw[0], dtype=torch.float64) + 0.5) * (y1 - y0) / out_hw[0]
    xs = x0 + (torch.arange(out_hw[1], dtype=torch.float64) + 0.5) * (x1 - x0) / out_hw[1]
    return ((ys >= 0) & (ys < image_hw[0]))[:, None] & ((xs >= 0) & (xs < image_hw[1]))[None, :]


def cache_window(box: torch.Tensor, map_hw: tuple[int, int], pool: int = 1) -> tuple[slice, slice]:
    """Rows/cols of a cache grid under ``box`` (in that grid's cells) plus a one-cell margin for
    interpolation, widened to the feature pooling grid so that features cut at the same place."""
    x0, y0, x1, y1 = box.tolist()

    def span(lo: float, hi: float, size: int) -> slice:
        start = max(math.floor(lo) - 1, 0) // pool * pool
        stop = min(math.ceil(hi) + 1, size)
        stop = min(math.ceil(stop / pool) * pool, size)
        return slice(start, max(stop, start + 1))

    return span(y0, y1, map_hw[0]), span(x0, x1, map_hw[1])
