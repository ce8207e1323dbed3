"""Reading a store on object storage through the local read cache, against a real S3-protocol
server on 127.0.0.1 (moto's, with every request it answers recorded): training from the bucket
equals training from a local copy, a second run reads no chunk from the bucket, the size cap
evicts the least recently used objects, a damaged cached object is read again, a store replaced
at the same URL is never served from the old one's objects."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs", reason="object storage needs s3fs: pip install 'skd[s3]'")
pytest.importorskip("moto.server", reason="the S3 test server is moto's: pip install 'moto[server]'")

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from conftest import run_main  # noqa: E402
from pipeline.cache.readcache import MARKER, ReadCache, evict, parse_size  # noqa: E402
from pipeline.cache.store import TeacherStore  # noqa: E402
from pipeline.cache.writer import cache_teacher  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.errors import SkdError  # noqa: E402
from pipeline.models import build_model  # noqa: E402

OPTIONS = {"size": [32, 40], "length": 6}
INFO = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125, "weights_sha256": "0" * 64}


class Recorder:
    """WSGI middleware: every request's (method, path), in order."""

    def __init__(self, app):
        self.app, self.requests, self.lock = app, [], threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def server():
    """moto's S3 application served on a free port of 127.0.0.1 (as ThreadedMotoServer does), with a
    recorder around it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recorder = Recorder(DomainDispatcherApplication(create_backend_app))
    httpd = make_server("127.0.0.1", port, recorder, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", recorder
    httpd.shutdown()
    thread.join()


@pytest.fixture
def bucket(server, request):
    import s3fs

    endpoint, recorder = server
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    name = "rc-" + request.node.name.replace("_", "-")[:40].strip("-").lower()
    fs.call_s3("create_bucket", Bucket=name)
    return fs, name, options, recorder


def write_store(url: str, options: dict, seed: int = 0, sha: str = "0" * 64) -> None:
    torch.manual_seed(seed)
    teacher = build_model("pspnet_resnet18", 8, width=0.125).eval()
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    cache_teacher(teacher, {**INFO, "weights_sha256": sha}, dataset, url, storage_options=options, batch_size=2,
                  feature_pool=2, shard_images=2, workers=0, progress=False)


def all_maps(store: TeacherStore) -> list[np.ndarray]:
    return [store.read_log_probs(i) for i in range(len(store))] + \
           [store.read_features(i, (slice(0, 4), slice(0, 5))) for i in range(len(store))]


def cached_objects(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def test_sizes_parse_in_powers_of_1024():
    assert parse_size("500M") == 500 * 2**20
    assert parse_size("1.5G") == 3 * 2**29
    assert parse_size("2TiB") == 2 * 2**40
    assert parse_size(4096) == 4096
    with pytest.raises(SkdError, match=r"--cache-dir-size \(storage.cache_dir_size\) '20X': expected a size"):
        parse_size("20X")


def test_training_from_the_bucket_through_the_cache_equals_training_from_a_local_copy(bucket, tmp_path, monkeypatch,
                                                                                      capsys):
    fs, name, options, recorder = bucket
    url = f"s3://{name}/team/s.zarr"
    write_store(url, options)
    fs.get(f"{name}/team/s.zarr", str(tmp_path / "local.zarr"), recursive=True)
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"data": {"dataset": "synthetic", "options": OPTIONS, "workers": 1},
                                  "model": {"name": "pspnet_resnet18", "width": 0.125},
                                  "train": {"iterations": 3, "batch_size": 2, "log_every": 1, "device": "cpu"}}))
    store_options = ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option", "key=testing",
                     "--storage-option", "secret=testing", "--storage-option", "client_kwargs.region_name=us-east-1"]

    def train(out: str, cache: str, *extra: str) -> dict[str, torch.Tensor]:
        code, _, err = run_main(monkeypatch, capsys, "--quiet", "train-student", "--config", str(config),
                                "--cache", cache, "--losses", "pi,pa", "--out", str(tmp_path / out), *extra)
        assert code == 0, err
        return torch.load(tmp_path / out / "model.pt", weights_only=True)["model"]

    local = train("local", str(tmp_path / "local.zarr"))
    cache_dir = tmp_path / "read-cache"
    first = train("first", url, *store_options, "--cache-dir", str(cache_dir))
    assert local.keys() == first.keys() and all(torch.equal(local[k], first[k]) for k in local)
    assert len(cached_objects(cache_dir)) > 0
    # The config records how the store was reached, without the credentials.
    recorded = json.loads((tmp_path / "first" / "config.json").read_text())["storage"]
    assert recorded["options"]["key"] == recorded["options"]["secret"] == "<redacted>"
    assert recorded["cache_dir"] == str(cache_dir)

    # A second run (the cache folder from the environment) reads every chunk from local disk: the
    # bucket only answers for the store's root metadata (read afresh on every open) and listings.
    monkeypatch.setenv("SKD_CACHE_DIR", str(cache_dir))
    before = len(recorder.requests)
    second = train("second", url, *store_options)
    assert all(torch.equal(local[k], second[k]) for k in local)
    requests = recorder.requests[before:]
    objects = [path for method, path in requests if method == "GET" and "/s.zarr/" in path]
    assert objects and all(path.endswith("/s.zarr/zarr.json") for path in objects), objects


def test_the_size_cap_evicts_the_least_recently_used_objects(bucket, tmp_path):
    fs, name, options, _ = bucket
    url = f"s3://{name}/s.zarr"
    write_store(url, options)
    sizes = {key: fs.info(key)["size"] for key in fs.find(f"{name}/s.zarr") if "/log_probs/c/" in key}
    cap = 2 * max(sizes.values()) + 1  # room for two log_probs shards, not three
    store = TeacherStore(url, options, ReadCache(tmp_path / "rc", cap))
    reference = TeacherStore(url, options)
    for i in range(len(store)):  # three shards of two images
        np.testing.assert_array_equal(store.read_log_probs(i), reference.read_log_probs(i))
    held = sum(p.stat().st_size for p in cached_objects(tmp_path / "rc"))
    assert held <= cap
    folder = next((tmp_path / "rc").iterdir())
    shards = [p.relative_to(folder).as_posix() for p in cached_objects(folder) if p.parts[-6] == "log_probs"]
    assert "log_probs/c/2/0/0/0" in shards and "log_probs/c/0/0/0/0" not in shards  # the last read stays, the first went

    # evict() on its own: the oldest last use goes first, down to 90 % of the cap.
    folder = tmp_path / "lru" / "store"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    for age, name_ in enumerate(["new", "mid", "old"]):
        (folder / name_).write_bytes(b"x" * 100)
        os.utime(folder / name_, (time.time() - 100 * age,) * 2)
    assert evict(ReadCache(tmp_path / "lru", 250)) == 200
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "mid", "new"])
    assert evict(ReadCache(tmp_path / "lru", 250)) == 200  # under the cap: nothing more goes


def test_a_damaged_cached_object_is_read_again_and_a_damaged_store_names_the_image(bucket, tmp_path):
    fs, name, options, _ = bucket
    url = f"s3://{name}/s.zarr"
    write_store(url, options)
    reference = all_maps(TeacherStore(url, options))
    cache = ReadCache(tmp_path / "rc", 2**30)
    all_maps(TeacherStore(url, options, cache))
    shard = next(p for p in cached_objects(tmp_path / "rc") if p.parts[-6:] == ("log_probs", "c", "1", "0", "0", "0"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    got = all_maps(TeacherStore(url, options, cache))  # images 2 and 3 read from the bucket again
    assert all(np.array_equal(a, b) for a, b in zip(got, reference))
    assert shard.read_bytes() == fs.cat_file(f"{name}/s.zarr/log_probs/c/1/0/0/0")  # the cached copy is whole again

    # The bucket's own object damaged: the read names the image, through a cache that fetches it
    # (and drops it, and fetches it again) or without one.
    key = f"{name}/s.zarr/log_probs/c/1/0/0/0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    for store in (TeacherStore(url, options, ReadCache(tmp_path / "fresh", 2**30)), TeacherStore(url, options)):
        store.read_log_probs(0)  # another shard reads
        with pytest.raises(SkdError, match=r"log_probs of image '.*' \(#2\) cannot be read"):
            store.read_log_probs(2)


def test_a_store_replaced_at_the_same_url_is_not_served_from_the_old_ones_objects(bucket, tmp_path):
    fs, name, options, _ = bucket
    url = f"s3://{name}/s.zarr"
    write_store(url, options, seed=0)
    cache = ReadCache(tmp_path / "rc", 2**30)
    old = all_maps(TeacherStore(url, options, cache))
    # Another teacher, the same layout: every object has the same key as before.
    torch.manual_seed(1)
    teacher = build_model("pspnet_resnet18", 8, width=0.125).eval()
    cache_teacher(teacher, {**INFO, "weights_sha256": "1" * 64}, build_dataset("synthetic", None, "train", **OPTIONS),
                  url, storage_options=options, batch_size=2, feature_pool=2, shard_images=2, workers=0,
                  progress=False, overwrite=True)
    new = all_maps(TeacherStore(url, options))
    assert not np.array_equal(old[0], new[0])
    got = all_maps(TeacherStore(url, options, cache))
    assert all(np.array_equal(a, b) for a, b in zip(got, new))
