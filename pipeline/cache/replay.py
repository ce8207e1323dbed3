"""Augmentation-consistent replay of cached teacher maps: the geometry.

The cache holds the teacher's output on the whole, unaugmented image. For each training sample the
loader knows the crop box in original-image coordinates and the flip (``pipeline.data.transforms``).
The training samples (``pipeline.data.samples``) read only the part of the cached maps under that
box (``pipeline.data.transforms.cache_window``: one image per read, at the cache's low resolution)
and mark the output pixels that fall outside the image (padding), which carry no teacher signal
(``valid_mask`` there). Here the training device resamples each window onto the student's output
grid with ``roi_align(aligned=True)`` (:func:`replay`) and flips it when the image was flipped.

A store with a bank of training views (``pipeline.data.views``) replays nothing: the sample is one
of the stored views, and its targets are the teacher's maps on exactly that input.
"""

from __future__ import annotations

import torch
from torchvision.ops import roi_align


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
