"""Stage one: run the teacher once over a dataset split and write the cache."""

from __future__ import annotations

import contextlib
import json
import logging
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

import pipeline
from pipeline.cache.codecs import encode_features, quantise_log_probs
from pipeline.cache.lifecycle import LocalStoreLifecycle, ObjectStoreLifecycle, pending_shards, store_lifecycle
from pipeline.cache.projection import Projection, fit_projection
from pipeline.cache.remote import describe, network_errors, network_options
from pipeline.cache.schema import SHARD_IMAGES, level_array
from pipeline.cache.store import FEATURE_ARRAYS, create_store, read_layout, read_projection, redact
from pipeline.data.views import crop_params, draw_views
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_jitter, apply_params, normalize
from pipeline.device import set_cpu_threads
from pipeline.errors import SkdError
from pipeline.faults import fault_point
from pipeline.inference import predict, resize
from pipeline.metrics import ConfusionMatrix
from pipeline.progress import progress_bar
from pipeline import parallel

log = logging.getLogger(__name__)


def _collate(items: list[dict]) -> dict:
    batch = {"image": torch.stack([it["image"] for it in items]), "index": torch.tensor([it["index"] for it in items]),
             "label": torch.stack([it["label"] for it in items])}
    if "view_images" in items[0]:
        for key in ("view_images", "view_crops", "view_jitter"):
            batch[key] = torch.stack([it[key] for it in items])
    return batch


class _Indexed(torch.utils.data.Dataset):
    """Yields the image and its position, and with a ``view_bank`` (its spec) the image's K augmented
    views (uint8, as training will crop them) with their parameters. The label is still read (by
    ``dataset[i]``) so that a broken or mis-sized label stops caching at that file rather than a
    later training run."""

    def __init__(self, dataset, view_bank: dict | None = None):
        self.dataset = dataset
        self.view_bank = view_bank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        out = {"image": item["image"], "index": i, "label": item["label"]}  # the label scores the teacher
        if self.view_bank:
            crops, jitter = draw_views(self.view_bank, i, tuple(item["image"].shape[-2:]))
            crop_size = tuple(self.view_bank["crop_size"])
            out["view_images"] = torch.stack([
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
    view_bank: dict | None = None,
    precision: str = "fp32",
    features: bool = True,
    feature_projection: int = 0,
    projection_images: int = 256,
    shard_images: int = SHARD_IMAGES,
    workers: int = 2,
    write_threads: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
) -> str | Path:
    """Write ``teacher``'s outputs on every image of ``dataset`` to the store ``out``.

    ``scales``/``flip``: test-time augmentation averaged into each stored map. ``window``: run the
    teacher as sliding windows of this size (e.g. its training crop) rather than on whole images.
    ``levels``: also store the map of the image resized by each of these scales (see
    ``create_store``), for training crops taken at those scales. ``view_bank``: also store a bank of
    augmented training views with the teacher's maps on each (``pipeline.data.views.view_spec``);
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
    if features and feature_projection > teacher.feature_channels:
        # Said before the teacher runs (the fit would find it only after a pass over the images).
        raise SkdError(f"--feature-projection {feature_projection} asks for more channels than the teacher's "
                       f"{teacher.feature_channels} features have; nothing was written")
    world = parallel.current()
    storage_options = network_options(str(out), storage_options)  # retries configured once, for every request
    lifecycle = store_lifecycle(out, storage_options)
    with contextlib.ExitStack() as held:
        # Rank 0 alone touches the store's layout, holding the store's writer lock until it is
        # finalised; the other ranks learn the outcome (or the error) from it.
        setup_error, todo = None, None
        if world.main:
            try:
                held.enter_context(lifecycle.lock())
                todo = _open_or_create(lifecycle, teacher, teacher_info, dataset, feature_pool, scales, flip, window,
                                       levels, view_bank, precision, features, shard_images, overwrite,
                                       feature_projection, projection_images, device, progress, storage_options)
            except OSError as exc:  # a read-only folder, a full disk, a path that is a file
                setup_error = SkdError(f"cannot write the store {redact(str(out))}: {exc.strerror or exc}"
                                       f"{f' ({exc.filename})' if exc.filename else ''}; nothing was changed")
            except network_errors() as exc:  # object storage that stopped answering, after its retries
                setup_error = SkdError(f"cannot write the store {redact(str(out))}: {describe(exc)}; "
                                       "nothing was changed")
            except Exception as exc:
                setup_error = exc
        shared = parallel.broadcast_object(None if setup_error is None else str(setup_error) or type(setup_error).__name__)
        if setup_error is not None:
            raise setup_error
        if shared is not None:
            raise SkdError(f"rank 0 stopped: {shared}")
        todo = parallel.broadcast_object(todo)
        lifecycle.writing = parallel.broadcast_object(lifecycle.writing)  # rank 0 decided where the shards go
        if todo is None:
            log.info("%s is already complete, from the same teacher, data and settings: nothing to do", redact(out))
            return out
        _write_shards(teacher, dataset, lifecycle, todo, world, batch_size=batch_size, device=device,
                      feature_pool=feature_pool, scales=scales, flip=flip, window=window, view_bank=view_bank,
                      precision=precision, features=features, workers=workers, write_threads=write_threads,
                      progress=progress)
    return out


def _write_shards(teacher: nn.Module, dataset, lifecycle: LocalStoreLifecycle | ObjectStoreLifecycle,
                  todo: list[tuple[int, int]],
                  world: parallel.World, *, batch_size: int, device: torch.device | str, feature_pool: int,
                  scales: Sequence[float], flip: bool, window: tuple[int, int] | None, view_bank: dict | None,
                  precision: str, features: bool, workers: int, write_threads: int, progress: bool) -> None:
    """Run the teacher on this rank's share of the shards ``todo`` and write them; rank 0 finalises."""
    group = lifecycle.target()
    layout = read_layout(group)
    mine = todo[world.rank :: world.size]  # shards not yet done, dealt out over the ranks
    pending = [i for a, b in mine for i in range(a, b)]
    step = batch_size if layout.fixed_size else 1
    # Batches never cross a shard, so that an image's batch (and so its numbers) is the same
    # whatever the number of processes.
    batches = [list(range(i, min(i + step, b))) for a, b in mine for i in range(a, b, step)]
    loader = DataLoader(_Indexed(dataset, view_bank), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        pin_memory=torch.device(device).type == "cuda")
    set_cpu_threads(torch.device(device), workers)
    teacher = teacher.to(device).eval()
    projection = read_projection(group)
    specs = [spec for spec in layout.specs() if spec.written_by == "writer"]
    writes = _BoundedWrites(write_threads)
    shards = _ShardBuffers(group, [spec.name for spec in specs], layout.shard_images, layout.images, writes,
                           redact(str(lifecycle.writing)))
    desc = "cache-teacher" + (f" (rank 0 of {world.size})" if world.size > 1 else "")
    score = ConfusionMatrix(dataset.num_classes, ignore_index=dataset.ignore_index)  # the teacher's, as stored
    with progress_bar(len(pending), desc, "img", progress, log) as bar, writes:
        for batch in loader:
            images = normalize(batch["image"].to(device, non_blocking=True))
            outputs = {}
            for level in layout.levels:
                log_probs, level_features = predict(teacher, resize(images, level), scales=scales, flip=flip,
                                                    window=window, precision=precision)
                outputs[level_array(level)] = quantise_log_probs(log_probs, class_dim=1)
                if level == 1.0 and features:
                    outputs |= dict(zip(FEATURE_ARRAYS, encode_features(level_features, feature_pool, projection)))
            if view_bank:
                view_log_probs, *view_features = _teacher_on_views(
                    teacher, batch["view_images"], feature_pool, batch_size, device, precision, projection)
                outputs |= {"view_log_probs": quantise_log_probs(view_log_probs, class_dim=2),
                            "view_crops": batch["view_crops"], "view_jitter": batch["view_jitter"]}
                if features:
                    outputs |= dict(zip(["view_" + name for name in FEATURE_ARRAYS], view_features))
            indices = batch["index"].tolist()
            _check_finite(dataset, indices, outputs)
            outputs = {name: t.cpu().numpy() for name, t in outputs.items()}
            for k, index in enumerate(indices):
                hw = layout.image_hw[index]
                values = {spec.name: _cut(outputs[spec.name][k], spec.extent and spec.extent(hw)) for spec in specs}
                shards.put(index, values)
                _score(score, values[level_array(1.0)], batch["label"][k])
            bar.update(len(indices))
    parallel.barrier()  # every rank's shards are on disk
    matrix = (parallel.all_mean(score.matrix.to(device).double()) * world.size).round().long().cpu()
    if world.main:
        _record_score(group, dataset, matrix, whole_split=sum(b - a for a, b in todo) == len(dataset))
        lifecycle.finalise()
        log.info("wrote %s", redact(str(lifecycle.final)))
    parallel.barrier()  # no rank returns before the store is in place


def _score(score: ConfusionMatrix, log_probs: np.ndarray, label: torch.Tensor) -> None:
    """Add one image's stored map to the teacher's confusion matrix, as ``skd evaluate --cache`` scores
    it: upsampled bilinearly to the label's size, then the argmax."""
    up = F.interpolate(torch.from_numpy(log_probs)[None].float(), size=label.shape[-2:], mode="bilinear",
                       align_corners=False)
    score.update(up[0].argmax(0), label)


def _record_score(group: zarr.Group, dataset, matrix: torch.Tensor, whole_split: bool) -> None:
    """The teacher's mIoU on the split, from the maps this run wrote, into the store's attributes
    (``teacher_miou``) and the log; not when an earlier run cached part of the split (the maps it
    wrote were not scored: ``skd cache-stats STORE --labels`` scores them all) or nothing is labelled."""
    cm = ConfusionMatrix(dataset.num_classes, ignore_index=dataset.ignore_index)
    cm.matrix += matrix
    counted = int(cm.matrix.sum())
    if counted == 0:
        return
    if not whole_split:
        log.info("teacher mIoU not computed: an earlier run cached part of this split (skd cache-stats STORE "
                 "--labels %s/%s scores the whole store)", dataset.name, dataset.split)
        return
    record = {"miou": cm.miou(), "pixel_accuracy": cm.pixel_accuracy(), "dataset": dataset.name,
              "split": dataset.split, "images": len(dataset), "pixels": counted}
    group.attrs["teacher_miou"] = record
    log.info("teacher mIoU on %s/%s (its maps as stored, %d images): %.2f, pixel accuracy %.2f", dataset.name,
             dataset.split, len(dataset), 100 * record["miou"], 100 * record["pixel_accuracy"])


def _open_or_create(lifecycle: LocalStoreLifecycle | ObjectStoreLifecycle, teacher: nn.Module, teacher_info: dict[str, Any], dataset,
                    feature_pool: int, scales: Sequence[float], flip: bool, window: tuple[int, int] | None,
                    levels: Sequence[float], view_bank: dict | None, precision: str, features: bool, shard_images: int,
                    overwrite: bool, feature_projection: int, projection_images: int, device: torch.device | str,
                    progress: bool, storage_options: dict | None) -> list[tuple[int, int]] | None:
    """Create the partial store or resume it; returns the shards (start, stop) not yet done, or
    None when the store is already this very store, complete (a re-run of a finished command)."""
    provenance = {
        "teacher": teacher_info,
        "dataset": {"name": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint,
                    "num_images": len(dataset), "class_names": list(dataset.class_names), "ids": list(dataset.ids)},
        "preprocessing": {"input": "RGB/255, ImageNet mean/std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "teacher_scales": [float(s) for s in scales], "teacher_flip": bool(flip),
                          "teacher_window": list(window) if window else None, "teacher_precision": precision,
                          "levels": sorted({1.0, *(float(s) for s in levels)}),
                          **({"views": view_bank} if view_bank else {}),
                          **({"feature_projection": {"channels": feature_projection, "fit_images":
                                                     min(projection_images, len(dataset))}}
                             if features and feature_projection else {})},
        "skd_version": pipeline.__version__,
        "torch_version": torch.__version__,
    }
    provenance = json.loads(json.dumps(provenance))  # compare as it reads back from JSON attributes

    def create(path: str | Path) -> None:
        image_hw = np.array([dataset.image_size(i) for i in range(len(dataset))], dtype=np.int32)
        projection = (fit_projection(teacher, dataset, feature_projection, feature_pool=feature_pool,
                                     images=projection_images, device=device, precision=precision, progress=progress)
                      if features and feature_projection else None)
        create_store(path, {**provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, image_hw,
                     teacher_info["num_classes"], teacher.feature_channels, feature_pool, levels, features=features,
                     shard_images=shard_images, projection=projection, storage_options=storage_options)

    group = lifecycle.begin({**provenance, "feature_pool": feature_pool, "features": features}, create, overwrite)
    if group is None:
        return None
    done = group["done"][:]
    if done.any():
        log.info("resuming %s: %d of %d images already cached", redact(str(lifecycle.final)), int(done.sum()), len(done))
    return pending_shards(group)


def _cut(values: np.ndarray, extent: tuple[int, int] | None) -> np.ndarray:
    """A map cut to the image's true extent on the canvas (its last two dimensions)."""
    return values if extent is None else values[..., : extent[0], : extent[1]]


class _ShardBuffers:
    """Each shard's images gathered in memory; a complete shard goes to the write pool as one task
    that writes every array's shard and then the shard's ``done`` flags. So each shard file is
    written once, by one writer, and nothing is flagged before it is on disk."""

    def __init__(self, group: zarr.Group, names: list[str], shard: int, n: int, writes: "_BoundedWrites", where: str):
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
                 start: int, stop: int, where: str) -> None:
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
    except network_errors() as exc:  # object storage unreachable for longer than its retries wait
        raise SkdError(f"writing images {start}-{stop - 1} to {where} failed after retries: {describe(exc)}; "
                       "the shards finished before are kept, marked done: re-run the same command to resume") from None


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


def _teacher_on_views(teacher: nn.Module, view_images: torch.Tensor, feature_pool: int, batch_size: int,
                      device: torch.device | str, precision: str,
                      projection: Projection | None = None) -> tuple[torch.Tensor, ...]:
    """The teacher on a batch of images' views (B, K, 3, h, w) uint8: log-probabilities (B, K, C, ho, wo),
    pooled encoded features (B, K, F, hf, wf), their scales and offsets (B, K, F) and position scales
    (B, K, hf, wf)."""
    b, k = view_images.shape[:2]
    flat = view_images.flatten(0, 1)
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
