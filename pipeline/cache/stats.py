"""What is in a store, computed chunk-parallel with dask (threads) straight from its arrays.

Per array: bytes on disk against the raw float32 (or stored dtype) size, and values that are not
finite within the images' extents. Of the teacher's level-1 map: how often each class is the
argmax, the mean top-class probability and a histogram of the per-pixel entropy.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from pipeline.cache.store import TeacherStore, logit_size


def extent_mask(store: TeacherStore, level: float = 1.0) -> np.ndarray:
    """(N, h, w) bool: the cells of each image's map that belong to the image (not the canvas)."""
    array = store.group[store.level_arrays[level]]
    mask = np.zeros((array.shape[0], *array.shape[2:]), dtype=bool)
    for i, hw in enumerate(store.image_hw):
        h, w = logit_size(hw, level)
        mask[i, :h, :w] = True
    return mask


def store_stats(store: TeacherStore, entropy_bins: int = 20) -> dict[str, Any]:
    """Statistics of ``store`` (see the module docstring) as a JSON-ready dict."""
    arrays = {}
    for name, array in sorted(store.group.arrays()):
        raw = math.prod(array.shape) * array.dtype.itemsize
        on_disk = store.bytes_on_disk(name)
        arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "raw_bytes": raw,
                        "bytes_on_disk": on_disk, "ratio": on_disk / raw if on_disk and raw else None}

    mask = extent_mask(store)
    log_probs = da.from_zarr(store.group[store.level_arrays[1.0]])
    valid = da.from_array(mask, chunks=(log_probs.chunks[0], *log_probs.chunks[2:]))
    num_classes = log_probs.shape[1]
    probs = da.exp(log_probs)
    top = probs.max(axis=1)
    entropy = -(probs * log_probs).sum(axis=1)
    weights = valid.astype(np.float64)
    counts = da.bincount(log_probs.argmax(axis=1).ravel(), weights=weights.ravel(), minlength=num_classes)
    histogram, edges = da.histogram(entropy, bins=entropy_bins, range=(0.0, math.log(num_classes)), weights=weights)
    nonfinite = {name: (~da.isfinite(da.from_zarr(store.group[name])) & (valid[:, None] if level_map else True)).sum()
                 for name, level_map in _finite_checked(store)}
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


def _finite_checked(store: TeacherStore) -> list[tuple[str, bool]]:
    """Arrays whose values must be finite: the level-1 map (within the extents) and per-image scales."""
    names = [(store.level_arrays[1.0], True)]
    return names + [(name, False) for name in ("feature_scale", "feature_offset") if name in store.group.array_keys()]


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
