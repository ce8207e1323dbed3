"""Augmentation-consistent replay of cached teacher maps: the geometry.

The cache holds the teacher's output on the whole, unaugmented image. For each training sample the
loader knows the crop box in original-image coordinates and the flip (``pipeline.data.transforms``).
The training samples (``pipeline.data.samples``) read only the part of the cached maps under that
box (:func:`cache_window`, one image per read, at the cache's low resolution), and the training
device resamples it onto the student's output grid with ``roi_align(aligned=True)`` (:func:`replay`),
flips it when the image was flipped, and marks with a validity mask (:func:`valid_mask`) the output
pixels that fall outside the image (padding), which carry no teacher signal.

A store with a bank of training views (``pipeline.cache.views``) replays nothing: the sample is one
of the stored views, and its targets are the teacher's maps on exactly that input.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align


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


def replay(maps: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], flip: torch.Tensor) -> torch.Tensor:
    """Resample each map's box onto an ``out_hw`` grid (bins average their area), then flip as the image was."""
    rois = torch.cat([torch.arange(len(maps), device=maps.device, dtype=torch.float32)[:, None],
                      boxes.to(maps.device, torch.float32)], dim=1)
    out = roi_align(maps.float(), rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = flip.to(out.device).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


def replay_targets(batch: dict, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher (log-probabilities, features) for a collated batch whose cache windows are already on
    the device; features are None when the batch carries none."""
    log_probs = replay(batch["teacher_log_probs"], batch["logit_box"], out_hw, batch["flip"])
    if "teacher_features" not in batch:
        return log_probs, None
    return log_probs, replay(batch["teacher_features"], batch["feature_box"], out_hw, batch["flip"])
