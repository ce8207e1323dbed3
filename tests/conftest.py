from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.models import build_model
from pipeline.train.checkpoint import save_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAMVID = SHARED / "data" / "camvid"

TINY_DATA = {"dataset": "synthetic", "options": {"size": [32, 48], "length": 16}, "workers": 0}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors gain nothing from threads, and on busy cores OpenMP threads spin for seconds."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # an explicit setting that skd keeps instead of choosing its own
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


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


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``skd ARGS`` through ``cli.main()`` in this process: (exit code, stdout, stderr)."""
    import cli

    monkeypatch.setattr(sys, "argv", ["skd", *args])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def endpoint():
    """A real S3-protocol server (moto's) on a free port of 127.0.0.1, for one test module's buckets."""
    from moto import server as moto_server

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
