"""The teacher cache: one Zarr v3 group per (teacher, dataset split).

Layout, format 2 (opens with plain ``zarr.open_group``; zarr decodes every array to float32 itself)::

    attrs      JSON provenance: teacher, dataset (name, split, fingerprint, ids), preprocessing,
               codecs and how to decode them, the canvas, skd version, creation time, ``complete``
    log_probs  (N, C, h, w)  teacher log-probabilities at output stride 8, clipped at -16, 8-bit codes
    log_probs_x<s> (N, C, hs, ws)  optional extra levels: the teacher run on the image resized by s
               (attribute ``logit_levels``); replay reads the level nearest a crop's scale
    features   (N, F, hf, wf)  PSP features max-pooled by ``feature_pool``, divided by a scale per
               position, then mapped per image and channel onto [0, 1]; 7-bit codes in uint8
               (absent with ``features: false``)
    feature_scale, feature_offset (N, F), feature_position_scale (N, hf, wf)  the teacher's
               features = (features x scale + offset) x position scale (stores written before
               position scales have none: 1; before per-channel scaling, scale is (N,): one per image)
    view_*     optional bank of K augmented training views per image with the teacher's maps on
               each (``pipeline.cache.views``): view_crops (N, K, 5) int32, view_jitter (N, K, 3),
               view_log_probs (N, K, C, ho, wo), view_features (N, K, F, hf, wf), view_feature_scale
               and view_feature_offset (N, K, F), view_feature_position_scale (N, K, hf, wf);
               attribute ``preprocessing.views``
    image_hw   (N, 2) int32  each image's true size; maps are top-left aligned on a fixed canvas
    done       (N,) bool     set after a shard's maps are written, so a re-run resumes

Arrays over images are sharded by ``shard_images`` images, one inner chunk per image (or 64x64 tile)
with a crc32c checksum. Format 1 (float16 ``logits``, features only scaled, one file per image)
is still read. A store is written to ``<path>.partial`` and renamed (or zipped) only when every
image is done, so the final path never holds a half-written store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import warnings

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, Delta, FixedScaleOffset, ZstdCodec

from pipeline.errors import SkdError
from pipeline.faults import fault_point
from pipeline.cache.projection import Projection
from pipeline.inference import OUTPUT_STRIDE, output_size, scaled_size

log = logging.getLogger(__name__)

FORMAT = "skd-teacher-cache"
FORMAT_VERSION = 2  # 1: float16 arrays, one file per image; still read (tests/fixtures/v1_store.zarr)
# Chunks for stores whose images differ in size: tiles no image touches are never written.
VARIABLE_SIZE_TILE = 64
# Images per shard file. A shard is written whole by one writer (of one process or rank), so writers
# never share a file; a killed run loses at most the shards in flight.
SHARD_IMAGES = 16

# Log-probabilities are clipped at -LOG_PROB_RANGE (probabilities below 1e-7 count as 1e-7) and
# quantised to 8 bits; the writer keeps every other class at least one step below the top one, so
# the stored argmax is the teacher's.
LOG_PROB_RANGE = 16.0
# Features are stored divided by a scale per position (the largest |value| over the channels there,
# so that each position keeps its precision relative to itself: the pair-wise loss normalises every
# node), then mapped per image and channel onto [0, 1] and quantised to 127 levels: the teacher's
# features = (stored x feature_scale + feature_offset) x feature_position_scale. docs/CACHE.md
# measures the choice: at the bytes of 8 bits per channel alone, a quarter of its pair-wise error.
FEATURE_LEVELS = 127
# The arrays one image's features are stored in, in the order the writer fills them.
FEATURE_ARRAYS = ("features", "feature_scale", "feature_offset", "feature_position_scale")
# Small arrays that every sample reads a piece of (position scales) are read whole, once per process,
# up to this size; 2975 Cityscapes images' position scales at feature pool 4 are 12 MB.
WHOLE_ARRAY_BYTES = 32 * 2**20


def log_prob_filters() -> list:
    return [FixedScaleOffset(offset=-LOG_PROB_RANGE, scale=255 / LOG_PROB_RANGE, dtype="<f4", astype="u1"),
            Delta(dtype="u1")]


def feature_filters() -> list:
    return [FixedScaleOffset(offset=0, scale=FEATURE_LEVELS, dtype="<f4", astype="u1"), Delta(dtype="u1")]


# The numcodecs filters are zarr-python's own (zarr.codecs.numcodecs); zarr warns that other
# implementations may lack them, on every array opened. Said once, in docs/CACHE.md, instead.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

# Every chunk carries a crc32c checksum: a corrupted chunk is reported (with its image) instead of
# read as wrong numbers.
def compressors() -> list:
    return [ZstdCodec(level=9), Crc32cCodec()]


CODECS = {
    "log_probs": f"float32 -> FixedScaleOffset(offset=-{LOG_PROB_RANGE:g}, scale=255/{LOG_PROB_RANGE:g}, uint8) -> "
                 "Delta(uint8) -> zstd(9) -> crc32c, in shards of images",
    "features": "float32 in [0, 1] ((x feature_scale + feature_offset, per image and channel) x feature_position_scale "
                "= the features, or their PCA coordinates: see decode) -> "
                f"FixedScaleOffset(offset=0, scale={FEATURE_LEVELS}, uint8) -> Delta(uint8) -> zstd(9) -> crc32c, "
                "in shards of images",
}
PROJECTION_NOTE = ("; features hold PCA coordinates z: the teacher's features are feature_mean + "
                   "feature_components @ z at every pixel (einsum('ck,nkyx->ncyx', components, z) + mean), up to the "
                   "variance of the directions left out")
DECODE_NOTE = ("zarr decodes the stored uint8 values to float32 itself (the FixedScaleOffset and Delta filters "
               "are numcodecs codecs): read the arrays as they are")
FEATURE_DECODE_NOTE = ("; features decode to (features x feature_scale + feature_offset) x feature_position_scale, for "
                       "image i: (features[i] * feature_scale[i][:, None, None] + feature_offset[i][:, None, None]) * "
                       "feature_position_scale[i]")


def redact(url: str) -> str:
    """A store URL fit for logs: user, password and query string (tokens) removed."""
    url = re.sub(r"//[^/@]*@", "//", str(url))
    return url.split("?", 1)[0]


def scrub(text: str) -> str:
    """Free text (an exception's message) with every URL's user, password and query string removed."""
    text = re.sub(r"//[^/@\s'\"]*@", "//", str(text))
    return re.sub(r"(://[^\s'\"?]*)\?[^\s'\"]*", r"\1", text)


def is_url(url: str) -> bool:
    """An fsspec URL (s3://, gs://, https://, file://, ...), opened through fsspec."""
    return "://" in str(url)


def logit_size(image_hw: Sequence[int], level: float = 1.0) -> tuple[int, int]:
    """The stored map's size for an image of ``image_hw`` at the level (scale) ``level``."""
    return output_size(scaled_size(image_hw, level) if level != 1.0 else image_hw)


def feature_size(image_hw: Sequence[int], pool: int) -> tuple[int, int]:
    h, w = logit_size(image_hw)
    return math.ceil(h / pool), math.ceil(w / pool)


def _per_channel(values: np.ndarray, leading: int) -> np.ndarray:
    """Feature scales or offsets with a trailing channel axis: as stored, (N, F) or (N, K, F) with
    ``leading`` = 1 or 2 axes before it; stores that scaled per image or view hold (N,) or (N, K),
    which get a channel axis of 1."""
    return values[..., None] if values.ndim == leading else values


def level_array(level: float) -> str:
    """Name of the array holding the teacher's map at scale ``level`` (1.0 is ``log_probs``)."""
    return "log_probs" if level == 1.0 else f"log_probs_x{level:g}"


def create_store(
    path: Path,
    provenance: dict[str, Any],
    image_hw: np.ndarray,
    num_classes: int,
    feature_channels: int,
    feature_pool: int,
    levels: Sequence[float] = (1.0,),
    features: bool = True,
    shard_images: int = SHARD_IMAGES,
    projection: Projection | None = None,
) -> zarr.Group:
    """Create an empty store at ``path`` (a local directory) with all arrays and attributes.

    With a ``projection`` the features are stored as their coordinates on its ``k`` directions
    (``feature_channels`` is then the teacher's channel count; the arrays hold ``k``), and the
    projection itself goes in ``feature_mean`` and ``feature_components``.

    ``levels``: the scales at which the teacher's map is stored (1.0 always; e.g. 1.0, 2.0 also
    keeps the map of the image upsampled by 2, for crops that training zooms into).
    ``features=False`` leaves the features out (a store that serves evaluation or pixel-wise and
    holistic distillation only). Arrays over images are sharded by ``shard_images`` images.
    """
    image_hw = np.asarray(image_hw, dtype=np.int32)
    n = len(image_hw)
    views = provenance.get("preprocessing", {}).get("views")
    largest = image_hw.max(axis=0)
    feat_canvas = feature_size(largest, feature_pool)
    what = "teacher PSP features"
    if features and projection is not None:
        what = f"coordinates z of the teacher's PSP features on the {projection.channels} directions of feature_components"
        feature_channels = projection.channels
    fixed_size = bool((image_hw == image_hw[0]).all())
    levels = sorted({1.0, *(float(s) for s in levels)})
    shard = max(1, min(shard_images, n))

    def chunks(channels: int, hw: tuple[int, int]) -> tuple[int, ...]:
        if fixed_size:
            return (1, channels, *hw)
        return (1, channels, min(hw[0], VARIABLE_SIZE_TILE), min(hw[1], VARIABLE_SIZE_TILE))

    def per_image(name: str, shape: tuple[int, ...], dtype: str, inner: tuple[int, ...], filters: list | None,
                  fill: Any, dims: tuple[str, ...], content: str, **attributes: Any) -> None:
        # Per-image parameters (scales, offsets, crops: no filters) go in one plain chunk per shard:
        # an index of per-image chunks would outweigh them.
        small = filters is None
        group.create_array(name, shape=(n, *shape), dtype=dtype, chunks=((shard,) if small else (1,)) + tuple(
                               shape if small else inner), shards=None if small else (shard, *shape),
                           filters=filters, compressors=compressors(), fill_value=fill,
                           dimension_names=("image", *dims), attributes={"content": content, **attributes})

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(
        {**provenance, "format": FORMAT, "format_version": FORMAT_VERSION, "output_stride": OUTPUT_STRIDE,
         "feature_pool": feature_pool, "feature_stride": OUTPUT_STRIDE * feature_pool, "features": features,
         "logit_levels": [{"scale": s, "array": level_array(s)} for s in levels], "shard_images": shard,
         "codecs": CODECS, "decode": DECODE_NOTE + (FEATURE_DECODE_NOTE if features else "")
                   + (PROJECTION_NOTE if features and projection is not None else ""),
         "feature_projection": ({"channels": projection.channels, "teacher_channels": int(len(projection.mean)),
                                 "explained_variance": float(projection.explained.sum())}
                                if features and projection is not None else None),
         "canvas": "images of different sizes share one canvas per array: image i fills the top-left "
                   "image_hw[i] (divided by the output stride, rounded up) of it; the rest is undefined (NaN "
                   "where a whole chunk is outside the image)",
         "complete": False}
    )
    for level in levels:
        canvas = logit_size(largest, level)
        per_image(level_array(level), (num_classes, *canvas), "float32", chunks(num_classes, canvas)[1:],
                  log_prob_filters(), np.nan, ("class", "y", "x"),
                  f"teacher log-probabilities, image resized by {level:g}, output stride {OUTPUT_STRIDE}; "
                  f"clipped at -{LOG_PROB_RANGE:g}", scale=level)
    if features:
        per_image("features", (feature_channels, *feat_canvas), "float32", chunks(feature_channels, feat_canvas)[1:],
                  feature_filters(), np.nan, ("channel", "y", "x"),
                  f"{what}, max-pooled by {feature_pool} (stride {OUTPUT_STRIDE * feature_pool}), divided by "
                  "feature_position_scale and mapped onto [0, 1] per image and channel: (x feature_scale + "
                  "feature_offset (per channel)) x feature_position_scale (per position) = "
                  + ("z" + PROJECTION_NOTE if projection is not None else "the teacher's features"))
        per_image("feature_scale", (feature_channels,), "float32", (feature_channels,), None, np.nan, ("channel",),
                  "per image and channel: the features' range (max - min)")
        per_image("feature_offset", (feature_channels,), "float32", (feature_channels,), None, np.nan, ("channel",),
                  "per image and channel: the features' minimum")
        per_image("feature_position_scale", feat_canvas, "float16", chunks(1, feat_canvas)[2:], [], np.nan, ("y", "x"),
                  "per image and position: the features there were divided by this (their largest |value|, "
                  "relative to the image's largest) before the per-channel mapping")
    if views:
        k, out_hw = views["count"], output_size(views["crop_size"])
        view_feat = (math.ceil(out_hw[0] / feature_pool), math.ceil(out_hw[1] / feature_pool))
        # Inner chunks of one view: a training sample reads only its own.
        per_image("view_log_probs", (k, num_classes, *out_hw), "float32", (1, num_classes, *out_hw),
                  log_prob_filters(), np.nan, ("view", "class", "y", "x"),
                  "teacher log-probabilities on each stored training view, as the student sees it")
        if features:
            per_image("view_features", (k, feature_channels, *view_feat), "float32",
                      (1, feature_channels, *view_feat), feature_filters(), np.nan, ("view", "channel", "y", "x"),
                      f"{what} on each view, max-pooled by {feature_pool}, mapped onto [0, 1] per view and channel")
            per_image("view_feature_scale", (k, feature_channels), "float32", (k, feature_channels), None, np.nan,
                      ("view", "channel"), "per view and channel: the features' range (max - min)")
            per_image("view_feature_offset", (k, feature_channels), "float32", (k, feature_channels), None, np.nan,
                      ("view", "channel"), "per view and channel: the features' minimum")
            per_image("view_feature_position_scale", (k, *view_feat), "float16", (1, *view_feat), [], np.nan,
                      ("view", "y", "x"), "per view and position: the features there were divided by this")
        per_image("view_crops", (k, 5), "int32", (k, 5), None, 0, ("view", "param"),
                  "per view: scaled height, scaled width, crop top, crop left, flip (0/1)")
        per_image("view_jitter", (k, 3), "float32", (k, 3), None, 1.0, ("view", "factor"),
                  "per view: brightness, contrast, saturation factors")
    if features and projection is not None:
        group.create_array("feature_mean", data=projection.mean, chunks=projection.mean.shape, compressors=compressors(),
                           dimension_names=("teacher_channel",),
                           attributes={"content": "the teacher features' mean over the pixels the projection was fitted on"})
        group.create_array("feature_components", data=projection.components, chunks=projection.components.shape,
                           compressors=compressors(),
                           dimension_names=("teacher_channel", "channel"),
                           attributes={"content": "orthonormal principal directions of the teacher's features, by "
                                                  "decreasing variance",
                                       "explained_variance": [float(v) for v in projection.explained]})
    group.create_array("image_hw", data=image_hw, chunks=(max(n, 1), 2), dimension_names=("image", "hw"),
                       attributes={"content": "each image's true (height, width) in pixels"})
    # Flags are written once per shard, right after the shard: one chunk per shard.
    group.create_array("done", shape=(n,), dtype="bool", chunks=(shard,), fill_value=False, dimension_names=("image",),
                       attributes={"content": "True once the image's maps are on disk (a re-run resumes from here)"})
    return group


def read_projection(group: zarr.Group) -> Projection | None:
    """The feature projection a store's features were stored with (None: the features themselves)."""
    if not group.attrs.get("features", True) or not group.attrs.get("feature_projection"):
        return None
    components = group["feature_components"]
    return Projection(group["feature_mean"][:], components[:],
                      np.asarray(components.attrs["explained_variance"], dtype=np.float32))


class TeacherStore:
    """Read access to a cache (directory, .zip or fsspec URL), opened lazily in each process.

    ZipStore and fsspec stores opened in a parent process break in forked DataLoader workers, so the
    group is (re)opened the first time it is used in a process.
    """

    def __init__(self, url: str | Path, storage_options: dict | None = None):
        self.url = str(url)
        self.storage_options = storage_options
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}  # opened once per process: opening reads metadata
        self._in_memory: dict[str, np.ndarray | None] = {}  # small arrays read whole, once per process
        self._pid: int | None = None
        attrs = dict(self.group.attrs)
        if attrs.get("format") != FORMAT:
            raise SkdError(f"{redact(self.url)} is not an skd teacher cache (no '{FORMAT}' format attribute)")
        if attrs.get("format_version", 0) > FORMAT_VERSION:
            raise SkdError(f"{redact(self.url)} was written by a newer skd (format {attrs['format_version']})")
        self.attrs = attrs
        self.ids: list[str] = list(attrs["dataset"]["ids"])
        self.num_classes: int = int(attrs["teacher"]["num_classes"])
        self.feature_pool: int = int(attrs["feature_pool"])
        # Stores written before levels existed hold level 1 only.
        self.version: int = int(attrs.get("format_version", 1))
        # Level -> array name (format 1 called level 1 "logits" and stores before levels have no list).
        levels = attrs.get("logit_levels", [{"scale": 1.0, "array": "logits"}])
        self.level_arrays: dict[float, str] = {float(lv["scale"]): lv["array"] for lv in levels}
        self.levels: list[float] = sorted(self.level_arrays)
        self.has_features: bool = bool(attrs.get("features", True))
        self.feature_channels: int | None = (self.group["features"].shape[1] if self.has_features else None)
        self.feature_stride: int = int(attrs.get("feature_stride", OUTPUT_STRIDE * self.feature_pool))
        # Stored features may be PCA coordinates; training maps them back (``CachedTargets``).
        self.projection: Projection | None = read_projection(self.group)
        self.image_hw: np.ndarray = self.group["image_hw"][:]
        # (Stored features x feature_scale + feature_offset) x feature_position_scale = the teacher's;
        # scale and offset per image and channel: (N, F), or (N, 1) from stores that scaled per image
        # (format 1 only scaled: offset 0).
        names = self._names = set(self.group.array_keys())
        n = len(self.ids)
        self.feature_scale: np.ndarray = _per_channel(self.group["feature_scale"][:] if "feature_scale" in names
                                                      else np.ones(n, dtype=np.float32), 1)
        self.feature_offset: np.ndarray = _per_channel(self.group["feature_offset"][:] if "feature_offset" in names
                                                       else np.zeros(n, dtype=np.float32), 1)
        self.view_feature_scale = self.view_feature_offset = None
        # The bank of stored training views (None without one); its parameters are small: read once.
        self.views: dict | None = attrs.get("preprocessing", {}).get("views")
        if self.views:
            self.view_crops: np.ndarray = self.group["view_crops"][:]
            self.view_jitter: np.ndarray = self.group["view_jitter"][:]
            if self.has_features:
                self.view_feature_scale = _per_channel(self.group["view_feature_scale"][:], 2)
                self.view_feature_offset = (_per_channel(self.group["view_feature_offset"][:], 2)
                                            if "view_feature_offset" in names else np.zeros_like(self.view_feature_scale))

    @property
    def group(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            self._group = _open_group(self.url, self.storage_options)
            self._arrays, self._in_memory = {}, {}
            self._pid = os.getpid()
        return self._group

    def _array(self, name: str) -> zarr.Array:
        group = self.group  # (re)opened in a new process, which empties the handles too
        if name not in self._arrays:
            self._arrays[name] = group[name]
        return self._arrays[name]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_group"], state["_arrays"], state["_in_memory"] = None, {}, {}  # never ship an open store handle to a worker
        return state

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def done_count(self) -> int:
        return int(self.group["done"][:].sum())

    def read(self, index: int, window: tuple[slice, slice] | None = None,
             features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Cached (log-probabilities, features) of one image at level 1 as float32 arrays, cut to the
        image's true extent (features decoded, see ``read_features``).

        ``window`` optionally restricts the read to a region of the logit grid (rows, cols); the
        features are then cut to the matching region of their coarser grid. With
        ``features=False`` they are not read at all (None).
        """
        h, w = logit_size(self.image_hw[index])
        rows, cols = window or (slice(0, h), slice(0, w))
        return self.read_log_probs(index, 1.0, (rows, cols)), self.read_features(index, (rows, cols)) if features else None

    def read_log_probs(self, index: int, level: float = 1.0, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """One image's stored map at ``level`` (one of ``levels``), optionally a window of its grid."""
        h, w = logit_size(self.image_hw[index], level)
        rows, cols = window or (slice(0, h), slice(0, w))
        return self._read(self.level_arrays[level], index, (index, slice(None), rows, cols))

    def read_features(self, index: int, window: tuple[slice, slice]) -> np.ndarray:
        """The teacher's features (or PCA coordinates) under a window of the level-1 logit grid,
        decoded: (stored x feature_scale + feature_offset) x feature_position_scale."""
        rows, cols = window
        fh, fw = feature_size(self.image_hw[index], self.feature_pool)
        p = self.feature_pool
        region = (slice(rows.start // p, min(math.ceil(rows.stop / p), fh)),
                  slice(cols.start // p, min(math.ceil(cols.stop / p), fw)))
        stored = self._read("features", index, (index, slice(None), *region))
        return self._decode(stored, self.feature_scale[index], self.feature_offset[index],
                            "feature_position_scale", (index, *region), index)

    def read_view(self, index: int, view: int, features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The teacher's (log-probabilities, features) on one stored view of image ``index``, float32
        on the view's output grid (features pooled and decoded; None with ``features=False``)."""
        log_probs = self._read("view_log_probs", index, (index, view))
        if not features:
            return log_probs, None
        stored = self._read("view_features", index, (index, view))
        return log_probs, self._decode(stored, self.view_feature_scale[index, view], self.view_feature_offset[index, view],
                                       "view_feature_position_scale", (index, view), index)

    def _decode(self, stored: np.ndarray, scale: np.ndarray, offset: np.ndarray, position_array: str,
                region: tuple, index: int) -> np.ndarray:
        features = stored * scale[:, None, None] + offset[:, None, None]
        if position_array in self._names:  # stores written before position scales have none
            features *= self._read(position_array, index, region, whole=True)
        return features

    def _whole(self, name: str) -> np.ndarray | None:
        """Array ``name`` read whole into this process's memory if it is small (None if not, or if a
        chunk of it is damaged: per-image reads then say which image's)."""
        _ = self.group  # (re)opened in a new process, which starts with nothing in memory
        if name not in self._in_memory:
            array = self._array(name)
            try:
                whole = array[:] if array.nbytes <= WHOLE_ARRAY_BYTES else None
            except Exception:  # noqa: BLE001 -- reported image by image by _read
                whole = None
            self._in_memory[name] = whole
        return self._in_memory[name]

    def _read(self, name: str, index: int, region: tuple, whole: bool = False) -> np.ndarray:
        """``group[name][region]`` as float32; a chunk that fails its checksum or cannot be decoded
        is reported with the image it belongs to. ``whole``: from the whole array in memory, if it
        is small (one zarr read costs a millisecond or more, whatever its size)."""
        in_memory = self._whole(name) if whole else None
        try:
            values = np.asarray((self._array(name) if in_memory is None else in_memory)[region], dtype=np.float32)
        except Exception as exc:  # zarr/numcodecs raise ValueError, RuntimeError, ... for a bad chunk
            raise SkdError(f"{redact(self.url)}: {name} of image {self.ids[index]!r} (#{index}) cannot be read "
                           f"({type(exc).__name__}: {scrub(exc)}); the store is damaged: run skd cache-verify on it, "
                           "and re-create it with skd cache-teacher") from None
        # Reads stay within the image's extent, where every value was written: the NaN fill there
        # means a chunk file is missing (a store copied in part).
        if not np.isfinite(values).all():
            raise SkdError(f"{redact(self.url)}: {name} of image {self.ids[index]!r} (#{index}) is missing (NaN "
                           "fill: a chunk file is not there, as in a store copied in part): run skd cache-verify "
                           "on it, and copy it again or re-create it with skd cache-teacher")
        return values

    def bytes_on_disk(self, name: str) -> int | None:
        """Bytes of array ``name``'s files (None for zip and URL stores, whose files are not on disk as such)."""
        if is_url(self.url) or self.url.endswith(".zip"):
            return None
        return sum(f.stat().st_size for f in (Path(self.url) / name).rglob("*") if f.is_file())

    def nearest_level(self, scale: float) -> float:
        """The stored level closest to ``scale`` in ratio (log) terms."""
        return min(self.levels, key=lambda level: abs(math.log(level / scale)))

    def check_matches(self, dataset, num_classes: int | None = None) -> None:
        """Refuse a store that does not belong to ``dataset`` (ids, fingerprint, classes) or is unfinished."""
        where = redact(self.url)
        if not self.complete:
            raise SkdError(f"{where} is incomplete ({self.done_count()}/{len(self)} images cached): "
                           "re-run skd cache-teacher to finish it")
        done = self.group["done"][:]
        if not done.all():  # marked complete by its writer, so something happened to it since
            first = int(np.flatnonzero(~done)[0])
            raise SkdError(f"{where} is incomplete ({int(done.sum())}/{len(done)} images flagged done; image "
                           f"{self.ids[first]!r} (#{first}) is not), though marked complete: it was damaged or "
                           "copied in part; run skd cache-verify on it, and copy it again or re-create it with "
                           "skd cache-teacher")
        info = self.attrs["dataset"]
        if info["name"] != dataset.name or info["split"] != dataset.split:
            raise SkdError(f"{where} caches dataset {info['name']}/{info['split']}, "
                           f"not {dataset.name}/{dataset.split}")
        if info["fingerprint"] != dataset.fingerprint:
            raise SkdError(f"{where} was cached from different files of {dataset.name}/{dataset.split} "
                           f"(fingerprint {info['fingerprint'][:12]} != {dataset.fingerprint[:12]}): re-run skd cache-teacher")
        if list(dataset.ids) != self.ids:
            raise SkdError(f"{where} lists {len(self.ids)} image ids that differ from the dataset's {len(dataset.ids)}")
        expected = num_classes if num_classes is not None else dataset.num_classes
        if self.num_classes != expected:
            raise SkdError(f"{where} holds {self.num_classes}-class teacher logits but {expected} classes were expected")


def _open_group(url: str, storage_options: dict | None) -> zarr.Group:
    try:
        if url.endswith(".zip") and not is_url(url):
            if not Path(url).is_file():
                raise FileNotFoundError(url)
            store = zarr.storage.ZipStore(url, mode="r")
            return zarr.open_group(store, mode="r")
        if not is_url(url) and not Path(url).is_dir():
            partial, old = Path(url + ".partial"), Path(url + ".old")
            hint = (" (an interrupted --overwrite left the stores at .old and .partial: re-run skd cache-teacher "
                    "to finish the swap)" if old.exists() else
                    " (a partial store exists: re-run skd cache-teacher to finish it)" if partial.exists() else "")
            raise SkdError(f"no teacher cache at {url}{hint}")
        if is_url(url):
            return zarr.open_group(url, mode="r", storage_options=storage_options)
        return zarr.open_group(url, mode="r")
    except SkdError:
        raise
    except Exception as exc:  # zarr/fsspec raise many types; the user needs the store and the reason
        raise SkdError(f"cannot open teacher cache {redact(url)}: {type(exc).__name__}: {scrub(exc)}") from None


def finalize(partial: Path, final: Path) -> None:
    """Mark a fully written store complete and move it to its final place (directory or zip),
    replacing an older store there only now that the new one is whole.

    A directory cannot be replaced in one atomic step: the older store is first renamed to
    ``<final>.old``, the new one moved in, and only then is the older one deleted. A run killed
    between the two renames leaves both stores whole; ``recover_swap`` (run by the next
    ``cache-teacher``) completes the swap.
    """
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs["complete"] = True
    if str(final).endswith(".zip"):
        pack_store(partial, final)
        shutil.rmtree(partial)
        return
    old = final.with_name(final.name + ".old")
    if final.is_dir():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        fault_point("finalize")
    os.replace(partial, final)
    if old.exists():
        try:
            shutil.rmtree(old)
        except OSError as exc:  # the new store is in place; the old one is only in the way
            log.warning("the new store is in place at %s, but the old one could not be deleted from %s (%s): "
                        "delete it by hand", final, old, exc.strerror or exc)


def pack_store(directory: Path, zip_path: Path) -> Path:
    """Pack a directory store into one zip file that skd and zarr read in place (entries stored,
    not compressed again: the chunks are). Written to a temporary file and renamed."""
    if not (Path(directory) / "zarr.json").is_file():
        raise SkdError(f"{directory} is not a Zarr store directory (no zarr.json)")
    zip_path = Path(zip_path)
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for file in sorted(Path(directory).rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(directory).as_posix())
        os.replace(tmp, zip_path)  # replaces an older zip atomically
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path


def recover_swap(final: Path) -> None:
    """Finish a store swap that ``finalize`` was killed in: the new store (complete, still at
    ``<final>.partial``) moves in; without a complete new one the old store is put back."""
    old, partial = final.with_name(final.name + ".old"), final.with_name(final.name + ".partial")
    if final.exists() or not old.is_dir():
        if old.is_dir() and final.exists():
            shutil.rmtree(old)  # the swap finished; only the deletion was cut short
        return
    complete = partial.is_dir() and bool(zarr.open_group(str(partial), mode="r").attrs.get("complete"))
    os.replace(partial if complete else old, final)
    if complete:
        shutil.rmtree(old)


def array_table(store: TeacherStore) -> str:
    """One line per array: shape, dtype as read, chunks and shards, codecs, bytes on disk (local stores)."""
    lines = [f"{'array':20s} {'shape':24s} {'chunks':20s} {'shards':20s} {'on disk':>10s}  codecs"]
    for name, array in sorted(store.group.arrays()):
        size = store.bytes_on_disk(name)
        codecs = ", ".join(type(c).__name__ for c in (*array.filters, *array.compressors))
        lines.append(f"{name:20s} {str(array.shape):24s} {str(array.chunks):20s} {str(array.shards or '-'):20s} "
                     f"{'-' if size is None else f'{size / 2**20:.2f} MiB':>10s}  {array.dtype} {codecs}")
    return "\n".join(lines)


def provenance_json(attrs: dict) -> str:
    """Provenance without the (long) id list, for printing."""
    shown = json.loads(json.dumps(attrs))
    shown.get("dataset", {}).pop("ids", None)
    return json.dumps(shown, indent=2, sort_keys=True)
