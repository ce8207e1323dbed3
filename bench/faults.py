"""Randomised fault injection: kill `skd cache-teacher` and `skd train-student` with SIGKILL, resume,
and check that nothing was lost or silently corrupted.

Each round kills one run, either after a random delay or at a chosen point (``SKD_FAULT``, see
``pipeline/faults.py``: between two arrays of a shard, before a shard's done flags, between the two
renames that swap a store into place (those rounds replace a copy of the reference with
``--overwrite``), between writing a checkpoint and renaming it), then re-runs the same command
(``--resume`` for training) until it finishes, and checks:

* after every kill, every image flagged done in the partial store has all its data (no NaN fill);
* the finished store equals an uninterrupted store of the same teacher, array for array and bit for
  bit (the writer is deterministic on one machine: same batches, same arithmetic), with the same
  provenance (creation time aside, and the teacher's mIoU, which only a run that wrote every image
  scores), and ``skd cache-verify`` passes;
* the finished student's ``model.pt`` equals an uninterrupted run's, tensor for tensor, bit for bit;
* nothing is left behind: no ``*.partial``, ``*.old``, ``*.lock`` or ``*.tmp``.

    python bench/faults.py --rounds 20 --out runs/faults        # minutes; prints a table, writes faults.json
    python bench/faults.py --rounds 3 --out /tmp/faults         # the fast variant the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The store's codecs are numcodecs' (plain zarr-python reads them); zarr warns about that on each read.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
CACHE_POINTS = ["shard-write", "flag-write", "finalize"]
TRAIN_POINTS = ["checkpoint-write"]
ITERATIONS = 12


def skd(*args: str, fault: str | None = None, delay: float | None = None, log=None) -> tuple[int, bool]:
    """Run ``skd ARGS``; with ``fault`` set SKD_FAULT, with ``delay`` SIGKILL it after that many
    seconds. Returns (exit code, whether it was killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SKD_FAULT", None)
    if fault:
        env["SKD_FAULT"] = fault
    proc = subprocess.Popen([sys.executable, "-m", "cli", "--quiet", *args], cwd=ROOT, env=env,
                            stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode, proc.returncode == -signal.SIGKILL


def store_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    # The creation time differs by nature; the teacher's mIoU is scored only by a run that wrote every image.
    attrs = {k: v for k, v in group.attrs.items() if k not in ("created", "teacher_miou")}
    return {name: array[:] for name, array in group.arrays()}, attrs


def incomplete_done_images(partial: Path) -> int:
    """Images flagged done whose data is not all there (the NaN fill of a chunk never written)."""
    import zarr

    if not partial.is_dir():
        return 0
    try:
        group = zarr.open_group(str(partial), mode="r")
        done = group["done"][:]
    except Exception:
        return 0  # killed while the store itself was being created: nothing is flagged
    bad = 0
    for name, array in group.arrays():
        if name == "done" or not np.issubdtype(array.dtype, np.floating):
            continue
        values = array[:]
        for index in np.flatnonzero(done):
            if not np.isfinite(values[index]).all():
                bad += 1
    return bad


def leftovers(directory: Path, stem: str) -> list[str]:
    suffixes = (".partial", ".creating", ".old", ".lock", ".tmp")
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.name.startswith((stem, f".{stem}", ".last.pt", ".model.pt")) and p.name.endswith(suffixes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for faults.json and the log")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="skd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "w")
    rng = random.Random(args.seed)

    # The settings: 64 synthetic images (4 shards of 16), a tiny teacher and student on the CPU.
    config = work / "faults.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "synthetic", "options": {"size": [64, 96], "length": 64}, "workers": 0},
        "model": {"name": "pspnet_resnet18", "width": 0.125},
        "train": {"iterations": ITERATIONS, "batch_size": 4, "log_every": 2, "checkpoint_every": 2, "device": "cpu"},
        "cache": {"batch_size": 4, "feature_pool": 2},
    }))
    common = ["--config", str(config)]
    assert skd("train-teacher", *common, "--width", "0.25", "--iterations", "2", "--out", str(work / "teacher"),
               log=log)[0] == 0, "teacher training failed (see log.txt)"
    teacher = work / "teacher" / "model.pt"
    cache_args = ["cache-teacher", *common, "--teacher", str(teacher)]
    tic = time.perf_counter()
    assert skd(*cache_args, "--cache", str(work / "reference.zarr"), log=log)[0] == 0, "reference store failed"
    cache_seconds = time.perf_counter() - tic
    reference_store = store_arrays(work / "reference.zarr")
    train_args = ["train-student", *common, "--cache", str(work / "reference.zarr"), "--losses", "pi,pa,ho"]
    tic = time.perf_counter()
    assert skd(*train_args, "--out", str(work / "reference-student"), log=log)[0] == 0, "reference student failed"
    train_seconds = time.perf_counter() - tic
    import torch

    reference_model = torch.load(work / "reference-student" / "model.pt", weights_only=True)["model"]

    rows = []
    for r in range(args.rounds):
        kind = "cache" if r % 2 == 0 else "train"
        points = CACHE_POINTS if kind == "cache" else TRAIN_POINTS
        # Half the rounds at a chosen point (its n-th occurrence), half after a random delay.
        if rng.random() < 0.5:
            point = rng.choice(points)
            nth = 1 if point == "finalize" else rng.randint(1, 3 if kind == "cache" else ITERATIONS // 2)
            fault, delay, how = f"{point}:{nth}", None, f"at {point} #{nth}"
        else:
            seconds = rng.uniform(0.3, 1.0) * (cache_seconds if kind == "cache" else train_seconds)
            fault, delay, how = None, seconds, f"after {seconds:.1f} s"
        row = {"round": r, "run": kind, "fault": how, "killed": False, "resumes": 0, "corrupt": 0, "lost": 0,
               "finished": False, "leftovers": []}
        log.write(f"\n=== round {r}: {kind}, kill {how}\n")
        log.flush()
        if kind == "cache":
            store = work / f"round{r}.zarr"
            overwrite = []
            if fault and fault.startswith("finalize"):  # the swap happens when a store is replaced
                shutil.copytree(work / "reference.zarr", store)
                overwrite = ["--overwrite"]
            code, killed = skd(*cache_args, "--cache", str(store), *overwrite, fault=fault, delay=delay, log=log)
            row["killed"] = killed
            row["corrupt"] += incomplete_done_images(store.with_name(store.name + ".partial"))
            for _ in range(3):
                if code == 0:
                    break
                row["resumes"] += 1
                code, _ = skd(*cache_args, "--cache", str(store), log=log)
            row["finished"] = code == 0
            if code == 0:
                arrays, attrs = store_arrays(store)
                want_arrays, want_attrs = reference_store
                row["corrupt"] += int(attrs != want_attrs) + sum(
                    not np.array_equal(arrays.get(name), values) for name, values in want_arrays.items())
                row["lost"] += int((~arrays["done"]).sum())
                row["corrupt"] += int(skd("cache-verify", str(store), log=log)[0] != 0)
            row["leftovers"] = leftovers(work, store.name)
        else:
            run = work / f"round{r}-student"
            code, killed = skd(*train_args, "--out", str(run), fault=fault, delay=delay, log=log)
            row["killed"] = killed
            for _ in range(3):
                if code == 0:
                    break
                row["resumes"] += 1
                resume = ["--resume"] if (run / "last.pt").exists() else []
                code, _ = skd(*train_args, "--out", str(run), *resume, log=log)
            row["finished"] = code == 0
            if code == 0:
                state = torch.load(run / "model.pt", weights_only=True)["model"]
                row["corrupt"] += sum(not torch.equal(state[k], v) for k, v in reference_model.items())
                row["lost"] += ITERATIONS - int(torch.load(run / "last.pt", weights_only=True)["iteration"])
            row["leftovers"] = leftovers(run, "") if run.exists() else []
        rows.append(row)
        print(f"round {r:2d}  {kind:5s}  kill {how:28s}  killed {str(row['killed']):5s}  resumes {row['resumes']}  "
              f"corrupt {row['corrupt']}  lost {row['lost']}  finished {row['finished']}"
              f"{'  LEFT: ' + ', '.join(row['leftovers']) if row['leftovers'] else ''}", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    totals = {
        "rounds": len(rows),
        "faults_injected": sum(r["killed"] for r in rows),
        "resumes": sum(r["resumes"] for r in rows),
        "corruptions": sum(r["corrupt"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "unfinished": sum(not r["finished"] for r in rows),
        "leftover_files": sum(len(r["leftovers"]) for r in rows),
    }
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commit": commit, "totals": totals,
              "rounds": rows}
    (out / "faults.json").write_text(json.dumps(result, indent=2))
    print("\n| rounds | faults injected | resumes | corruptions | data lost | unfinished | files left |")
    print("|---|---|---|---|---|---|---|")
    print("| {rounds} | {faults_injected} | {resumes} | {corruptions} | {lost} | {unfinished} | {leftover_files} |".format(**totals))
    ok = totals["corruptions"] == totals["lost"] == totals["unfinished"] == totals["leftover_files"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
