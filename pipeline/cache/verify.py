"""Checking a store before trusting it: every array of its schema, every image's entry read
(checksums), flags, ids, sizes and provenance."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from pipeline.cache.schema import ArraySpec
from pipeline.cache.store import TeacherStore, scrub
from pipeline.data.views import draw_views

# Attributes a store cannot be used without.
REQUIRED_ATTRS = ("teacher", "dataset", "preprocessing", "feature_pool", "format_version")


def verify_store(store: TeacherStore, progress: bool = True, threads: int = 8) -> list[str]:
    """Every problem found in ``store``, each naming the array and image it concerns (empty: sound).

    Iterates the store's schema (``pipeline.cache.schema``): each array must be there with its
    shape, and every image's entry of it is read, so that a chunk failing its checksum or failing
    to decode is found; then checked as its spec says (finite within the image's extent, equal to
    the view bank's draws, flagged done, positive sizes).
    """
    problems = [f"attribute '{key}' is missing" for key in REQUIRED_ATTRS if key not in store.attrs]
    n = len(store)
    if not store.complete:
        problems.append("the store is not marked complete (an interrupted cache-teacher run)")
    if len(set(store.ids)) != n:
        problems.append("image ids are not unique")
    present = dict(store.group.arrays())
    specs = []
    for spec in store.specs():
        expected = (n, *spec.shape) if spec.over_images else spec.shape
        if spec.name not in present:
            if not spec.added_in:  # arrays added later are absent from older stores, which readers allow
                problems.append(f"array {spec.name} is missing")
        elif present[spec.name].shape != expected:
            problems.append(f"{spec.name} has shape {present[spec.name].shape}, expected {expected}")
        else:
            specs.append(spec)
    for spec in specs:
        if not spec.over_images:
            problems += _check(store, spec, None)
    per_image = [spec for spec in specs if spec.over_images]
    shard = store.layout.shard_images
    store.group  # opened here, once, before the threads share it

    def check_shard(start: int) -> list[str]:
        stop, found = min(start + shard, n), []
        for spec in per_image:
            try:  # one read per shard file; a damaged chunk makes it fail, then each image is read alone
                block = store.array(spec.name)[start:stop]
            except Exception:  # noqa: BLE001 -- reported image by image below
                block = None
            for index in range(start, stop):
                found += _check(store, spec, index, None if block is None else block[index - start])
        return found

    # Shards are read in parallel: a read waits on storage (a disk, or requests to a bucket) as much
    # as it computes, and zarr's decoding releases the GIL.
    with ThreadPoolExecutor(threads) as pool, tqdm(total=n, desc="cache-verify", unit="img",
                                                   disable=not progress) as bar:
        for start, found in zip(range(0, n, shard), pool.map(check_shard, range(0, n, shard))):
            problems += found
            bar.update(min(shard, n - start))
    return problems


def _check(store: TeacherStore, spec: ArraySpec, index: int | None, values: np.ndarray | None = None) -> list[str]:
    """The problems of one image's entry of an array (``index`` None: an array not over images),
    read here unless its ``values`` are given."""
    what = spec.name if index is None else f"{spec.name} of image {store.ids[index]!r} (#{index})"
    if values is None:
        try:
            values = store.array(spec.name)[() if index is None else index]
        except Exception as exc:  # noqa: BLE001 -- checksum mismatch, truncated or undecodable chunk
            return [f"{what}: {type(exc).__name__}: {scrub(exc)}"]
    values = np.asarray(values)
    if spec.verify == "finite":
        if spec.extent is not None:
            h, w = spec.extent(store.image_hw[index])
            values = values[..., :h, :w]
        if not np.isfinite(values).all():
            return [f"{what} holds NaN or inf (a missing chunk reads as NaN)"]
    elif spec.verify == "flags" and not values.all():
        return [f"image {store.ids[index]!r} (#{index}) is not flagged done"]
    elif spec.verify == "sizes" and not (values > 0).all():
        return [f"{what} is {values.tolist()}, not a size"]
    elif spec.verify == "drawn":
        crops, jitter = draw_views(store.views, index, tuple(int(v) for v in store.image_hw[index]))
        drawn = crops if spec.name == "view_crops" else jitter
        if not np.allclose(values, drawn, rtol=0, atol=1e-6):
            return [f"{what} differs from the views the bank's seed draws (a missing or damaged chunk)"]
    return []
