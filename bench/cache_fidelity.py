"""Bytes per image and fidelity of a teacher cache against the float32 teacher.

Reads a store written by `skd cache-teacher`, reruns its teacher in float32 on the same images (with
the same test-time augmentation recorded in the store) and reports: stored bytes per image (logits
and features, on disk) against raw float32, mean per-pixel KL(float32 || stored) at temperatures 1
and 4, and argmax agreement.

    python bench/cache_fidelity.py --cache data/camvid-val.zarr --teacher runs/camvid-teacher/model.pt \\
        --dataset camvid --data-root ../shared/data/camvid --split val --output docs/results/cache_camvid.json
    # Cityscapes-size scenes (synthetic, 1024x2048), with a store cached from them:
    python bench/cache_fidelity.py --cache cs-val.zarr --teacher T.pt --dataset synthetic \\
        --options '{"size": [1024, 2048], "length": 8}' --output cache_cityscapes_size.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from zarr.codecs import ZstdCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_codecs import encoded  # noqa: E402
from pipeline.cache.store import FEATURE_ARRAYS, TeacherStore, logit_size  # noqa: E402
from pipeline.inference import predict  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.data.transforms import normalize  # noqa: E402
from pipeline.distill.losses import pairwise_loss  # noqa: E402
from pipeline.train.checkpoint import model_from_checkpoint  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402


def format1_bytes(features: np.ndarray) -> float:
    """Bytes of one image's (F, h, w) features as format 1 stored them: float16, zstd level 3."""
    return encoded(features[None], "float16", None, [ZstdCodec(level=3)])[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a directory store")
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--options", default="{}",
                   help='dataset options as JSON, e.g. \'{"size": [1024, 2048], "length": 8}\' for synthetic scenes')
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None)
    args = p.parse_args()

    device = resolve_device(args.device)
    store = TeacherStore(args.cache)
    dataset = build_dataset(args.dataset, args.data_root, args.split, **json.loads(args.options))
    store.check_matches(dataset)
    teacher, _ = model_from_checkpoint(args.teacher)
    teacher.to(device).eval()
    pre = store.attrs["preprocessing"]
    kl = {1.0: 0.0, 4.0: 0.0}
    agree = pixels = 0
    raw_logits = raw_features = format1_features = 0
    pa_errors: dict[tuple[int, int], list[float]] = {}
    for i in range(len(dataset)):
        image = normalize(dataset[i]["image"].to(device))[None]
        window = tuple(pre["teacher_window"]) if pre.get("teacher_window") else None
        reference, features = predict(teacher, image, scales=pre["teacher_scales"], flip=pre["teacher_flip"], window=window)
        stored = torch.from_numpy(store.read_log_probs(i)).float().to(device)[None]
        for t in kl:
            log_p = (reference / t).log_softmax(1)
            log_q = (stored / t).log_softmax(1)
            kl[t] += (log_p.exp() * (log_p - log_q)).sum(1).sum().item()
        agree += (reference.argmax(1) == stored.argmax(1)).sum().item()
        pixels += reference[0, 0].numel()
        raw_logits += reference.numel() * 4
        pool = store.feature_pool
        exact = F.max_pool2d(features, pool, pool, ceil_mode=True)
        raw_features += exact.numel() * 4
        format1_features += format1_bytes(exact[0].cpu().numpy())
        if store.has_features:
            # The pair-wise loss against a (random) student, from decoded vs exact teacher features,
            # for nodes of 1 and 2 stored cells and of a quarter and half of the map.
            fh, fw = exact.shape[-2:]
            rows, cols = logit_size(store.image_hw[i])
            decoded = torch.from_numpy(store.read_features(i, (slice(0, rows), slice(0, cols)))[None]).to(device)
            student = torch.randn(1, 32, fh, fw, generator=torch.Generator().manual_seed(i)).to(device)
            for node in ((1, 1), (2, 2), (max(1, fh // 4), max(1, fw // 4)), (max(1, fh // 2), max(1, fw // 2))):
                want = pairwise_loss(student, exact, node).item()
                pa_errors.setdefault(node, []).append(abs(pairwise_loss(student, decoded, node).item() - want) / want)
    n = len(dataset)
    report = {
        "command": " ".join(sys.argv),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "device": str(device), "images": n, "codecs": store.attrs["codecs"],
        "format_version": store.version,
        "logits_bytes_per_image": store.bytes_on_disk(store.level_arrays[1.0]) / n,
        # The features with their per-channel scales and offsets and their position scales.
        "features_bytes_per_image": sum(store.bytes_on_disk(name) for name in FEATURE_ARRAYS
                                        if name in store.group.array_keys()) / n,
        # Format 1's codec (float16, zstd level 3, one chunk per image) on the same exact features.
        "format1_features_bytes_per_image": format1_features / n,
        "raw_float32_logits_bytes_per_image": raw_logits / n,
        "raw_float32_features_bytes_per_image": raw_features / n,
        "mean_kl_T1": kl[1.0] / pixels, "mean_kl_T4": kl[4.0] / pixels, "argmax_agreement": agree / pixels,
        "pairwise_loss_relative_error": {f"{k[0]}x{k[1]}": max(v) for k, v in pa_errors.items()},
    }
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
