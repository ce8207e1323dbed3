"""One writer per store: ``cache-teacher`` holds an exclusive lock on ``<store>.lock`` while it runs."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from pipeline.errors import SkdError


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
