"""Checking a store before trusting it: every chunk read (checksums), flags, ids and provenance."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline.cache.store import FEATURE_ARRAYS, TeacherStore, feature_size, logit_size

# Attributes a store cannot be used without.
REQUIRED_ATTRS = ("teacher", "dataset", "preprocessing", "feature_pool", "format_version")


def per_image_arrays(store: TeacherStore) -> list[str]:
    """The store's arrays with one entry per image (everything but ``image_hw`` and ``done``)."""
    n = len(store)
    return sorted(name for name, array in store.group.arrays()
                  if name not in ("image_hw", "done") and array.shape and array.shape[0] == n)


def verify_store(store: TeacherStore, progress: bool = True) -> list[str]:
    """Every problem found in ``store``, each naming the array and image it concerns (empty: sound).

    Reads every image's entry of every array, so that a chunk failing its checksum (format 2) or
    failing to decode is found; checks that maps hold finite values within each image's extent,
    that every image is flagged done, and that ids, sizes and provenance are consistent.
    """
    problems = [f"attribute '{key}' is missing" for key in REQUIRED_ATTRS if key not in store.attrs]
    n = len(store)
    if not store.complete:
        problems.append("the store is not marked complete (an interrupted cache-teacher run)")
    if len(set(store.ids)) != n:
        problems.append("image ids are not unique")
    if store.image_hw.shape != (n, 2):
        problems.append(f"image_hw has shape {store.image_hw.shape}, expected ({n}, 2)")
    try:
        done = store.group["done"][:]
        problems += [f"image {store.ids[i]!r} (#{i}) is not flagged done" for i in np.flatnonzero(~done)]
    except Exception as exc:
        problems.append(f"done flags cannot be read: {type(exc).__name__}: {exc}")
    checked = {*store.level_arrays.values(), *FEATURE_ARRAYS}  # finite when sound
    for index in tqdm(range(n), desc="cache-verify", unit="img", disable=not progress):
        for name in per_image_arrays(store):
            try:
                values = store.group[name][index]
            except Exception as exc:  # checksum mismatch, truncated or undecodable chunk, missing file
                problems.append(f"{name} of image {store.ids[index]!r} (#{index}): {type(exc).__name__}: {exc}")
                continue
            if name in checked:
                h, w = _extent(store, name, index)
                if not np.isfinite(values[..., :h, :w] if values.ndim >= 2 else values).all():
                    problems.append(f"{name} of image {store.ids[index]!r} (#{index}) holds NaN or inf")
    return problems


def _extent(store: TeacherStore, name: str, index: int) -> tuple[int, int]:
    """The part of an image's map on the canvas that belongs to the image."""
    if name in ("features", "feature_position_scale"):
        return feature_size(store.image_hw[index], store.feature_pool)
    level = next((level for level, array in store.level_arrays.items() if array == name), 1.0)
    return logit_size(store.image_hw[index], level)
