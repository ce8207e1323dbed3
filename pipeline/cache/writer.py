"""Stage one: run the teacher once over a dataset split and write the cache."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import pipeline
from pipeline.cache.store import (FEATURE_ARRAYS, LOG_PROB_RANGE, SHARD_IMAGES, create_store, feature_size, finalize,
                                  level_array, logit_size, read_projection, recover_swap)
from pipeline.inference import predict, resize
from pipeline.device import set_cpu_threads
from pipeline.cache.lock import WriterLock
from pipeline.cache.projection import Projection, fit_projection, project
from pipeline.cache.views import VIEW_ARRAYS, crop_params, draw_views
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_jitter, apply_params, normalize
from pipeline.errors import SkdError
from pipeline.faults import fault_point
from pipeline import parallel as distributed

log = logging.getLogger(__name__)


def _collate(items: list[dict]) -> dict:
    batch = {"image": torch.stack([it["image"] for it in items]), "index": torch.tensor([it["index"] for it in items])}
    if "views" in items[0]:
        for key in ("views", "view_crops", "view_jitter"):
            batch[key] = torch.stack([it[key] for it in items])
    return batch


class _Indexed(torch.utils.data.Dataset):
    """Yields the image and its position, and with a view bank ``views`` the image's K augmented
    views (uint8, as training will crop them) with their parameters. The label is still read (by
    ``dataset[i]``) so that a broken or mis-sized label stops caching at that file rather than a
    later training run."""

    def __init__(self, dataset, views: dict | None = None):
        self.dataset = dataset
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        out = {"image": item["image"], "index": i}
        if self.views:
            crops, jitter = draw_views(self.views, i, tuple(item["image"].shape[-2:]))
            crop_size = tuple(self.views["crop_size"])
            out["views"] = torch.stack([
                apply_jitter(apply_params(item["image"], item["label"], crop_params(row), crop_size)[0], factors)
                for row, factors in zip(crops, jitter.tolist())])
            out["view_crops"], out["view_jitter"] = torch.from_numpy(crops), torch.from_numpy(jitter)
        return out


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
    views: dict | None = None,
    precision: str = "fp32",
    features: bool = True,
    feature_projection: int = 0,
    projection_images: int = 256,
    shard_images: int = SHARD_IMAGES,
    workers: int = 2,
    write_threads: int = 4,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``teacher``'s outputs on every image of ``dataset`` to the store ``out``.

    ``scales``/``flip``: test-time augmentation averaged into each stored map. ``window``: run the
    teacher as sliding windows of this size (e.g. its training crop) rather than on whole images.
    ``levels``: also store the map of the image resized by each of these scales (see
    ``create_store``), for training crops taken at those scales. ``views``: also store a bank of
    augmented training views with the teacher's maps on each (``pipeline.cache.views.view_spec``);
    the teacher runs on each view as it is, with no test-time augmentation, as an online teacher would.
    ``precision``: "fp32", or "bf16" to run the teacher under bfloat16 autocast (recorded in the
    provenance; docs/BENCHMARKS.md measures what it changes). ``feature_projection`` k > 0 stores the
    features as their coordinates on the top k principal directions of the teacher's features, fitted
    on up to ``projection_images`` images of ``dataset`` (``pipeline.cache.projection``): dense
    features for feature distillation at a fraction of the bytes. Compression and writes run in
    ``write_threads`` background threads, so the next batch's teacher pass overlaps them.

    Resumes a previous interrupted run of the same teacher on the same data (``<out>.partial``);
    refuses to mix outputs of a different teacher, dataset or setting into it.

    Under torchrun, rank 0 creates (or checks) the store, each rank runs the teacher on its own share
    of the shards not yet done and writes only those, and rank 0 finalises once all are written. The
    store is the one a single process writes (batches never cross a shard), at any world size.
    """
    out = Path(out)
    if features and feature_projection > teacher.feature_channels:
        # Said before the teacher runs (the fit would find it only after a pass over the images).
        raise SkdError(f"--feature-projection {feature_projection} asks for more channels than the teacher's "
                       f"{teacher.feature_channels} features have; nothing was written")
    world = distributed.current()
    with contextlib.ExitStack() as held:
        # Rank 0 alone touches the store's layout, holding the store's writer lock until it is
        # finalised; the other ranks learn the outcome (or the error) from it.
        setup_error, todo = None, None
        if world.main:
            try:
                held.enter_context(WriterLock(out))
                todo = _open_or_create(teacher, teacher_info, dataset, out, feature_pool, scales, flip, window,
                                       levels, views, precision, features, shard_images, overwrite,
                                       feature_projection, projection_images, device, progress)
            except OSError as exc:  # a read-only folder, a full disk, a path that is a file
                setup_error = SkdError(f"cannot write the store {out}: {exc.strerror or exc}"
                                       f"{f' ({exc.filename})' if exc.filename else ''}; nothing was changed")
            except Exception as exc:
                setup_error = exc
        shared = distributed.broadcast_object(None if setup_error is None else str(setup_error) or type(setup_error).__name__)
        if setup_error is not None:
            raise setup_error
        if shared is not None:
            raise SkdError(f"rank 0 stopped: {shared}")
        todo = distributed.broadcast_object(todo)
        if todo is None:
            log.info("%s is already complete, from the same teacher, data and settings: nothing to do", out)
            return out
        _write_shards(teacher, dataset, out, todo, world, batch_size=batch_size, device=device,
                      feature_pool=feature_pool, scales=scales, flip=flip, window=window, views=views,
                      precision=precision, features=features, workers=workers, write_threads=write_threads,
                      progress=progress)
    return out


def _write_shards(teacher: nn.Module, dataset, out: Path, todo: list[tuple[int, int]], world: distributed.World, *,
                  batch_size: int, device: torch.device | str, feature_pool: int, scales: Sequence[float], flip: bool,
                  window: tuple[int, int] | None, views: dict | None, precision: str, features: bool, workers: int,
                  write_threads: int, progress: bool) -> None:
    """Run the teacher on this rank's share of the shards ``todo`` and write them; rank 0 finalises."""
    partial = out.with_name(out.name + ".partial")
    group = zarr.open_group(str(partial), mode="r+")
    n = len(dataset)
    mine = todo[world.rank :: world.size]  # shards not yet done, dealt out over the ranks
    pending = [i for a, b in mine for i in range(a, b)]
    image_hw = group["image_hw"][:]
    fixed_size = bool((image_hw == image_hw[0]).all())
    step = batch_size if fixed_size else 1
    # Batches never cross a shard, so that an image's batch (and so its numbers) is the same
    # whatever the number of processes.
    batches = [list(range(i, min(i + step, b))) for a, b in mine for i in range(a, b, step)]
    loader = DataLoader(_Indexed(dataset, views), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        pin_memory=torch.device(device).type == "cuda")
    set_cpu_threads(torch.device(device), workers)
    teacher = teacher.to(device).eval()
    levels = group.attrs["preprocessing"]["levels"]
    projection = read_projection(group)
    names = [level_array(level) for level in levels] + (list(FEATURE_ARRAYS) if features else [])
    if views:
        names += [name for name in VIEW_ARRAYS if features or not name.startswith("view_feature")]
    writes = _BoundedWrites(write_threads)
    shards = _ShardBuffers(group, names, int(group.attrs["shard_images"]), n, writes, partial)
    desc = "cache-teacher" + (f" (rank 0 of {world.size})" if world.size > 1 else "")
    with tqdm(total=len(pending), desc=desc, unit="img", disable=not progress) as bar, writes:
        for batch in loader:
            images = normalize(batch["image"].to(device, non_blocking=True))
            outputs = {}
            for level in levels:
                log_probs, level_features = predict(teacher, resize(images, level), scales=scales, flip=flip,
                                                    window=window, precision=precision)
                outputs[level_array(level)] = _storable_log_probs(log_probs)
                if level == 1.0 and features:
                    outputs |= dict(zip(FEATURE_ARRAYS, encode_features(level_features, feature_pool, projection)))
            if views:
                view_log_probs, *view_features = _teacher_on_views(
                    teacher, batch["views"], feature_pool, batch_size, device, precision, projection)
                outputs |= {"view_log_probs": _storable_log_probs(view_log_probs), "view_crops": batch["view_crops"],
                            "view_jitter": batch["view_jitter"]}
                if features:
                    outputs |= dict(zip(["view_" + name for name in FEATURE_ARRAYS], view_features))
            indices = batch["index"].tolist()
            _check_finite(dataset, indices, outputs)
            outputs = {name: t.cpu().numpy() for name, t in outputs.items()}
            for k, index in enumerate(indices):
                extent = {level_array(level): logit_size(image_hw[index], level) for level in levels}
                extent["features"] = extent["feature_position_scale"] = feature_size(image_hw[index], feature_pool)
                shards.put(index, {name: _cut(values[k], extent.get(name)) for name, values in outputs.items()})
            bar.update(len(indices))
    distributed.barrier()  # every rank's shards are on disk
    if world.main:
        finalize(partial, out)
        log.info("wrote %s", out)
    distributed.barrier()  # no rank returns before the store is in place


def _open_or_create(teacher: nn.Module, teacher_info: dict[str, Any], dataset, out: Path, feature_pool: int,
                    scales: Sequence[float], flip: bool, window: tuple[int, int] | None, levels: Sequence[float],
                    views: dict | None, precision: str, features: bool, shard_images: int, overwrite: bool,
                    feature_projection: int, projection_images: int, device: torch.device | str,
                    progress: bool) -> list[tuple[int, int]] | None:
    """Check ``out``, then create ``<out>.partial`` or check that it resumes; returns the shards
    (start, stop) not yet done, or None when ``out`` is already this very store, complete (a re-run
    of a finished command)."""
    partial = out.with_name(out.name + ".partial")
    recover_swap(out)

    provenance = {
        "teacher": teacher_info,
        "dataset": {"name": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint,
                    "num_images": len(dataset), "class_names": list(dataset.class_names), "ids": list(dataset.ids)},
        "preprocessing": {"input": "RGB/255, ImageNet mean/std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "teacher_scales": [float(s) for s in scales], "teacher_flip": bool(flip),
                          "teacher_window": list(window) if window else None, "teacher_precision": precision,
                          "levels": sorted({1.0, *(float(s) for s in levels)}),
                          **({"views": views} if views else {}),
                          **({"feature_projection": {"channels": feature_projection, "fit_images":
                                                     min(projection_images, len(dataset))}}
                             if features and feature_projection else {})},
        "skd_version": pipeline.__version__,
        "torch_version": torch.__version__,
    }
    provenance = json.loads(json.dumps(provenance))  # compare as it reads back from JSON attributes
    if out.exists() and not overwrite:
        attrs = _attributes(out)
        if attrs.get("complete") and not _differences(attrs, provenance, feature_pool, features):
            return None
        raise SkdError(f"{out} already exists (from another teacher, data or setting): pass --overwrite to replace it")
    if out.exists():
        _check_replaceable(out)
    # With --overwrite the old store stays usable until the new one is complete (see finalize).
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists() and not overwrite:
        different = _differences(_attributes(partial), provenance, feature_pool, features)
        if different and zarr.open_group(str(partial), mode="r")["done"][:].any():
            raise SkdError(f"{partial} was started with a different {different[0]}: remove it or pass --overwrite")
        if different:  # nothing of it is done (e.g. the run stopped at a broken file since fixed): start over
            log.info("%s was started with a different %s and holds nothing yet: starting again", partial, different[0])
            overwrite = True
    if partial.exists() and not overwrite:
        group = zarr.open_group(str(partial), mode="r+")
    else:
        if partial.exists():
            shutil.rmtree(partial)
        # The empty store is laid out aside and renamed: a run killed while creating it leaves no
        # .partial without its arrays (only a .creating folder, removed by the next run).
        creating = partial.with_name(partial.name + ".creating")
        shutil.rmtree(creating, ignore_errors=True)
        image_hw = np.array([dataset.image_size(i) for i in range(len(dataset))], dtype=np.int32)
        provenance["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        projection = (fit_projection(teacher, dataset, feature_projection, feature_pool=feature_pool,
                                     images=projection_images, device=device, precision=precision, progress=progress)
                      if features and feature_projection else None)
        create_store(creating, provenance, image_hw, teacher_info["num_classes"], teacher.feature_channels,
                     feature_pool, levels, features=features, shard_images=shard_images, projection=projection)
        os.replace(creating, partial)
        group = zarr.open_group(str(partial), mode="r+")
    n = len(dataset)
    shard = int(group.attrs["shard_images"])
    done = group["done"][:]
    if done.any():
        log.info("resuming %s: %d of %d images already cached", partial, int(done.sum()), n)
    # Whole shards are the unit of work: a shard is written once, with all its images, then flagged.
    return [(a, min(a + shard, n)) for a in range(0, n, shard) if not done[a : a + shard].all()]


def _storable_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (dim 1 = classes) as the 8-bit store can hold them: clipped at
    -LOG_PROB_RANGE, every class but the top one at least one quantisation step below it, so that
    the stored argmax is the teacher's (exact ties aside)."""
    step = LOG_PROB_RANGE / 255
    top = log_probs.amax(dim=1, keepdim=True)
    below = torch.where(log_probs == top, log_probs, torch.minimum(log_probs, top - step))
    return below.clamp(min=-LOG_PROB_RANGE)


def _cut(values: np.ndarray, extent: tuple[int, int] | None) -> np.ndarray:
    """A map cut to the image's true extent on the canvas (its last two dimensions)."""
    return values if extent is None else values[..., : extent[0], : extent[1]]


class _ShardBuffers:
    """Each shard's images gathered in memory; a complete shard goes to the write pool as one task
    that writes every array's shard and then the shard's ``done`` flags. So each shard file is
    written once, by one writer, and nothing is flagged before it is on disk."""

    def __init__(self, group: zarr.Group, names: list[str], shard: int, n: int, writes: "_BoundedWrites", where: Path):
        self.where = where
        self.arrays = {name: group[name] for name in names}
        self.done = group["done"]
        self.shard, self.n, self.writes = shard, n, writes
        self.open: dict[int, tuple[dict[str, np.ndarray], set[int]]] = {}

    def put(self, index: int, values: dict[str, np.ndarray]) -> None:
        start = index // self.shard * self.shard
        stop = min(start + self.shard, self.n)
        if start not in self.open:
            self.open[start] = ({name: np.full((stop - start, *a.shape[1:]), a.fill_value, dtype=a.dtype)
                                 for name, a in self.arrays.items()}, set(range(start, stop)))
        buffers, missing = self.open[start]
        for name, value in values.items():
            buffers[name][(index - start, *(slice(0, s) for s in np.shape(value)))] = value
        missing.discard(index)
        if not missing:
            del self.open[start]
            self.writes.submit(_write_shard, self.arrays, buffers, self.done, start, stop, self.where)


def _write_shard(arrays: dict[str, zarr.Array], buffers: dict[str, np.ndarray], done: zarr.Array,
                 start: int, stop: int, where: Path) -> None:
    try:
        for k, (name, array) in enumerate(arrays.items()):
            if k == 1:
                fault_point("shard-write")
            array[start:stop] = buffers[name]
        fault_point("flag-write")
        done[start:stop] = True  # only after the maps are on disk
    except OSError as exc:  # a full disk, a quota, a permission taken away mid-run
        raise SkdError(f"writing images {start}-{stop - 1} to {where} failed: {exc.strerror or exc}"
                       f"{f' ({exc.filename})' if exc.filename else ''}; the shards finished before are kept, "
                       "marked done: make room and re-run the same command to resume") from None


class _BoundedWrites:
    """Compression and writes in background threads, at most ``2 × threads`` shards in flight so
    that memory stays bounded; the first failure is raised in the caller. Leaving the ``with``
    block waits for every write (also when the teacher loop failed, so what was computed is kept)."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cache-write")
        self.pending: deque = deque()

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > 2 * self.threads:
            self.pending.popleft().result()

    def __enter__(self) -> "_BoundedWrites":
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def encode_features(features: torch.Tensor, pool: int,
                    projection: Projection | None = None) -> tuple[torch.Tensor, ...]:
    """Features (B, F, h, w) max-pooled by ``pool`` and encoded as the store keeps them: values in
    [0, 1] (B, F, h, w), per-channel scale and offset (B, F) and a scale per position (B, h, w),
    float16: features = (values x scale + offset) x position scale.

    The pair-wise loss compares cosine similarities of nodes, each normalised to unit length, so a
    node whose features are all small (the leaky ReLU's negative side) needs its precision relative
    to itself: each position is divided by its largest |value| first. Per channel then, not per
    image, so that a few large channels do not set the step of all. (docs/CACHE.md: worst pair-wise
    error 5.4 % per image, 1.3 % per channel, 0.4 % per position and channel, at 1024x2048.)
    The position scale is relative to the image's largest value (float16 keeps its range); the
    rest of the magnitude goes into the channel scale and offset. With a ``projection``, the pooled
    features' coordinates on its directions are stored instead."""
    if pool > 1:
        features = F.max_pool2d(features, pool, pool, ceil_mode=True)
    if projection is not None:
        features = project(features, projection)
    features = features.float()
    peak = features.abs().amax(dim=1)  # (B, h, w)
    image_peak = peak.flatten(1).amax(dim=1).clamp(min=1e-30)[:, None, None]
    # Rounded to float16 before dividing, so that the stored scale is exactly the one used; at
    # least float16's smallest step, so that no position divides by 0.
    position = (peak / image_peak).half().clamp(min=2.0 ** -24)
    scaled = features / (position.float() * image_peak)[:, None]
    flat = scaled.flatten(2)
    offset = flat.amin(dim=2)
    scale = (flat.amax(dim=2) - offset).clamp(min=1e-12)
    values = ((scaled - offset[..., None, None]) / scale[..., None, None]).clamp(0, 1)
    top = image_peak.flatten(1)
    return values, scale * top, offset * top, position


def _teacher_on_views(teacher: nn.Module, views: torch.Tensor, feature_pool: int, batch_size: int,
                      device: torch.device | str, precision: str,
                      projection: Projection | None = None) -> tuple[torch.Tensor, ...]:
    """The teacher on a batch of images' views (B, K, 3, h, w) uint8: log-probabilities (B, K, C, ho, wo),
    pooled encoded features (B, K, F, hf, wf), their scales and offsets (B, K, F) and position scales
    (B, K, hf, wf)."""
    b, k = views.shape[:2]
    flat = views.flatten(0, 1)
    chunks = []
    for i in range(0, len(flat), batch_size):  # pooled chunk by chunk: full-resolution features never pile up
        log_probs, features = predict(teacher, normalize(flat[i : i + batch_size].to(device, non_blocking=True)),
                                      precision=precision)
        chunks.append((log_probs, *encode_features(features, feature_pool, projection)))
    return tuple(torch.cat(parts).unflatten(0, (b, k)) for parts in zip(*chunks))


def _check_finite(dataset, indices: list[int], outputs: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/inf teacher outputs (a diverged or broken teacher), naming the image. ``outputs``
    hold one row per image. One device sync per batch: the per-image checks run only once
    something is not finite."""
    finite = {what: torch.isfinite(t.reshape(len(indices), -1)).all(1).cpu() for what, t in outputs.items()}
    for k, index in enumerate(indices):
        bad = [what for what, ok in finite.items() if not ok[k]]
        if bad:
            raise SkdError(f"the teacher's {' and '.join(bad)} for image {dataset.ids[index]!r} (#{index}) are not finite "
                           "(NaN or inf): check the teacher checkpoint; completed shards of images before it are kept and "
                           "a re-run resumes")


def _check_replaceable(store: Path) -> None:
    """--overwrite moves the old store aside and deletes it once the new one is in place: refuse at
    once, not after the teacher's run, when that cannot be done."""
    for folder in [store.parent, *(p for p in [store, *store.rglob("*")] if p.is_dir())]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SkdError(f"cannot replace {store}: {folder} is read-only; nothing was changed")


def _attributes(store: Path) -> dict:
    try:
        return dict(zarr.open_group(str(store), mode="r").attrs)
    except Exception as exc:
        raise SkdError(f"cannot read {store}: {exc}; remove it or pass --overwrite") from None


def _differences(attrs: dict, provenance: dict, feature_pool: int, features: bool) -> list[str]:
    """What a store's attributes say was done differently from this run (empty: the same run)."""
    checks = {
        "teacher": (attrs.get("teacher"), provenance["teacher"]),
        "dataset": (attrs.get("dataset"), provenance["dataset"]),
        "preprocessing": (attrs.get("preprocessing"), provenance["preprocessing"]),
        "feature_pool": (attrs.get("feature_pool"), feature_pool),
        "features setting": (attrs.get("features"), features),
    }
    return [what for what, (old, new) in checks.items() if old != new]
