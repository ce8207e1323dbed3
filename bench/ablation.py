"""The paper's ablation on real CamVid, end to end, sized to a time budget:

    teacher (ImageNet MobileNetV2 PSPNet) -> cache of the train split (the config's TTA, sliding
    window and levels, and a bank of training views) -> students from scratch: baseline, +PI,
    +PI+PA, +PI+PA+HO from the cache's views, +PI+PA+HO from its whole-image maps (--no-views) and
    +PI+PA+HO online (first seed), then baseline and +PI+PA+HO from the cache for every other seed
    (``--mode seeds``: baseline and +PI+PA+HO only, for every seed; ``--mode grid``: every row of
    ``--rows`` for every seed, seed by seed) -> CamVid val mIoU of everything (single scale, whole image).

Every row of the comparison shares the schedule, batch, crops, data and seed of its baseline. Each
step runs under its own time limit; RESULTS/results.json and RESULTS/summary.md are rewritten as
each step finishes, so a run cut short still reports what it finished. Checkpoints and stores stay in
WORK (default RESULTS/work), so RESULTS stays small (three files).

    python bench/ablation.py --scale gpu --out results/camvid-gpu             # one H100/H200, ~7 min
    python bench/ablation.py --scale gpu --mode seeds --seeds 1,2 --out results/seeds  # baseline and full, 2 seeds
    python bench/ablation.py --scale cpu --out runs/camvid-cpu                 # the same, 2-core CPU scale
    python bench/ablation.py --scale smoke --out runs/smoke                    # a minute: checks the script
    # half-resolution CamVid on a 2-core CPU, 3 seeds of the four rows that matter (hours; resumable:
    # a finished teacher, store or student in WORK is kept and not redone)
    python bench/downscale_camvid.py ../shared/data/camvid runs/camvid-half
    python bench/ablation.py --scale cpu-half --data runs/camvid-half --mode grid \
        --rows baseline,pi,pi_pa_ho,pi_pa_ho_online --seeds 0,1,2 --out runs/camvid-cpu-half
    # baseline, +PI, +PI+PA+HO (cache) and +PI+PA+HO online for seeds 0, 1, 2, ... as long as they fit in
    # 400 s; 600 student iterations; evaluations in this process (bench/gpu_evidence.sh runs this)
    python bench/ablation.py --scale gpu --mode grid --rows baseline,pi_pa_ho,pi,pi_pa_ho_online \
        --seeds 0,1,2,3 --deadline 400 --set student_iterations=600 --evaluate-in-process --out OUT

``--set FIELD=VALUE`` overrides a field of the scale (any of ``Scale``'s, e.g. ``device=cpu``).
``--deadline S``: every student must be done S seconds after the start; one whose expected time
(the longest finished student of its row, or of any row, plus an evaluation) no longer fits is not
started, and is listed as skipped. ``--evaluate-in-process``: the evaluations run one at a time in
this process (one start-up in all, not one per run, and no student slot held while evaluating),
through the same ``evaluate_model`` as ``skd evaluate``; a run whose evaluation fails there is
evaluated by ``skd evaluate``.
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
import threading
from dataclasses import asdict, dataclass, fields, replace
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
    # CamVid at half resolution (bench/downscale_camvid.py; 240x180 images) on the 2-core CPU, long
    # enough for a teacher worth distilling: teacher 3000 it (about 3 h), store with flip, 180x240
    # windows, levels 1 and 2 and 8 views; students R18 x0.5, 800 it each.
    "cpu-half": Scale(3000, 800, "180x240", 8, 0.5, 1, "cpu", 1, 14400, 3600, 7200, "180x240", "1,2", "1", True, 8),
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


def apply_overrides(scale: Scale, settings: list[str]) -> Scale:
    """``FIELD=VALUE`` strings onto a copy of ``scale``, each value cast to the field's type."""
    types = {f.name: f.type for f in fields(Scale)}
    changes = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set {setting!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        if kind == "bool":
            changes[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            changes[key] = {"int": int, "float": float}.get(kind, str)(value)
    return replace(scale, **changes)


class Experiment:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scale = apply_overrides(SCALES[args.scale], args.set or [])
        if args.parallel:
            self.scale.parallel = args.parallel
        self.start = time.perf_counter()
        self.lock = threading.Lock()
        self.train_seconds: dict[str, list[float]] = {}  # row -> training times of its finished students
        self.eval_seconds: list[float] = []
        self.evaluator = futures.ThreadPoolExecutor(1) if args.evaluate_in_process else None
        self.evaluations: list[futures.Future] = []
        self._val = None
        self.out = Path(args.out)
        self.work = Path(args.work or self.out / "work")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "log.txt", "a")
        self.results = {"command": " ".join(sys.argv), "commit": _commit(), "host": platform.node(),
                        "scale": args.scale, "settings": asdict(self.scale), "device": _device_name(self.scale.device),
                        "mode": args.mode, "seeds": args.seeds, "rows": args.rows if args.mode == "grid" else None,
                        "deadline_s": args.deadline, "steps": {}, "runs": {}}

    # -- running commands ------------------------------------------------------------------------
    def skd(self, step: str, args: list[str], timeout: float) -> bool:
        """Run one `skd` command under a time limit; record its wall time and outcome."""
        cmd = [sys.executable, "-m", "cli", "--quiet", *args]
        with self.lock:
            self.log.write(f"$ skd {' '.join(args)}\n")
            self.log.flush()
        tic = time.perf_counter()
        timeout = max(1, round(timeout))
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout} s"
        self.record(step, status, time.perf_counter() - tic)
        return status == "ok"

    def record(self, step: str, status: str, seconds: float) -> None:
        with self.lock:
            self.results["steps"][step] = {"status": status, "seconds": round(seconds, 1)}
            self.save()

    def remaining(self) -> float:
        """Seconds left before --deadline (infinite without one)."""
        if self.args.deadline is None:
            return float("inf")
        return self.args.deadline - (time.perf_counter() - self.start)

    def common(self) -> list[str]:
        s = self.scale
        return ["--config", "configs/camvid.yaml", "--data-root", self.args.data, "--crop-size", s.crop,
                "--batch-size", str(s.batch_size), "--workers", str(s.workers), "--device", s.device]

    def evaluate(self, run: str) -> None:
        """CamVid val mIoU of a run's model: queued for this process's evaluator with
        --evaluate-in-process (returns at once), else `skd evaluate` now."""
        if self.evaluator is not None:
            self.evaluations.append(self.evaluator.submit(self._evaluate_here, run))
        else:
            self._evaluate_cli(run)

    def _evaluate_cli(self, run: str) -> None:
        result = self.work / f"{run}.json"
        tic = time.perf_counter()
        ok = self.skd(f"evaluate {run}", ["evaluate", "--config", "configs/camvid.yaml", "--data-root", self.args.data,
                                          "--device", self.scale.device, "--checkpoint", str(self.work / run / "model.pt"),
                                          "--output", str(result), "--name", run], self.scale.timeout_student_s)
        if ok:
            self._report(run, json.loads(result.read_text()), time.perf_counter() - tic)

    def _evaluate_here(self, run: str) -> None:
        tic = time.perf_counter()
        try:
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            from pipeline.data import build_dataset
            from pipeline.device import resolve_device
            from pipeline.evaluate import evaluate_model
            from pipeline.metrics import evaluation_report
            from pipeline.train.checkpoint import model_from_checkpoint

            if self._val is None:
                self._val = build_dataset("camvid", self.args.data, "val")
            model, _ = model_from_checkpoint(self.work / run / "model.pt")
            cm = evaluate_model(model, self._val, resolve_device(self.scale.device), progress=False, workers=2)
            report = {"name": run, "split": "val", **evaluation_report(cm, list(self._val.class_names))}
        except Exception as error:  # noqa: BLE001 - the command line's evaluation is the fallback
            with self.lock:
                self.log.write(f"in-process evaluation of {run} failed ({type(error).__name__}: {error}); "
                               "evaluating with skd evaluate\n")
                self.log.flush()
            self._evaluate_cli(run)
            return
        (self.work / f"{run}.json").write_text(json.dumps(report, indent=2))
        self.record(f"evaluate {run}", "ok", time.perf_counter() - tic)
        self._report(run, report, time.perf_counter() - tic)

    def _report(self, run: str, report: dict, seconds: float) -> None:
        with self.lock:
            if run != "teacher":  # (the teacher's includes the evaluator's start-up)
                self.eval_seconds.append(seconds)
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
        self.evaluate("teacher")  # with --evaluate-in-process, while the cache is written
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
        if self.args.mode == "grid":
            rows = {name: (name, losses, source) for name, losses, source in ABLATION}
            names = self.args.rows.split(",")
            unknown = [name for name in names if name not in rows]
            if unknown:
                raise SystemExit(f"--rows: unknown {', '.join(unknown)}; expected any of {', '.join(rows)}")
            jobs = [(*rows[name], seed) for seed in seeds for name in names]
        else:
            full = [(name, losses, source) for name, losses, source in ABLATION if name in ("baseline", "pi_pa_ho")]
            jobs = [] if self.args.mode == "seeds" else [(*row, seeds[0]) for row in ABLATION]
            jobs += [(*row, seed) for seed in (seeds if self.args.mode == "seeds" else seeds[1:]) for row in full]
        with futures.ThreadPoolExecutor(s.parallel) as pool:
            list(pool.map(lambda job: self.student(*job, teacher=teacher, store=store), jobs))
        for evaluation in self.evaluations:
            evaluation.result()

    def expected_seconds(self, name: str) -> float:
        """A student of this row, trained and evaluated: the longest finished one of the row (of any
        row before one of this row has finished), plus the longest evaluation; 0 before any."""
        with self.lock:
            train = self.train_seconds.get(name) or [t for ts in self.train_seconds.values() for t in ts]
            return max(train, default=0.0) + max(self.eval_seconds, default=0.0)

    def student(self, name: str, losses: str | None, source: str, seed: int, teacher: Path, store: Path) -> None:
        s = self.scale
        run = f"{name}_s{seed}"
        args = [*self.common(), "--model", "pspnet_resnet18", "--width", str(s.student_width),
                "--iterations", str(s.student_iterations), "--seed", str(seed), "--out", str(self.work / run)]
        left, expected = self.remaining(), self.expected_seconds(name)
        if not (self.work / run / "model.pt").exists() and left < max(expected, 1.0):
            self.record(run, f"skipped ({left:.0f} s left of the deadline, a student takes ~{expected:.0f} s)", 0.0)
            return
        timeout = min(s.timeout_student_s, left - max(self.eval_seconds, default=0.0))
        tic = time.perf_counter()
        ok = False
        if (self.work / run / "model.pt").exists():
            pass
        elif losses is None:
            ok = self.skd(run, ["train-teacher", *args], timeout)
        elif source in ("cache", "maps") and store.exists():
            ok = self.skd(run, ["train-student", *args, "--cache", str(store), "--losses", losses,
                                "--views" if source == "cache" else "--no-views"], timeout)
        elif source == "online":
            ok = self.skd(run, ["train-student", *args, "--teacher", str(teacher), "--losses", losses], timeout)
        if ok:
            with self.lock:
                self.train_seconds.setdefault(name, []).append(time.perf_counter() - tic)
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
    p.add_argument("--mode", choices=("ablation", "seeds", "grid"), default="ablation",
                   help="ablation: every row for the first seed; seeds: baseline and +PI+PA+HO only; "
                        "grid: every row of --rows for every seed, seed by seed")
    p.add_argument("--rows", default="baseline,pi_pa_ho,pi,pi_pa_ho_online",
                   help=f"--mode grid: the rows, in the order they start (any of {', '.join(LABELS)})")
    p.add_argument("--seeds", default="0", help="student seeds (the teacher and store are made once, seed 0)")
    p.add_argument("--data", default=os.environ.get("CAMVID", "../shared/data/camvid"))
    p.add_argument("--weights", default=os.environ.get(
        "WEIGHTS", "../shared/weights/mobilenet_v2_imagenet_tflite_int8_dequant_bnrecal_camvid-c2b858cd.pth"))
    p.add_argument("--parallel", type=int, default=None, help="students trained at once (default: the scale's)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a field of the scale, e.g. student_iterations=600 or device=cpu (repeatable)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after the start by which every student must be done: one that no longer fits "
                        "is not started")
    p.add_argument("--evaluate-in-process", action="store_true",
                   help="evaluate in this process, one run at a time, beside the training (not `skd evaluate`)")
    args = p.parse_args()
    experiment = Experiment(args)
    tic = time.perf_counter()
    experiment.run()
    experiment.results["total_seconds"] = round(time.perf_counter() - tic, 1)
    experiment.save()
    print(summary(experiment.results))


if __name__ == "__main__":
    main()
