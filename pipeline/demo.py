"""The whole pipeline on the built-in synthetic dataset, on the CPU, in a few minutes.

Runs the same `skd` commands a user would (printed before each step): train a teacher, cache it
once, train a baseline student and the paper's ablation (+PI, +PI+PA, +PI+PA+HO) from the cache,
evaluate everything on the validation split and print one table.

    python -m pipeline.demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/demo.yaml"
TEACHER = ["--model", "pspnet_resnet18", "--width", "0.5"]
STUDENT = ["--model", "pspnet_resnet18", "--width", "0.125"]
STUDENTS = [("baseline", None), ("+PI", "pi"), ("+PI+PA", "pi,pa"), ("+PI+PA+HO", "pi,pa,ho")]


def skd(*args: str) -> None:
    cmd = [sys.executable, "-m", "cli", "--quiet", *args]
    print("$ skd " + " ".join(shlex.quote(a) for a in args[:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for every run of the demo (replaced)")
    parser.add_argument("--teacher-iterations", type=int, default=600)
    parser.add_argument("--student-iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seed of every training run (weights, data order, augmentation)")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    cache = str(out / "synthetic.zarr")

    seed = ["--seed", str(args.seed)]
    skd("train-teacher", "--config", CONFIG, *TEACHER, *seed, "--iterations", str(args.teacher_iterations),
        "--out", str(out / "teacher"))
    skd("cache-teacher", "--config", CONFIG, "--teacher", str(out / "teacher/model.pt"), "--cache", cache)
    for name, losses in STUDENTS:
        run = str(out / name.strip("+").replace("+", "_").lower())
        common = ["--config", CONFIG, *STUDENT, *seed, "--iterations", str(args.student_iterations), "--out", run]
        if losses is None:
            skd("train-teacher", *common)
        else:
            skd("train-student", *common, "--cache", cache, "--losses", losses)

    rows = []
    for name, run in [("teacher", "teacher")] + [(n, n.strip("+").replace("+", "_").lower()) for n, _ in STUDENTS]:
        result = out / f"{run}.json"
        skd("evaluate", "--config", CONFIG, "--checkpoint", str(out / run / "model.pt"), "--output", str(result),
            "--name", name, *(["--save-images", "4"] if run in ("teacher", "baseline", "pi_pa_ho") else []))
        report = json.loads(result.read_text())
        rows.append({"model": name, "arch": f"{report['arch']['name']} x{report['arch']['width']}",
                     "mIoU": f"{100 * report['miou']:.2f}", "pixel_acc": f"{100 * report['pixel_accuracy']:.2f}"})

    from pipeline.metrics import format_table

    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print()
    print(format_table(rows, ["model", "arch", "mIoU", "pixel_acc"]))
    print(f"\nsynthetic val, single scale; {time.perf_counter() - started:.0f} s in all; "
          f"results in {out}/results.json, coloured predictions in {out}/*/")


if __name__ == "__main__":
    main()
