"""Stage one: run the teacher once over a dataset split and write the cache."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import pipeline
from pipeline.cache.store import create_store, feature_size, finalize, level_array, logit_size
from pipeline.inference import predict, resize
from pipeline.device import set_cpu_threads
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.errors import SkdError

log = logging.getLogger(__name__)


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "index": torch.tensor([it["index"] for it in items])}


class _Indexed(torch.utils.data.Dataset):
    """Yields the image and its position. The label is still read (by ``dataset[i]``) so that a
    broken or mis-sized label stops caching at that file rather than a later training run."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.dataset[i]["image"], "index": i}


def cache_teacher(
    teacher: nn.Module,
    teacher_info: dict[str, Any],
    dataset,
    out: str | Path,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    feature_pool: int = 4,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: tuple[int, int] | None = None,
    levels: Sequence[float] = (1.0,),
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``teacher``'s outputs on every image of ``dataset`` to the store ``out``.

    ``scales``/``flip``: test-time augmentation averaged into each stored map. ``window``: run the
    teacher as sliding windows of this size (e.g. its training crop) rather than on whole images.
    ``levels``: also store the map of the image resized by each of these scales (see
    ``create_store``), for training crops taken at those scales.

    Resumes a previous interrupted run of the same teacher on the same data (``<out>.partial``);
    refuses to mix outputs of a different teacher, dataset or setting into it.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not overwrite:
        raise SkdError(f"{out} already exists: pass --overwrite to replace it")
    # With --overwrite the old store stays usable until the new one is complete (see finalize).
    out.parent.mkdir(parents=True, exist_ok=True)

    provenance = {
        "teacher": teacher_info,
        "dataset": {"name": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint,
                    "num_images": len(dataset), "class_names": list(dataset.class_names), "ids": list(dataset.ids)},
        "preprocessing": {"input": "RGB/255, ImageNet mean/std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "teacher_scales": [float(s) for s in scales], "teacher_flip": bool(flip),
                          "teacher_window": list(window) if window else None,
                          "levels": sorted({1.0, *(float(s) for s in levels)})},
        "skd_version": pipeline.__version__,
        "torch_version": torch.__version__,
    }
    provenance = json.loads(json.dumps(provenance))  # compare as it reads back from JSON attributes
    if partial.exists() and not overwrite:
        _check_resumable(partial, provenance, feature_pool)
        group = zarr.open_group(str(partial), mode="r+")
    else:
        if partial.exists():
            shutil.rmtree(partial)
        image_hw = np.array([dataset.image_size(i) for i in range(len(dataset))], dtype=np.int32)
        provenance["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        group = create_store(partial, provenance, image_hw, teacher_info["num_classes"],
                             teacher.feature_channels, feature_pool, levels)

    done = group["done"][:]
    pending = np.flatnonzero(~done).tolist()
    if done.any():
        log.info("resuming %s: %d of %d images already cached", partial, int(done.sum()), len(done))
    image_hw = group["image_hw"][:]
    fixed_size = bool((image_hw == image_hw[0]).all())
    loader = DataLoader(
        Subset(_Indexed(dataset), pending), batch_size=batch_size if fixed_size else 1, num_workers=workers,
        collate_fn=_collate, pin_memory=torch.device(device).type == "cuda",
    )
    set_cpu_threads(torch.device(device), workers)
    teacher = teacher.to(device).eval()
    levels = provenance["preprocessing"]["levels"]
    level_arrays = {level: group[level_array(level)] for level in levels}
    features_arr, scale_arr, done_arr = group["features"], group["feature_scale"], group["done"]
    with tqdm(total=len(dataset), initial=len(dataset) - len(pending), desc="cache-teacher",
              unit="img", disable=not progress) as bar:
        for batch in loader:
            images = normalize(batch["image"].to(device, non_blocking=True))
            maps = {}
            for level in levels:
                maps[level], level_features = predict(teacher, resize(images, level), scales=scales, flip=flip,
                                                       window=window)
                if level == 1.0:
                    features = level_features
            if feature_pool > 1:
                features = F.max_pool2d(features, feature_pool, feature_pool, ceil_mode=True)
            # A per-image positive scale keeps features within float16 (a poorly trained teacher's
            # reach 1e5 and more); pair-wise distillation is invariant to it.
            feature_scale = features.abs().flatten(1).amax(dim=1).clamp(min=1e-12)
            features = features / feature_scale[:, None, None, None]
            indices = batch["index"].tolist()
            _check_finite(dataset, indices, maps, features, feature_scale)
            maps = {level: m.half().cpu().numpy() for level, m in maps.items()}
            features, feature_scale = features.half().cpu().numpy(), feature_scale.cpu().numpy()
            for k, index in enumerate(indices):
                for level, log_probs in maps.items():
                    h, w = logit_size(image_hw[index], level)
                    level_arrays[level][index, :, :h, :w] = log_probs[k, :, :h, :w]
                fh, fw = feature_size(image_hw[index], feature_pool)
                features_arr[index, :, :fh, :fw] = features[k, :, :fh, :fw]
                scale_arr[index] = feature_scale[k]
                done_arr[index] = True  # only after the maps are on disk
            bar.update(len(indices))
    finalize(partial, out)
    log.info("wrote %s", out)
    return out


def _check_finite(dataset, indices: list[int], maps: dict[float, torch.Tensor], features: torch.Tensor,
                  feature_scale: torch.Tensor) -> None:
    """Refuse NaN/inf teacher outputs (a diverged or broken teacher), naming the image.
    One device sync per batch: the per-image checks run only once something is not finite."""
    finite = {f"log-probabilities at scale {level:g}": torch.isfinite(m).flatten(1).all(1) for level, m in maps.items()}
    finite["features"] = torch.isfinite(features).flatten(1).all(1) & torch.isfinite(feature_scale)
    finite = {what: ok.cpu() for what, ok in finite.items()}
    for k, index in enumerate(indices):
        bad = [what for what, ok in finite.items() if not ok[k]]
        if bad:
            raise SkdError(f"the teacher's {' and '.join(bad)} for image {dataset.ids[index]!r} (#{index}) are not finite "
                           "(NaN or inf): check the teacher checkpoint; images before it are kept and a re-run resumes")


def _check_resumable(partial: Path, provenance: dict, feature_pool: int) -> None:
    try:
        attrs = dict(zarr.open_group(str(partial), mode="r").attrs)
    except Exception as exc:
        raise SkdError(f"cannot resume {partial}: {exc}; remove it or pass --overwrite") from None
    checks = {
        "teacher": (attrs.get("teacher"), provenance["teacher"]),
        "dataset": (attrs.get("dataset"), provenance["dataset"]),
        "preprocessing": (attrs.get("preprocessing"), provenance["preprocessing"]),
        "feature_pool": (attrs.get("feature_pool"), feature_pool),
    }
    for what, (old, new) in checks.items():
        if old != new:
            raise SkdError(f"{partial} was started with a different {what}: remove it or pass --overwrite")
