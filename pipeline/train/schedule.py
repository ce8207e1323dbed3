"""Learning-rate schedules shared by the student trainer and the holistic term's discriminator.

Kept apart from ``trainer.py`` so that ``pipeline.distill.holistic`` can import it without a cycle.
"""

from __future__ import annotations

import torch


def poly_schedule(optimizer: torch.optim.Optimizer, iterations: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = base_lr · (1 − it / iterations)^power, held at 0 after ``iterations`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, iterations) / iterations) ** power)
