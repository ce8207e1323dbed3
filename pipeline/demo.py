"""The whole pipeline on the built-in synthetic dataset, on the CPU, in a few minutes.

Runs the same `skd` commands a user would (printed before each step): train a teacher, cache it
once, train a baseline student and the paper's ablation (+PI, +PI+PA, +PI+PA+HO) from the cache,
evaluate everything on the validation split and print one table.

    python -m pipeline.demo --out runs/demo                       # seed 0, as `make demo`
    python -m pipeline.demo --seeds 0,1,2 --online --out runs/demo-seeds   # mean ± std over seeds

With several seeds, one teacher and one store serve every student (as in practice: the teacher is
paid once), and each student row is trained once per seed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/demo.yaml"
TEACHER = ["--model", "pspnet_resnet18", "--width", "0.5"]
STUDENT = ["--model", "pspnet_resnet18", "--width", "0.125"]
# (row, distillation terms or None for the baseline, teacher source)
STUDENTS = [("baseline", None, "cache"), ("+PI", "pi", "cache"), ("+PI+PA", "pi,pa", "cache"),
            ("+PI+PA+HO", "pi,pa,ho", "cache")]
ONLINE = ("+PI+PA+HO online", "pi,pa,ho", "online")


def skd(*args: str) -> None:
    cmd = [sys.executable, "-m", "cli", "--quiet", *args]
    print("$ skd " + " ".join(shlex.quote(a) for a in args[:]), flush=True)
    subprocess.run(cmd, check=True)


def run_dir(name: str, seed: int) -> str:
    return name.strip("+").replace("+", "_").replace(" ", "_").lower() + f"_s{seed}"


def evaluate(out: Path, run: str, name: str, images: bool) -> dict:
    result = out / f"{run}.json"
    skd("evaluate", "--config", CONFIG, "--checkpoint", str(out / run / "model.pt"), "--output", str(result),
        "--name", name, *(["--save-images", "4"] if images else []))
    return json.loads(result.read_text())


def store_bytes_per_image(store: Path) -> float:
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    total = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return total / attrs["dataset"]["num_images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for every run of the demo (replaced)")
    parser.add_argument("--teacher-iterations", type=int, default=600)
    parser.add_argument("--student-iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seed of the teacher (and of the students without --seeds)")
    parser.add_argument("--seeds", default=None, help="student seeds, e.g. 0,1,2: each row is trained once per seed")
    parser.add_argument("--online", action="store_true", help="add +PI+PA+HO with the teacher run live, to compare")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    students = STUDENTS + ([ONLINE] if args.online else [])
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    cache = out / "synthetic.zarr"
    teacher = out / "teacher/model.pt"

    skd("train-teacher", "--config", CONFIG, *TEACHER, "--seed", str(args.seed),
        "--iterations", str(args.teacher_iterations), "--out", str(out / "teacher"))
    skd("cache-teacher", "--config", CONFIG, "--teacher", str(teacher), "--cache", str(cache))
    for seed in seeds:
        for name, losses, source in students:
            common = ["--config", CONFIG, *STUDENT, "--seed", str(seed), "--iterations", str(args.student_iterations),
                      "--out", str(out / run_dir(name, seed))]
            if losses is None:
                skd("train-teacher", *common)
            else:
                where = ["--cache", str(cache)] if source == "cache" else ["--teacher", str(teacher)]
                skd("train-student", *common, *where, "--losses", losses)

    report = evaluate(out, "teacher", "teacher", images=True)
    rows = [{"model": "teacher", "arch": f"{report['arch']['name']} x{report['arch']['width']}",
             "mIoU": f"{100 * report['miou']:.2f}", "pixel_acc": f"{100 * report['pixel_accuracy']:.2f}"}]
    results = {"teacher": {"miou": report["miou"]}, "seeds": seeds, "store_bytes_per_image": store_bytes_per_image(cache)}
    baseline_mean = None
    for name, _, _ in students:
        reports = [evaluate(out, run_dir(name, seed), name, images=seed == seeds[0] and name in ("baseline", "+PI+PA+HO"))
                   for seed in seeds]
        mious = [100 * r["miou"] for r in reports]
        mean = statistics.mean(mious)
        baseline_mean = mean if baseline_mean is None else baseline_mean
        row = {"model": name, "arch": f"{reports[0]['arch']['name']} x{reports[0]['arch']['width']}",
               "mIoU": f"{mean:.2f}", "Δ": f"{mean - baseline_mean:+.2f}" if name != "baseline" else "",
               "pixel_acc": f"{100 * statistics.mean(r['pixel_accuracy'] for r in reports):.2f}"}
        if len(seeds) > 1:
            row["mIoU"] = f"{mean:.2f} ± {statistics.stdev(mious):.2f}"
            row["per seed"] = " ".join(f"{m:.2f}" for m in mious)
        rows.append(row)
        results[name] = {"miou_per_seed": mious, "mean": mean, "std": statistics.stdev(mious) if len(seeds) > 1 else 0.0}

    from pipeline.metrics import format_table

    (out / "results.json").write_text(json.dumps({"rows": rows, **results}, indent=2))
    print()
    print(format_table(rows, ["model", "arch", "mIoU", "Δ", "pixel_acc"] + (["per seed"] if len(seeds) > 1 else [])))
    print(f"\nsynthetic val, single scale; student seeds {','.join(map(str, seeds))}; teacher store "
          f"{results['store_bytes_per_image'] / 1024:.1f} KB/image; {time.perf_counter() - started:.0f} s in all; "
          f"results in {out}/results.json, coloured predictions in {out}/*/")


if __name__ == "__main__":
    main()
