"""Resuming a run: only the run the checkpoint holds resumes, and its log shows each step once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.errors import SkdError
from pipeline.train.checkpoint import config_differences
from pipeline.train.trainer import Trainer, train
from test_train import interrupted_run, make_config, read_log

RUN = {"iterations": 6, "log_every": 1, "checkpoint_every": 2}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resumed_run_logs_each_iteration_once(tiny_config, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = make_config(tiny_config, out, train=RUN | {"tensorboard": True})
    interrupted_run(cfg, stop_after=3, monkeypatch=monkeypatch)
    # Interrupted after iteration 3, with the checkpoint of iteration 2: iteration 3 is run again.
    assert [r["iteration"] for r in read_log(out)] == [1, 2, 3]
    config_json = (out / "config.json").read_bytes()
    first = read_log(out)[:2]

    train(cfg, resume=True, progress=False)
    records = read_log(out)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[:2] == first  # the records up to the checkpoint are kept as they were
    assert (out / "config.json").read_bytes() == config_json
    assert not list(out.glob(".*tmp"))
    # TensorBoard hides the interrupted run's events after the checkpoint.
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/task")] == [1, 2, 3, 4, 5, 6]


def test_a_resume_with_other_settings_is_refused_and_changes_nothing(tiny_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(tiny_config, out, train={"iterations": 2}), progress=False)
    before = snapshot(out)

    # Other seed, batch and crop: refused, each named with both values; device, workers and log_every
    # may change on resume, so they are not named.
    other = make_config(tiny_config, out, train={"iterations": 2, "seed": 1, "batch_size": 2, "log_every": 1, "device": "auto"},
                        data={"crop_size": [32, 32], "workers": 1})
    with pytest.raises(SkdError) as info:
        Trainer(other, resume=True, progress=False)
    message = str(info.value)
    assert "train.seed 0 (this run: 1)" in message
    assert "train.batch_size 4 (this run: 2)" in message
    assert "data.crop_size null (this run: [32, 32])" in message
    assert "log_every" not in message and "workers" not in message and "device" not in message
    assert "\n" not in message
    assert snapshot(out) == before

    # Only settings that may change: the run resumes (and, finished, only writes model.pt again).
    allowed = make_config(tiny_config, out, train={"iterations": 2, "log_every": 1, "checkpoint_every": 1, "device": "auto"},
                          data={"workers": 1})
    assert Trainer(allowed, resume=True, progress=False).iteration == 2


def test_config_differences_name_what_defines_the_run():
    saved = {"train": {"seed": 0, "lr": 0.01, "device": "cpu", "log_every": 20},
             "data": {"crop_size": (32, 32), "root": "/data/a"},
             "cache": {"feature_pool": 4},
             "distill": {"cache": "s3://bucket/a.zarr", "lambda_pi": 10.0, "removed": 1}}
    same = {"train": {"seed": 0, "lr": 0.01, "device": "cuda", "log_every": 1, "added": 2},
            "data": {"crop_size": [32, 32], "root": "/data/b"},  # a list and a tuple of the same crop
            "cache": {"feature_pool": 1},
            "distill": {"cache": "s3://bucket/a.zarr", "lambda_pi": 10.0}}
    assert config_differences(saved, same) == []
    other = {**same, "distill": {"cache": "s3://bucket/b.zarr", "lambda_pi": 80.0}}
    assert config_differences(saved, other) == ['distill.cache "s3://bucket/a.zarr" (this run: "s3://bucket/b.zarr")',
                                                "distill.lambda_pi 10.0 (this run: 80.0)"]
