"""Running a teacher for distillation targets: once per image at cache time, or live (online mode)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_STRIDE = 8
LOG_PROB_FLOOR = -1.0e4  # log(0) would be -inf; float16 holds this and softmax treats it as zero


@torch.no_grad()
def run_teacher(
    teacher: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_hw: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probabilities and PSP features for a normalised batch (B, 3, H, W).

    With several ``scales`` and/or ``flip`` the class probabilities are averaged over all views
    (test-time augmentation, affordable because a cache runs the teacher once). Features come from
    the scale closest to 1, averaged over the flip, so that a flipped replay stays exact.
    Both outputs have the teacher's stride-8 grid (or ``out_hw``).
    """
    height, width = images.shape[-2:]
    out_hw = out_hw or (-(-height // OUTPUT_STRIDE), -(-width // OUTPUT_STRIDE))
    feature_scale = min(scales, key=lambda s: abs(s - 1.0))
    probs = torch.zeros(())
    features = torch.zeros(())
    views = 0
    for scale in scales:
        x = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            out = teacher(x.flip(-1) if flipped else x)
            logits, feats = out.logits.float(), out.features.float()
            if flipped:
                logits, feats = logits.flip(-1), feats.flip(-1)
            if tuple(logits.shape[-2:]) != out_hw:
                logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
            probs = probs + logits.softmax(dim=1)
            views += 1
            if scale == feature_scale:
                if tuple(feats.shape[-2:]) != out_hw:
                    feats = F.interpolate(feats, size=out_hw, mode="bilinear", align_corners=False)
                features = features + feats
    log_probs = (probs / views).log().clamp(min=LOG_PROB_FLOOR)
    return log_probs, features / (2 if flip else 1)
