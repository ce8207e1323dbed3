"""Is the discriminator's own pass safe in bf16? D's loss, its gradient penalty and its parameter
gradients under bf16 autocast against float32, on the same maps and weights, plus the step's time.

The holistic term runs D's joint forward (which also gives the student its adversarial gradient)
and the penalty's double backward in float32; this measures what bf16 would change.

    python bench/d_precision.py --output docs/results/speed/d_precision_cpu.json
    python bench/d_precision.py --device cuda --output d_precision_gpu.json
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
    p.add_argument("--repeats", type=int, default=10, help="timed steps per precision")
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
        results = {}
        for bf16 in (False, True):
            adversarial, penalty, grads = d_step(d, real, fake, condition, alpha, bf16)
            times = []
            for _ in range(args.repeats + 2):
                sync()
                tic = time.perf_counter()
                d_step(d, real, fake, condition, alpha, bf16)
                sync()
                times.append(time.perf_counter() - tic)
            results[bf16] = (adversarial, penalty, grads, sorted(times[2:])[len(times[2:]) // 2])
        g32, g16 = results[False][2], results[True][2]
        row = {"maps": [side, side], "adversarial_fp32": results[False][0], "adversarial_bf16": results[True][0],
               "penalty_fp32": results[False][1], "penalty_bf16": results[True][1],
               "gradient_relative_error": ((g16 - g32).norm() / g32.norm()).item(),
               "gradient_cosine": torch.nn.functional.cosine_similarity(g16, g32, dim=0).item(),
               "step_ms_fp32": 1000 * results[False][3], "step_ms_bf16": 1000 * results[True][3]}
        rows.append(row)
        print(f"maps {side}x{side}: D gradients in bf16 differ by {100 * row['gradient_relative_error']:.2f} % "
              f"(cosine {row['gradient_cosine']:.5f}); penalty {row['penalty_fp32']:.5f} -> {row['penalty_bf16']:.5f}; "
              f"step {row['step_ms_fp32']:.1f} ms fp32, {row['step_ms_bf16']:.1f} ms bf16")
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "batch_size": args.batch_size, "classes": args.classes, "rows": rows}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
