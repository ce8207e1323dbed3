"""Training step time: student only vs distillation from the cache vs distillation from an online teacher.

Same student, teacher, batch, crop and losses in the three modes; the modes take their steps in
turn, so that the machine's drift falls on all of them alike; the first iterations (warm-up) are
excluded. Reports per-iteration wall time through the real data loader (what a user waits for) and
the time of the step itself, plus the ratios, as JSON; and each mode's FLOPs per step, whose ratio is
what the times' ratio would be if every op ran equally efficiently.

    python bench/step_time.py --output docs/results/step_time_cpu.json                 # CPU, small scale
    python bench/step_time.py --losses pi --losses pi,pa --losses pi,pa,ho --profile prof.txt  # several sets
    python bench/step_time.py --losses pi,pa,ho --no-online --compile     # each mode eager and compiled, in turn
    python bench/step_time.py --losses pi --losses pi,pa,ho --online-losses pi,pa,ho   # online for the full set only
    python bench/step_time.py --dataset camvid --data-root ../shared/data/camvid \\
        --teacher runs/camvid-teacher/model.pt --crop 360x480 --device cuda --output step_time_gpu.json
    # Cityscapes scale on a GPU: R18 x1.0 student, R101 teacher, 512x512 crops of 1024x2048 images
    python bench/step_time.py --size 1024x2048 --crop 512x512 --student-width 1 --teacher-arch pspnet_resnet101 \\
        --teacher-width 1 --workers 8 --device cuda --losses pi --losses pi,pa --losses pi,pa,ho --output st.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache.writer import cache_teacher  # noqa: E402
from pipeline.config import Config, merge  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.train.checkpoint import file_sha256, model_from_checkpoint, save_checkpoint  # noqa: E402
from pipeline.device import resolve_device
from pipeline.train.trainer import Trainer  # noqa: E402


COMPILED = "_compiled"  # the suffix of a mode whose student is compiled


def reference_mode(name: str) -> str:
    """The student-only mode a mode's ratios divide by: the compiled one for compiled modes."""
    return "student_only" + (COMPILED if name.endswith(COMPILED) else "")


def time_modes(cfgs: dict[str, Config], warmup: int, iterations: int) -> dict[str, dict]:
    """Median step and iteration times of every mode, their steps taken in turn (round robin).

    Taking turns puts any drift of the machine (other load, clock changes) on all modes alike,
    which timing one mode after the other does not; ``paired_step_ratio`` is the median over rounds
    of a step's time over the student-only step of the same round. An iteration is fetching the
    batch from the loader (prefetching in its workers meanwhile) plus the step.
    """
    trainers = {name: Trainer(cfg, progress=False) for name, cfg in cfgs.items()}
    sync = torch.cuda.synchronize if next(iter(trainers.values())).device.type == "cuda" else (lambda: None)
    streams = {name: trainer.batches() for name, trainer in trainers.items()}
    steps: dict[str, list[float]] = {name: [] for name in trainers}
    walls: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(warmup + iterations):
        for name, trainer in trainers.items():
            sync()
            tic = time.perf_counter()
            batch = next(streams[name])
            start = time.perf_counter()
            trainer.step(batch)
            sync()
            if i >= warmup:
                now = time.perf_counter()
                steps[name].append(now - start)
                walls[name].append(now - tic)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    results = {name: {"step_s": median(steps[name]), "iteration_s": median(walls[name]),
                      "mean_iteration_s": sum(walls[name]) / len(walls[name])} for name in trainers}
    for name in trainers:
        if name != reference_mode(name):
            results[name]["paired_step_ratio"] = median([a / b for a, b in zip(steps[name], steps[reference_mode(name)])])
        if name.endswith(COMPILED):  # its step over the same mode's eager step, round by round
            results[name]["paired_ratio_to_eager"] = median(
                [a / b for a, b in zip(steps[name], steps[name.removesuffix(COMPILED)])])
    # The arithmetic of one more step of each mode (torch's FLOP counter: convolutions and matrix
    # products, forward and backward): the ratio a machine equally efficient at every op would see.
    # (Not for compiled students: the counter sees only part of a compiled graph's work.)
    for name, trainer in trainers.items():
        if trainer.cfg.train.compile:
            continue
        with FlopCounterMode(display=False) as counter:
            trainer.step(next(streams[name]))
        results[name]["gflop"] = counter.get_total_flops() / 1e9
    return results


def profile_step(cfg: Config, warmup: int) -> str:
    """A torch.profiler table (self time per operator) of one full training step, after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    trainer = Trainer(cfg, progress=False)
    batches = trainer.batches()
    for _ in range(warmup):
        trainer.step(next(batches))
    batch = next(batches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.step(batch)
    key = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--size", default="192x256", help="synthetic image size HxW")
    p.add_argument("--student", default="pspnet_resnet18")
    p.add_argument("--student-width", type=float, default=0.5)
    p.add_argument("--teacher", default=None, help="teacher checkpoint; default: a randomly initialised --teacher-arch")
    p.add_argument("--teacher-arch", default="pspnet_resnet50")
    p.add_argument("--teacher-width", type=float, default=0.5)
    p.add_argument("--cache", default=None, help="existing store of that teacher; default: cached here first")
    p.add_argument("--losses", action="append", default=None,
                   help="distillation terms, e.g. pi,pa,ho; repeat for several sets [default: pi,pa,ho]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", default="128x128")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", default=None,
                   help="write a torch.profiler table of one cached step (the last --losses set) here")
    p.add_argument("--gp-every", type=int, default=1,
                   help="the gradient penalty on every N-th discriminator step (distill.gp_every; 1 = the paper)")
    p.add_argument("--no-online", action="store_true", help="time student-only and cached steps only")
    p.add_argument("--online-losses", action="append", default=None,
                   help="time the online teacher for these of the --losses sets only (repeatable) [default: every set]")
    p.add_argument("--compile", action="store_true",
                   help="also time every mode with its student compiled (train.compile), in the same rounds; the "
                        "first warm-up step compiles")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    loss_sets = args.losses or ["pi,pa,ho"]

    device = resolve_device(args.device)
    options = {"size": [int(v) for v in args.size.split("x")], "length": 64} if args.dataset == "synthetic" else {}
    dataset = build_dataset(args.dataset, args.data_root, "train", **options)
    tmp = Path(tempfile.mkdtemp(prefix="skd-bench-"))
    teacher_path = args.teacher
    if teacher_path is None:
        arch = {"name": args.teacher_arch, "num_classes": dataset.num_classes, "width": args.teacher_width}
        teacher_path = str(tmp / "teacher.pt")
        save_checkpoint(teacher_path, {"arch": arch, "model": build_model(**arch).state_dict()})
    cache = args.cache
    if cache is None:
        teacher, arch = model_from_checkpoint(teacher_path)
        cache = str(tmp / "cache.zarr")
        cache_teacher(teacher, {**arch, "weights_sha256": file_sha256(teacher_path)}, dataset, cache,
                      device=device, feature_pool=4, workers=args.workers, progress=False)

    base = {
        "data": {"dataset": args.dataset, "root": args.data_root, "options": options,
                 "crop_size": [int(v) for v in args.crop.split("x")], "scale_range": [0.5, 2.0], "flip": True,
                 "workers": args.workers},
        "model": {"name": args.student, "width": args.student_width},
        "train": {"iterations": 10**6, "batch_size": args.batch_size, "device": str(device), "log_every": 10**6,
                  "checkpoint_every": 10**6},
    }
    modes = [("student_only", {"distill": {"losses": []}})]
    for losses in loss_sets:
        terms = losses.split(",")
        distill = {"losses": terms, "gp_every": args.gp_every}
        modes += [(f"cached_{losses}", {"distill": {**distill, "cache": cache}})]
        if not args.no_online and (args.online_losses is None or losses in args.online_losses):
            modes += [(f"online_{losses}", {"distill": {**distill, "teacher": teacher_path}})]
    if args.compile:
        modes += [(name + COMPILED, {**extra, "train": {"compile": True}}) for name, extra in modes]
    cfgs = {name: merge(Config(), {**base, **extra, "train": {**base["train"], **extra.get("train", {}), "out": str(tmp / name)}})
            for name, extra in modes}
    results = time_modes(cfgs, args.warmup, args.iterations)
    for name, r in results.items():
        flops = f"   {r['gflop']:7.1f} GFLOP" if "gflop" in r else ""
        print(f"{name:22s} step {r['step_s'] * 1e3:8.1f} ms   iteration {r['iteration_s'] * 1e3:8.1f} ms{flops}", flush=True)
    for name in results:
        ref = results[reference_mode(name)]
        if name != reference_mode(name):
            results[name]["step_ratio"] = results[name]["step_s"] / ref["step_s"]
            results[name]["iteration_ratio"] = results[name]["iteration_s"] / ref["iteration_s"]
            if "gflop" in ref:
                results[name]["flop_ratio"] = results[name]["gflop"] / ref["gflop"]
    if args.profile:
        extra = {"distill": {"losses": loss_sets[-1].split(","), "cache": cache, "gp_every": args.gp_every}}
        cfg = merge(Config(), {**base, **extra, "train": {**base["train"], "out": str(tmp / "profile")}})
        Path(args.profile).write_text(profile_step(cfg, args.warmup))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit, "command": " ".join(sys.argv), "torch": torch.__version__,
        "student": f"{args.student} x{args.student_width}", "teacher": teacher_path if args.teacher else f"{args.teacher_arch} x{args.teacher_width} (random init)",
        "dataset": args.dataset, "batch_size": args.batch_size, "crop": args.crop, "losses": loss_sets,
        "warmup": args.warmup, "iterations": args.iterations, "gp_every": args.gp_every, "compile": args.compile,
        "results": results,
    }
    print(json.dumps({k: round(v["step_ratio"], 3) for k, v in results.items() if "step_ratio" in v}))
    print("FLOP ratios:", json.dumps({k: round(v["flop_ratio"], 3) for k, v in results.items() if "flop_ratio" in v}))
    if args.compile:
        print("compiled / eager, paired:",
              json.dumps({k: round(v["paired_ratio_to_eager"], 3) for k, v in results.items() if "paired_ratio_to_eager" in v}))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
