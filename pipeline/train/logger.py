"""Where a training run's records go: ``log.jsonl`` (one JSON object per logged step), TensorBoard
scalars (``--tensorboard``), and the progress bar or, without one, the console."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.errors import SkdError
from pipeline.progress import progress_bar

log = logging.getLogger(__name__)

# Bookkeeping fields of a record, kept off the progress bar.
BOOKKEEPING = ("iteration", "lr", "step_s", "elapsed_s")


class MetricLogger:
    """The records of one run. Only rank 0 (``main``) writes files; every rank keeps its bar.

    ``log.jsonl`` is appended to: the run's checkpoints start it afresh for a new run and cut it
    back to the checkpoint's iteration for a resumed one (``RunCheckpoints.begin``). TensorBoard
    hides its own events past ``iteration``, for the same reason.
    """

    def __init__(self, out: Path, *, main: bool, iteration: int, total: int | None, tensorboard: bool,
                 progress: bool):
        self.main, self.total, self.progress = main, total, progress
        self.file = open(Path(out) / "log.jsonl", "a") if main else None
        self.board = _summary_writer(Path(out) / "tensorboard", iteration) if tensorboard and main else None
        # A bar on a terminal, else a line every so often (the records alone come every log_every steps).
        self.bar = progress_bar(total, "train", "it", progress, log, initial=iteration)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()

    def tick(self) -> None:
        """One step done."""
        self.bar.update(1)

    def write(self, record: dict[str, float]) -> None:
        """One logged step: ``record`` holds its ``iteration`` and the values to log."""
        iteration = record["iteration"]
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.board is not None:
            for name, value in record.items():
                if name != "iteration":
                    self.board.add_scalar(name if name.startswith(("val_", "best_")) else f"train/{name}", value, iteration)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                              if k not in BOOKKEEPING and not k.startswith("grad_")})
        if not self.progress and self.main:
            log.info("it %d/%s  %s", iteration, "-" if self.total is None else self.total,
                     "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "iteration"))


def _summary_writer(folder: Path, iteration: int):
    """A TensorBoard SummaryWriter (the tensorboard package, pip install 'skd[tensorboard]'). A run
    resumed at ``iteration`` purges the events logged after it by the interrupted run."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SkdError("train.tensorboard (--tensorboard) needs the tensorboard package: "
                       "pip install 'skd[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter(str(folder), purge_step=iteration + 1 if iteration else None)
