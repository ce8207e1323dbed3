"""Progress of a long loop: a tqdm bar on a terminal, otherwise one log line every so often.

Output that goes to a file (a batch job, ``nohup``, ``| tee``) gets no bar: tqdm's carriage
returns make a mess of a log. It gets instead, every ``SKD_PROGRESS_EVERY`` seconds (30 by default;
0 logs every update), a line such as ``cache-teacher: 48/367 img (13%), 1.9 img/s, ETA 2m48s``,
logged at INFO level (so ``-q`` and the quiet ranks of a torchrun job print none).
"""

from __future__ import annotations

import logging
import os
import time

from tqdm import tqdm

from pipeline.errors import SkdError

ENV = "SKD_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def progress_bar(total: int | None, desc: str, unit: str, bar: bool, log: logging.Logger, initial: int = 0):
    """A tqdm bar when ``bar`` (a terminal), else a ``ProgressLines`` that logs to ``log``; both take
    ``update(n)``, ``set_postfix(...)`` and ``close()`` and work as context managers."""
    if bar:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return ProgressLines(total, desc, unit, log, initial)


def every_seconds() -> float:
    value = os.environ.get(ENV, "")
    if not value:
        return DEFAULT_EVERY_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise SkdError(f"{ENV}={value!r}: expected the seconds between progress lines (a number >= 0)")
    return seconds


class ProgressLines:
    """Logs ``desc: done/total unit (pct), rate, ETA`` at the first update and then at most once
    every ``SKD_PROGRESS_EVERY`` seconds. The rate is this run's (a resumed run starts at ``initial``)."""

    def __init__(self, total: int | None, desc: str, unit: str, log: logging.Logger, initial: int = 0):
        self.total, self.desc, self.unit, self.log = total, desc, unit, log
        self.n = self.start_n = initial
        self.every = every_seconds()
        self.started = time.perf_counter()
        self.last: float | None = None

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.last is None or now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        elapsed, count = now - self.started, self.n - self.start_n
        if count <= 0 or elapsed <= 0:
            return f"{self.desc}: {done}"
        rate = count / elapsed
        speed = f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if self.total else ""
        return f"{self.desc}: {done}, {speed}{eta}"

    def set_postfix(self, *args: object, **kwargs: object) -> None:
        """The bar's loss display; the lines leave it out (training logs its records itself)."""

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
