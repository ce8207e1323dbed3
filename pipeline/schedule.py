"""Schedules over a run's progress: the poly learning rate (the student's and the discriminator's)
and the distillation warm-up.

Below both ``pipeline.distill`` and ``pipeline.train``, so the holistic term imports it without climbing.
"""

from __future__ import annotations

import torch


class Progress:
    """How far a run is, as a fraction in [0, 1]: its steps against ``iterations``, or, with a
    wall-clock budget, the seconds spent training (``elapsed_s``, kept by the trainer) against
    ``budget_s``. The poly schedule and the distillation warm-up are defined over this fraction, so
    that methods with different step costs can be compared at one equal budget."""

    def __init__(self, iterations: int, budget_s: float | None = None):
        self.iterations, self.budget_s = iterations, budget_s
        self.elapsed_s = 0.0

    def fraction(self, step: int) -> float:
        if self.budget_s:
            return min(self.elapsed_s / self.budget_s, 1.0)
        return min(step / self.iterations, 1.0)


def poly_schedule(optimizer: torch.optim.Optimizer, progress: Progress | int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = base_lr · (1 − progress)^power: over ``iterations`` steps (an int), or over whatever a
    ``Progress`` measures; held at 0 once done."""
    progress = Progress(progress) if isinstance(progress, int) else progress
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - progress.fraction(step)) ** power)


def kd_weight(iteration: int, warmup: int) -> float:
    """Factor on every distillation term: a linear ramp from 0 to 1 over ``warmup`` iterations
    (no ramp at 0), so a student from scratch learns from the labels before the teacher pulls."""
    return 1.0 if warmup <= 0 else min(1.0, (iteration + 1) / warmup)
