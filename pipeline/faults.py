"""Fault injection at chosen points, for tests and ``bench/faults.py``.

``SKD_FAULT=<point>[:<n>]`` in the environment kills this process with SIGKILL (as a power cut or
the kernel's OOM killer would: no handler, no cleanup) the n-th time (default: the first) it
reaches ``fault_point("<point>")``. Without the variable a fault point is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

POINTS = {
    "shard-write": "between two arrays of one shard: part of a shard on disk, not flagged done",
    "flag-write": "after a shard's arrays, before its done flags",
    "finalize": "inside the final swap of a store into place, between its two renames",
    "checkpoint-write": "after a checkpoint's temporary file is written, before it replaces the old one",
    "copy-object": "in cache-copy, after an object is written (a local file: under its temporary name, not yet renamed)",
}
_hits: Counter = Counter()
_lock = threading.Lock()


def fault_point(name: str) -> None:
    spec = os.environ.get("SKD_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    with _lock:
        _hits[name] += 1
        if _hits[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
