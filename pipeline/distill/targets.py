"""Where the teacher's targets come from: the cache (replayed onto each augmented crop) or the
teacher itself, run live on the batch (online mode). One interface, so the trainer has no branch."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.cache.replay import replay_targets
from pipeline.inference import predict


class CachedTargets:
    """Targets read from the store by the data loader and resampled to the student's output grid."""

    def __call__(self, batch: dict, images: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return replay_targets(batch, out_hw)


class OnlineTargets:
    """The teacher run on the student's augmented input (eval mode, no gradients), in ``precision``
    (the trainer passes "bf16" on CUDA with mixed precision on, as it runs the student: a fair
    online baseline)."""

    def __init__(self, teacher: nn.Module, precision: str = "fp32"):
        self.teacher = teacher.eval().requires_grad_(False)
        self.precision = precision

    def __call__(self, batch: dict, images: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return predict(self.teacher, images, out_hw=out_hw, precision=self.precision)
