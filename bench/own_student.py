"""A torchvision student distilled from a cached skd teacher: baseline vs +PI vs +PI+PA+HO over seeds.

The demo's teacher (PSPNet-R18 x0.5) and its store (configs/demo.yaml: 8 views per image, levels 1
and 1.5, unpooled features) distilled into ``torchvision:lraspp_mobilenet_v3_large`` trained from
scratch with the demo's recipe; every row once per seed, each run evaluated on synthetic val right
after it is trained. Runs already evaluated are kept, so a stopped benchmark continues where it was
when run again with the same arguments.

    python bench/own_student.py --teacher runs/demo/teacher/model.pt --cache runs/demo/synthetic.zarr \
        --seeds 0,1,2 --out runs/own-student

Writes OUT/own_student.json after every run: mIoU per row and seed, mean ± std (sample std over
seeds), and paired differences (each distilled row minus the baseline of the same seed, and
+PI+PA+HO minus +PI), mean ± std over the seeds both have; the commit, command and seconds per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS = [("baseline", "none"), ("+PI", "pi"), ("+PI+PA+HO", "pi,pa,ho")]
CONTRASTS = [("+PI", "baseline"), ("+PI+PA+HO", "baseline"), ("+PI+PA+HO", "+PI")]


def skd(*args: str) -> None:
    print("$ skd " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "cli", "--quiet", *args], check=True)


def evaluated(config: str, checkpoint: Path, result: Path) -> float:
    if not result.exists():
        skd("evaluate", "--config", config, "--checkpoint", str(checkpoint), "--output", str(result))
    return json.loads(result.read_text())["miou"]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher checkpoint the store was cached from (evaluated once)")
    parser.add_argument("--cache", required=True, help="the teacher's store")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--model", default="torchvision:lraspp_mobilenet_v3_large")
    parser.add_argument("--iterations", type=int, default=300, help="as the demo's students")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/own-student")
    args = parser.parse_args()
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "own_student.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report |= {"command": "python " + " ".join(sys.argv), "model": args.model, "config": args.config,
               "iterations": args.iterations, "teacher": args.teacher, "cache": args.cache,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, PyTorch {torch.__version__}"}
    report.setdefault("commits", [])
    if commit not in report["commits"]:
        report["commits"].append(commit)  # the code of every invocation that added runs
    seconds = report.setdefault("seconds", {})
    report["teacher_miou"] = 100 * evaluated(args.config, Path(args.teacher), out / "teacher_eval.json")

    per_seed: dict[str, dict[int, float]] = {name: {} for name, _ in ROWS}
    for seed in seeds:  # seed by seed: a benchmark cut short still has paired rows
        for name, losses in ROWS:
            run = out / f"{name.strip('+').replace('+', '_').lower()}_s{seed}"
            if not (run / "model.pt").exists():
                started = time.perf_counter()
                skd("train-student", "--config", args.config, "--model", args.model, "--seed", str(seed),
                    "--iterations", str(args.iterations), "--losses", losses, "--out", str(run),
                    *(["--cache", args.cache] if losses != "none" else []), *(["--resume"] if (run / "last.pt").exists() else []))
                seconds[run.name] = round(time.perf_counter() - started, 1)
            per_seed[name][seed] = 100 * evaluated(args.config, run / "model.pt", out / f"{run.name}.json")
            report["rows"] = {row: {"per_seed": values, **summary(list(values.values()))} for row, values in per_seed.items()}
            report["paired"] = {
                f"{a} - {b}": summary([per_seed[a][s] - per_seed[b][s] for s in seeds if s in per_seed[a] and s in per_seed[b]])
                for a, b in CONTRASTS}
            report_path.write_text(json.dumps(report, indent=2))

    print(f"\nteacher {report['teacher_miou']:.2f} mIoU; {args.model}, {args.iterations} iterations, seeds {args.seeds}")
    for name, row in report["rows"].items():
        std = f" ± {row['std']:.2f}" if row["std"] is not None else ""
        print(f"  {name:10s} {row['mean']:.2f}{std}   per seed {', '.join(f'{v:.2f}' for v in row['values'])}")
    for name, diff in report["paired"].items():
        std = f" ± {diff['std']:.2f}" if diff["std"] is not None else ""
        print(f"  {name:22s} {diff['mean']:+.2f}{std} (n={diff['n']})")


if __name__ == "__main__":
    main()
