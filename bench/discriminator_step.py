"""The discriminator's step alone: its time, and whether it is safe in bf16.

One D step as the holistic term takes it (the joint forward over real and fake maps, the WGAN-GP
penalty's forward and double backward, one backward), at several map sizes, timed

- in float32 as skd runs it, and with every spectral-norm conv forced through ``conv2d`` (on a CPU
  skd computes outputs of fewer than 16 positions as one matrix product instead), in turn;
- under bf16 autocast, with its loss, penalty and parameter gradients against float32's on the same
  maps and weights (skd keeps D's step in float32).

    python bench/discriminator_step.py --output docs/results/speed/discriminator_step_cpu.json
    python bench/discriminator_step.py --device cuda --output discriminator_step_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.device import resolve_device  # noqa: E402
from pipeline.distill.losses import discriminator_loss, gradient_penalty  # noqa: E402
from pipeline.models import discriminator  # noqa: E402
from pipeline.models.discriminator import Discriminator  # noqa: E402


def d_step(d: Discriminator, real: torch.Tensor, fake: torch.Tensor, condition: torch.Tensor, alpha: torch.Tensor,
           bf16: bool, lambda_gp: float = 10.0) -> tuple[float, float, torch.Tensor]:
    """(adversarial loss, penalty, flattened parameter gradients) of one D step, as the trainer weighs them."""
    d.zero_grad(set_to_none=True)
    amp = torch.autocast(real.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    b = real.shape[0]
    with amp:
        scores = d.score_maps(torch.cat([real, fake]), torch.cat([condition, condition])).float()
        adversarial = discriminator_loss(scores[:b], scores[b:], "wgan")
        penalty = gradient_penalty(d.score_maps, real, fake, condition, alpha).float()
    (adversarial + lambda_gp * penalty).backward()
    return adversarial.item(), penalty.item(), torch.cat([p.grad.flatten() for p in d.parameters()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--maps", type=int, action="append", default=None,
                   help="map side (the student's output, crop / 8); repeat [default: 16 and 64]")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for side in args.maps or [16, 64]:
        generator = torch.Generator().manual_seed(side)
        b, c = args.batch_size, args.classes
        # A confident teacher and a less confident student, as early in distillation.
        real = torch.softmax(3 * torch.randn(b, c, side, side, generator=generator), 1).to(device)
        fake = torch.softmax(torch.randn(b, c, side, side, generator=generator), 1).to(device)
        condition = torch.randn(b, 3, side, side, generator=generator).to(device)
        alpha = torch.rand(b, generator=generator).to(device)
        torch.manual_seed(0)
        d = Discriminator(c).to(device).eval()  # eval: no power-iteration step, so both precisions see the same σ
        variants = {"fp32": (False, discriminator.SMALL_OUTPUT), "fp32_conv2d_only": (False, 0),
                    "bf16": (True, discriminator.SMALL_OUTPUT)}
        values, times = {}, {name: [] for name in variants}
        for name, (bf16, small) in variants.items():
            discriminator.SMALL_OUTPUT = small
            values[name] = d_step(d, real, fake, condition, alpha, bf16)
        for i in range(args.repeats + 2):  # the variants in turn, so that drift falls on all alike
            for name, (bf16, small) in variants.items():
                discriminator.SMALL_OUTPUT = small
                sync()
                tic = time.perf_counter()
                d_step(d, real, fake, condition, alpha, bf16)
                sync()
                if i >= 2:
                    times[name].append(time.perf_counter() - tic)
        discriminator.SMALL_OUTPUT = variants["fp32"][1]
        g32, g16 = values["fp32"][2], values["bf16"][2]
        row = {"maps": [side, side], "adversarial_fp32": values["fp32"][0], "adversarial_bf16": values["bf16"][0],
               "penalty_fp32": values["fp32"][1], "penalty_bf16": values["bf16"][1],
               "gradient_relative_error_bf16": ((g16 - g32).norm() / g32.norm()).item(),
               "gradient_cosine_bf16": torch.nn.functional.cosine_similarity(g16, g32, dim=0).item(),
               "gradient_relative_difference_conv2d_only": ((values["fp32_conv2d_only"][2] - g32).norm() / g32.norm()).item()}
        row |= {f"step_ms_{name}": 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}
        rows.append(row)
        print(f"maps {side}x{side}: step {row['step_ms_fp32']:.1f} ms (conv2d only: {row['step_ms_fp32_conv2d_only']:.1f} ms, "
              f"bf16: {row['step_ms_bf16']:.1f} ms); D's gradients in bf16 differ by "
              f"{100 * row['gradient_relative_error_bf16']:.2f} % (cosine {row['gradient_cosine_bf16']:.5f}), "
              f"penalty {row['penalty_fp32']:.5f} -> {row['penalty_bf16']:.5f}")
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "batch_size": args.batch_size, "classes": args.classes, "rows": rows}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
