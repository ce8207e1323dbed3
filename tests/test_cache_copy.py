"""skd cache-copy between a directory, a zip and a bucket, against a real S3-protocol server on
127.0.0.1 (moto's server, started here); a damaged object found by cache-verify on the bucket; an
unreachable endpoint refused at once by the commands that write or list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import run_main

pytest.importorskip("s3fs", reason="object storage needs s3fs: pip install 'skd[s3]'")
pytest.importorskip("moto.server", reason="the S3 test server is moto's: pip install 'moto[server]'")

from pipeline.cache.copy import copy_store  # noqa: E402
from pipeline.cache.store import TeacherStore  # noqa: E402
from pipeline.cache.writer import cache_teacher  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.errors import SkdError  # noqa: E402
from pipeline.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"size": [32, 40], "length": 6}
INFO = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125, "weights_sha256": "0" * 64}
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


@pytest.fixture
def bucket(endpoint, request, monkeypatch):
    """A new bucket; credentials in the environment (the standard chain), the endpoint as an option."""
    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    options = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    fs.call_s3("create_bucket", Bucket=name)
    return fs, name, options


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Two small local stores of one teacher on the same data, with different settings (pooling)."""
    tmp = tmp_path_factory.mktemp("copy")
    torch.manual_seed(0)
    teacher = build_model("pspnet_resnet18", 8, width=0.125).eval()
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    settings = {"batch_size": 2, "shard_images": 2, "workers": 0, "progress": False}
    for name, pool in (("a", 2), ("b", 1)):
        cache_teacher(teacher, INFO, dataset, tmp / f"{name}.zarr", feature_pool=pool, **settings)
    return {"a": tmp / "a.zarr", "b": tmp / "b.zarr"}


def objects(location: str | Path, fs=None) -> dict[str, bytes]:
    """Every object of a store, read without skd: a directory's files, a zip's entries, a bucket's objects."""
    location = str(location)
    if location.startswith("s3://"):
        root = location[len("s3://"):]
        fs.invalidate_cache(root)
        return {key[len(root) + 1:]: fs.cat_file(key) for key in fs.find(root)}
    if location.endswith(".zip"):
        with zipfile.ZipFile(location) as zf:
            return {name: zf.read(name) for name in zf.namelist()}
    return {f.relative_to(location).as_posix(): f.read_bytes() for f in Path(location).rglob("*") if f.is_file()}


def skd(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return run_main(monkeypatch, capsys, "--quiet", *args)


def test_a_store_copied_to_a_bucket_and_on_to_a_zip_is_the_original_bit_for_bit(stores, bucket, tmp_path,
                                                                                 monkeypatch, capsys):
    fs, name, options = bucket
    monkeypatch.chdir(tmp_path)  # a copy written to a local folder named "s3:" would land here
    url, packed = f"s3://{name}/team/a.zarr", tmp_path / "a.zip"
    option = ("--storage-option", f"endpoint_url={options['endpoint_url']}")
    code, out, err = skd(monkeypatch, capsys, "cache-copy", str(stores["a"]), url, *option)
    assert code == 0, err
    assert "every chunk verified" in out
    assert list(tmp_path.iterdir()) == []
    original = objects(stores["a"])
    assert objects(url, fs) == original
    code, out, err = skd(monkeypatch, capsys, "cache-copy", url, str(packed), *option)
    assert code == 0, err
    assert objects(packed) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]  # no partial copy or lock left beside it
    # Read back through zarr: every array's values and attributes, and the group's attributes.
    zip_store = zarr.storage.ZipStore(packed, mode="r")
    try:
        got, want = zarr.open_group(zip_store, mode="r"), zarr.open_group(str(stores["a"]), mode="r")
        assert dict(got.attrs) == dict(want.attrs) and got.attrs["complete"] is True
        assert sorted(got.array_keys()) == sorted(want.array_keys())
        for key in want.array_keys():
            assert dict(got[key].attrs) == dict(want[key].attrs)
            np.testing.assert_array_equal(got[key][:], want[key][:], err_msg=key)
    finally:
        zip_store.close()
    # Copying again finds the same store in place and writes nothing.
    stamp = fs.info(f"{name}/team/a.zarr/zarr.json")["LastModified"]
    code, out, _ = skd(monkeypatch, capsys, "cache-copy", str(stores["a"]), url, *option)
    assert code == 0 and "already holds this store" in out
    assert fs.info(f"{name}/team/a.zarr/zarr.json", refresh=True)["LastModified"] == stamp


def test_a_different_store_at_the_destination_is_refused(stores, bucket, tmp_path, monkeypatch, capsys):
    fs, name, options = bucket
    url = f"s3://{name}/a.zarr"
    copy_store(stores["a"], url, options, progress=False)
    before = objects(url, fs)
    code, out, err = skd(monkeypatch, capsys, "cache-copy", str(stores["b"]), url, "--storage-option",
                         f"endpoint_url={options['endpoint_url']}")
    assert code != 0
    assert len(err.strip().splitlines()) == 1
    assert str(stores["b"]) in err and url in err and "different store (another feature_pool)" in err
    assert objects(url, fs) == before
    # A local destination too, and a folder that is not a store at all.
    local = tmp_path / "a.zarr"
    shutil.copytree(stores["a"], local)
    with pytest.raises(SkdError, match="holds a different store"):
        copy_store(stores["b"], local, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a store")
    with pytest.raises(SkdError, match="exists and is not a teacher store"):
        copy_store(stores["a"], tmp_path / "notes", progress=False)


def test_an_incomplete_source_is_refused(stores, tmp_path):
    partial = tmp_path / "p.zarr"
    shutil.copytree(stores["a"], partial)
    zarr.open_group(str(partial), mode="r+")["done"][4:] = False  # as a run stopped before the last shard
    zarr.open_group(str(partial), mode="r+").attrs["complete"] = False
    with pytest.raises(SkdError, match=r"p.zarr is incomplete \(4/6 images flagged done\)"):
        copy_store(partial, tmp_path / "out.zarr", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


def _killed_copy(src: Path, dst: str, nth: int, endpoint: str | None = None) -> None:
    """``skd cache-copy SRC DST`` in its own process, killed (SIGKILL) at the nth object written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SKD_FAULT": f"copy-object:{nth}"}
    args = [sys.executable, "-m", "cli", "--quiet", "cache-copy", str(src), dst, "--threads", "1"]
    if endpoint:
        args += ["--storage-option", f"endpoint_url={endpoint}"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr[-2000:]


def test_a_killed_copy_to_a_bucket_resumes_and_copies_only_what_is_missing(stores, bucket):
    fs, name, options = bucket
    url = f"s3://{name}/a.zarr"
    total = len(objects(stores["a"]))
    _killed_copy(stores["a"], url, total // 2, options["endpoint_url"])
    # What a reader finds: a store that says it is incomplete.
    assert 0 < len(objects(url, fs)) < total
    assert not TeacherStore(url, options).complete
    # The killed copy's lease is still there; let it expire, as it does 10 minutes after a writer dies.
    lease = json.loads(fs.cat_file(f"{name}/a.zarr.lease"))
    fs.pipe_file(f"{name}/a.zarr.lease", json.dumps({**lease, "expires": time.time() - 1}).encode())
    report = copy_store(stores["a"], url, options, progress=False)
    assert report.kept == total // 2 - 1  # every object written before the kill, but the root's metadata
    assert report.copied == total - 1 - report.kept
    assert objects(url, fs) == objects(stores["a"])


def test_a_copy_killed_inside_a_file_leaves_no_store_and_resumes(stores, tmp_path):
    dst = tmp_path / "a.zarr"
    _killed_copy(stores["a"], str(dst), 6)
    partial = tmp_path / "a.zarr.partial"
    assert not dst.exists() and len(list(partial.rglob("*.copying"))) == 1  # killed before its rename
    report = copy_store(stores["a"], dst, progress=False)
    assert report.kept == 4  # the four whole objects written after the root's metadata
    assert objects(dst) == objects(stores["a"]) and not partial.exists()


def test_cache_verify_on_a_bucket_names_the_image_of_a_flipped_byte(stores, bucket, tmp_path, monkeypatch, capsys):
    fs, name, options = bucket
    url = f"s3://{name}/a.zarr"
    copy_store(stores["a"], url, options, progress=False)
    key = f"{name}/a.zarr/log_probs/c/1/0/0/0"  # the shard of images #2 and #3
    data = bytearray(fs.cat_file(key))
    data[len(data) // 4] ^= 0x01  # one bit, inside the first image's chunk
    fs.pipe_file(key, bytes(data))
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    code, _, err = skd(monkeypatch, capsys, "cache-verify", url)
    assert code != 0
    ids = TeacherStore(stores["a"]).ids
    problems = [line for line in err.splitlines() if line.startswith("problem:")]
    assert problems and all(f"log_probs of image {ids[2]!r} (#2)" in line for line in problems), err
    # A copy of the damaged store stops before it is marked complete, naming the same image.
    with pytest.raises(SkdError, match=r"failed verification .*log_probs of image .* \(#2\)"):
        copy_store(url, tmp_path / "copy.zarr", options, progress=False)
    assert not (tmp_path / "copy.zarr").exists()


@pytest.mark.parametrize("command", ["cache-copy", "cache-list", "cache-teacher"])
def test_an_unreachable_endpoint_gives_one_line_at_once_and_writes_nothing(command, stores, tiny_config, tiny_teacher,
                                                                           tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    url = "s3://team/a.zarr"
    args = {"cache-copy": ["cache-copy", str(stores["a"]), url],
            "cache-list": ["cache-list", "s3://team"],
            "cache-teacher": ["cache-teacher", "--config", str(tiny_config), "--teacher", str(tiny_teacher),
                              "--cache", url, "--device", "cpu"]}[command]
    if command == "cache-list":
        monkeypatch.setenv("AWS_ENDPOINT_URL", UNREACHABLE)  # the endpoint from the environment
    else:
        args += ["--storage-option", f"endpoint_url={UNREACHABLE}"]
    start = time.monotonic()
    code, out, err = skd(monkeypatch, capsys, *args)
    seconds = time.monotonic() - start
    assert code != 0
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: cannot reach s3://team"), err
    assert "127.0.0.1:9" in err  # what could not be reached
    assert seconds < 10, f"{command} took {seconds:.1f} s to give up"
    assert list(work.iterdir()) == []
