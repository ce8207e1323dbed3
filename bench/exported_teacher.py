"""An exported teacher's store against its checkpoint's: `skd export` the checkpoint as .pt2 and .ts
(with features and class names), cache the checkpoint and both files with the same command, and
report each store's largest difference from the checkpoint's (decoded log-probabilities in 8-bit
codes, features in 7-bit codes of each channel), argmax agreement and the wall time of each step.

    python bench/exported_teacher.py --teacher runs/demo/teacher/model.pt --config configs/demo.yaml \\
        --split val --size 96x128 --out runs/exported-teacher --output docs/results/exported_teacher.json

Every cache-teacher option after `--` is passed on to all three runs (e.g. `-- --views 0`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache.codecs import FEATURE_LEVELS, LOG_PROB_STEP, decode_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def skd(*args: str) -> float:
    """Run `skd ARGS` (printed), return its wall time."""
    print("$ skd " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli", "--quiet", *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def compare(store: Path, reference: Path) -> dict:
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    result = {}
    for name in sorted(k for k in b.array_keys() if k.startswith("log_probs")):
        x, y = a[name][:], b[name][:]
        ok = np.isfinite(y)
        result[name] = {"max_abs_diff": float(np.abs(x - y)[ok].max()), "codes": float(np.abs(x - y)[ok].max() / LOG_PROB_STEP),
                        "identical_fraction": float((x == y)[ok].mean()),
                        "argmax_agreement": float((x.argmax(1) == y.argmax(1)).mean())}
    if "features" in b.array_keys():
        worst = 0.0
        for i in range(b["features"].shape[0]):
            f, g = (decode_features(s["features"][i], s["feature_scale"][i], s["feature_offset"][i],
                                    s["feature_position_scale"][i]) for s in (a, b))
            step = b["feature_scale"][i][:, None, None] / FEATURE_LEVELS * b["feature_position_scale"][i]
            worst = max(worst, float(np.nanmax(np.abs(f - g) / np.maximum(step, 1e-30))))
        result["features_max_diff_in_codes"] = worst
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--size", required=True, help="HxW the files are exported at")
    parser.add_argument("--dataset", default="synthetic", help="class names written into the files")
    parser.add_argument("--out", required=True, help="folder for the files and stores")
    parser.add_argument("--output", default=None, help="JSON report")
    parser.add_argument("cache_args", nargs="*", help="more cache-teacher options (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"teacher": args.teacher, "config": args.config, "split": args.split, "size": args.size,
              "cache_args": args.cache_args, "seconds": {}, "stores": {}}
    files = {"pt2": out / "teacher.pt2", "torchscript": out / "teacher.ts"}
    for fmt, path in files.items():
        report["seconds"][f"export {fmt}"] = skd("export", "--checkpoint", args.teacher, "--format", fmt, "--size",
                                                 args.size, "--with-features", "--dataset", args.dataset, "--out", str(path))
    stores = {}
    for name, teacher in (("checkpoint", args.teacher), *((fmt, str(p)) for fmt, p in files.items())):
        stores[name] = out / f"{name}.zarr"
        report["seconds"][f"cache {name}"] = skd("cache-teacher", "--config", args.config, "--split", args.split,
                                                 "--teacher", teacher, "--cache", str(stores[name]), "--overwrite",
                                                 *args.cache_args)
    for fmt in files:
        report["stores"][fmt] = compare(stores[fmt], stores["checkpoint"])
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
