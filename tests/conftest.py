from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.models import build_model
from pipeline.train.checkpoint import save_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAMVID = SHARED / "data" / "camvid"

TINY_DATA = {"dataset": "synthetic", "options": {"size": [32, 48], "length": 16}, "workers": 0}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A YAML recipe with tiny synthetic images and a few iterations (CPU, seconds)."""
    cfg = {
        "data": TINY_DATA,
        "model": {"name": "pspnet_resnet18", "width": 0.125},
        "train": {"iterations": 4, "batch_size": 4, "log_every": 2, "checkpoint_every": 2, "device": "cpu"},
        "cache": {"batch_size": 4, "feature_pool": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> Path:
    """An untrained (but deterministic) small teacher checkpoint in skd's format."""
    torch.manual_seed(0)
    arch = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.25}
    model = build_model(**arch)
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, {"arch": arch, "model": model.state_dict()})
    return path
