"""Stores on object storage, against a real S3-protocol server on 127.0.0.1 (moto's server, started
here): written straight to the bucket, resumed, replaced, one writer at a time."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("s3fs", reason="object storage needs s3fs: pip install 'skd[s3]'")
pytest.importorskip("moto.server", reason="the S3 test server is moto's: pip install 'moto[server]'")

from pipeline.cache.lock import ObjectLease  # noqa: E402
from pipeline.cache.store import TeacherStore  # noqa: E402
from pipeline.cache.writer import cache_teacher  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.errors import SkdError  # noqa: E402
from pipeline.models import build_model  # noqa: E402

OPTIONS = {"size": [32, 40], "length": 6}
INFO = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125, "weights_sha256": "0" * 64}


@pytest.fixture
def bucket(endpoint, request):
    import s3fs

    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    fs.call_s3("create_bucket", Bucket=name)
    return fs, name, options


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("pspnet_resnet18", 8, width=0.125).eval()


class StopsAtBatch(nn.Module):
    def __init__(self, model: nn.Module, stop_at: int):
        super().__init__()
        self.model, self.stop_at, self.batches = model, stop_at, 0
        self.feature_channels = model.feature_channels

    def forward(self, x):
        self.batches += 1
        if self.batches == self.stop_at:
            raise KeyboardInterrupt
        return self.model(x)


def cache(teacher, out, options=None, **kwargs):
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    settings = {"batch_size": 2, "feature_pool": 2, "shard_images": 2, "workers": 0, "progress": False} | kwargs
    return cache_teacher(teacher, INFO, dataset, out, storage_options=options, **settings)


def same_maps(a: TeacherStore, b: TeacherStore) -> None:
    assert a.complete and b.complete and len(a) == len(b)
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read_log_probs(i), b.read_log_probs(i))
        np.testing.assert_array_equal(a.read_features(i, (slice(0, 4), slice(0, 5))),
                                      b.read_features(i, (slice(0, 4), slice(0, 5))))


def test_a_store_is_written_to_the_bucket_and_reads_back_as_the_local_one(bucket, teacher, tmp_path, monkeypatch):
    fs, name, options = bucket
    monkeypatch.chdir(tmp_path)  # a store written to a local folder named "s3:" would land here
    url = f"s3://{name}/team/s.zarr"
    cache(teacher, url, options)
    assert list(tmp_path.iterdir()) == []
    keys = fs.find(f"{name}/team")
    assert f"{name}/team/s.zarr/zarr.json" in keys and any("/log_probs/c/" in key for key in keys)
    assert not any(key.endswith(".lease") for key in keys)  # released at the end
    local = cache(teacher, tmp_path / "local.zarr")
    same_maps(TeacherStore(url, options), TeacherStore(local))


def test_an_interrupted_write_resumes_in_place_to_the_same_store(bucket, teacher, tmp_path):
    fs, name, options = bucket
    url = f"s3://{name}/s.zarr"
    with pytest.raises(KeyboardInterrupt):
        cache(StopsAtBatch(teacher, stop_at=3), url, options)
    with pytest.raises(SkdError, match="incomplete"):
        TeacherStore(url, options).check_matches(build_dataset("synthetic", None, "train", **OPTIONS))
    assert TeacherStore(url, options).done_count() == 4  # two shards of two images were written
    cache(teacher, url, options)
    same_maps(TeacherStore(url, options), TeacherStore(cache(teacher, tmp_path / "ref.zarr")))


def test_an_overwrite_keeps_the_old_store_readable_until_the_new_one_is_complete(bucket, teacher, tmp_path):
    fs, name, options = bucket
    url = f"s3://{name}/s.zarr"
    cache(teacher, url, options, feature_pool=2)
    with pytest.raises(SkdError, match="already exists"):
        cache(teacher, url, options, feature_pool=1)
    with pytest.raises(KeyboardInterrupt):
        cache(StopsAtBatch(teacher, stop_at=3), url, options, feature_pool=1, overwrite=True)
    old = TeacherStore(url, options)
    assert old.complete and old.feature_pool == 2
    cache(teacher, url, options, feature_pool=1, overwrite=True)
    new = TeacherStore(url, options)
    assert new.feature_pool == 1
    same_maps(new, TeacherStore(cache(teacher, tmp_path / "ref.zarr", feature_pool=1)))
    assert not fs.exists(f"{name}/s.zarr.partial")


def test_one_writer_at_a_time_and_a_stale_lease_expires(bucket):
    fs, name, _ = bucket
    key = f"{name}/s.zarr.lease"
    with ObjectLease(fs, key, "s3://store"):
        with pytest.raises(SkdError, match=r"being written by pid \d+ on .* \(its lease holds until"):
            ObjectLease(fs, key, "s3://store").__enter__()
    assert not fs.exists(key)
    # A writer that died: its lease expired a second ago and nobody renews it.
    fs.pipe_file(key, json.dumps({"holder": "pid 1 on elsewhere", "expires": time.time() - 1}).encode())
    with ObjectLease(fs, key, "s3://store") as lease:
        assert json.loads(fs.cat_file(key))["holder"] == lease.holder


def test_the_command_line_writes_to_and_verifies_a_bucket(bucket, tmp_path, monkeypatch):
    import sys

    import cli
    from pipeline.models import build_model
    from pipeline.train.checkpoint import save_checkpoint

    fs, name, options = bucket
    torch.manual_seed(0)
    arch = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125}
    save_checkpoint(tmp_path / "t.pt", {"arch": arch, "model": build_model(**arch).state_dict()})
    # Credentials from the environment (the standard chain); the endpoint as a storage option, or
    # from the environment for the commands that only read.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.chdir(tmp_path)
    url = f"s3://{name}/cli.zarr"

    def skd(*args):
        monkeypatch.setattr(sys, "argv", ["skd", "--quiet", *args])
        try:
            cli.main()
        except SystemExit as exc:
            if exc.code:
                pytest.fail(f"skd {' '.join(args)} exited with {exc.code}")

    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"data": {"dataset": "synthetic", "options": OPTIONS}}))  # JSON is YAML
    skd("cache-teacher", "--config", str(config), "--teacher", str(tmp_path / "t.pt"), "--cache", url,
        "--workers", "0", "--device", "cpu", "--storage-option", f"endpoint_url={options['endpoint_url']}")
    assert fs.exists(f"{name}/cli.zarr/zarr.json") and not (tmp_path / "s3:").exists()
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    skd("cache-verify", url)


def test_cache_list_catalogues_the_stores_under_a_prefix(bucket, teacher):
    from pipeline.cache.catalogue import list_stores

    fs, name, options = bucket
    cache(teacher, f"s3://{name}/team/a.zarr", options)
    cache(teacher, f"s3://{name}/team/sub/b.zarr", options, levels=(1.0, 2.0))
    fs.pipe_file(f"{name}/team/notes.txt", b"not a store")
    rows = list_stores(f"s3://{name}/team", options)
    assert [row["store"] for row in rows] == [f"s3://{name}/team/a.zarr", f"s3://{name}/team/sub/b.zarr"]
    assert [row["levels"] for row in rows] == [[1.0], [1.0, 2.0]]
    assert all(row["complete"] and row["images"] == OPTIONS["length"] and row["dataset"] == "synthetic/train"
               and row["weights_sha256"] == "0" * 64 and row["bytes"] > 0 for row in rows)
