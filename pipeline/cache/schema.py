"""The arrays a teacher store holds, defined once.

Each array is an :class:`ArraySpec`: its name, axes, the shape of one image's entry, dtype,
encoding (``pipeline.cache.codecs``), fill value, inner chunk, the part of each entry that belongs
to the image (``extent``) and what ``cache-verify`` checks of it. :func:`store_arrays` lists the
specs of one store's :class:`StoreLayout`; creating a store, writing it, verifying it, its
statistics and ``cache-info`` all iterate that list, so an array cannot be left out of one of them.

Shapes: maps of images of one size are stored at that size. Images of different sizes share one
canvas per array (the largest image's grid), each filling its top-left part; the canvas is cut
into square tiles of ``TILE`` cells, and tiles no image touches are never written. Arrays over
images are sharded by ``shard_images`` images (a shard spans the whole canvas, rounded up to whole
tiles: zarr needs the inner chunk to divide the shard, not the array): a shard is one file
(object), written whole by one writer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.cache.codecs import LOG_PROB_RANGE, feature_filters, log_prob_filters
from pipeline.inference import OUTPUT_STRIDE, output_size, scaled_size

# Spatial tile (in map cells) of stores whose images differ in size.
TILE = 64
# Images per shard file, at most; fewer when one shard's maps would not fit SHARD_BUFFER_BYTES (the
# writer gathers a shard in memory, as float32, before writing it whole, with up to 2 x write
# threads shards in flight).
SHARD_IMAGES = 16
SHARD_BUFFER_BYTES = 256 << 20

Extent = Callable[[Sequence[int]], tuple[int, int]]


def logit_size(image_hw: Sequence[int], level: float = 1.0) -> tuple[int, int]:
    """The stored map's size for an image of ``image_hw`` at the level (scale) ``level``."""
    return output_size(scaled_size(image_hw, level) if level != 1.0 else image_hw)


def feature_size(image_hw: Sequence[int], pool: int) -> tuple[int, int]:
    h, w = logit_size(image_hw)
    return math.ceil(h / pool), math.ceil(w / pool)


def level_array(level: float) -> str:
    """Name of the array holding the teacher's map at scale ``level`` (1.0 is ``log_probs``)."""
    return "log_probs" if level == 1.0 else f"log_probs_x{level:g}"


@dataclass(frozen=True)
class StoreLayout:
    """What the shapes of a store's arrays follow from (its attributes and ``image_hw`` hold all of it)."""

    image_hw: np.ndarray  # (N, 2) int32: each image's true size
    num_classes: int
    feature_channels: int | None  # channels of the stored features (k with a projection); None: no features
    feature_pool: int
    levels: tuple[float, ...] = (1.0,)
    view_count: int = 0
    view_crop: tuple[int, int] | None = None  # the views' crop size in pixels
    projection_channels: int | None = None  # the teacher's channels, when the features are projected
    shard_images: int = SHARD_IMAGES

    @property
    def images(self) -> int:
        return len(self.image_hw)

    @property
    def fixed_size(self) -> bool:
        return bool((self.image_hw == self.image_hw[0]).all())

    def canvas(self, extent: Extent) -> tuple[int, int]:
        """The grid an array of maps is stored on: the largest extent of any image."""
        sizes = np.array([extent(hw) for hw in self.image_hw]).reshape(-1, 2)
        return int(sizes[:, 0].max()), int(sizes[:, 1].max())

    def tile(self, canvas: tuple[int, int]) -> tuple[int, int]:
        """The inner chunk of one image's map on ``canvas``: all of it, or a tile when sizes differ."""
        return canvas if self.fixed_size else (min(canvas[0], TILE), min(canvas[1], TILE))

    def specs(self) -> list[ArraySpec]:
        return store_arrays(self)

    @property
    def view_out_hw(self) -> tuple[int, int]:
        return output_size(self.view_crop)

    @property
    def view_feature_hw(self) -> tuple[int, int]:
        h, w = self.view_out_hw
        return math.ceil(h / self.feature_pool), math.ceil(w / self.feature_pool)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store.

    ``shape`` and ``inner`` are those of one image's entry (the array adds a leading image axis,
    except for arrays ``over_images`` False). ``inner`` None: a small per-image array, stored as
    one plain chunk per shard of images. ``extent``: the part of an image's entry (its last two
    axes) that belongs to the image, for maps on a canvas; None: all of it. ``verify``: what
    ``cache-verify`` checks of each entry: "finite" (within the extent: a missing chunk reads as
    the NaN fill), "drawn" (equal to the view bank's seeded draws), "flags" (all set) or "sizes"
    (positive). ``written_by``: "writer" (one
    entry per image, as the teacher runs) or "create" (the whole array, when the store is made).
    ``added_in``: stores written before this array existed lack it (readers fall back).
    """

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    content: str
    encoding: str = "plain"  # "log_probs", "features" (the codecs' filters) or "plain"
    fill: Any = float("nan")
    inner: tuple[int, ...] | None = None
    extent: Extent | None = None
    verify: str = "finite"
    written_by: str = "writer"
    over_images: bool = True
    added_in: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def shard(self, images: int) -> tuple[int, ...] | None:
        """The shard shape over ``images`` images: whole inner chunks covering each entry (None:
        a small array, not sharded)."""
        if self.inner is None:
            return None
        return (images, *(math.ceil(size / chunk) * chunk for size, chunk in zip(self.shape, self.inner)))

    def filters(self) -> list | None:
        """The numcodecs filters before compression (None: a small array, no filters)."""
        if self.encoding == "log_probs":
            return log_prob_filters()
        if self.encoding == "features":
            return feature_filters()
        return [] if self.inner is not None else None


def store_arrays(layout: StoreLayout) -> list[ArraySpec]:
    """Every array of a store with this layout, in the order the writer fills them."""
    pool = layout.feature_pool
    specs: list[ArraySpec] = []
    for level in layout.levels:
        extent = (lambda hw, level=level: logit_size(hw, level))
        canvas = layout.canvas(extent)
        specs.append(ArraySpec(
            level_array(level), ("class", "y", "x"), (layout.num_classes, *canvas), "float32",
            f"teacher log-probabilities, image resized by {level:g}, output stride {OUTPUT_STRIDE}; clipped at "
            f"-{LOG_PROB_RANGE:g}", encoding="log_probs", inner=(layout.num_classes, *layout.tile(canvas)),
            extent=extent, attributes={"scale": level}))
    if layout.feature_channels:
        k = layout.feature_channels
        extent = (lambda hw: feature_size(hw, pool))
        canvas = layout.canvas(extent)
        what = ("coordinates z of the teacher's PSP features on the directions of feature_components"
                if layout.projection_channels else "teacher PSP features")
        specs += [
            ArraySpec("features", ("channel", "y", "x"), (k, *canvas), "float32",
                      f"{what}, max-pooled by {pool} (stride {OUTPUT_STRIDE * pool}), divided by feature_position_scale "
                      "and mapped onto [0, 1] per image and channel: (x feature_scale + feature_offset (per channel)) "
                      "x feature_position_scale (per position) = " + ("z" if layout.projection_channels else "the features"),
                      encoding="features", inner=(k, *layout.tile(canvas)), extent=extent),
            ArraySpec("feature_scale", ("channel",), (k,), "float32",
                      "per image and channel: the features' range (max - min)"),
            ArraySpec("feature_offset", ("channel",), (k,), "float32",
                      "per image and channel: the features' minimum", added_in="per-channel offsets"),
            ArraySpec("feature_position_scale", ("y", "x"), canvas, "float16",
                      "per image and position: the features there were divided by this (their largest |value|, "
                      "relative to the image's largest) before the per-channel mapping",
                      inner=layout.tile(canvas), extent=extent, added_in="position scales"),
        ]
    if layout.view_count:
        views, out_hw, feat_hw = layout.view_count, layout.view_out_hw, layout.view_feature_hw
        specs.append(ArraySpec(
            "view_log_probs", ("view", "class", "y", "x"), (views, layout.num_classes, *out_hw), "float32",
            "teacher log-probabilities on each stored training view, as the student sees it",
            encoding="log_probs", inner=(1, layout.num_classes, *out_hw)))  # a sample reads its own view only
        if layout.feature_channels:
            k = layout.feature_channels
            specs += [
                ArraySpec("view_features", ("view", "channel", "y", "x"), (views, k, *feat_hw), "float32",
                          f"features on each view, max-pooled by {pool}, mapped onto [0, 1] per view and channel",
                          encoding="features", inner=(1, k, *feat_hw)),
                ArraySpec("view_feature_scale", ("view", "channel"), (views, k), "float32",
                          "per view and channel: the features' range (max - min)"),
                ArraySpec("view_feature_offset", ("view", "channel"), (views, k), "float32",
                          "per view and channel: the features' minimum", added_in="per-channel offsets"),
                ArraySpec("view_feature_position_scale", ("view", "y", "x"), (views, *feat_hw), "float16",
                          "per view and position: the features there were divided by this",
                          inner=(1, *feat_hw), added_in="position scales"),
            ]
        specs += [
            # A view's crop and jitter are drawn from a seed (pipeline.data.views): verify draws them again.
            ArraySpec("view_crops", ("view", "param"), (views, 5), "int32",
                      "per view: scaled height, scaled width, crop top, crop left, flip (0/1)", fill=0, verify="drawn"),
            ArraySpec("view_jitter", ("view", "factor"), (views, 3), "float32",
                      "per view: brightness, contrast, saturation factors", verify="drawn"),
        ]
    if layout.projection_channels:
        specs += [
            ArraySpec("feature_mean", ("teacher_channel",), (layout.projection_channels,), "float32",
                      "the teacher features' mean over the pixels the projection was fitted on",
                      written_by="create", over_images=False),
            ArraySpec("feature_components", ("teacher_channel", "channel"),
                      (layout.projection_channels, layout.feature_channels), "float32",
                      "orthonormal principal directions of the teacher's features, by decreasing variance",
                      written_by="create", over_images=False),
        ]
    specs += [
        ArraySpec("image_hw", ("hw",), (2,), "int32", "each image's true (height, width) in pixels",
                  fill=0, verify="sizes", written_by="create"),
        ArraySpec("done", (), (), "bool", "True once the image's maps are on disk (a re-run resumes from here)",
                  fill=False, verify="flags", written_by="flags"),
    ]
    return specs


def shard_images(layout_without_shards: StoreLayout, limit: int = SHARD_IMAGES,
                 buffer_bytes: int = SHARD_BUFFER_BYTES) -> int:
    """Images per shard: ``limit``, or fewer so that one shard of every array written per image fits
    ``buffer_bytes`` as float32 (a 2048-pixel image's 150-class map at level 2 alone is 150 MB)."""
    per_image = sum(math.prod(spec.shape) * 4 for spec in store_arrays(layout_without_shards)
                    if spec.written_by == "writer")
    fit = max(1, buffer_bytes // max(per_image, 1))
    return int(max(1, min(limit, fit, layout_without_shards.images)))
