"""The summary of bench/gpu_evidence.sh: one table (markdown and JSON) from what its steps wrote.

Reads, in the results folder OUT, whichever of these exist (a run cut short has fewer):
results.json (bench/ablation.py: CamVid teacher and students per seed), step_time.json
(bench/step_time.py at Cityscapes scale), cache_throughput.json (bench/cache_throughput.py on real
CamVid images), and the script's step statuses (--status, one ``name<TAB>exit<TAB>seconds<TAB>limit``
line per step). Writes OUT/evidence.md and OUT/evidence.json:

- CamVid val mIoU per row: every seed, mean ± std (sample std over seeds);
- paired differences: each distilled row minus the baseline of the same seed, mean ± std over the
  seeds both have, with the paired t statistic and how many seeds the row was ahead; and two more
  contrasts: +PI+PA+HO minus +PI (both from the cache), online minus cache (+PI+PA+HO);
- step time per mode (student's median step in ms, its ratio to the student alone);
- cache-teacher images/s against the teacher alone;
- every step's exit status and seconds.

    python bench/evidence_summary.py OUT [--status WORK/status.tsv]

Standard library only (it runs after every step, and from a signal handler when a run is cut off).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import LABELS  # noqa: E402  (standard library only at import)

# Distilled rows against the baseline of the same seed, then the contrasts between distilled rows.
CONTRASTS = [("pi_pa_ho", "pi", "+PI+PA+HO − +PI (both cache, views)"),
             ("pi_pa_ho_online", "pi_pa_ho", "+PI+PA+HO online − from the cache")]
STEP_MODES = [("student_only", "student alone (CE only)"), ("cached_pi", "+PI from the cache"),
              ("cached_pi,pa", "+PI+PA from the cache"), ("cached_pi,pa,ho", "+PI+PA+HO from the cache"),
              ("online_pi", "+PI, online teacher"), ("online_pi,pa", "+PI+PA, online teacher"),
              ("online_pi,pa,ho", "+PI+PA+HO, online teacher")]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stats(values: list[float]) -> dict:
    """n, mean, sample std (None for one value) and, for differences, the paired t statistic."""
    n = len(values)
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if n > 1 else None
    t = mean / (std / math.sqrt(n)) if std else None
    return {"n": n, "mean": mean, "std": std, "t": t, "values": values}


def _pm(s: dict, signed: bool = False) -> str:
    if not s or s["mean"] is None:
        return "—"
    mean = f"{s['mean']:+.2f}" if signed else f"{s['mean']:.2f}"
    return mean + (f" ± {s['std']:.2f}" if s["std"] is not None else " (one seed)")


def camvid(results: dict) -> dict:
    """mIoU (in points) per row and seed, the rows' statistics and the paired differences."""
    runs = results.get("runs", {})
    per_row: dict[str, dict[int, float]] = {}
    for run, r in runs.items():
        if run == "teacher":
            continue
        name, seed = run.rsplit("_s", 1)
        per_row.setdefault(name, {})[int(seed)] = 100 * r["miou"]
    order = [name for name in LABELS if name in per_row]
    rows = {name: {"label": LABELS[name], "seeds": sorted(per_row[name]),
                   **stats([per_row[name][s] for s in sorted(per_row[name])])} for name in order}
    base = per_row.get("baseline", {})

    def paired(a: str, b: dict[int, float]) -> dict:
        seeds = sorted(set(per_row.get(a, {})) & set(b))
        diffs = [per_row[a][s] - b[s] for s in seeds]
        return {"seeds": seeds, "ahead": sum(d > 0 for d in diffs), **stats(diffs)}

    vs_baseline = {name: {"label": LABELS[name] + " − baseline", **paired(name, base)}
                   for name in order if name != "baseline"}
    contrasts = {f"{a}-{b}": {"label": label, **paired(a, per_row.get(b, {}))}
                 for a, b, label in CONTRASTS if a in per_row and b in per_row}
    teacher = runs.get("teacher")
    return {"teacher_miou": 100 * teacher["miou"] if teacher else None, "rows": rows, "vs_baseline": vs_baseline,
            "contrasts": contrasts, "store_bytes_per_image": results.get("store_bytes_per_image"),
            "settings": results.get("settings"), "device": results.get("device"), "commit": results.get("commit"),
            "steps": results.get("steps", {})}


def step_time(report: dict) -> dict:
    results = report.get("results", {})
    modes = {}
    for key, label in STEP_MODES:
        if key in results:
            r = results[key]
            modes[key] = {"label": label, "step_ms": 1e3 * r["step_s"], "iteration_ms": 1e3 * r["iteration_s"],
                          "step_ratio": r.get("step_ratio", 1.0 if key == "student_only" else None),
                          "paired_step_ratio": r.get("paired_step_ratio"), "flop_ratio": r.get("flop_ratio"),
                          "gflop": r.get("gflop")}
    return {"device": report.get("device"), "student": report.get("student"), "teacher": report.get("teacher"),
            "crop": report.get("crop"), "batch_size": report.get("batch_size"), "warmup": report.get("warmup"),
            "iterations": report.get("iterations"), "modes": modes}


def _status(path: Path | None) -> list[dict]:
    steps = []
    if path and path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                steps.append({"step": parts[0], "exit": int(parts[1]), "seconds": int(parts[2]),
                              "limit_s": int(parts[3]) if len(parts) > 3 else None})
    return steps


def _f(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    lines = ["# Evidence run (bench/gpu_evidence.sh)", ""]
    c = summary.get("camvid")
    if c:
        s = c["settings"] or {}
        lines += [f"CamVid val mIoU, single scale, whole image; device {c['device']}, commit {c['commit']}; "
                  f"teacher PSPNet-MobileNetV2 (ImageNet init) {s.get('teacher_iterations')} it; students "
                  f"PSPNet-R18 ×{s.get('student_width')} from scratch, {s.get('student_iterations')} it, batch "
                  f"{s.get('batch_size')}, crops {s.get('crop')}; store: views {s.get('views')}, windows "
                  f"{s.get('teacher_window')}, levels {s.get('levels')}, flip {s.get('teacher_flip')}"
                  + (f", {c['store_bytes_per_image'] / 1024:.1f} KB per image" if c.get("store_bytes_per_image") else "")
                  + ".", "",
                  "| row | seeds | mIoU per seed | mean ± std | paired Δ vs baseline (mean ± std) | t | ahead |",
                  "|---|---|---|---|---|---|---|"]
        if c["teacher_miou"] is not None:
            lines.append(f"| teacher | 0 | {c['teacher_miou']:.2f} | | | | |")
        for name, r in c["rows"].items():
            d = c["vs_baseline"].get(name)
            values = ", ".join(f"{v:.2f}" for v in r["values"])
            delta = (_pm(d, signed=True) + (f" (n={d['n']})" if d["n"] > 1 else "")) if d and d["n"] else ""
            ahead = f"{d['ahead']}/{d['n']}" if d and d["n"] else ""
            t = _f(d["t"]) if d and d["n"] else ""
            lines.append(f"| {r['label']} | {','.join(map(str, r['seeds']))} | {values} | {_pm(r)} | {delta} | "
                         f"{t} | {ahead} |")
        if c["contrasts"]:
            lines += ["", "| paired contrast | seeds | per seed | mean ± std | t | ahead |", "|---|---|---|---|---|---|"]
            for d in c["contrasts"].values():
                values = ", ".join(f"{v:+.2f}" for v in d["values"])
                lines.append(f"| {d['label']} | {','.join(map(str, d['seeds']))} | {values} | {_pm(d, signed=True)} | "
                             f"{_f(d['t'])} | {d['ahead']}/{d['n']} |")
        lines += ["", "CamVid steps:", "", "| step | status | seconds |", "|---|---|---|"]
        lines += [f"| {step} | {v['status']} | {v['seconds']} |" for step, v in c["steps"].items()]
        lines.append("")
    st = summary.get("step_time")
    if st:
        lines += [f"Step time: {st['student']} student, teacher {st['teacher']}, crops {st['crop']}, batch "
                  f"{st['batch_size']}, median of {st['iterations']} steps after {st['warmup']} warm-up, the modes "
                  f"taking their steps in turn; device {st['device']}.", "",
                  "| mode | step (ms) | × student alone | paired × | FLOP × | iteration (ms) |", "|---|---|---|---|---|---|"]
        for m in st["modes"].values():
            lines.append(f"| {m['label']} | {m['step_ms']:.1f} | {_f(m['step_ratio'], '.3f')} | "
                         f"{_f(m['paired_step_ratio'], '.3f')} | {_f(m['flop_ratio'], '.3f')} | {m['iteration_ms']:.1f} |")
        lines.append("")
    tp = summary.get("cache_throughput")
    if tp:
        r, s = tp["results"], tp["settings"]
        lines += [f"Cache writing on {tp.get('images')} {s.get('dataset', 'synthetic')} {s.get('split', 'train')} images "
                  f"({'x'.join(map(str, tp.get('image_size') or []))}), teacher {s['teacher_arch']} ×{s['teacher_width']} "
                  f"({s['precision']}), batch {s['batch_size']}, {s['workers']} loader workers; device {tp['device']}: "
                  f"teacher alone **{r['teacher_only_img_s']:.1f} img/s**, cache-teacher "
                  f"**{r['cache_teacher_img_s']:.1f} img/s** (ratio {r['ratio']:.3f}).", ""]
    if summary.get("steps"):
        lines += ["| script step | exit | seconds | limit |", "|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} | {_f(s['limit_s'], 'd')} |" for s in summary["steps"]]
        lines.append("")
    return "\n".join(lines)


def summarise(out: Path, status: Path | None) -> dict:
    summary: dict = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": _status(status)}
    results = _load(out / "results.json")
    if results:
        summary["camvid"] = camvid(results)
    report = _load(out / "step_time.json")
    if report:
        summary["step_time"] = step_time(report)
    report = _load(out / "cache_throughput.json")
    if report:
        summary["cache_throughput"] = {k: report.get(k) for k in ("device", "commit", "images", "image_size",
                                                                   "settings", "results")}
    (out / "evidence.json").write_text(json.dumps(summary, indent=2))
    (out / "evidence.md").write_text(markdown(summary))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the results folder of bench/gpu_evidence.sh")
    p.add_argument("--status", default=None, help="the script's step statuses (name, exit, seconds, limit; tab-separated)")
    p.add_argument("--print", action="store_true", help="also print the markdown")
    args = p.parse_args()
    summary = summarise(Path(args.out), Path(args.status) if args.status else None)
    if args.print:
        print(markdown(summary))


if __name__ == "__main__":
    main()
