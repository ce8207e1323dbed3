"""Feature distillation from projected (PCA) teacher features: the k table on real CamVid.

For each k, `skd cache-teacher --feature-pool 1 --feature-projection k` writes the train split's
dense (stride 8) teacher features as k PCA coordinates (plus the views bank and maps every store
has); "full" stores the features themselves. A student is then trained with `--losses fd` from
each store, one with the teacher run live (online fd, the teacher's full features), and a baseline;
all share the schedule, crops, data and seed of bench/ablation.py's scale. Reported per row: val
mIoU, bytes per image of the stored features (with their scales, offsets and projection) and of
the whole store, and the projection's explained variance.

    python bench/fd_projection.py --scale cpu --teacher runs/camvid-cpu-new/work/teacher/model.pt \\
        --ks 16,32,64,full --out runs/fd-k
    # on a GPU machine (../shared/device/prepare.sh --camvid --weights), after bench/camvid_ablation.sh
    # has left its teacher in /tmp/skd-work:
    python bench/fd_projection.py --scale gpu --teacher /tmp/skd-work/teacher/model.pt --data .device/camvid --out $OUT

OUT/results.json and OUT/summary.md are rewritten as each step finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import SCALES, Experiment, _bytes  # noqa: E402


class KTable(Experiment):
    def run(self) -> None:
        s, args = self.scale, self.args
        self.results.update({"teacher": args.teacher, "ks": args.ks, "lambda_fd": args.lambda_fd, "rows": {}})
        self.student_run("baseline", None)
        self.student_run("fd_online", ["--teacher", args.teacher, "--losses", "fd"])
        for k in args.ks.split(","):
            store = self.work / f"camvid-train-k{k}.zarr"
            if not store.exists():
                projection = [] if k == "full" else ["--feature-projection", k, "--projection-images",
                                                      str(args.projection_images)]
                self.skd(f"cache k={k}", ["cache-teacher", "--config", "configs/camvid.yaml", "--data-root", args.data,
                                          "--device", s.device, "--workers", str(s.workers), "--teacher", args.teacher,
                                          "--cache", str(store), "--teacher-window", "whole", "--no-teacher-flip",
                                          "--views", str(s.views), "--crop-size", s.crop, "--feature-pool", "1",
                                          *projection], s.timeout_cache_s)  # no --overwrite: a cut run resumes
            if not store.exists():
                continue
            attrs = json.loads((store / "zarr.json").read_text())["attributes"]
            images = attrs["dataset"]["num_images"]
            feature_arrays = [p for p in store.iterdir() if p.is_dir() and "feature" in p.name]
            self.results["rows"][f"k{k}"] = {
                "features_bytes_per_image": sum(_bytes(p) for p in feature_arrays) / images,
                "store_bytes_per_image": _bytes(store) / images,
                "explained_variance": (attrs.get("feature_projection") or {}).get("explained_variance", 1.0),
            }
            self.save()
            self.student_run(f"fd_k{k}", ["--cache", str(store), "--losses", "fd", "--views"])

    def student_run(self, run: str, distill: list[str] | None) -> None:
        s = self.scale
        args = [*self.common(), "--model", "pspnet_resnet18", "--width", str(s.student_width),
                "--iterations", str(s.student_iterations), "--seed", str(self.args.seed), "--out", str(self.work / run)]
        if not (self.work / run / "model.pt").exists():
            if distill is None:
                self.skd(run, ["train-teacher", *args], s.timeout_student_s)
            else:
                self.skd(run, ["train-student", *args, *distill, "--lambda-fd", str(self.args.lambda_fd)],
                         s.timeout_student_s)
        if (self.work / run / "model.pt").exists():
            self.evaluate(run)

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "summary.md").write_text(summary(self.results))


def summary(results: dict) -> str:
    runs, rows = results["runs"], results.get("rows", {})
    base = runs.get("baseline", {}).get("miou")
    lines = [f"CamVid val mIoU, fd from projected stores; scale {results['scale']}, device {results['device']}, "
             f"commit {results['commit']}, lambda_fd {results.get('lambda_fd')}", "",
             "| student | k | explained variance | features KB/image | store KB/image | mIoU | Δ vs baseline |",
             "|---|---|---|---|---|---|---|"]

    def row(label: str, run: str, k: str = "", info: dict | None = None) -> None:
        if run not in runs and not info:
            return
        miou = runs.get(run, {}).get("miou")
        info = info or {}
        lines.append(
            f"| {label} | {k} | {info['explained_variance']:.4f} | {info['features_bytes_per_image'] / 1024:.1f} | "
            f"{info['store_bytes_per_image'] / 1024:.1f} | " if info else f"| {label} | {k} | | | | ")
        lines[-1] += (f"{100 * miou:.2f} | {f'{100 * (miou - base):+.2f}' if base is not None and run != 'baseline' else ''} |"
                      if miou is not None else "– | |")

    row("baseline (CE only)", "baseline")
    row("fd, online teacher", "fd_online", "all")
    for key, info in rows.items():
        row("fd, cache", f"fd_{key}", key[1:], info)
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {step} | {v['status']} | {v['seconds']} |" for step, v in results["steps"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", default="../shared/data/camvid")
    p.add_argument("--ks", default="16,32,64,full", help="projection sizes; 'full' stores the features themselves")
    p.add_argument("--projection-images", type=int, default=128)
    p.add_argument("--lambda-fd", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    experiment = KTable(args)
    tic = time.perf_counter()
    experiment.run()
    experiment.results["total_seconds"] = round(time.perf_counter() - tic, 1)
    experiment.save()
    print(summary(experiment.results))


if __name__ == "__main__":
    main()
