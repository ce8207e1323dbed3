"""Model-card numbers of a network: parameters, GFLOPs, latency, throughput and peak memory."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(model: nn.Module, size: tuple[int, int], device: torch.device | str = "cpu") -> int:
    """FLOPs of one forward pass on a 1×3×``size`` image (FlopCounterMode: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, *size, device=device))
    return counter.get_total_flops()


@torch.no_grad()
def profile_model(model: nn.Module, size: tuple[int, int], device: torch.device, batch_sizes=(1, 8),
                  repeats: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Parameters; GFLOPs of one image (torch's FlopCounterMode: 2 per multiply-add); per batch
    size the median forward latency (eval mode, no gradients), images/s, and peak memory (CUDA:
    allocated tensors; CPU: the process's peak resident size, which includes everything loaded)."""
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                              "gflops_per_image": count_flops(model, size, device) / 1e9, "size": list(size),
                              "device": str(device), "batches": {}}
    for batch in batch_sizes:
        x = torch.zeros(batch, 3, *size, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(warmup + repeats):
            sync()
            tic = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - tic)
        latency = sorted(times)[len(times) // 2]
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
        report["batches"][batch] = {"latency_ms": 1000 * latency, "images_per_s": batch / latency,
                                    "peak_memory_mb": peak / 2**20}
    return report


def format_profile(name: str, report: dict[str, Any]) -> str:
    memory = "peak CUDA memory" if report["device"].startswith("cuda") else "peak process memory"
    lines = [f"{name}: {report['parameters'] / 1e6:.2f} M parameters, {report['gflops_per_image']:.1f} GFLOPs per "
             f"{report['size'][0]}x{report['size'][1]} image, on {report['device']}", "",
             f"{'batch':>5s} {'latency':>10s} {'images/s':>9s} {memory:>20s}"]
    for batch, b in report["batches"].items():
        lines.append(f"{batch:>5} {b['latency_ms']:>8.1f} ms {b['images_per_s']:>9.1f} {b['peak_memory_mb']:>17.0f} MB")
    return "\n".join(lines)
