"""A store's life, from its first shard to its place: lock, create, resume, overwrite-swap,
finalise; on a local path (as a directory or a zip) or on object storage (a URL).

The final path never holds a half-written store. A run writes ``<store>.partial`` (laid out first
in ``<store>.partial.creating`` and renamed, so a partial store always has all its arrays), flags
each shard done once it is on disk, and only when every shard is done marks the store complete
and moves it into place. A re-run of the same command resumes the partial store, also when that
command replaces an older store (``--overwrite``), which stays usable until the new one is
complete. ``cache-teacher`` runs this; the teacher itself is ``pipeline.cache.writer``'s.

Object storage has no rename (``ObjectStoreLifecycle``): a new store is written in place, each
shard whole as one object, flagged done after it, and ``complete: true`` is written last; readers
refuse a store that is not complete. A replacement (``--overwrite``) is written beside the old
store, at ``<url>.partial``, and copied over it (server-side) once complete; while it is copied
the store at the URL reads as incomplete, never as a mix, and an interrupted copy is finished by
the next run. One writer at a time holds a lease object (``pipeline.cache.lock.ObjectLease``).
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zarr

from pipeline.cache.lock import ObjectLease, WriterLock
from pipeline.errors import SkdError
from pipeline.faults import fault_point

log = logging.getLogger(__name__)

# What makes two stores the same store: a store is resumed, or a finished one left as it is, only
# when all of these agree with the run's.
IDENTITY = ("teacher", "dataset", "preprocessing", "feature_pool", "features")


class LocalStoreLifecycle:
    """The store at ``final`` (a directory, or a path ending in .zip) and its partial and old copies."""

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.old = self.final.with_name(self.final.name + ".old")
        self.creating = self.partial.with_name(self.partial.name + ".creating")
        self.writing = self.partial  # where this run writes (object storage may write in place)

    def lock(self) -> WriterLock:
        """One writer at a time: held from opening the store to finalising it."""
        return WriterLock(self.final)

    def begin(self, identity: dict[str, Any], create: Callable[[Path], None], overwrite: bool) -> zarr.Group | None:
        """The partial store this run writes into, created (by ``create(path)``) or resumed; None
        when ``final`` already is this very store, complete (a re-run of a finished command).

        ``identity``: the run's values of ``IDENTITY``. Without ``overwrite`` a different store at
        ``final`` is refused, and so is a partial store of another run with images in it; with
        it, the older store stays in place until ``finalise``.
        """
        recover_swap(self.final)
        existing = read_attributes(self.final) if self.final.exists() else None
        partial = read_attributes(self.partial) if self.partial.is_dir() else None
        resumable = partial is not None and not differences(partial, identity)
        if existing is not None and not overwrite:
            if existing.get("complete") and not differences(existing, identity):
                return None
            if resumable:
                raise SkdError(f"{self.final} holds another store, and {self.partial} is this run's, interrupted while "
                               "replacing it: pass --overwrite again to resume it")
            raise SkdError(f"{self.final} already exists (from another teacher, data or setting): pass --overwrite to "
                           "replace it")
        if existing is not None:
            check_replaceable(self.final)
        if resumable:
            return zarr.open_group(str(self.partial), mode="r+")
        if partial is not None:
            different = differences(partial, identity)
            if _any_done(self.partial) and not overwrite:
                raise SkdError(f"{self.partial} was started with a different {different[0]}: remove it or pass "
                               "--overwrite")
            log.info("%s was started with a different %s%s: starting again", self.partial, different[0],
                     "" if overwrite else " and holds nothing yet")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        # A run killed while laying out the store leaves only a .creating folder, removed here.
        shutil.rmtree(self.creating, ignore_errors=True)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        create(self.creating)
        os.replace(self.creating, self.partial)
        return zarr.open_group(str(self.partial), mode="r+")

    def target(self) -> zarr.Group:
        """The store this run writes (the partial store), opened for writing."""
        return zarr.open_group(str(self.writing), mode="r+")

    def finalise(self) -> None:
        """Mark the partial store complete and move it into place (see ``finalize``)."""
        finalize(self.partial, self.final)


class ObjectStoreLifecycle:
    """The store at a URL (s3://, gs://, ... through fsspec) and, while it is replaced, ``<url>.partial``."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        from pipeline.cache.remote import network_options
        from pipeline.cache.store import redact

        self.final, self.options = url.rstrip("/"), network_options(url, storage_options)
        self.partial = self.final + ".partial"
        self.where = redact(self.final)
        self.fs, self.path = fsspec.core.url_to_fs(self.final, **self.options)
        self.writing = self.final

    def lock(self) -> ObjectLease:
        """The store's lease; first a quick check that the endpoint answers at all, so that a wrong or
        unreachable one fails in a second, not after the retries (``pipeline.cache.remote``)."""
        from pipeline.cache.remote import check_reachable

        check_reachable(self.final, self.options, "nothing was written")
        return ObjectLease(self.fs, self.path + ".lease", self.where)

    def _attributes(self, url: str) -> dict | None:
        """A store's attributes, or None where there is no store (or one whose layout was cut short)."""
        path = self.fs._strip_protocol(url)
        if not self.fs.exists(path + "/zarr.json"):
            return None
        group = zarr.open_group(url, mode="r", storage_options=self.options, zarr_format=3)
        # ``done`` is the last array a store is created with: without it, creating it was cut short.
        return dict(group.attrs) if "done" in group.array_keys() else None

    def begin(self, identity: dict[str, Any], create: Callable[[str], None], overwrite: bool) -> zarr.Group | None:
        """As ``LocalStoreLifecycle.begin``: the store this run writes (None: already complete)."""
        self._finish_interrupted_swap()
        existing = self._attributes(self.final)
        if existing is not None and not differences(existing, identity):
            if existing.get("complete") and not overwrite:
                return None
            if not existing.get("complete"):  # this run's own store, interrupted: resume in place
                return self.target()
        if existing is not None and not overwrite:
            raise SkdError(f"{self.where} already exists (from another teacher, data or setting): pass --overwrite "
                           "to replace it")
        # A new store in place, or a replacement beside the old one (which stays readable meanwhile).
        self.writing = self.final if existing is None else self.partial
        partial = self._attributes(self.writing)
        if partial is not None and not differences(partial, identity):
            return self.target()
        self._remove(self.writing)
        create(self.writing)
        return self.target()

    def target(self) -> zarr.Group:
        return zarr.open_group(self.writing, mode="r+", storage_options=self.options, zarr_format=3)

    def finalise(self) -> None:
        """``complete: true`` written last; a replacement is first copied over the old store."""
        if self.writing == self.partial:
            self._swap()
        else:
            self.target().attrs["complete"] = True

    def _swap(self) -> None:
        """Replace the store at the URL by the complete one at ``.partial``: the URL's root metadata
        first says "incomplete, being replaced" (readers refuse it), then the old objects go, the new
        ones are copied server-side, the metadata says complete, and the partial store is removed."""
        final, partial = self.fs._strip_protocol(self.final), self.fs._strip_protocol(self.partial)
        new = zarr.open_group(self.partial, mode="r+", storage_options=self.options, zarr_format=3)
        new.attrs["complete"] = True  # whole: an interrupted swap is finished from it by the next run
        marker = new.attrs.asdict()
        group = zarr.open_group(self.final, mode="r+", storage_options=self.options, zarr_format=3)
        group.attrs.update({**marker, "complete": False, "replaced_by": "partial"})
        fault_point("finalize")
        old = [key for key in self.fs.find(final) if key != final + "/zarr.json"]
        if old:
            self.fs.rm(old)  # batched deletes
        for key in self.fs.find(partial):
            if key != partial + "/zarr.json":
                self.fs.copy(key, final + key[len(partial):])
        group = zarr.open_group(self.final, mode="r+", storage_options=self.options, zarr_format=3)
        group.attrs.put({**marker, "complete": True})
        self._remove(self.partial)

    def _finish_interrupted_swap(self) -> None:
        existing = self._attributes(self.final)
        if existing is not None and existing.get("replaced_by") and (self._attributes(self.partial) or {}).get("complete"):
            log.info("%s: finishing the replacement an earlier run was stopped in", self.where)
            self.writing = self.partial
            self._swap()

    def _remove(self, url: str) -> None:
        path = self.fs._strip_protocol(url)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)


def store_lifecycle(out: str | Path, storage_options: dict | None = None) -> LocalStoreLifecycle | ObjectStoreLifecycle:
    """The life cycle of the store at ``out``: a local path, or a URL."""
    if "://" in str(out):
        return ObjectStoreLifecycle(str(out), storage_options)
    return LocalStoreLifecycle(out)


def pending_shards(group: zarr.Group) -> list[tuple[int, int]]:
    """The shards (start, stop) of a store not yet flagged done: whole shards are the unit of work."""
    done = group["done"][:]
    n, shard = len(done), int(group.attrs["shard_images"])
    return [(a, min(a + shard, n)) for a in range(0, n, shard) if not done[a : a + shard].all()]


def read_attributes(store: Path) -> dict:
    """A local store's attributes: a directory or a zip."""
    try:
        if store.is_file() and store.suffix == ".zip":
            zip_store = zarr.storage.ZipStore(store, mode="r")
            try:
                return dict(zarr.open_group(zip_store, mode="r").attrs)
            finally:
                zip_store.close()
        return dict(zarr.open_group(str(store), mode="r").attrs)
    except Exception as exc:  # noqa: BLE001 -- zarr raises many types; the user needs the path and what to do
        raise SkdError(f"cannot read {store} ({type(exc).__name__}: {exc}): remove it or pass --overwrite") from None


def differences(attrs: dict, identity: dict[str, Any]) -> list[str]:
    """Which of ``IDENTITY`` a store's attributes hold differently from ``identity`` (empty: the same store)."""
    return [key for key in IDENTITY if attrs.get(key) != identity.get(key)]


def _any_done(store: Path) -> bool:
    return bool(zarr.open_group(str(store), mode="r")["done"][:].any())


def check_replaceable(store: Path) -> None:
    """--overwrite moves the old store aside and deletes it once the new one is in place: refuse at
    once, not after the teacher's run, when that cannot be done."""
    folders = [store.parent] + ([p for p in [store, *store.rglob("*")] if p.is_dir()] if store.is_dir() else [])
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SkdError(f"cannot replace {store}: {folder} is read-only; nothing was changed")


def finalize(partial: Path, final: Path) -> None:
    """Mark a fully written store complete and move it to its final place (directory or zip),
    replacing an older store there only now that the new one is whole.

    A directory cannot be replaced in one atomic step: the older store is first renamed to
    ``<final>.old``, the new one moved in, and only then is the older one deleted. A run killed
    between the two renames leaves both stores whole; ``recover_swap`` (run by the next
    ``cache-teacher``) completes the swap. A zip replaces an older one in one rename.
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
