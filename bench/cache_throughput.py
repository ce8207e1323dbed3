"""Cache writing throughput: the teacher alone vs `cache_teacher` (teacher + compression + writes).

Both read the same images through the same DataLoader settings and run the same teacher at the same
precision; the ratio says how much of the teacher's speed the writer keeps (1.0 = writing is free,
hidden behind the teacher). Reports images/s and the ratio as JSON.

    python bench/cache_throughput.py --output docs/results/cache_throughput_cpu.json       # CPU, small
    python bench/cache_throughput.py --size 1024x2048 --teacher-arch pspnet_resnet101 --teacher-width 1 \\
        --images 64 --batch-size 4 --workers 12 --device cuda --precision bf16 --output tp.json
    # real images read from disk (not synthetic scenes drawn on a CPU core): CamVid train, every image
    python bench/cache_throughput.py --dataset camvid --data-root ../shared/data/camvid --images 0 \\
        --teacher-arch pspnet_resnet101 --teacher-width 1 --workers 12 --device cuda --output tp_camvid.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache.writer import cache_teacher  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.data.transforms import normalize  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402
from pipeline.inference import predict  # noqa: E402
from pipeline.models import build_model  # noqa: E402


def teacher_only(teacher, dataset, batch_size: int, workers: int, device: torch.device, precision: str) -> float:
    """Images/s of the teacher on every image (loader, transfer, forward, results back on the host)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=lambda items: torch.stack([it["image"] for it in items]),
                        pin_memory=device.type == "cuda")
    tic = time.perf_counter()
    for images in loader:
        log_probs, features = predict(teacher, normalize(images.to(device, non_blocking=True)), precision=precision)
        log_probs.half().cpu(), features.half().cpu()  # what the writer also pays: the copy back
    return len(dataset) / (time.perf_counter() - tic)


def first_images(dataset, n: int):
    """The first ``n`` images of a dataset read from files, as a dataset of the same kind (what the
    writer needs of it: ids, sizes, a fingerprint of its own)."""
    subset = copy.copy(dataset)
    subset.ids = dataset.ids[:n]
    subset.image_paths, subset.label_paths = dataset.image_paths[:n], dataset.label_paths[:n]
    subset._lut_of = dataset._lut_of[:n]
    subset.fingerprint = hashlib.sha256(f"{dataset.fingerprint} first {n}".encode()).hexdigest()
    return subset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic (drawn on the fly), or a dataset read from disk: camvid, cityscapes, ade20k, folder")
    p.add_argument("--data-root", default=None, help="the dataset's folder (not for synthetic)")
    p.add_argument("--split", default="train", help="the split whose images are run (not for synthetic)")
    p.add_argument("--size", default="192x256", help="synthetic image size HxW")
    p.add_argument("--images", type=int, default=48, help="images (the first N of a real split; 0: all of it)")
    p.add_argument("--classes", type=int, default=None,
                   help="teacher classes (the writer does not care what the images show) [default: 19 for "
                        "synthetic images, else the dataset's]")
    p.add_argument("--teacher-arch", default="pspnet_resnet50")
    p.add_argument("--teacher-width", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--write-threads", type=int, default=4)
    p.add_argument("--feature-pool", type=int, default=4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="each measurement is repeated; the best is kept")
    p.add_argument("--output", default=None)
    args = p.parse_args()

    device = resolve_device(args.device)
    size = [int(v) for v in args.size.split("x")]
    if args.dataset == "synthetic":
        dataset = build_dataset("synthetic", None, "train", size=size, length=args.images or 48)
        classes = args.classes or 19
    else:
        dataset = build_dataset(args.dataset, args.data_root, args.split)
        classes = args.classes or dataset.num_classes
        if 0 < args.images < len(dataset):
            dataset = first_images(dataset, args.images)
    arch = {"name": args.teacher_arch, "num_classes": classes, "width": args.teacher_width}
    torch.manual_seed(0)
    teacher = build_model(**arch).to(device).eval()
    teacher_only(teacher, torch.utils.data.Subset(dataset, range(min(8, len(dataset)))), args.batch_size, 0, device,
                 args.precision)  # warm-up
    results = {"teacher_only_img_s": max(teacher_only(teacher, dataset, args.batch_size, args.workers, device,
                                                      args.precision) for _ in range(args.repeats))}
    rates = []
    for _ in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="skd-throughput-"))
        tic = time.perf_counter()
        cache_teacher(teacher, {**arch, "weights_sha256": "0" * 64}, dataset, tmp / "store.zarr", batch_size=args.batch_size,
                      device=device, feature_pool=args.feature_pool, precision=args.precision, workers=args.workers,
                      write_threads=args.write_threads, progress=False)
        rates.append(len(dataset) / (time.perf_counter() - tic))
        shutil.rmtree(tmp)
    results["cache_teacher_img_s"] = max(rates)
    results["ratio"] = results["cache_teacher_img_s"] / results["teacher_only_img_s"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "commit": commit,
              "command": " ".join(sys.argv), "torch": torch.__version__, "settings": vars(args), "images": len(dataset),
              "image_size": list(dataset[0]["image"].shape[-2:]), "results": results}
    print(f"teacher only {results['teacher_only_img_s']:.2f} img/s   cache-teacher {results['cache_teacher_img_s']:.2f} "
          f"img/s   ratio {results['ratio']:.3f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
