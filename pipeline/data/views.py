"""A bank of stored training views (in the manner of FKD): exact teacher targets for augmented crops.

Replaying the teacher's map of a whole image onto a crop cannot be exact: a PSPNet pools context
over its whole input, so the teacher on a crop answers differently at the crop's borders than its
map of the image does (docs/RESULTS.md §2). A view bank removes the difference at K times the
bytes: the writer draws K augmentations per image (crop, scale, flip, colour jitter) exactly as
training draws them, runs the teacher on each augmented crop, and stores the parameters with the
maps. Training then takes its samples among those views, and the targets are what an online
teacher would have computed on the very same input.

Each image's views are drawn from a generator seeded by (bank seed, image index, view), so a
resumed or re-run writer draws the same ones; training walks through an image's views in a seeded
random order, one per epoch, so that no view repeats before all K have been seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.data.transforms import AugmentConfig, CropParams, sample_jitter, sample_params

def view_spec(augment: AugmentConfig, count: int, seed: int = 0) -> dict[str, Any]:
    """The provenance entry of a bank of ``count`` views per image drawn with ``augment`` (JSON)."""
    if augment.crop_size is None:
        raise ValueError("a view bank needs a training crop size (data.crop_size)")
    return {"count": int(count), "crop_size": [int(v) for v in augment.crop_size],
            "scale_range": [float(v) for v in augment.scale_range], "flip": bool(augment.flip),
            "color_jitter": float(augment.color_jitter), "seed": int(seed)}


def spec_augment(spec: dict[str, Any]) -> AugmentConfig:
    """The augmentation a bank's views were drawn with."""
    return AugmentConfig(tuple(spec["crop_size"]), tuple(spec["scale_range"]), spec["flip"], spec["color_jitter"])


def draw_views(spec: dict[str, Any], index: int, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The bank's views of image ``index``: crops (K, 5) int32 rows of (scaled h, scaled w, top,
    left, flip) and colour jitter factors (K, 3) float32."""
    augment = spec_augment(spec)
    crops, jitter = np.zeros((spec["count"], 5), np.int32), np.ones((spec["count"], 3), np.float32)
    for k in range(spec["count"]):
        rng = np.random.default_rng([spec["seed"], index, k])
        params = sample_params(augment, image_hw, rng)
        crops[k] = (*params.scaled_hw, params.top, params.left, params.flip)
        jitter[k] = sample_jitter(augment.color_jitter, rng)
    return crops, jitter


def crop_params(row: np.ndarray) -> CropParams:
    """A stored crop row back as the parameters ``apply_params`` takes."""
    h, w, top, left, flip = (int(v) for v in row)
    return CropParams((h, w), top, left, bool(flip))


def view_for_epoch(count: int, seed: int, index: int, epoch: int) -> int:
    """Which of an image's ``count`` views training uses in ``epoch``: every view once per ``count``
    epochs, in an order seeded by (seed, image, round)."""
    order = np.random.default_rng([seed, index, epoch // count]).permutation(count)
    return int(order[epoch % count])
