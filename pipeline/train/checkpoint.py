"""Checkpoints: written atomically (temp file, then rename), read with ``weights_only=True``.

A checkpoint is a dict: ``arch`` (how to rebuild the model: name, num_classes and build options),
``model`` (state_dict) and, for training runs, optimiser / discriminator / progress state.

:class:`RunCheckpoints` keeps a training run's folder: what ``last.pt`` holds, and how a run resumes
from it (the same settings, the log cut back to the checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.cache.store import redact, redact_options
from pipeline.config import Config
from pipeline.errors import SkdError
from pipeline.faults import fault_point
from pipeline.models import build_model
from pipeline.models.weights import file_sha256, load_state, read_checkpoint, state_dict_of  # noqa: F401 (file_sha256: re-exported)

log = logging.getLogger(__name__)

load_checkpoint = read_checkpoint  # skd checkpoints are plain dicts of tensors and numbers


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    fault_point("checkpoint-write")
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact



def model_from_checkpoint(path: str | Path, arch: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from an skd checkpoint (or a plain state_dict plus ``arch``) and load its weights.

    Returns the model (on the CPU, eval mode) and its ``arch`` dict.
    """
    state = read_checkpoint(path)
    arch = dict(state.get("arch") or arch or {})
    if "name" not in arch or "num_classes" not in arch:
        raise SkdError(f"checkpoint {path} does not say which model it holds (a plain state_dict): cache-teacher "
                       "takes --teacher-arch/--num-classes for such a file; other commands need a checkpoint with its "
                       "architecture, {'arch': {'name': ..., 'num_classes': ...}, 'model': state_dict}")
    model = build_model(**arch)
    load_state(model, state_dict_of(state, path), path, strict=True)
    return model.eval(), arch


# Settings a resumed run may change: where the data lies, how the run is executed and how it
# reports. Each leaves the sequence of steps as it is (samples are seeded by (seed, epoch, index),
# whatever the loader's workers; a compiled student computes what the eager one does). Everything
# else defines the run and must stay as the checkpoint was trained: the data and its augmentation,
# the models, the teacher or store, the losses and their weights, the seed, the batch, and
# iterations and budget_minutes (the learning-rate schedule and the warm-up are fractions of them).
# The cache section configures cache-teacher; training reads the store's own settings, so it is
# left out too, and so is the storage section (how a store is reached, and the local read cache).
RESUMABLE_SETTINGS = frozenset({
    "data.root", "data.workers", "data.prefetch_factor", "data.pin_memory",
    "train.device", "train.compile", "train.out",
    "train.log_every", "train.log_grad_norms", "train.checkpoint_every", "train.val_every", "train.tensorboard",
})
# teacher_model only shapes what train-teacher builds, and that lands in the model section (compared).
RESUMABLE_SECTIONS = frozenset({"cache", "storage", "teacher_model"})


def public_config(cfg: Config) -> dict:
    """The run's settings as written to config.json and checkpoints: a store URL without its
    credentials (files outlive the run and travel with it)."""
    settings = cfg.to_dict()
    if settings["distill"].get("cache"):
        settings["distill"]["cache"] = redact(settings["distill"]["cache"])
    if "storage" in settings:
        settings["storage"]["options"] = redact_options(settings["storage"]["options"])
    return settings


def config_differences(saved: dict, current: dict) -> list[str]:
    """The settings that differ between a checkpoint's config and this run's, as "section.key old
    (this run: new)", leaving out those a resumed run may change. A setting only one side knows
    (added or removed since the checkpoint) is not compared."""
    def flat(settings: dict) -> dict[str, Any]:
        # Through JSON: a tuple and a list of the same values are the same setting.
        return {f"{section}.{key}": json.loads(json.dumps(value))
                for section, values in settings.items() for key, value in values.items()}

    old, new = flat(saved), flat(current)
    return [f"{key} {json.dumps(old[key])} (this run: {json.dumps(new[key])})" for key in old if key in new
            and key not in RESUMABLE_SETTINGS and key.split(".")[0] not in RESUMABLE_SECTIONS and old[key] != new[key]]


class RunCheckpoints:
    """A training run's folder: ``config.json``, ``last.pt``, ``log.jsonl``.

    ``parts`` are the objects whose state ``last.pt`` holds, by key ("model", "optimizer",
    "scheduler", "fd_adapter"); ``merged`` ones write several keys of their own (the holistic term's
    "discriminator", "d_optimizer", "d_scheduler"). :meth:`resume` refuses a checkpoint of another
    architecture or other settings (:data:`RESUMABLE_SETTINGS` may change) before anything is
    loaded or written; :meth:`begin` then cuts the log back to the checkpoint's iteration.
    """

    def __init__(self, out: Path, cfg: Config, arch: dict, parts: dict[str, Any], merged: dict[str, Any]):
        self.out, self.settings, self.arch = Path(out), public_config(cfg), arch
        self.parts, self.merged = parts, merged
        self.last = self.out / "last.pt"
        self.resumed_at: int | None = None

    def state(self, iteration: int, extra: dict[str, Any]) -> dict[str, Any]:
        state = {"arch": self.arch, "iteration": iteration, "config": self.settings, "torch_rng": torch.get_rng_state()}
        state |= {key: part.state_dict() for key, part in self.parts.items()}
        for part in self.merged.values():
            state |= part.state_dict()
        return state | extra

    def save(self, iteration: int, extra: dict[str, Any]) -> None:
        save_checkpoint(self.last, self.state(iteration, extra))

    def save_weights(self, name: str, model: nn.Module, **extra: Any) -> Path:
        """A deployable checkpoint (``model.pt``, ``best.pt``): the model and its architecture."""
        path = self.out / name
        save_checkpoint(path, {"arch": self.arch, "model": model.state_dict(), **extra})
        return path

    def refuse_existing(self) -> None:
        if self.last.exists():
            raise SkdError(f"{self.out} already holds a training run: pass --resume to continue it or choose another --out")

    def resume(self) -> dict[str, Any]:
        """Load ``last.pt`` into the parts, after checking that it is this run's; returns the state."""
        if not self.last.exists():
            raise SkdError(f"--resume: no checkpoint at {self.last}")
        state = load_checkpoint(self.last)
        if state.get("arch") != self.arch:
            raise SkdError(f"--resume: {self.last} holds {state.get('arch')}, but the run is configured for {self.arch}")
        differ = config_differences(state.get("config") or {}, self.settings)
        if differ:
            raise SkdError(f"--resume: {self.last} was trained with other settings: {'; '.join(differ)}. Resume with "
                           f"the run's own settings (see {self.out / 'config.json'}), or start a new run in another --out")
        for key, part in self.parts.items():
            if key not in state:
                raise SkdError(f"--resume: {self.last} has no {key} state, but this run needs one")
            part.load_state_dict(state[key])
        for name, part in self.merged.items():
            try:
                part.load_state_dict(state)
            except KeyError:
                raise SkdError(f"--resume: {self.last} has no {name} state, but this run needs one") from None
        torch.set_rng_state(state["torch_rng"])
        self.resumed_at = int(state["iteration"])
        log.info("resumed %s at iteration %d", self.last, self.resumed_at)
        return state

    def begin(self) -> None:
        """On rank 0, before the first step: a new run writes config.json and starts its log; a
        resumed one keeps config.json (its settings are the checkpoint's) and drops the log records
        of the steps after the checkpoint, which it is about to run again."""
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "log.jsonl"
        if self.resumed_at is None:
            (self.out / "config.json").write_text(json.dumps(self.settings, indent=2))
            log_path.write_text("")
            return
        kept = []
        for line in (log_path.read_text().splitlines() if log_path.exists() else []):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
            if record.get("iteration", 0) <= self.resumed_at:
                kept.append(line + "\n")
        tmp = log_path.with_name(f".{log_path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log_path)  # a crash here leaves the old log or the cut one, never half of it
