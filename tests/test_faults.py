"""Faults: processes killed at chosen points, a second writer, a full disk, credentials in URLs.

The randomised version with many rounds is ``bench/faults.py``; its fast variant runs here.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pipeline.cache.lock import WriterLock
from pipeline.cache.store import scrub
from pipeline.config import Config
from pipeline.train.checkpoint import public_config

REPO = Path(__file__).resolve().parents[1]


def skd(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", "--quiet", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "synthetic", "options": {"size": [32, 48], "length": 40}, "workers": 0},
        "model": {"name": "pspnet_resnet18", "width": 0.125},
        "train": {"iterations": 4, "batch_size": 4, "log_every": 2, "checkpoint_every": 2, "device": "cpu"},
        "cache": {"batch_size": 4, "feature_pool": 2},
    }))
    result = skd("train-teacher", "--config", str(config), "--width", "0.25", "--iterations", "1", "--out", str(tmp / "t"))
    assert result.returncode == 0, result.stderr
    reference = tmp / "reference.zarr"
    args = ["cache-teacher", "--config", str(config), "--teacher", str(tmp / "t" / "model.pt")]
    assert skd(*args, "--cache", str(reference)).returncode == 0
    return {"tmp": tmp, "config": config, "cache_args": args, "reference": reference}


def arrays(path: Path) -> dict[str, np.ndarray]:
    return {name: array[:] for name, array in zarr.open_group(str(path), mode="r").arrays()}


def assert_same_store(got: Path, want: Path) -> None:
    a, b = arrays(got), arrays(want)
    assert a.keys() == b.keys()
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("point", ["shard-write", "flag-write"])
def test_a_writer_killed_mid_shard_flags_nothing_it_did_not_write_and_resumes(setup, point, tmp_path):
    out, partial = tmp_path / "s.zarr", tmp_path / "s.zarr.partial"
    killed = skd(*setup["cache_args"], "--cache", str(out), env={"SKD_FAULT": f"{point}:2"})
    assert killed.returncode == -signal.SIGKILL
    group = zarr.open_group(str(partial), mode="r")
    done = group["done"][:]
    assert 0 < done.sum() < len(done)  # the second shard (of three) was cut short: only the first is done
    for index in np.flatnonzero(done):
        assert np.isfinite(group["log_probs"][index]).all() and np.isfinite(group["features"][index]).all()
    assert not done[16:32].any()
    resumed = skd(*setup["cache_args"], "--cache", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists() and not out.with_name("s.zarr.lock").exists()
    assert_same_store(out, setup["reference"])


def test_a_writer_killed_between_the_renames_of_an_overwrite_leaves_a_whole_store(setup, tmp_path):
    out = tmp_path / "s.zarr"
    assert skd(*setup["cache_args"], "--cache", str(out)).returncode == 0
    killed = skd(*setup["cache_args"], "--cache", str(out), "--overwrite", env={"SKD_FAULT": "finalize"})
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and out.with_name("s.zarr.old").is_dir() and out.with_name("s.zarr.partial").is_dir()
    # The next run finishes the swap, then finds the very store it would write: nothing to do.
    again = skd(*setup["cache_args"], "--cache", str(out))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert_same_store(out, setup["reference"])


def test_a_training_run_killed_while_saving_a_checkpoint_resumes_to_the_same_model(setup, tmp_path):
    base = ["train-student", "--config", str(setup["config"]), "--cache", str(setup["reference"]), "--losses", "pi"]
    assert skd(*base, "--out", str(tmp_path / "reference")).returncode == 0
    run = tmp_path / "run"
    killed = skd(*base, "--out", str(run), env={"SKD_FAULT": "checkpoint-write:2"})  # the save at iteration 4
    assert killed.returncode == -signal.SIGKILL
    import torch

    assert torch.load(run / "last.pt", weights_only=True)["iteration"] == 2  # the previous checkpoint, whole
    assert not (run / "model.pt").exists()
    resumed = skd(*base, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.glob(".*.tmp"))
    got = torch.load(run / "model.pt", weights_only=True)["model"]
    want = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_a_second_writer_is_refused_and_a_killed_holder_does_not_block(setup, tmp_path):
    out = tmp_path / "s.zarr"
    with WriterLock(out):
        second = skd(*setup["cache_args"], "--cache", str(out))
    assert second.returncode == 2
    message = second.stderr.strip().splitlines()[-1]
    assert f"pid {os.getpid()} on " in message and "being written" in message and str(out) in message
    assert not out.exists() and not out.with_name("s.zarr.partial").exists()

    # A holder killed with SIGKILL leaves its lock file behind, but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.cache.lock import WriterLock\n"
                               f"with WriterLock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert out.with_name("s.zarr.lock").exists()
    after = skd(*setup["cache_args"], "--cache", str(out))
    assert after.returncode == 0, after.stderr
    assert not out.with_name("s.zarr.lock").exists()


def test_rerunning_a_finished_cache_does_nothing_and_another_teacher_is_refused(setup, tmp_path):
    out = tmp_path / "s.zarr"
    assert skd(*setup["cache_args"], "--cache", str(out)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = skd(*setup["cache_args"], "--cache", str(out))
    assert again.returncode == 0 and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    other = skd("cache-teacher", "--config", str(setup["config"]), "--teacher", str(setup["tmp"] / "t" / "model.pt"),
                "--feature-pool", "1", "--cache", str(out))
    assert other.returncode == 2 and "already exists" in other.stderr and "--overwrite" in other.stderr


def test_a_full_disk_stops_caching_with_a_message_and_a_store_that_resumes(setup, tmp_path):
    # Larger images than the other tests': the store's metadata (~4 KB) fits under the limit, a
    # shard of maps (~14 KB) does not.
    config = tmp_path / "larger.yaml"
    recipe = yaml.safe_load(setup["config"].read_text())
    recipe["data"]["options"]["size"] = [64, 96]
    config.write_text(yaml.safe_dump(recipe))
    args = ["cache-teacher", "--config", str(config), "--teacher", str(setup["tmp"] / "t" / "model.pt")]
    out = tmp_path / "s.zarr"

    def small_files():  # every file this process writes stops at 8 KB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    full = skd(*args, "--cache", str(out), preexec_fn=small_files)
    assert full.returncode == 2, full.stderr
    message = full.stderr.strip().splitlines()[-1]
    assert message.startswith("error: writing images") and "File too large" in message and "re-run" in message
    assert not out.exists()
    group = zarr.open_group(str(out.with_name("s.zarr.partial")), mode="r")
    for index in np.flatnonzero(group["done"][:]):
        assert np.isfinite(group["features"][index]).all()
    resumed = skd(*args, "--cache", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert skd(*args, "--cache", str(tmp_path / "reference.zarr")).returncode == 0
    assert_same_store(out, tmp_path / "reference.zarr")


def test_credentials_in_a_store_url_never_reach_messages_or_files(setup, tmp_path):
    url = "file://reader:s3cr3t@/nonexistent/store.zarr?token=t0k3n"
    result = skd("train-student", "--config", str(setup["config"]), "--cache", url, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "s3cr3t" not in result.stderr and "t0k3n" not in result.stderr and "reader" not in result.stderr
    cfg = Config()
    cfg.distill.cache = "s3://AKIAEXAMPLE:s3cr3t@bucket/store.zarr?X-Amz-Signature=t0k3n"
    written = json.dumps(public_config(cfg))
    assert "s3cr3t" not in written and "t0k3n" not in written and "s3://bucket/store.zarr" in written
    assert scrub("No group found in 'https://u:s3cr3t@host/x.zarr?sig=t0k3n' at ''") == "No group found in 'https://host/x.zarr' at ''"


def test_fault_injection_rounds(tmp_path):
    """bench/faults.py, fast: three rounds of kills and resumes, nothing lost or corrupted."""
    result = subprocess.run([sys.executable, "bench/faults.py", "--rounds", "3", "--out", str(tmp_path)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    totals = json.loads((tmp_path / "faults.json").read_text())["totals"]
    assert totals["rounds"] == 3 and totals["faults_injected"] >= 1
    assert totals["corruptions"] == totals["lost"] == totals["unfinished"] == totals["leftover_files"] == 0


def test_training_from_a_store_while_another_is_written_beside_it(setup, tmp_path):
    base = ["train-student", "--config", str(setup["config"]), "--cache", str(setup["reference"]), "--losses", "pi,pa"]
    alone = skd(*base, "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    # A longer caching run (more, larger images) in the folder of the store being read.
    config = tmp_path / "more.yaml"
    recipe = yaml.safe_load(setup["config"].read_text())
    recipe["data"]["options"] = {"size": [64, 96], "length": 320}
    config.write_text(yaml.safe_dump(recipe))
    beside = setup["reference"].with_name("beside.zarr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-m", "cli", "--quiet", "cache-teacher", "--config", str(config),
                               "--teacher", str(setup["tmp"] / "t" / "model.pt"), "--cache", str(beside)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        together = skd(*base, "--out", str(tmp_path / "together"))
        overlapped = writer.poll() is None  # the writer was busy for the whole training run
    finally:
        _, errors = writer.communicate(timeout=300)
    assert together.returncode == 0, together.stderr
    assert writer.returncode == 0, errors
    assert overlapped, "the caching run ended before training did; make it longer"
    import torch

    got = torch.load(tmp_path / "together" / "model.pt", weights_only=True)["model"]
    want = torch.load(tmp_path / "alone" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert skd("cache-verify", str(beside)).returncode == 0


def test_sigterm_or_ctrl_c_keeps_the_last_step_and_the_run_resumes(setup, tmp_path):
    config = tmp_path / "rare-checkpoints.yaml"  # no periodic checkpoint before the signal: last.pt is its doing
    recipe = yaml.safe_load(setup["config"].read_text())
    recipe["train"]["checkpoint_every"] = 1000
    config.write_text(yaml.safe_dump(recipe))
    base = ["train-student", "--config", str(config), "--cache", str(setup["reference"]), "--losses", "pi",
            "--iterations", "400"]
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", *base, "--out", str(run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    logged = log.read_text().count("\n") * 2  # log_every 2 in this recipe
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    import torch

    stopped_at = torch.load(run / "last.pt", weights_only=True)["iteration"]
    assert logged <= stopped_at < 400  # the step it was on when the signal came
    assert not (run / "model.pt").exists()
    resumed = skd(*base, "--out", str(run), "--resume", "--iterations", "400")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "model.pt").exists()


def test_a_writer_killed_while_creating_the_store_leaves_nothing_that_blocks_a_rerun(setup, tmp_path, monkeypatch):
    import pipeline.cache.writer as writer
    from pipeline.data import build_dataset
    from pipeline.train.checkpoint import model_from_checkpoint

    def stopped_half_way(path, *args, **kwargs):  # as a kill during the creation leaves it: arrays missing
        create_store(path, *args, **kwargs)
        (Path(path) / "done" / "zarr.json").unlink()
        raise KeyboardInterrupt

    create_store = writer.create_store
    monkeypatch.setattr(writer, "create_store", stopped_half_way)
    out = tmp_path / "s.zarr"
    dataset = build_dataset("synthetic", None, "train", **yaml.safe_load(setup["config"].read_text())["data"]["options"])
    teacher, arch = model_from_checkpoint(setup["tmp"] / "t" / "model.pt")
    info = {**arch, "weights_sha256": "0" * 64}
    with pytest.raises(KeyboardInterrupt):
        writer.cache_teacher(teacher, info, dataset, out, feature_pool=2, workers=0, progress=False)
    assert out.with_name("s.zarr.partial.creating").is_dir() and not out.with_name("s.zarr.partial").exists()

    monkeypatch.setattr(writer, "create_store", create_store)
    writer.cache_teacher(teacher, info, dataset, out, feature_pool=2, workers=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
