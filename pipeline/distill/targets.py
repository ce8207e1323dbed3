"""Where the teacher's targets come from: the cache (replayed onto each augmented crop) or the
teacher itself, run live on the batch (online mode). One interface, so the trainer has no branch:
each call gives the teacher's (log-probabilities, features) on the student's output grid."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.cache.projection import Projection, unproject
from pipeline.cache.replay import replay_targets
from pipeline.inference import predict


class CachedTargets:
    """Targets read from the store by the data loader and resampled to the student's output grid.

    From a store of projected features (PCA coordinates) the features are mapped back to the
    teacher's channels, so that every term sees what an online teacher would give, up to the
    directions left out: regressing the centred coordinates themselves distilled worse (docs/RESULTS.md §5).
    """

    def __init__(self, projection: Projection | None = None):
        self.projection = projection

    def __call__(self, batch: dict, images: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_probs, features = replay_targets(batch, out_hw)
        if self.projection is not None and features is not None:
            features = unproject(features, self.projection)
        return log_probs, features


class OnlineTargets:
    """The teacher run on the student's augmented input (eval mode, no gradients), in ``precision``
    (the trainer passes "bf16" on CUDA with mixed precision on, as it runs the student: a fair
    online baseline)."""

    def __init__(self, teacher: nn.Module, precision: str = "fp32"):
        self.teacher = teacher.eval().requires_grad_(False)
        self.precision = precision

    def __call__(self, batch: dict, images: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return predict(self.teacher, images, out_hw=out_hw, precision=self.precision)
