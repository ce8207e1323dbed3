"""Checkpoints: written atomically (temp file, then rename), read with ``weights_only=True``.

A checkpoint is a dict: ``arch`` (how to rebuild the model: name, num_classes and build options),
``model`` (state_dict) and, for training runs, optimiser / discriminator / progress state.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import SkdError
from pipeline.faults import fault_point
from pipeline.models import build_model
from pipeline.models.weights import load_state, read_checkpoint, state_dict_of

load_checkpoint = read_checkpoint  # skd checkpoints are plain dicts of tensors and numbers


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    fault_point("checkpoint-write")
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
