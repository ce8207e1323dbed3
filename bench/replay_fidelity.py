"""How close are replayed cached targets to the teacher run live on the same augmented crop?

For random crops at fixed scales (with random flips) of a real dataset, compares the cached teacher
map resampled to the crop (what `skd train-student --cache` trains on) with the teacher run on the
crop itself (what online distillation trains on): mean KL(online || replayed) per valid pixel,
argmax agreement, and each target's pixel accuracy against the ground truth. Done for each kind of
cache in --variants:

    plain    the teacher once on the whole image (float16 storage only adds KL ~1e-7, so this is also
             the probe "online teacher on the whole image, then cropped": context and resolution)
    tta      + test-time scales (--tta-scales) and flip
    window   plain, but the teacher run as sliding windows of --window (its training crop)
    levels   plain, plus maps of the image resized by each of --levels (replay reads the nearest)
    window+levels, tta+levels, ...   combinations

    python bench/replay_fidelity.py --teacher runs/camvid-teacher/model.pt \\
        --dataset camvid --data-root ../shared/data/camvid --split val --output docs/results/replay_camvid.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache.replay import replay_targets  # noqa: E402
from pipeline.data.samples import TrainingSamples, collate  # noqa: E402
from pipeline.cache.store import TeacherStore  # noqa: E402
from pipeline.inference import predict  # noqa: E402
from pipeline.cache.writer import cache_teacher  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.data.transforms import AugmentConfig, normalize  # noqa: E402
from pipeline.train.checkpoint import file_sha256, model_from_checkpoint  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402


def compare(teacher, dataset, store, scale: float, crop: tuple[int, int], crops: int, seed: int, device) -> dict:
    samples = TrainingSamples(dataset, AugmentConfig(crop, (scale, scale), flip=True), store, seed=seed,
                              features=False)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    kl_sum = agree = acc_online = acc_replay = pixels = labelled = 0.0
    for k in range(crops):
        samples.epoch = k // len(dataset)  # new crops when there are more crops than images
        batch = collate([samples[int(order[k % len(dataset)])]])
        batch = {key: v.to(device) for key, v in batch.items()}
        images = normalize(batch["image"])
        online, _ = predict(teacher, images)
        out_hw = tuple(online.shape[-2:])
        replayed, _ = replay_targets(batch, out_hw)
        valid = batch["valid"]
        log_p_online, log_p_replay = online.log_softmax(1), replayed.float().log_softmax(1)
        kl = (log_p_online.exp() * (log_p_online - log_p_replay)).sum(1)
        kl_sum += kl[valid].sum().item()
        agree += (online.argmax(1) == replayed.argmax(1))[valid].sum().item()
        pixels += valid.sum().item()
        # Accuracy against the labels at full crop resolution.
        label = batch["label"]
        up = lambda m: F.interpolate(m, size=label.shape[-2:], mode="bilinear", align_corners=False).argmax(1)  # noqa: E731
        keep = label != 255
        acc_online += (up(online) == label)[keep].sum().item()
        acc_replay += (up(replayed.float()) == label)[keep].sum().item()
        labelled += keep.sum().item()
    return {"scale": scale, "crops": crops, "valid_pixels": int(pixels), "mean_kl": kl_sum / pixels,
            "argmax_agreement": agree / pixels, "online_pixel_acc": acc_online / labelled,
            "replayed_pixel_acc": acc_replay / labelled}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--dataset-options", default="{}", help='JSON keyword arguments of the dataset, e.g. {"size": [96, 128]}')
    p.add_argument("--variants", default="plain,tta", help="plain, tta, window, levels and '+' combinations")
    p.add_argument("--window", default=None, help="sliding-window size HxW for the window variants (default: --crop)")
    p.add_argument("--levels", default="1,2", help="stored scales for the levels variants")
    p.add_argument("--crop", default="192x256", help="student crop HxW")
    p.add_argument("--scales", default="0.5,1,2")
    p.add_argument("--crops", type=int, default=100, help="random crops per scale")
    p.add_argument("--tta-scales", default="0.75,1,1.25")
    p.add_argument("--feature-pool", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default=None, help="where the two caches go (default: a temp folder)")
    p.add_argument("--output", default=None)
    args = p.parse_args()

    device = resolve_device(args.device)
    dataset = build_dataset(args.dataset, args.data_root, args.split, **json.loads(args.dataset_options))
    teacher, arch = model_from_checkpoint(args.teacher)
    teacher.to(device).eval()
    info = {**arch, "checkpoint": Path(args.teacher).name, "weights_sha256": file_sha256(args.teacher)}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="skd-replay-"))
    crop = tuple(int(v) for v in args.crop.split("x"))
    window = tuple(int(v) for v in (args.window or args.crop).split("x"))
    rows = []
    for name in args.variants.split(","):
        parts = set(name.split("+"))
        unknown = parts - {"plain", "tta", "window", "levels"}
        if unknown:
            raise SystemExit(f"unknown variant part(s) {sorted(unknown)}")
        setting = {"scales": [float(s) for s in args.tta_scales.split(",")] if "tta" in parts else [1.0],
                   "flip": "tta" in parts, "window": window if "window" in parts else None,
                   "levels": [float(s) for s in args.levels.split(",")] if "levels" in parts else [1.0]}
        path = work / f"{args.dataset}-{args.split}-{name.replace('+', '-')}.zarr"
        tic = time.perf_counter()
        if not path.exists():
            cache_teacher(teacher, info, dataset, path, device=device, feature_pool=args.feature_pool,
                          progress=False, workers=0, **setting)
        cache_s = time.perf_counter() - tic
        store = TeacherStore(path)
        for scale in (float(s) for s in args.scales.split(",")):
            row = {"cache": name, **setting,
                   **compare(teacher, dataset, store, scale, crop, args.crops, args.seed, device)}
            rows.append(row)
            print(f"{name:14s} scale {scale:4.2f}: KL {row['mean_kl']:.4f}  argmax agreement {100 * row['argmax_agreement']:.2f}%  "
                  f"pixel acc online {100 * row['online_pixel_acc']:.2f}% replayed {100 * row['replayed_pixel_acc']:.2f}%",
                  flush=True)
        rows[-1]["cache_seconds"] = cache_s
        rows[-1]["log_prob_bytes_per_image"] = sum(
            f.stat().st_size for f in path.rglob("*") if f.is_file() and "logits" in f.relative_to(path).parts[0]
        ) / len(dataset)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"command": " ".join(sys.argv), "commit": commit, "device": str(device), "teacher": info,
              "dataset": f"{args.dataset}/{args.split}", "crop": args.crop, "rows": rows}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
