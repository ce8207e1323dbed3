"""The paper's ablation on real CamVid, end to end, sized to a time budget:

    teacher (ImageNet MobileNetV2 PSPNet) -> cache of the train split (the config's TTA, sliding
    window and levels, and a bank of training views) -> students from scratch: baseline, +PI,
    +PI+PA, +PI+PA+HO from the cache's views, +PI+PA+HO from its whole-image maps (--no-views) and
    +PI+PA+HO online (first seed), then baseline and +PI+PA+HO from the cache for every other seed
    (``--mode seeds``: baseline and +PI+PA+HO only, for every seed)
    -> CamVid val mIoU of everything (single scale, whole image).

Every row of the comparison shares the schedule, batch, crops, data and seed of its baseline. Each
step runs under its own time limit; RESULTS/results.json and RESULTS/summary.md are rewritten as
each step finishes, so a run cut short still reports what it finished. Checkpoints and stores stay in
WORK (default RESULTS/work), so RESULTS stays small (three files).

    python bench/ablation.py --scale gpu --out results/camvid-gpu             # one H100/H200, ~7 min
    python bench/ablation.py --scale gpu --mode seeds --seeds 1,2 --out results/seeds  # baseline and full, 2 seeds
    python bench/ablation.py --scale cpu --out runs/camvid-cpu                 # the same, 2-core CPU scale
    python bench/ablation.py --scale smoke --out runs/smoke                    # a minute: checks the script

Students run ``--parallel`` at a time (on a GPU they are bound by kernel launches, so several
processes share one device well). Rates behind the GPU sizing (H200, bf16, 360x480, batch 8):
teacher 46 ms/it, R18 student 30 ms/it alone, 40 with PI, 72 with PI+PA+HO; see docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Scale:
    teacher_iterations: int
    student_iterations: int
    crop: str
    batch_size: int
    student_width: float
    workers: int
    device: str
    parallel: int
    timeout_teacher_s: int
    timeout_cache_s: int
    timeout_student_s: int
    teacher_window: str  # sliding-window size for the cache: the teacher's training crop
    levels: str
    teacher_scales: str
    teacher_flip: bool
    views: int  # training views stored per image (cache-teacher --views)


SCALES = {
    # One H100/H200 in <= 9 minutes (docs/RESULTS.md §4 has the estimate): teacher 1000 it ~46 s;
    # cache ~100 s (28 teacher passes per image: flip x (1 window at level 1 + 9 at level 2) and 8
    # views, against 20 s measured for 6 whole-image views); six students of 1000 it, ~360 s of GPU
    # time one after the other, less three at a time; evaluations and process start-ups ~100 s.
    "gpu": Scale(1000, 1000, "360x480", 8, 1.0, 4, "auto", 3, 150, 180, 300, "360x480", "1,2", "1", True, 8),
    # The 2-core CPU machine: small crops and short schedules (about an hour for the ablation).
    # (Level 1 only: a level-2 store in 128x160 windows is ~100 teacher passes per image on 2 cores.)
    "cpu": Scale(400, 300, "128x160", 8, 0.5, 1, "cpu", 1, 1800, 1800, 1800, "128x160", "1", "1", True, 8),
    # A check that the script runs end to end (minutes on a CPU); its numbers mean nothing.
    "smoke": Scale(4, 4, "128x160", 2, 0.125, 0, "cpu", 2, 600, 600, 600, "360x480", "1", "1", False, 2),
}
# (run, terms, teacher source): "cache" trains on the store's views, "maps" replays its whole-image
# maps onto fresh augmentations (--no-views), "online" runs the teacher live.
# In the order they start: the comparison that matters most first, in case a time limit cuts the run
# (the summary lists them in LABELS order).
ABLATION = [("baseline", None, "cache"), ("pi_pa_ho", "pi,pa,ho", "cache"), ("pi_pa_ho_online", "pi,pa,ho", "online"),
            ("pi", "pi", "cache"), ("pi_pa", "pi,pa", "cache"), ("pi_pa_ho_maps", "pi,pa,ho", "maps")]
LABELS = {"baseline": "student baseline (CE only)", "pi": "+PI (cache, views)", "pi_pa": "+PI+PA (cache, views)",
          "pi_pa_ho": "+PI+PA+HO (cache, views)", "pi_pa_ho_maps": "+PI+PA+HO (cache, whole-image maps)",
          "pi_pa_ho_online": "+PI+PA+HO (online teacher)"}


class Experiment:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scale = SCALES[args.scale]
        self.out = Path(args.out)
        self.work = Path(args.work or self.out / "work")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "log.txt", "a")
        self.results = {"command": " ".join(sys.argv), "commit": _commit(), "host": platform.node(),
                        "scale": args.scale, "settings": asdict(self.scale), "device": _device_name(self.scale.device),
                        "steps": {}, "runs": {}}

    # -- running commands ------------------------------------------------------------------------
    def skd(self, step: str, args: list[str], timeout: int) -> bool:
        """Run one `skd` command under a time limit; record its wall time and outcome."""
        cmd = [sys.executable, "-m", "cli", "--quiet", *args]
        self.log.write(f"$ skd {' '.join(args)}\n")
        self.log.flush()
        tic = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout} s"
        self.results["steps"][step] = {"status": status, "seconds": round(time.perf_counter() - tic, 1)}
        self.save()
        return status == "ok"

    def common(self) -> list[str]:
        s = self.scale
        return ["--config", "configs/camvid.yaml", "--data-root", self.args.data, "--crop-size", s.crop,
                "--batch-size", str(s.batch_size), "--workers", str(s.workers), "--device", s.device]

    def evaluate(self, run: str) -> None:
        result = self.work / f"{run}.json"
        ok = self.skd(f"evaluate {run}", ["evaluate", "--config", "configs/camvid.yaml", "--data-root", self.args.data,
                                          "--device", self.scale.device, "--checkpoint", str(self.work / run / "model.pt"),
                                          "--output", str(result), "--name", run], self.scale.timeout_student_s)
        if ok:
            report = json.loads(result.read_text())
            self.results["runs"][run] = {"miou": report["miou"], "pixel_accuracy": report["pixel_accuracy"],
                                         "per_class_iou": report["per_class_iou"]}
            self.save()

    # -- the experiment --------------------------------------------------------------------------
    def run(self) -> None:
        s = self.scale
        teacher = self.work / "teacher/model.pt"
        store = self.work / "camvid-train.zarr"
        if not teacher.exists():
            self.skd("teacher", ["train-teacher", *self.common(), "--model", "pspnet_mobilenetv2", "--pretrained-backbone",
                                 self.args.weights, "--iterations", str(s.teacher_iterations), "--seed", "0",
                                 "--out", str(self.work / "teacher")], s.timeout_teacher_s)
        if not teacher.exists():
            return
        self.evaluate("teacher")
        if not store.exists():
            self.skd("cache", ["cache-teacher", "--config", "configs/camvid.yaml", "--data-root", self.args.data,
                               "--device", s.device, "--workers", str(s.workers), "--teacher", str(teacher),
                               "--cache", str(store), "--teacher-window", s.teacher_window, "--levels", s.levels,
                               "--teacher-scales", s.teacher_scales, "--views", str(s.views), "--crop-size", s.crop,
                               "--teacher-flip" if s.teacher_flip else "--no-teacher-flip", "--overwrite"],
                     s.timeout_cache_s)
        if store.exists():
            images = json.loads((store / "zarr.json").read_text())["attributes"]["dataset"]["num_images"]
            self.results["store_bytes_per_image"] = _bytes(store) / images
        seeds = [int(x) for x in self.args.seeds.split(",")]
        full = [(name, losses, source) for name, losses, source in ABLATION if name in ("baseline", "pi_pa_ho")]
        jobs = [] if self.args.mode == "seeds" else [(*row, seeds[0]) for row in ABLATION]
        jobs += [(*row, seed) for seed in (seeds if self.args.mode == "seeds" else seeds[1:]) for row in full]
        with futures.ThreadPoolExecutor(s.parallel) as pool:
            list(pool.map(lambda job: self.student(*job, teacher=teacher, store=store), jobs))

    def student(self, name: str, losses: str | None, source: str, seed: int, teacher: Path, store: Path) -> None:
        s = self.scale
        run = f"{name}_s{seed}"
        args = [*self.common(), "--model", "pspnet_resnet18", "--width", str(s.student_width),
                "--iterations", str(s.student_iterations), "--seed", str(seed), "--out", str(self.work / run)]
        if (self.work / run / "model.pt").exists():
            pass
        elif losses is None:
            self.skd(run, ["train-teacher", *args], s.timeout_student_s)
        elif source in ("cache", "maps") and store.exists():
            self.skd(run, ["train-student", *args, "--cache", str(store), "--losses", losses,
                           "--views" if source == "cache" else "--no-views"], s.timeout_student_s)
        elif source == "online":
            self.skd(run, ["train-student", *args, "--teacher", str(teacher), "--losses", losses], s.timeout_student_s)
        if (self.work / run / "model.pt").exists():
            self.evaluate(run)

    # -- reporting -------------------------------------------------------------------------------
    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "summary.md").write_text(summary(self.results))


def summary(results: dict) -> str:
    runs = results["runs"]
    lines = [f"CamVid val mIoU (single scale, whole image); scale {results['scale']}, device {results['device']}, "
             f"commit {results['commit']}", "", "| run | seed | mIoU | Δ vs baseline (same seed) | pixel acc |",
             "|---|---|---|---|---|"]
    if "teacher" in runs:
        lines.append(f"| teacher (MobileNetV2 PSPNet, ImageNet init) | 0 | {100 * runs['teacher']['miou']:.2f} |  | "
                     f"{100 * runs['teacher']['pixel_accuracy']:.2f} |")
    students = sorted((run.rsplit("_s", 1) for run in runs if run != "teacher"),
                      key=lambda name_seed: (int(name_seed[1]), list(LABELS).index(name_seed[0])))
    for name, seed in students:
        r = runs[f"{name}_s{seed}"]
        base = runs.get(f"baseline_s{seed}")
        delta = f"{100 * (r['miou'] - base['miou']):+.2f}" if base and name != "baseline" else ""
        lines.append(f"| {LABELS[name]} | {seed} | {100 * r['miou']:.2f} | {delta} | {100 * r['pixel_accuracy']:.2f} |")
    by_seed = {}
    for run, r in runs.items():
        if run != "teacher":
            name, seed = run.rsplit("_s", 1)
            by_seed.setdefault(name, []).append(100 * r["miou"])
    if any(len(v) > 1 for v in by_seed.values()):
        import statistics

        lines += ["", "| run | seeds | mean | std |", "|---|---|---|---|"]
        for name, values in by_seed.items():
            if len(values) > 1:
                lines.append(f"| {LABELS[name]} | {len(values)} | {statistics.mean(values):.2f} | {statistics.stdev(values):.2f} |")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {step} | {v['status']} | {v['seconds']} |" for step, v in results["steps"].items()]
    if "store_bytes_per_image" in results:
        lines += ["", f"Store: {results['store_bytes_per_image'] / 1024:.1f} KB per training image."]
    return "\n".join(lines) + "\n"


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def _device_name(device: str) -> str:
    try:
        import torch

        if device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    p.add_argument("--out", required=True, help="results folder: results.json, summary.md, log.txt")
    p.add_argument("--work", default=None, help="checkpoints and stores (default OUT/work)")
    p.add_argument("--mode", choices=("ablation", "seeds"), default="ablation",
                   help="ablation: every row for the first seed; seeds: baseline and +PI+PA+HO only")
    p.add_argument("--seeds", default="0", help="student seeds (the teacher and store are made once, seed 0)")
    p.add_argument("--data", default=os.environ.get("CAMVID", "../shared/data/camvid"))
    p.add_argument("--weights", default=os.environ.get(
        "WEIGHTS", "../shared/weights/mobilenet_v2_imagenet_tflite_int8_dequant_bnrecal_camvid-c2b858cd.pth"))
    p.add_argument("--parallel", type=int, default=None, help="students trained at once (default: the scale's)")
    args = p.parse_args()
    experiment = Experiment(args)
    if args.parallel:
        experiment.scale.parallel = args.parallel
    tic = time.perf_counter()
    experiment.run()
    experiment.results["total_seconds"] = round(time.perf_counter() - tic, 1)
    experiment.save()
    print(summary(experiment.results))


if __name__ == "__main__":
    main()
