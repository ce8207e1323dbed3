"""One writer per store: ``cache-teacher`` holds an exclusive lock on ``<store>.lock`` (a local
store) or a lease object ``<store>.lease`` (a store on object storage) while it runs."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from pipeline.errors import SkdError

log = logging.getLogger(__name__)

# How long a lease on object storage holds without renewal: a writer that crashed is out of the way
# this long after its last renewal. The holder renews it every third of this.
LEASE_SECONDS = 600.0


class WriterLock:
    """An exclusive ``flock`` on ``<store>.lock``, held from set-up to finalisation.

    The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a
    killed run never leaves a store locked; the file holds the holder's pid, host and start time
    for the message a second writer gets. Removed when the run finishes.
    """

    def __init__(self, store: Path):
        self.store = Path(store)
        self.path = self.store.with_name(self.store.name + ".lock")
        self.file = None

    def __enter__(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                file = open(self.path, "a+")
            except OSError as exc:
                raise SkdError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                raise SkdError(
                    f"{self.store} is being written by {holder}: wait for that run to finish or stop it. "
                    f"(The lock is released when its process ends, even if killed; if no such process is "
                    f"running, e.g. on a filesystem without working locks, delete {self.path}.)") from None
            # The holder may have removed the file between our open and our lock: lock the new one.
            try:
                if os.stat(self.path).st_ino == os.fstat(file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            file.close()
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.file.close()  # releases the lock


class ObjectLease:
    """A lease object ``<store>.lease`` on object storage, created with a conditional put (If-None-Match:
    a second writer's create fails), naming its holder, host and start, with an expiry.

    The holder renews it in a background thread (a put conditional on the lease's ETag, so a lease
    taken over meanwhile is not overwritten) and deletes it at the end. A lease past its expiry is
    stale (its writer crashed): the next writer deletes that very lease (conditional on its ETag)
    and takes a new one. Expiries are the writers' clocks: keep them roughly in time (NTP).
    """

    def __init__(self, fs, key: str, where: str, seconds: float = LEASE_SECONDS):
        self.fs, self.key, self.where, self.seconds = fs, key, where, seconds
        self.etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.seconds}).encode()

    def __enter__(self) -> "ObjectLease":
        for _ in range(2):
            try:
                self.fs.pipe_file(self.key, self._body(), mode="create")
                self.etag = self.fs.info(self.key, refresh=True)["ETag"]
                break
            except FileExistsError:
                self._remove_if_stale()
        else:
            raise SkdError(f"{self.where}: another writer took the store's lease at the same time; try again")
        self._renewer = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._renewer.start()
        return self

    def _remove_if_stale(self) -> None:
        try:
            held = json.loads(self.fs.cat_file(self.key))
            etag = self.fs.info(self.key, refresh=True)["ETag"]
        except FileNotFoundError:
            return  # released meanwhile
        if held["expires"] > time.time():
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["expires"]))
            raise SkdError(f"{self.where} is being written by {held['holder']} (its lease holds until {until}, "
                           "renewed while it runs): wait for that run to finish or stop it; a lease whose "
                           f"writer died expires by itself within {self.seconds / 60:g} minutes")
        log.warning("%s: taking over the expired lease of %s", self.where, held["holder"])
        self._delete(etag)

    def _delete(self, etag: str | None) -> None:
        bucket, key, _ = self.fs.split_path(self.key)
        if etag is not None:  # only that very lease, not one another writer took since
            from pipeline.cache.remote import describe, network_errors

            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except OSError:
                pass  # someone else's lease now, or gone: the conditional create decides
            except network_errors() as exc:  # the storage stopped answering: the lease expires by itself
                log.warning("%s: the writer's lease could not be released (%s); it expires by itself within %g "
                            "minutes", self.where, describe(exc), self.seconds / 60)
        self.fs.invalidate_cache(self.key)

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.fs.pipe_file(self.key, self._body(), IfMatch=self.etag)
                self.etag = self.fs.info(self.key, refresh=True)["ETag"]
            except Exception as exc:  # noqa: BLE001 -- a missed renewal is retried; the expiry has margin
                log.warning("%s: renewing the writer's lease failed (%s)", self.where, type(exc).__name__)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self._delete(self.etag)
