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
from pipeline.models import build_model


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SkdError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with forbidden globals, not a torch file...
        raise SkdError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise SkdError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


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
    state = load_checkpoint(path)
    arch = dict(state.get("arch") or arch or {})
    if "name" not in arch or "num_classes" not in arch:
        raise SkdError(f"checkpoint {path} does not say which model it holds: pass the architecture "
                       "(--teacher-arch/--num-classes) for plain state_dicts")
    weights = state.get("model", state.get("state_dict", state))
    weights = {k.removeprefix("module."): v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    model = build_model(**arch)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise SkdError(f"checkpoint {path} does not fit {arch['name']}: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise SkdError(f"checkpoint {path} does not fit {arch['name']}: {len(missing)} missing keys "
                       f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model.eval(), arch
