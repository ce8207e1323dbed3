"""Distillation methods at one equal wall-clock budget: which wins when step costs differ.

Trains, one after the other (each alone on the machine, so that a budget means the same for all),
students with ``--budget-minutes M``: baseline, +PI, +PI+PA+HO and FD from the cache, and FD and
+PI+PA+HO with the teacher run live (online). The poly schedule and the distillation warm-up run
over the budget, so a method with a costlier step simply gets fewer steps. Then evaluates every
student and writes OUT/budget.json and OUT/budget.md (mIoU, steps done, ms per step).

    # CPU, the demo's data, teacher and store (make demo first), 2 minutes per method:
    python bench/budget_ablation.py --config configs/demo.yaml --teacher runs/demo/teacher/model.pt \\
        --cache runs/demo/synthetic.zarr --student-width 0.125 --budget-minutes 2 --out runs/budget-demo
    # one GPU, CamVid (teacher and store from bench/camvid_ablation.sh's work folder):
    python bench/budget_ablation.py --config configs/camvid.yaml --data-root .device/camvid \\
        --teacher /tmp/skd-work/teacher/model.pt --cache /tmp/skd-work/camvid-train.zarr --budget-minutes 0.75 \\
        --out "$OUT/budget"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (run, terms or None for the baseline, teacher source)
METHODS = [("baseline", None, "cache"), ("pi", "pi", "cache"), ("pi_pa_ho", "pi,pa,ho", "cache"),
           ("fd", "fd", "cache"), ("fd_online", "fd", "online"), ("pi_pa_ho_online", "pi,pa,ho", "online")]


def skd(args: list[str], log) -> int:
    log.write(f"$ skd {' '.join(args)}\n")
    log.flush()
    return subprocess.run([sys.executable, "-m", "cli", "--quiet", *args], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (online runs)")
    p.add_argument("--cache", required=True, help="the teacher's store of the training split")
    p.add_argument("--student", default="pspnet_resnet18")
    p.add_argument("--student-width", type=float, default=1.0)
    p.add_argument("--budget-minutes", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(m for m, _, _ in METHODS))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ["--config", args.config, *(["--data-root", args.data_root] if args.data_root else [])]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {"command": " ".join(sys.argv), "commit": commit, "budget_minutes": args.budget_minutes, "runs": {}}
    wanted = args.methods.split(",")
    with open(out / "log.txt", "a") as log:
        for name, terms, source in (m for m in METHODS if m[0] in wanted):
            run = out / name
            common = [*data, "--model", args.student, "--width", str(args.student_width), "--seed", str(args.seed),
                      "--budget-minutes", str(args.budget_minutes), "--out", str(run)]
            tic = time.perf_counter()
            if not (run / "model.pt").exists():
                if terms is None:
                    skd(["train-teacher", *common], log)
                else:
                    where = ["--cache", args.cache] if source == "cache" else ["--teacher", args.teacher]
                    skd(["train-student", *common, *where, "--losses", terms], log)
            seconds = time.perf_counter() - tic
            if not (run / "model.pt").exists():
                results["runs"][name] = {"status": "failed"}
                continue
            report = out / f"{name}.json"
            skd(["evaluate", *data, "--checkpoint", str(run / "model.pt"), "--output", str(report), "--name", name], log)
            rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
            results["runs"][name] = {"terms": terms, "teacher": source, "miou": json.loads(report.read_text())["miou"],
                                     "steps": rows[-1]["iteration"], "training_s": rows[-1]["elapsed_s"],
                                     "ms_per_step": 1000 * rows[-1]["elapsed_s"] / rows[-1]["iteration"],
                                     "wall_s": round(seconds, 1)}
            (out / "budget.json").write_text(json.dumps(results, indent=2))
    lines = [f"Equal budget of {args.budget_minutes:g} min per method (commit {commit}); `{results['command']}`", "",
             "| method | teacher | mIoU | steps | ms/step |", "|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        if "miou" in r:
            lines.append(f"| {name} | {r['teacher'] if r['terms'] else '-'} | {100 * r['miou']:.2f} | {r['steps']} | "
                         f"{r['ms_per_step']:.0f} |")
    (out / "budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
