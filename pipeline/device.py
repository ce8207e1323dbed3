"""Choosing the device, and CPU threads that do not fight the data-loading processes."""

from __future__ import annotations

import os

import torch

from pipeline.errors import SkdError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SkdError(f"device {name} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SkdError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def set_cpu_threads(device: torch.device, workers: int) -> None:
    """On the CPU, leave one core per loader worker: intra-op threads that share cores with other
    busy processes spin and wait on each other (measured: 50x slower steps on 2 cores).
    An explicit OMP_NUM_THREADS wins."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores - workers))
