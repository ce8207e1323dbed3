"""Writing a store to object storage when more than one process writes, or the network fails: against
a real S3-protocol server on 127.0.0.1 (moto's server, started here, and stopped to cut the network)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import TINY_DATA, run_main

pytest.importorskip("s3fs", reason="object storage needs s3fs: pip install 'skd[s3]'")
moto_server = pytest.importorskip("moto.server", reason="the S3 test server is moto's: pip install 'moto[server]'")

from pipeline.cache.writer import cache_teacher  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.errors import SkdError  # noqa: E402
from pipeline.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Server:
    """moto's S3 server on one port, which can be stopped and started again (its buckets live in
    this process, so they survive a restart, as a real server's disks would)."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def s3(request, monkeypatch):
    import s3fs

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    server = Server()
    fs = s3fs.S3FileSystem(endpoint_url=server.url, skip_instance_cache=True)
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    fs.call_s3("create_bucket", Bucket=name)
    yield server, fs, name
    server.stop()


def objects(fs, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix``, by key below it, read without skd; the root metadata's
    attributes without the creation time (each run has its own)."""
    fs.invalidate_cache(prefix)
    found = {key[len(prefix) + 1:]: fs.cat_file(key) for key in fs.find(prefix)}
    root = json.loads(found.pop("zarr.json"))
    root["attributes"].pop("created")
    found["zarr.json"] = json.dumps(root, sort_keys=True).encode()
    return found


def test_two_torchrun_processes_write_to_a_bucket_the_store_one_process_writes(s3, tiny_teacher, tmp_path,
                                                                               monkeypatch, capsys):
    server, fs, name = s3
    config = tmp_path / "tiny.yaml"  # 32 images: two shards of 16, one per process
    config.write_text(yaml.safe_dump({"data": {**TINY_DATA, "options": {"size": [32, 48], "length": 32}},
                                      "cache": {"batch_size": 4, "feature_pool": 2}}))
    args = ["cache-teacher", "--config", str(config), "--teacher", str(tiny_teacher), "--device", "cpu",
            "--storage-option", f"endpoint_url={server.url}"]
    code, _, err = run_main(monkeypatch, capsys, "--quiet", *args, "--cache", f"s3://{name}/one.zarr")
    assert code == 0, err
    # Two processes that share no folder: each works in an empty one of its own, and only the bucket joins them.
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "cli", "--quiet", *args, "--cache", f"s3://{name}/two.zarr"]
    env = {**os.environ, **CREDENTIALS, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(work.iterdir()) == []
    two = objects(fs, f"{name}/two.zarr")
    assert two == objects(fs, f"{name}/one.zarr")
    assert json.loads(two["zarr.json"])["attributes"]["complete"] is True
    assert not fs.exists(f"{name}/two.zarr.lease")


class CutsTheNetwork(nn.Module):
    """The teacher, which stops the S3 server when it reaches its nth batch (and starts it again
    ``after`` seconds later, unless None): the shards written meanwhile meet a dead endpoint."""

    def __init__(self, model: nn.Module, server: Server, nth: int, after: float | None):
        super().__init__()
        self.model, self.server, self.nth, self.after, self.batches = model, server, nth, after, 0
        self.feature_channels = model.feature_channels

    def forward(self, x):
        self.batches += 1
        if self.batches == self.nth:
            self.server.stop()
            if self.after is not None:
                threading.Timer(self.after, self.server.start).start()
        return self.model(x)


def cache(teacher, url: str, server: Server, **options):
    dataset = build_dataset("synthetic", None, "train", size=[32, 40], length=6)
    info = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125, "weights_sha256": "0" * 64}
    return cache_teacher(teacher, info, dataset, url, batch_size=2, feature_pool=2, shard_images=2, workers=0,
                         progress=False, storage_options={"endpoint_url": server.url, **options})


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("pspnet_resnet18", 8, width=0.125).eval()


def test_a_short_outage_is_ridden_out_by_the_retries(s3, teacher, caplog):
    server, fs, name = s3
    cache(teacher, f"s3://{name}/reference.zarr", server)
    with caplog.at_level(logging.DEBUG, logger="botocore.retries.standard"):
        cache(CutsTheNetwork(teacher, server, nth=2, after=0.5), f"s3://{name}/s.zarr", server)
    assert any("Retry needed" in record.getMessage() for record in caplog.records), "no request met the outage"
    assert objects(fs, f"{name}/s.zarr") == objects(fs, f"{name}/reference.zarr")


def test_a_long_outage_stops_the_run_naming_the_store_and_images_and_it_resumes(s3, teacher):
    server, fs, name = s3
    cache(teacher, f"s3://{name}/reference.zarr", server)
    url = f"s3://{name}/s.zarr"
    few_retries = {"config_kwargs": {"retries": {"max_attempts": 2}}}  # gives up in a second or two
    start = time.monotonic()
    with pytest.raises(SkdError, match=rf"writing images \d-\d to {url} failed after retries: "
                                       r"EndpointConnectionError.*re-run the same command to resume"):
        cache(CutsTheNetwork(teacher, server, nth=2, after=None), url, server, **few_retries)
    assert time.monotonic() - start < 30
    server.start()
    done = json.loads(fs.cat_file(f"{name}/s.zarr/zarr.json"))["attributes"]
    assert done["complete"] is False  # readers refuse it
    # The run could not release its lease while the server was down; it expires as 10 minutes pass.
    lease = json.loads(fs.cat_file(f"{name}/s.zarr.lease"))
    fs.pipe_file(f"{name}/s.zarr.lease", json.dumps({**lease, "expires": time.time() - 1}).encode())
    cache(teacher, url, server)
    assert objects(fs, f"{name}/s.zarr") == objects(fs, f"{name}/reference.zarr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
