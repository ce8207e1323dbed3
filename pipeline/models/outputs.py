"""What every segmentation network in skd returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class SegOutput(NamedTuple):
    """Outputs of one forward pass, all at output stride 8 (ceil(H/8) × ceil(W/8)).

    logits:   B×C main-head class scores.
    aux:      B×C auxiliary-head scores from the stride-8 stage before the last one (layer3);
              None in eval mode, where it is never used and would only cost compute.
    features: B×F output of the PSP module (bottleneck conv + BN + activation, before dropout);
              the pair-wise distillation term compares these between teacher and student.
    """

    logits: Tensor
    aux: Tensor | None
    features: Tensor
