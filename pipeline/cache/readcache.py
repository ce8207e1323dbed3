"""Reading a store on object storage fast: a local read-through cache of its objects, and reads
of many images at once on threads.

Training reads every image of a store once an epoch. From a bucket each read is a request or two
(a shard's index, then the image's chunk), 10-50 ms each on real object storage. With a read cache
(``--cache-dir DIR``, ``SKD_CACHE_DIR``, or ``storage.cache_dir`` in the config) the first read of
any object of the store fetches the whole object (one request) into DIR, and every later read of
it, by this run or any other on the machine, reads local disk. What is cached is the objects' raw
bytes: zarr still checks each shard index's and chunk's crc32c checksum on every read, and a read
that fails its checksum drops the array's cached objects and reads the store itself again
(``TeacherStore``).

Entries are keyed by the store's URL and a hash of its root metadata (``zarr.json``, read from
the store on every open, never from the cache), which holds the store's creation time and
provenance: a store replaced at the same URL (``cache-teacher --overwrite``) has other root
metadata, so its reads never meet the old store's objects. A store that is not marked complete
(still being written or replaced) is read without the cache. Objects are written to a temporary
file and renamed, so several loader workers and several runs may share one folder; the least
recently used objects are deleted when it outgrows its size cap (``--cache-dir-size``).

Measured against fsspec's file caches and zarr's own cache store: docs/CACHE.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, WrapperStore

from pipeline.cache.remote import network_options
from pipeline.errors import SkdError

DEFAULT_SIZE = "20G"
MARKER = "skd-read-cache.json"  # in each store's folder: only folders holding one are ever evicted from
TOUCH_EVERY_S = 60.0  # how often a hit refreshes an object's last-use time (its mtime)
RESCAN_FRACTION = 0.05  # rescan the folder's size after adding this fraction of the cap
STALE_TMP_S = 3600.0  # temporary files older than this were left by a killed process

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ReadCache:
    """Where a remote store's objects are cached, and the folder's size cap in bytes."""
    directory: Path
    max_bytes: int


def parse_size(text: str | int, option: str = "--cache-dir-size (storage.cache_dir_size)") -> int:
    """Bytes from ``500M``, ``20G``, ``1.5T`` (powers of 1024) or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not match:
        raise SkdError(f"{option} {text!r}: expected a size such as 500M, 20G or 1T")
    value = float(match.group(1)) * 1024 ** "bkmgt".index(match.group(2) or "b")
    if value < 1:
        raise SkdError(f"{option} {text!r}: the cache needs room for at least one object")
    return int(value)


def read_cache(directory: str | Path | None, size: str | int = DEFAULT_SIZE) -> ReadCache | None:
    """The read cache a command's options ask for (None: read the store directly)."""
    if not directory:
        return None
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise SkdError(f"--cache-dir (storage.cache_dir) {directory}: not a folder")
    return ReadCache(path, parse_size(size))


def open_remote(url: str, storage_options: dict | None = None, cache: ReadCache | None = None) -> Store:
    """The zarr store for a store at a URL, read-only: straight from the URL, or through ``cache``
    if it is given and the store is complete. Requests are retried as ``pipeline.cache.remote`` sets."""
    store = FsspecStore.from_url(url, storage_options=network_options(url, storage_options), read_only=True)
    if cache is None:
        return store
    root = sync(store.get("zarr.json", default_buffer_prototype()))
    if root is None:
        return store  # nothing there: zarr says so when it opens the group
    root = root.to_bytes()
    try:
        complete = json.loads(root).get("attributes", {}).get("complete")
    except ValueError:
        return store
    return DiskCacheStore(store, cache, url, root) if complete else store


def _bounds(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, size
    if isinstance(byte_range, SuffixByteRequest):
        return max(size - byte_range.suffix, 0), size
    raise TypeError(f"unexpected byte range {byte_range!r}")


class DiskCacheStore(WrapperStore[Store]):
    """A read-only zarr store that keeps whole objects of the store it wraps in a local folder.

    A read of any byte range of an object not in the folder fetches the whole object (one request;
    a shard is one object, so an epoch fetches each shard once instead of two requests per image)
    and writes it under a temporary name, then renames it into place. Root metadata is served
    from the bytes read when the store was opened (``open_remote``), which key the folder.
    """

    def __init__(self, store: Store, cache: ReadCache, url: str, root: bytes):
        from pipeline.cache.store import redact

        super().__init__(store)
        self.cache, self.url, self.root = cache, url, root
        identity = hashlib.sha256(root).hexdigest()
        self.folder = cache.directory / hashlib.sha256(f"{redact(url)}\n{identity}".encode()).hexdigest()[:32]
        self._fetching: dict[str, asyncio.Lock] = {}  # one fetch per object at a time in this process
        self._touched: dict[Path, float] = {}
        self._space = _Space(cache)
        self._write_marker(redact(url), identity)

    def _with_store(self, store: Store) -> DiskCacheStore:
        return type(self)(store, self.cache, self.url, self.root)

    def __str__(self) -> str:
        return f"{self._store} (read through {self.folder})"

    def _write_marker(self, url: str, identity: str) -> None:
        marker = self.folder / MARKER
        if not marker.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(marker, json.dumps({"store": url, "root_metadata_sha256": identity}).encode())

    def _path(self, key: str) -> Path | None:
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts) or key == MARKER:
            return None  # not a plain object key: read through, never cached
        return self.folder.joinpath(*parts)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if key == "zarr.json":
            start, stop = _bounds(byte_range, len(self.root))
            return prototype.buffer.from_bytes(self.root[start:stop])
        path = self._path(key)
        if path is None:
            return await self._store.get(key, prototype, byte_range)
        data = await asyncio.to_thread(self._read_local, path, byte_range)
        if data is None:
            lock = self._fetching.setdefault(key, asyncio.Lock())
            async with lock:  # another read of this object may have fetched it meanwhile
                data = await asyncio.to_thread(self._read_local, path, byte_range)
                if data is None:
                    whole = await self._store.get(key, default_buffer_prototype())
                    if whole is None:
                        return None
                    whole = whole.to_bytes()
                    await asyncio.to_thread(self._save, path, whole)
                    start, stop = _bounds(byte_range, len(whole))
                    data = whole[start:stop]
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        return (path is not None and path.is_file()) or await self._store.exists(key)

    def _read_local(self, path: Path, byte_range: ByteRequest | None) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None  # never fetched, or evicted (by this process or another)
        try:
            start, stop = _bounds(byte_range, os.fstat(fd).st_size)
            data = os.pread(fd, max(stop - start, 0), start)
        finally:
            os.close(fd)
        now = time.time()
        if now - self._touched.get(path, 0.0) > TOUCH_EVERY_S:  # least recently used = oldest mtime
            self._touched[path] = now
            try:
                os.utime(path)
            except FileNotFoundError:
                pass
        return data

    def _save(self, path: Path, data: bytes) -> None:
        if len(data) > self.cache.max_bytes:
            return  # larger than the whole cache: read from the store every time
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
        self._touched[path] = time.time()
        self._space.added(len(data))

    def discard(self, prefix: str) -> None:
        """Delete the cached objects under ``prefix`` (an array's name): they failed a checksum."""
        import shutil

        path = self._path(prefix)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


class _Space:
    """The cache folder's size, kept under its cap by deleting the least recently used objects.

    Each process counts what it adds and rescans the folder once it has added a twentieth of the
    cap (other processes add too), or when the count says the cap is passed.
    """

    _lock = threading.Lock()

    def __init__(self, cache: ReadCache):
        self.cache = cache
        self.used = self.since_scan = 0
        self.scanned = False

    def added(self, size: int) -> None:
        with self._lock:
            self.used += size
            self.since_scan += size
            if not self.scanned or self.used > self.cache.max_bytes or \
                    self.since_scan > RESCAN_FRACTION * self.cache.max_bytes:
                self.used, self.since_scan, self.scanned = evict(self.cache), 0, True


def evict(cache: ReadCache, target_fraction: float = 0.9) -> int:
    """Delete the least recently used objects of the cache folder until it holds no more than
    ``target_fraction`` of its cap, if it holds more than the cap; the bytes it holds after."""
    files, total, now = [], 0, time.time()
    for marker in cache.directory.glob(f"*/{MARKER}"):
        for root, _, names in os.walk(marker.parent):
            for name in names:
                path = os.path.join(root, name)
                try:
                    stat = os.stat(path)
                except FileNotFoundError:
                    continue  # evicted by another process meanwhile
                if name.endswith(".tmp"):
                    if now - stat.st_mtime > STALE_TMP_S:
                        _unlink(path)
                    continue
                if name != MARKER:
                    files.append((stat.st_mtime, stat.st_size, path))
                    total += stat.st_size
    if total <= cache.max_bytes:
        return total
    for _, size, path in sorted(files):
        if total <= target_fraction * cache.max_bytes:
            break
        _unlink(path)
        total -= size
    return total


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_ahead(read: Callable[[T], R], items: Iterable[T], threads: int = 8, ahead: int = 32) -> Iterator[R]:
    """``map(read, items)`` in order, with up to ``ahead`` reads in flight on ``threads`` threads:
    reads from object storage wait on the network, and a whole store read one request at a time
    waits for each in turn. Memory stays bounded (``Executor.map`` would submit every item at once)."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ParallelSamples(torch.utils.data.Dataset):
    """A map-style dataset whose batches are read on threads (``__getitems__``, which the
    DataLoader calls with a whole batch of keys): the samples of a batch read their chunks from a
    remote store at the same time instead of one after another. The items are those of
    ``samples``, in order."""

    def __init__(self, samples: torch.utils.data.Dataset, threads: int = 8):
        self.samples, self.threads = samples, threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Any) -> Any:
        return self.samples[key]

    def __getitems__(self, keys: list) -> list:
        if self._pool is None or self._pid != os.getpid():  # one pool per loader process
            self._pool, self._pid = ThreadPoolExecutor(self.threads), os.getpid()
        # The first sample in this thread: it opens the store once for the process, not once per thread.
        first = self.samples[keys[0]]
        return [first, *self._pool.map(self.samples.__getitem__, keys[1:])]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_pid": None}
