"""Training curves of one or several runs (their log.jsonl) in one PNG: a panel per loss term, and
the val mIoU when the runs validated (``--val-every``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pipeline.errors import SkdError

# Bookkeeping fields of a log record, not curves to draw.
NOT_CURVES = {"iteration", "lr", "step_s", "elapsed_s", "best_val_miou"}


def read_log(run: Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise SkdError(f"{run} holds no log.jsonl: is it a training run's --out folder?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise SkdError(f"{path} line {number} is not JSON") from None
    return records


def plot_runs(runs: list[Path], out: Path) -> list[str]:
    """Draw every loss term (and val mIoU) against the iteration for each run; returns the panels' names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        raise SkdError("skd plot needs matplotlib: pip install 'skd[plot]' (or pip install matplotlib)") from None
    logs = {Path(run).name or str(run): read_log(Path(run)) for run in runs}
    panels = sorted({key for records in logs.values() for r in records for key in r
                     if key not in NOT_CURVES and not key.startswith("grad_")},
                    key=lambda k: (k == "val_miou", k))
    if not panels:
        raise SkdError(f"no loss values in the logs of {', '.join(map(str, runs))}")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows + 0.4), squeeze=False)
    # One colour per run in every panel, whichever panels it appears in: matplotlib's own cycle
    # restarts in each panel and would give a run another colour where an earlier run is absent.
    colours = {name: f"C{k % 10}" for k, name in enumerate(logs)}
    for ax, panel in zip(axes.flat, panels):
        for name, records in logs.items():
            points = [(r["iteration"], r[panel]) for r in records if panel in r and "iteration" in r]
            if points:
                ax.plot(*zip(*points), color=colours[name], marker="." if panel == "val_miou" else None)
        ax.set_title("val mIoU" if panel == "val_miou" else f"loss: {panel}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # One legend for the whole figure, above the panels: every run, in the order given.
    handles = [Line2D([], [], color=colours[name]) for name in logs]
    fig.legend(handles, list(logs), loc="upper center", ncol=min(len(logs), 4), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 * math.ceil(len(logs) / 4) / (3.2 * rows + 0.4)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return panels
