"""What is in a store, computed chunk-parallel with dask (threads) straight from its arrays.

Per array: bytes on disk against the raw float32 (or stored dtype) size, and, for the arrays whose
values must be finite (``pipeline.cache.schema``), those that are not, within the images' extents.
Of the teacher's level-1 map: how often each class is the argmax, the mean top-class probability
and a histogram of the per-pixel entropy.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from pipeline.cache.schema import ArraySpec
from pipeline.cache.store import TeacherStore


def extent_mask(store: TeacherStore, spec: ArraySpec) -> np.ndarray:
    """(N, h, w) bool: the cells of each image's entry of a map array that belong to the image
    (not the canvas)."""
    array = store.array(spec.name)
    mask = np.zeros((array.shape[0], *array.shape[-2:]), dtype=bool)
    for i, hw in enumerate(store.image_hw):
        h, w = spec.extent(hw)
        mask[i, :h, :w] = True
    return mask


def store_stats(store: TeacherStore, entropy_bins: int = 20) -> dict[str, Any]:
    """Statistics of ``store`` (see the module docstring) as a JSON-ready dict."""
    specs = {spec.name: spec for spec in store.specs()}
    arrays = {}
    for name, array in sorted(store.group.arrays()):
        raw = math.prod(array.shape) * array.dtype.itemsize
        on_disk = store.bytes_on_disk(name)
        arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "raw_bytes": raw,
                        "bytes_on_disk": on_disk, "ratio": on_disk / raw if on_disk and raw else None}

    level = specs[store.level_arrays[1.0]]
    log_probs = _blocks(store, level.name)
    valid = da.from_array(extent_mask(store, level), chunks=(log_probs.chunks[0], *log_probs.chunks[2:]))
    num_classes = log_probs.shape[1]
    # Canvas cells outside an image hold NaN: they take no part in any statistic.
    log_probs = da.where(valid[:, None], log_probs, 0.0)
    probs = da.exp(log_probs)
    top = probs.max(axis=1)
    entropy = -(probs * log_probs).sum(axis=1)
    weights = valid.astype(np.float64)
    counts = da.bincount(log_probs.argmax(axis=1).ravel(), weights=weights.ravel(), minlength=num_classes)
    histogram, edges = da.histogram(entropy, bins=entropy_bins, range=(0.0, math.log(num_classes)), weights=weights)
    nonfinite = {name: _nonfinite(store, spec) for name, spec in specs.items()
                 if spec.verify == "finite" and spec.over_images and name in arrays}
    counts, mean_top, histogram, nonfinite, pixels = da.compute(
        counts, (top * weights).sum() / weights.sum(), histogram, nonfinite, valid.sum())
    for name, count in nonfinite.items():
        arrays[name]["nonfinite"] = int(count)
    return {
        "store": store.url, "images": len(store), "pixels": int(pixels), "arrays": arrays,
        "class_names": list(store.attrs["dataset"].get("class_names", [])),
        "argmax_frequency": (np.asarray(counts) / max(int(pixels), 1)).tolist(),
        "mean_top_probability": float(mean_top),
        "entropy_histogram": {"edges": edges.tolist(), "fraction": (np.asarray(histogram) / max(int(pixels), 1)).tolist()},
    }


def _blocks(store: TeacherStore, name: str) -> da.Array:
    """An array as dask blocks of one shard of images each: one task per shard file, not per chunk."""
    array = store.array(name)
    return da.from_zarr(array, chunks=(store.layout.shard_images, *array.shape[1:]))


def _nonfinite(store: TeacherStore, spec: ArraySpec) -> da.Array:
    """Count of values that are not finite within the images' extents (all of an entry without one)."""
    values = _blocks(store, spec.name)
    bad = ~da.isfinite(values)
    if spec.extent is not None:
        mask = extent_mask(store, spec)
        middle = (None,) * (values.ndim - 3)
        bad = bad & da.from_array(mask, chunks=(values.chunks[0], *values.chunks[-2:]))[(slice(None), *middle)]
    return bad.sum()


def format_stats(stats: dict[str, Any]) -> str:
    """A readable summary of ``store_stats``."""
    width = max(20, *(len(name) for name in stats["arrays"]))
    lines = [f"{stats['images']} images, {stats['pixels']} map cells; mean top-class probability "
             f"{stats['mean_top_probability']:.3f}", "",
             f"{'array':{width}s} {'raw':>12s} {'on disk':>12s} {'ratio':>7s} {'not finite':>11s}"]
    for name, a in stats["arrays"].items():
        disk = "-" if a["bytes_on_disk"] is None else f"{a['bytes_on_disk'] / 2**20:.2f} MiB"
        ratio = "-" if a["ratio"] is None else f"{a['ratio']:.3f}"
        lines.append(f"{name:{width}s} {a['raw_bytes'] / 2**20:9.2f} MiB {disk:>12s} {ratio:>7s} "
                     f"{a.get('nonfinite', '-')!s:>11s}")
    names = stats["class_names"] or [str(i) for i in range(len(stats["argmax_frequency"]))]
    lines += ["", "teacher argmax frequency per class:"]
    lines += [f"  {name:14s} {100 * f:6.2f} %" for name, f in zip(names, stats["argmax_frequency"])]
    edges, fractions = stats["entropy_histogram"]["edges"], stats["entropy_histogram"]["fraction"]
    lines += ["", "per-pixel entropy (nats):"]
    lines += [f"  {lo:5.2f}-{hi:5.2f} {'#' * round(60 * f):60s} {100 * f:5.1f} %"
              for lo, hi, f in zip(edges[:-1], edges[1:], fractions)]
    return "\n".join(lines)
