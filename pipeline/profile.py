"""Model-card numbers of a network: parameters, GFLOPs, latency, throughput and peak memory."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.errors import SkdError


@torch.no_grad()
def count_flops(model: nn.Module, size: tuple[int, int], device: torch.device | str = "cpu") -> int:
    """FLOPs of one forward pass on a 1×3×``size`` image (FlopCounterMode: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, *size, device=device))
    return counter.get_total_flops()


def spread(times_s: list[float]) -> dict[str, float]:
    """Median, quartiles, minimum and maximum of timings in seconds, as milliseconds."""
    ms = torch.tensor(times_s, dtype=torch.float64) * 1000
    q25, median, q75 = torch.quantile(ms, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"latency_ms": median, "p25_ms": q25, "p75_ms": q75, "min_ms": ms.min().item(), "max_ms": ms.max().item()}


@torch.no_grad()
def profile_model(model: nn.Module, size: tuple[int, int], device: torch.device, batch_sizes=(1, 8),
                  repeats: int = 20, warmup: int = 5) -> dict[str, Any]:
    """Parameters; GFLOPs of one image (torch's FlopCounterMode: 2 per multiply-add); per batch
    size, after ``warmup`` untimed forward passes (the first ones pay one-time costs: memory
    allocation, kernel selection, caches), ``repeats`` timed ones (eval mode, no gradients): the
    median latency with its spread (quartiles, min and max), images/s at the median, and peak
    memory (CUDA: allocated tensors; CPU: the process's peak resident size, which includes
    everything loaded)."""
    if repeats < 1 or warmup < 0:
        raise SkdError(f"profile needs at least one timed run and no negative warm-up, not repeats={repeats}, "
                       f"warmup={warmup}")
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                              "gflops_per_image": count_flops(model, size, device) / 1e9, "size": list(size),
                              "device": str(device), "threads": torch.get_num_threads(), "warmup": warmup,
                              "repeats": repeats, "batches": {}}
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
        timing = spread(times)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
        report["batches"][batch] = {**timing, "images_per_s": 1000 * batch / timing["latency_ms"],
                                    "peak_memory_mb": peak / 2**20}
    return report


def format_profile(name: str, report: dict[str, Any]) -> str:
    memory = "peak CUDA memory" if report["device"].startswith("cuda") else "peak process memory"
    threads = f", {report['threads']} threads" if not report["device"].startswith("cuda") else ""
    lines = [f"{name}: {report['parameters'] / 1e6:.2f} M parameters, {report['gflops_per_image']:.1f} GFLOPs per "
             f"{report['size'][0]}x{report['size'][1]} image, on {report['device']}{threads}",
             f"latency: median of {report['repeats']} timed runs after {report['warmup']} warm-up runs, "
             "with the middle half (quartiles) and min-max", "",
             f"{'batch':>5s} {'median':>10s} {'quartiles':>17s} {'min-max':>17s} {'images/s':>9s} {memory:>20s}"]
    wide = []
    for batch, b in report["batches"].items():
        lines.append(f"{batch:>5} {b['latency_ms']:>7.1f} ms {b['p25_ms']:>7.1f}-{b['p75_ms']:<6.1f} ms "
                     f"{b['min_ms']:>7.1f}-{b['max_ms']:<6.1f} ms {b['images_per_s']:>9.1f} "
                     f"{b['peak_memory_mb']:>17.0f} MB")
        if b["p75_ms"] > 1.25 * b["p25_ms"]:
            wide.append(str(batch))
    if wide:
        lines.append(f"note: the timings at batch {', '.join(wide)} vary widely (the slowest quarter over 1.25 x the "
                     "fastest): other work shares the device; more --repeats or a quieter machine give steadier numbers")
    return "\n".join(lines)
