"""Markdown summary of an ablation folder written by bench/camvid_ablation.sh.

    python bench/summarize.py runs/camvid
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("teacher", "teacher (MobileNetV2 PSPNet, ImageNet init)"),
    ("teacher-cache", "teacher as cached (val store, TTA)"),
    ("baseline", "student baseline (CE only)"),
    ("pi", "student +PI (cache)"),
    ("pi_pa", "student +PI+PA (cache)"),
    ("pi_pa_ho", "student +PI+PA+HO (cache)"),
    ("pi_pa_ho_online", "student +PI+PA+HO (online teacher)"),
]


def main() -> None:
    out = Path(sys.argv[1])
    results = {name: json.loads((out / f"{name}.json").read_text()) for name, _ in ROWS if (out / f"{name}.json").exists()}
    base = results.get("baseline", {}).get("miou")
    print("| run | mIoU | Δ vs baseline | pixel acc |\n|---|---|---|---|")
    for name, label in ROWS:
        if name not in results:
            continue
        r = results[name]
        delta = f"{100 * (r['miou'] - base):+.2f}" if base is not None and name not in ("teacher", "teacher-cache") else ""
        print(f"| {label} | {100 * r['miou']:.2f} | {delta} | {100 * r['pixel_accuracy']:.2f} |")
    if results:
        classes = list(next(iter(results.values()))["per_class_iou"])
        print("\n| class | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
        for c in classes:
            cells = [("n/a" if r["per_class_iou"][c] is None else f"{100 * r['per_class_iou'][c]:.1f}") for r in results.values()]
            print(f"| {c} | " + " | ".join(cells) + " |")
    step = out / "step_time.json"
    if step.exists():
        s = json.loads(step.read_text())
        print(f"\nStep time ({s['device']}, batch {s['batch_size']}, crop {s['crop']}):")
        print("| mode | step (ms) | iteration incl. loading (ms) | ratio to student-only |\n|---|---|---|---|")
        for mode, r in s["results"].items():
            print(f"| {mode} | {1e3 * r['step_s']:.1f} | {1e3 * r['iteration_s']:.1f} | {r.get('iteration_ratio', 1.0):.2f} |")
    fid = out / "cache_fidelity.json"
    if fid.exists():
        f = json.loads(fid.read_text())
        print(f"\nCache: logits {f['logits_bytes_per_image'] / 1e3:.1f} KB/img (float32 {f['raw_float32_logits_bytes_per_image'] / 1e3:.1f} KB), "
              f"features {f['features_bytes_per_image'] / 1e3:.1f} KB/img (float32 {f['raw_float32_features_bytes_per_image'] / 1e3:.1f} KB); "
              f"KL T=1 {f['mean_kl_T1']:.2e}, T=4 {f['mean_kl_T4']:.2e}; argmax agreement {100 * f['argmax_agreement']:.3f}%")


if __name__ == "__main__":
    main()
