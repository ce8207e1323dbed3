"""Sweep the distillation recipe: train students with each setting, evaluate, one table.

Every run uses the same teacher, store, schedule, data, crops and seed as its baseline; only the
options named in the grid change. Runs go through the `skd` command line (a YAML recipe per run,
written next to it), so what is measured is what a user gets. Finished runs are skipped on a re-run.

    # the pixel-wise weight and temperature, from the cache and online, 3 seeds:
    python bench/recipe_sweep.py --teacher runs/demo/teacher/model.pt --cache cache=runs/demo/synthetic.zarr \\
        --grid "losses=pi lambda_pi=0.3,1,3,10,30,80 temperature=1,4" --online --seeds 0,1,2 --out runs/sweep-pi

Grid syntax: space-separated ``key=v1,v2,...``; keys are ``losses`` (``pi+pa`` for several terms,
``none`` for the baseline) and any field of the ``distill`` section of a config (lambda_pi,
temperature, lambda_pa, lambda_ho, pa_node, kd_warmup, ...). The baseline is always run.
Output: OUT/sweep.json (every run: settings, mIoU, final loss terms, mean gradient norms) and
OUT/sweep.md (mean ± std over seeds per setting).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_grid(text: str) -> list[dict]:
    axes = {}
    for part in text.split():
        key, _, values = part.partition("=")
        axes[key] = [_value(v) for v in values.split(",")]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_name(setting: dict, mode: str, seed: int) -> str:
    if not setting:
        return f"baseline_s{seed}"
    parts = [f"{k}{v}" for k, v in setting.items()]
    return "_".join(parts + [mode, f"s{seed}"]).replace("+", "-")


def train_and_evaluate(args, name: str, setting: dict, mode: str, seed: int) -> dict:
    """Train (unless done) and evaluate one run; ``mode`` is a store's label, "online" or "baseline"."""
    out = Path(args.out) / name
    record = {"name": name, "mode": mode, "seed": seed, **setting}
    result_file = Path(args.out) / f"{name}.json"
    if not result_file.exists():
        base = yaml.safe_load(Path(args.config).read_text()) or {}
        setting = dict(setting)
        losses = str(setting.pop("losses", "none"))
        recipe = dict(base)
        recipe["train"] = {**base.get("train", {}), "seed": seed, "iterations": args.iterations}
        recipe["distill"] = {**base.get("distill", {}), **setting,
                             "losses": [] if losses == "none" else losses.split("+")}
        out.parent.mkdir(parents=True, exist_ok=True)
        recipe_file = Path(args.out) / f"{name}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        cmd = [sys.executable, "-m", "cli", "--quiet"]
        model = ["--model", args.model, "--width", str(args.width)]
        if not setting and losses == "none":
            cmd += ["train-teacher", "--config", str(recipe_file), *model, "--out", str(out)]
        else:
            source = ["--teacher", args.teacher] if mode == "online" else ["--cache", args.caches[mode]]
            cmd += ["train-student", "--config", str(recipe_file), *model, *source, "--out", str(out)]
        if (out / "last.pt").exists() and not (out / "model.pt").exists():
            cmd.append("--resume")
        if not (out / "model.pt").exists():
            subprocess.run(cmd, check=True, cwd=ROOT, env=_env())
        subprocess.run([sys.executable, "-m", "cli", "--quiet", "evaluate", "--config", str(recipe_file),
                        "--checkpoint", str(out / "model.pt"), "--output", str(result_file), "--name", name],
                       check=True, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)
    record["miou"] = json.loads(result_file.read_text())["miou"]
    return record | _log_summary(out / "log.jsonl")


def _env() -> dict:
    # One compute thread per run: runs execute side by side.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _log_summary(log_file: Path) -> dict:
    """Last logged loss terms, and each term's gradient norm averaged over the logged steps."""
    if not log_file.exists():
        return {}
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    summary = {f"final_{k}": v for k, v in rows[-1].items() if k not in ("iteration", "lr", "step_s", "elapsed_s")
               and not k.startswith("grad_")}
    grads = {k for row in rows for k in row if k.startswith("grad_")}
    for key in sorted(grads):
        values = [row[key] for row in rows if key in row]
        summary[f"mean_{key}"] = sum(values) / len(values)
    return summary


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = tuple((k, v) for k, v in r.items() if k not in ("name", "seed", "miou")
                    and not k.startswith(("final_", "mean_grad")))
        groups.setdefault(key, []).append(r)
    rows = []
    for key, runs in groups.items():
        mious = [100 * r["miou"] for r in runs]
        row = {k: v for k, v in key}
        row |= {"seeds": len(runs), "mIoU mean": round(statistics.mean(mious), 2),
                "mIoU std": round(statistics.stdev(mious), 2) if len(mious) > 1 else 0.0,
                "per seed": " ".join(f"{m:.2f}" for m in mious)}
        for g in sorted({k for r in runs for k in r if k.startswith("mean_grad")}):
            row[g.removeprefix("mean_")] = f"{statistics.mean(r[g] for r in runs if g in r):.3g}"
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (online mode)")
    p.add_argument("--cache", action="append", default=[], metavar="LABEL=STORE",
                   help="a store of the teacher on the training split, with a label for the table (repeatable)")
    p.add_argument("--online", action="store_true", help="also distil from the teacher run live")
    p.add_argument("--grid", required=True, help='e.g. "losses=pi lambda_pi=1,3,10 temperature=1,4"')
    p.add_argument("--seeds", default="0")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--model", default="pspnet_resnet18")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--parallel", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    args.caches = dict(c.split("=", 1) for c in args.cache)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(run_name({}, "", s), {}, "baseline", s) for s in seeds]
    for setting in parse_grid(args.grid):
        for mode in [*args.caches, *(["online"] if args.online else [])]:
            jobs += [(run_name(setting, mode, s), setting, mode, s) for s in seeds]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with futures.ThreadPoolExecutor(args.parallel) as pool:
        records = list(pool.map(lambda job: train_and_evaluate(args, *job), jobs))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    rows = summarize(records)
    report = {"command": " ".join(sys.argv), "commit": commit, "runs": records, "summary": rows}
    (Path(args.out) / "sweep.json").write_text(json.dumps(report, indent=2))
    table = markdown(rows)
    (Path(args.out) / "sweep.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
