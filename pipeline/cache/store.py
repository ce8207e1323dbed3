"""The teacher cache: one Zarr v3 group per (teacher, dataset split), read by ``TeacherStore``.

A store opens with plain ``zarr.open_group``, and zarr decodes every array to float32 itself. Its
arrays are defined once, in ``pipeline.cache.schema`` (names, shapes, chunks, what verify checks);
their encodings in ``pipeline.cache.codecs``; how a store is written, resumed and moved into place
(so that the final path never holds a half-written store) in ``pipeline.cache.lifecycle``.
Attributes hold the JSON provenance: teacher, dataset (name, split, fingerprint, ids),
preprocessing, codecs and how to decode them, skd version, creation time and ``complete``.

Format 1 (float16 ``logits``, features only scaled, one file per image) is still read; format 2
stores from before per-channel offsets or position scales lack those arrays, and read as if
offsets were 0 and position scales 1.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.cache.codecs import (CODECS, DECODE_NOTE, FEATURE_DECODE_NOTE, PROJECTION_NOTE, compressors,
                                   decode_features)
from pipeline.cache.projection import Projection
from pipeline.cache.readcache import DiskCacheStore, ReadCache, open_remote
from pipeline.cache.schema import (SHARD_IMAGES, ArraySpec, StoreLayout, feature_size, level_array, logit_size,
                                   shard_images as fitting_shard_images)
from pipeline.errors import SkdError
from pipeline.inference import OUTPUT_STRIDE

log = logging.getLogger(__name__)

FORMAT = "skd-teacher-cache"
FORMAT_VERSION = 2  # 1: float16 arrays, one file per image; still read (tests/fixtures/v1_store.zarr)
# The arrays one image's features are stored in, in the order the writer fills them.
FEATURE_ARRAYS = ("features", "feature_scale", "feature_offset", "feature_position_scale")
# Small arrays that every sample reads a piece of (position scales) are read whole, once per process,
# up to this size; 2975 Cityscapes images' position scales at feature pool 4 are 12 MB.
WHOLE_ARRAY_BYTES = 32 * 2**20


def redact(url: str) -> str:
    """A store URL fit for logs: user, password and query string (tokens) removed."""
    url = re.sub(r"//[^/@]*@", "//", str(url))
    return url.split("?", 1)[0]


def scrub(text: str, url: str | None = None) -> str:
    """Free text (an exception's message) with every URL's user, password and query string removed;
    with ``url``, also its user, password and query wherever they appear without the scheme (a
    store's repr shows the path fsspec made of the URL, e.g. /user:secret@/path?token=...)."""
    text = str(text)
    if url is not None:
        userinfo = re.search(r"//([^/@]*@)", str(url))
        query = str(url).partition("?")[2]
        for secret in (userinfo.group(1) if userinfo else "", "?" + query if query else ""):
            if secret:
                text = text.replace(secret, "")
    text = re.sub(r"//[^/@\s'\"]*@", "//", text)
    return re.sub(r"(://[^\s'\"?]*)\?[^\s'\"]*", r"\1", text)


# Storage options whose values are (or may hold) credentials, by a part of their name.
SECRET_OPTION = re.compile(r"key|secret|token|password|passwd|credential|sas|signature|auth", re.IGNORECASE)


def redact_options(options: Any) -> Any:
    """Storage options fit for logs and config.json: values of options named like a credential
    (key, secret, token, password, ...) replaced by "<redacted>", URLs in the others redacted."""
    if isinstance(options, dict):
        return {key: "<redacted>" if SECRET_OPTION.search(str(key)) and not isinstance(value, dict)
                else redact_options(value) for key, value in options.items()}
    if isinstance(options, list):
        return [redact_options(value) for value in options]
    return redact(options) if isinstance(options, str) else options


def is_url(url: str) -> bool:
    """An fsspec URL (s3://, gs://, https://, file://, ...), opened through fsspec."""
    return "://" in str(url)


def _per_channel(values: np.ndarray, leading: int) -> np.ndarray:
    """Feature scales or offsets with a trailing channel axis: as stored, (N, F) or (N, K, F) with
    ``leading`` = 1 or 2 axes before it; stores that scaled per image or view hold (N,) or (N, K),
    which get a channel axis of 1."""
    return values[..., None] if values.ndim == leading else values


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
    storage_options: dict | None = None,
) -> zarr.Group:
    """Create an empty store at ``path`` (a local directory, or a URL opened with ``storage_options``)
    with all arrays and attributes.

    With a ``projection`` the features are stored as their coordinates on its ``k`` directions
    (``feature_channels`` is then the teacher's channel count; the arrays hold ``k``), and the
    projection itself goes in ``feature_mean`` and ``feature_components``.

    ``levels``: the scales at which the teacher's map is stored (1.0 always; e.g. 1.0, 2.0 also
    keeps the map of the image upsampled by 2, for crops that training zooms into).
    ``features=False`` leaves the features out (a store that serves evaluation or pixel-wise and
    holistic distillation only). Arrays over images are sharded by ``shard_images`` images, or
    fewer when one shard of large images would not fit the writer's memory budget.
    """
    image_hw = np.asarray(image_hw, dtype=np.int32)
    views = provenance.get("preprocessing", {}).get("views")
    projection = projection if features else None
    layout = StoreLayout(
        image_hw, num_classes, (projection.channels if projection is not None else feature_channels) if features else None,
        feature_pool, tuple(sorted({1.0, *(float(s) for s in levels)})),
        view_count=views["count"] if views else 0, view_crop=tuple(views["crop_size"]) if views else None,
        projection_channels=len(projection.mean) if projection is not None else None)
    shard = fitting_shard_images(layout, shard_images)
    group = zarr.open_group(str(path), mode="w", zarr_format=3,
                            **({"storage_options": storage_options} if is_url(str(path)) else {}))
    group.attrs.update(
        {**provenance, "format": FORMAT, "format_version": FORMAT_VERSION, "output_stride": OUTPUT_STRIDE,
         "feature_pool": feature_pool, "feature_stride": OUTPUT_STRIDE * feature_pool, "features": features,
         "logit_levels": [{"scale": s, "array": level_array(s)} for s in layout.levels], "shard_images": shard,
         "codecs": CODECS, "decode": DECODE_NOTE + (FEATURE_DECODE_NOTE if features else "")
                   + (PROJECTION_NOTE if projection is not None else ""),
         "feature_projection": ({"channels": projection.channels, "teacher_channels": int(len(projection.mean)),
                                 "explained_variance": float(projection.explained.sum())}
                                if projection is not None else None),
         "canvas": "images of different sizes share one canvas per array: image i fills the top-left "
                   "image_hw[i] (divided by the output stride, rounded up) of it; the rest is undefined (NaN "
                   "where a whole chunk is outside the image)",
         "complete": False}
    )
    data = {"image_hw": image_hw}
    if projection is not None:
        data |= {"feature_mean": projection.mean, "feature_components": projection.components}
    for spec in layout.specs():
        _create_array(group, spec, layout.images, shard, data.get(spec.name))
    if projection is not None:
        group["feature_components"].attrs["explained_variance"] = [float(v) for v in projection.explained]
    return group


def _create_array(group: zarr.Group, spec: ArraySpec, images: int, shard: int, data: np.ndarray | None) -> None:
    attributes = {"content": spec.content, **spec.attributes}
    dims = ("image", *spec.dims) if spec.over_images else spec.dims
    if data is not None:  # written whole, now
        group.create_array(spec.name, data=data, chunks=tuple(max(size, 1) for size in data.shape),
                           compressors=compressors(), dimension_names=dims, attributes=attributes)
        return
    if spec.inner is None:
        # Per-image parameters (scales, offsets, crops, flags) go in one plain chunk per shard: an
        # index of per-image chunks would outweigh them.
        chunks, shards = (shard, *spec.shape), None
    else:
        chunks, shards = (1, *spec.inner), spec.shard(shard)
    group.create_array(spec.name, shape=(images, *spec.shape), dtype=spec.dtype, chunks=chunks, shards=shards,
                       filters=spec.filters(), compressors=compressors(), fill_value=spec.fill,
                       dimension_names=dims, attributes=attributes)


def read_layout(group: zarr.Group) -> StoreLayout:
    """The layout a (format 2) store's arrays follow, from its attributes and ``image_hw``."""
    attrs = group.attrs
    views = attrs.get("preprocessing", {}).get("views")
    projection = attrs.get("feature_projection")
    return StoreLayout(
        group["image_hw"][:], int(attrs["teacher"]["num_classes"]),
        group["features"].shape[1] if attrs.get("features", True) else None, int(attrs["feature_pool"]),
        tuple(sorted(float(level["scale"]) for level in attrs["logit_levels"])),
        view_count=views["count"] if views else 0, view_crop=tuple(views["crop_size"]) if views else None,
        projection_channels=projection["teacher_channels"] if projection else None,
        shard_images=int(attrs["shard_images"]))


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
    group is (re)opened the first time it is used in a process. A store at a URL is read with
    ``storage_options`` and, with a ``read_cache``, through a local cache of its objects
    (``pipeline.cache.readcache``).
    """

    def __init__(self, url: str | Path, storage_options: dict | None = None, read_cache: ReadCache | None = None):
        self.url = str(url)
        self.storage_options = storage_options
        self.read_cache = read_cache if is_url(self.url) else None
        self._refetched: set[tuple[str, int]] = set()  # reads retried after dropping a damaged cached copy
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
            self._group = _open_group(self.url, self.storage_options, self.read_cache)
            self._arrays, self._in_memory = {}, {}
            self._pid = os.getpid()
        return self._group

    def array(self, name: str) -> zarr.Array:
        """Array ``name``, opened once per process (opening reads its metadata)."""
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
        # Stores written before position scales have none.
        position = self._read(position_array, index, region, whole=True) if position_array in self._names else None
        return decode_features(stored, scale, offset, position)

    @functools.cached_property
    def layout(self) -> StoreLayout:
        """The layout the store's arrays follow (``pipeline.cache.schema``), read once."""
        return read_layout(self.group)

    def specs(self) -> list[ArraySpec]:
        """The arrays this store holds by its format (``store_arrays`` of its layout); format 1
        stores predate the schema."""
        if self.version < 2:
            raise SkdError(f"{redact(self.url)} is a format-1 store (written by an older skd): re-create it with "
                           "skd cache-teacher to check or describe it array by array")
        return self.layout.specs()

    def _whole(self, name: str) -> np.ndarray | None:
        """Array ``name`` read whole into this process's memory if it is small (None if not, or if a
        chunk of it is damaged: per-image reads then say which image's)."""
        _ = self.group  # (re)opened in a new process, which starts with nothing in memory
        if name not in self._in_memory:
            array = self.array(name)
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
            values = np.asarray((self.array(name) if in_memory is None else in_memory)[region], dtype=np.float32)
        except Exception as exc:  # zarr/numcodecs raise ValueError, RuntimeError, ... for a bad chunk
            if self._drop_cached(name, index):  # a damaged copy in the read cache: read the store itself
                return self._read(name, index, region, whole)
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

    def _drop_cached(self, name: str, index: int) -> bool:
        """Drop array ``name``'s objects from the read cache, once per image and array; False
        without a read cache (or on the second failure: then the store's own copy is damaged)."""
        store = self.group.store
        if not isinstance(store, DiskCacheStore) or (name, index) in self._refetched:
            return False
        self._refetched.add((name, index))
        log.warning("%s: %s of image %r failed its checksum in the read cache %s: read again from the store",
                    redact(self.url), name, self.ids[index], store.folder)
        store.discard(name)
        return True

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
            # Say which data each side holds: counts, roots (the store records its root only if its
            # writer did), and the first id only one side has.
            store_root = f"from {info['root']}" if info.get("root") else "its dataset's root not recorded"
            data_root = getattr(dataset, "root", None)
            data_side = f"the dataset at {data_root} has {len(dataset)} images" if data_root else \
                f"the dataset has {len(dataset)} images"
            only_store = sorted(set(self.ids) - set(dataset.ids))
            only_data = sorted(set(dataset.ids) - set(self.ids))
            ids = (f"; first id only in the store: {only_store[0]!r}" if only_store else "") + \
                (f"; first id only in the dataset: {only_data[0]!r}" if only_data else "")
            if not ids:
                ids = "; the same ids, so some files differ in content (size) or the class list changed"
            raise SkdError(f"{where} was cached from different files of {dataset.name}/{dataset.split} "
                           f"(fingerprint {info['fingerprint'][:12]} != {dataset.fingerprint[:12]}): the store holds "
                           f"{len(self.ids)} images ({store_root}), {data_side}{ids}; re-run skd cache-teacher")
        if list(dataset.ids) != self.ids:
            raise SkdError(f"{where} lists {len(self.ids)} image ids that differ from the dataset's {len(dataset.ids)}")
        expected = num_classes if num_classes is not None else dataset.num_classes
        if self.num_classes != expected:
            raise SkdError(f"{where} holds {self.num_classes}-class teacher logits but {expected} classes were expected")


def _open_group(url: str, storage_options: dict | None, read_cache: ReadCache | None = None) -> zarr.Group:
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
        if is_url(url):  # read-only, through the local read cache if there is one
            return zarr.open_group(open_remote(url, storage_options, read_cache), mode="r")
        return zarr.open_group(url, mode="r")
    except SkdError:
        raise
    except Exception as exc:  # zarr/fsspec raise many types; the user needs the store and the reason
        raise SkdError(f"cannot open teacher cache {redact(url)}: {type(exc).__name__}: {scrub(exc, url)}") from None


def array_table(store: TeacherStore) -> str:
    """One line per array of the store's schema (then any other array it holds): shape, dtype as
    read, chunks and shards, codecs, bytes on disk (local stores)."""
    present = dict(store.group.arrays())
    expected = [spec.name for spec in store.specs()] if store.version >= 2 else sorted(present)
    lines = [f"{'array':28s} {'shape':26s} {'chunks':22s} {'shards':22s} {'on disk':>10s}  codecs"]
    for name in expected + sorted(set(present) - set(expected)):
        if name not in present:
            lines.append(f"{name:28s} missing{'' if store.version < 2 else ' (written before this array existed?)'}")
            continue
        array, size = present[name], store.bytes_on_disk(name)
        codecs = ", ".join(type(c).__name__ for c in (*array.filters, *array.compressors))
        lines.append(f"{name:28s} {str(array.shape):26s} {str(array.chunks):22s} {str(array.shards or '-'):22s} "
                     f"{'-' if size is None else f'{size / 2**20:.2f} MiB':>10s}  {array.dtype} {codecs}")
    return "\n".join(lines)


def provenance_json(attrs: dict) -> str:
    """Provenance without the (long) id list, for printing."""
    shown = json.loads(json.dumps(attrs))
    shown.get("dataset", {}).pop("ids", None)
    return json.dumps(shown, indent=2, sort_keys=True)
