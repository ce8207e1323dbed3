"""``skd cache-copy``: a complete store from one place to another (a directory, a .zip, a URL on
object storage), object by object, resumable and verified.

A store is a set of objects (``zarr.json`` files and chunk or shard files) under its root; the copy
moves those bytes as they are, so the destination is the source bit for bit. What makes it safe:

- Only a complete source is copied (its writer marked it so and every image is flagged done).
- The destination is never mistaken for a finished store before it is one: a directory or zip is
  assembled in ``<dst>.partial`` and moved (or packed) into place at the end; on object storage,
  where nothing can be renamed, the copy is written in place with the root metadata saying
  ``complete: false`` first and the source's own root metadata (``complete: true``) last.
- Every object is written whole (a file under a temporary name, then renamed; an object by one
  PUT), and the ``done`` flags' objects go after every chunk: a copy stopped at any point leaves
  only whole objects, and re-running it copies only what is missing.
- Before the destination is marked complete, every chunk is read back through zarr from the
  destination (``pipeline.cache.verify``), so each chunk's crc32c checksum is checked where the
  store will be read.
- A destination holding another store (another teacher, data or setting, see
  ``pipeline.cache.lifecycle.IDENTITY``) is refused; the same store, complete, is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.cache.lifecycle import IDENTITY, differences, pack_store, store_lifecycle
from pipeline.cache.remote import check_reachable, describe, network_errors, network_options
from pipeline.cache.store import TeacherStore, is_url, redact
from pipeline.cache.verify import verify_store
from pipeline.errors import SkdError
from pipeline.faults import fault_point

log = logging.getLogger(__name__)

ROOT = "zarr.json"  # the store's root metadata: its attributes, ``complete`` among them


@dataclass
class CopyReport:
    """What a copy did: objects copied now, objects a previous run had copied, and bytes copied now."""

    copied: int = 0
    kept: int = 0
    bytes: int = 0
    already_there: bool = False


class _Source:
    """A store's objects, by key relative to its root ('zarr.json', 'log_probs/c/3/0/0/0'), in a
    directory, a zip or at a URL."""

    def __init__(self, location: str, storage_options: dict):
        self.location = location
        if is_url(location):
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(location, **storage_options)
        elif location.endswith(".zip"):
            self.zip = zipfile.ZipFile(location)  # reads from several threads (zipfile shares the handle safely)
        self.kind = "url" if is_url(location) else "zip" if location.endswith(".zip") else "dir"

    def sizes(self) -> dict[str, int]:
        if self.kind == "url":
            found = self.fs.find(self.root, detail=True)
            return {key[len(self.root) + 1 :]: info["size"] for key, info in found.items()}
        if self.kind == "zip":
            return {info.filename: info.file_size for info in self.zip.infolist() if not info.is_dir()}
        root = Path(self.location)
        return {f.relative_to(root).as_posix(): f.stat().st_size for f in root.rglob("*") if f.is_file()}

    def close(self) -> None:
        if self.kind == "zip":
            self.zip.close()

    def read(self, key: str) -> bytes:
        if self.kind == "url":
            return self.fs.cat_file(f"{self.root}/{key}")
        if self.kind == "zip":
            return self.zip.read(key)
        return (Path(self.location) / key).read_bytes()


class _Target:
    """Where a copy writes whole objects: a local directory (each file written under a temporary
    name and renamed) or a URL (one PUT per object)."""

    def __init__(self, location: str, storage_options: dict):
        self.location = location
        if is_url(location):
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(location, **storage_options)

    def sizes(self) -> dict[str, int]:
        """The whole objects already there; the temporary file a stopped copy was writing is removed."""
        if is_url(self.location):
            self.fs.invalidate_cache(self.root)
            if not self.fs.exists(self.root):
                return {}
            found = self.fs.find(self.root, detail=True)
            return {key[len(self.root) + 1 :]: info["size"] for key, info in found.items()}
        root = Path(self.location)
        for tmp in root.rglob("*.copying"):
            tmp.unlink()
        return {f.relative_to(root).as_posix(): f.stat().st_size for f in root.rglob("*") if f.is_file()}

    def write(self, key: str, data: bytes) -> None:
        if is_url(self.location):
            self.fs.pipe_file(f"{self.root}/{key}", data)
            fault_point("copy-object")
            return
        path = Path(self.location) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".copying")
        tmp.write_bytes(data)
        fault_point("copy-object")
        os.replace(tmp, path)

def root_attributes(location: str, storage_options: dict) -> dict | None:
    """The attributes in the root metadata of whatever is at ``location`` (None: nothing there).
    Raises when something is there that is not a Zarr store."""
    try:
        if is_url(location):
            import fsspec

            fs, root = fsspec.core.url_to_fs(location, **storage_options)
            fs.invalidate_cache(root)
            if not fs.exists(f"{root}/{ROOT}"):
                return {} if fs.exists(root) and fs.find(root) else None
            return json.loads(fs.cat_file(f"{root}/{ROOT}")).get("attributes", {})
        path = Path(location)
        if not path.exists():
            return None
        if path.is_file() and location.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read(ROOT)).get("attributes", {}) if ROOT in zf.namelist() else {}
        if path.is_dir() and (path / ROOT).is_file():
            return json.loads((path / ROOT).read_text()).get("attributes", {})
        return {}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SkdError(f"cannot read what is at {redact(location)} ({describe(exc)}); nothing was copied") from None


def copy_store(src: str | Path, dst: str | Path, storage_options: dict | None = None,
               source_options: dict | None = None, threads: int = 8, progress: bool = True) -> CopyReport:
    """Copy the complete store ``src`` to ``dst`` (each a directory, a path ending in .zip, or a URL).

    ``storage_options``: fsspec options for a URL (both sides); ``source_options`` replaces them for
    ``src`` when it lives elsewhere (another endpoint, other credentials). A copy stopped at any
    point resumes when run again; ``dst`` holding the same store, complete, is left as it is.
    """
    src, dst = str(src).rstrip("/"), str(dst).rstrip("/")
    names = f"{redact(src)} to {redact(dst)}"
    same = src == dst if is_url(src) or is_url(dst) else Path(src).resolve() == Path(dst).resolve()
    if same:
        raise SkdError(f"cannot copy {names}: they are the same place")
    src_options = network_options(src, source_options if source_options is not None else storage_options)
    dst_options = network_options(dst, storage_options)
    for location, options in ((src, src_options), (dst, dst_options)):
        if is_url(location):  # an unreachable endpoint fails here, in a second, before anything is written
            check_reachable(location, options, "nothing was copied")
    try:
        return _copy(src, dst, src_options, dst_options, names, threads, progress)
    except network_errors() as exc:  # still failing after the client's retries
        raise SkdError(f"copying {names} failed: {describe(exc)}; every object copied so far is whole: re-run the "
                       "same command to resume") from None


def _copy(src: str, dst: str, src_options: dict, dst_options: dict, names: str, threads: int,
          progress: bool) -> CopyReport:
    source = TeacherStore(src, src_options)
    done = source.group["done"][:]
    if not source.complete or not done.all():
        raise SkdError(f"cannot copy {names}: {redact(src)} is incomplete ({int(done.sum())}/{len(done)} images "
                       "flagged done): finish it with skd cache-teacher first; nothing was copied")
    identity = {key: source.attrs.get(key) for key in IDENTITY}
    lifecycle = store_lifecycle(dst, dst_options)
    # Local copies are assembled beside the destination; object storage has no rename: in place.
    assembly = dst if is_url(dst) else str(lifecycle.partial)
    with lifecycle.lock():  # no cache-teacher, and no other copy, writes dst meanwhile
        existing = root_attributes(dst, dst_options)
        if existing is not None:
            _refuse_other(existing, identity, source.attrs, dst, names)
            if existing.get("complete"):
                log.info("%s already holds this store (same teacher, data and settings): nothing to copy", redact(dst))
                return CopyReport(already_there=True)
            if not is_url(dst):  # local stores are moved into place complete: this one was left otherwise
                raise SkdError(f"cannot copy {names}: {redact(dst)} holds an incomplete store: remove it; nothing "
                               "was copied")
        if assembly != dst:
            partial = root_attributes(assembly, {})
            if partial is not None:
                _refuse_other(partial, identity, source.attrs, assembly, names)
        objects, target = _Source(src, src_options), _Target(assembly, dst_options)
        try:
            report = _copy_objects(objects, target, threads, progress)
            _verify(assembly, dst_options, names, progress)
            # Last: the source's own root metadata, which says complete; then the move into place.
            target.write(ROOT, objects.read(ROOT))
        finally:
            objects.close()
        if dst.endswith(".zip") and not is_url(dst):
            pack_store(Path(assembly), Path(dst))
            shutil.rmtree(assembly)
        elif not is_url(dst):
            os.replace(assembly, dst)
    return report


def _refuse_other(found: dict, identity: dict, source_attrs: dict, where: str, names: str) -> None:
    """Refuse to write over ``where`` unless it holds (a copy of) this very store."""
    if not found:
        raise SkdError(f"cannot copy {names}: {redact(where)} exists and is not a teacher store; nothing was copied")
    different = differences(found, identity)
    if different:
        raise SkdError(f"cannot copy {names}: {redact(where)} holds a different store (another {different[0]}): "
                       "remove it or copy elsewhere; nothing was copied")
    unfinished_copy = {**found, "complete": source_attrs.get("complete")} == source_attrs
    if not found.get("complete") and not unfinished_copy:
        raise SkdError(f"cannot copy {names}: {redact(where)} holds an unfinished store of the same teacher and data "
                       "written by another run (cache-teacher): finish that run or remove it; nothing was copied")


def _copy_objects(source: _Source, target: _Target, threads: int, progress: bool) -> CopyReport:
    """Every object of ``source`` not yet whole at ``target``: the root metadata first (saying
    incomplete), then every array's metadata, then the chunks, the ``done`` flags' last."""
    wanted, present = source.sizes(), target.sizes()
    root = json.loads(source.read(ROOT))
    root["attributes"]["complete"] = False
    target.write(ROOT, json.dumps(root, indent=2).encode())
    todo = [key for key in wanted if key != ROOT and present.get(key) != wanted[key]]
    metadata = sorted(key for key in todo if key.endswith("/" + ROOT))
    flags = sorted(key for key in todo if key.startswith("done/") and key not in metadata)
    chunks = sorted(set(todo) - set(metadata) - set(flags))
    report = CopyReport(kept=len(wanted) - 1 - len(todo))
    with ThreadPoolExecutor(max(1, threads)) as pool, tqdm(total=sum(wanted[k] for k in todo), unit="B",
                                                           unit_scale=True, desc="cache-copy",
                                                           disable=not progress) as bar:
        def copy_one(key: str) -> None:
            data = source.read(key)
            target.write(key, data)
            bar.update(len(data))

        for group in (metadata, chunks, flags):  # each group whole before the next starts
            for _ in pool.map(copy_one, group):
                pass
            report.copied += len(group)
            report.bytes += sum(wanted[k] for k in group)
    return report


def _verify(location: str, storage_options: dict, names: str, progress: bool) -> None:
    """Every chunk of the copy read back through zarr (checksums) before it is marked complete."""
    store = TeacherStore(location, storage_options)
    # Verified as the complete store it is about to become: its root says incomplete until then.
    store.attrs = {**store.attrs, "complete": True}
    problems = verify_store(store, progress=progress)
    if problems:
        raise SkdError(f"copying {names}: the copy failed verification ({len(problems)} problem(s); the first: "
                       f"{problems[0]}); it is left incomplete, which readers refuse: run skd cache-verify on the "
                       "source, and if it is sound, remove the copy and copy again")

