"""Store format 2: checksums that name the damaged image, whole-shard writers, stores without
features, and an --overwrite that a kill cannot leave without a usable store."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.lifecycle import recover_swap
from pipeline.cache.store import TeacherStore
from pipeline.cache.verify import verify_store
from pipeline.cache.writer import cache_teacher
from pipeline.config import Config, merge
from pipeline.data import build_dataset
from pipeline.errors import SkdError
from pipeline.evaluate import evaluate_cache
from pipeline.models import build_model
from pipeline.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"size": [32, 48], "length": 6}
ARCH = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125}


def write_store(path: Path, seed: int = 0, **kwargs) -> Path:
    torch.manual_seed(seed)
    teacher = build_model(**ARCH)
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    return cache_teacher(teacher, {**ARCH, "weights_sha256": str(seed) * 64}, dataset, path, batch_size=4,
                         feature_pool=2, workers=0, progress=False, **kwargs)


def flip_a_byte_of_chunk(shard_file: Path, chunk: int) -> None:
    """Corrupt inner chunk ``chunk`` of a shard (its index, at the end of the file, lists
    (offset, length) per chunk as little-endian uint64, then a crc32c of the index)."""
    data = bytearray(shard_file.read_bytes())
    index_at = len(data) - 4 - 16 * 6  # 6 images in the shard, a 4-byte checksum after the index
    offset, length = struct.unpack_from("<QQ", data, index_at + 16 * chunk)
    data[offset + length // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))


def test_a_flipped_byte_is_reported_with_its_image_by_verify_and_by_training(tmp_path):
    store = write_store(tmp_path / "s.zarr")
    assert verify_store(TeacherStore(store), progress=False) == []
    flip_a_byte_of_chunk(store / "log_probs" / "c" / "0" / "0" / "0" / "0", chunk=2)

    problems = verify_store(TeacherStore(store), progress=False)
    assert len(problems) == 1 and "log_probs of image 'synthetic/train/000002' (#2)" in problems[0]
    result = subprocess.run([sys.executable, "-m", "cli", "cache-verify", str(store)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "#2" in result.stderr and "1 problem" in result.stderr

    # Training reads image 2 in its first batch (whole images, batch 6): it stops naming it, writes no checkpoint.
    out = tmp_path / "run"
    cfg = merge(Config(), {"data": {"dataset": "synthetic", "options": OPTIONS, "workers": 0},
                           "model": {"name": "pspnet_resnet18", "width": 0.125},
                           "train": {"iterations": 2, "batch_size": 6, "device": "cpu", "out": str(out)},
                           "distill": {"losses": ["pi"], "cache": str(store)}})
    with pytest.raises(SkdError, match=r"log_probs of image 'synthetic/train/000002' \(#2\) cannot be read"):
        Trainer(cfg, progress=False).fit()
    assert not (out / "last.pt").exists() and not (out / "model.pt").exists()


def test_a_damaged_position_scale_names_its_image_and_the_others_still_read(tmp_path):
    """Position scales are read whole when small; a damaged chunk falls back to reads per image,
    which name the image, and the other images still decode."""
    store = write_store(tmp_path / "s.zarr")
    reader = TeacherStore(store)
    window = (slice(0, 4), slice(0, 6))
    before = [reader.read_features(i, window) for i in (1, 3)]
    flip_a_byte_of_chunk(store / "feature_position_scale" / "c" / "0" / "0" / "0", chunk=3)
    reader = TeacherStore(store)
    np.testing.assert_array_equal(reader.read_features(1, window), before[0])
    with pytest.raises(SkdError, match=r"feature_position_scale of image 'synthetic/train/000003' \(#3\) cannot be read"):
        reader.read_features(3, window)


def test_each_shard_file_is_written_once(tmp_path, monkeypatch):
    written = Counter()
    set_ = zarr.storage.LocalStore.set

    async def counting_set(self, key, value):
        written[key] += 1
        return await set_(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    write_store(tmp_path / "s.zarr", shard_images=2)  # 6 images: three shards per array
    chunks = {key: count for key, count in written.items() if "/c/" in key}
    assert chunks and max(chunks.values()) == 1, [key for key, count in chunks.items() if count > 1]
    assert sum(key.startswith("log_probs/c/") for key in chunks) == 3
    assert sum(key.startswith("done/c/") for key in chunks) == 3  # one flag chunk per shard


def test_a_store_without_features_evaluates_and_refuses_pairwise(tmp_path):
    store = write_store(tmp_path / "s.zarr", features=False)
    group = zarr.open_group(str(store), mode="r")
    assert "features" not in group.array_keys() and group.attrs["features"] is False
    reader = TeacherStore(store)
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    assert 0 <= evaluate_cache(reader, dataset, progress=False).miou() <= 1

    def config(losses):
        return merge(Config(), {"data": {"dataset": "synthetic", "options": OPTIONS, "workers": 0},
                                "model": {"name": "pspnet_resnet18", "width": 0.125},
                                "train": {"iterations": 1, "batch_size": 2, "device": "cpu", "out": str(tmp_path / "r")},
                                "distill": {"losses": losses, "cache": str(store)}})

    with pytest.raises(SkdError, match="no teacher features.*--no-features"):
        Trainer(config(["pi", "pa"]), progress=False)
    trainer = Trainer(config(["pi", "ho"]), progress=False)
    assert all(np.isfinite(v) for v in trainer.step(next(trainer.batches())).values())


@pytest.mark.parametrize("new_store_complete", [True, False])
def test_an_overwrite_killed_between_the_renames_leaves_a_usable_store(tmp_path, new_store_complete):
    out = tmp_path / "s.zarr"
    write_store(out, seed=0)
    new = write_store(tmp_path / "new.zarr", seed=1)
    # The state a kill leaves between finalize's two renames: the old store moved aside, the new
    # one still at .partial (complete, or not when the kill came before it was marked so).
    out.rename(tmp_path / "s.zarr.old")
    new.rename(tmp_path / "s.zarr.partial")
    if not new_store_complete:
        zarr.open_group(str(tmp_path / "s.zarr.partial"), mode="r+").attrs["complete"] = False
    with pytest.raises(SkdError, match="interrupted --overwrite"):
        TeacherStore(out)

    recover_swap(out)  # what the next cache-teacher run does first
    store = TeacherStore(out)
    assert store.complete and not (tmp_path / "s.zarr.old").exists()
    assert store.attrs["teacher"]["weights_sha256"] == ("1" if new_store_complete else "0") * 64
    assert verify_store(store, progress=False) == []
    shutil.rmtree(out)


def test_dask_statistics_equal_a_numpy_loop(tmp_path):
    from pipeline.cache.stats import store_stats

    store = TeacherStore(write_store(tmp_path / "s.zarr", shard_images=4))
    stats = store_stats(store, entropy_bins=5)
    counts, top, entropies = np.zeros(8), [], []
    for i in range(len(store)):  # one image at a time, no dask
        log_probs = store.read_log_probs(i).astype(np.float64)
        probs = np.exp(log_probs)
        counts += np.bincount(log_probs.argmax(0).ravel(), minlength=8)
        top.append(probs.max(0).ravel())
        entropies.append(-(probs * log_probs).sum(0).ravel())
    pixels = counts.sum()
    assert stats["pixels"] == pixels == 6 * 4 * 6
    np.testing.assert_allclose(stats["argmax_frequency"], counts / pixels, rtol=1e-12)
    assert stats["mean_top_probability"] == pytest.approx(np.concatenate(top).mean(), rel=1e-6)
    hist, _ = np.histogram(np.concatenate(entropies), bins=5, range=(0, np.log(8)))
    np.testing.assert_allclose(stats["entropy_histogram"]["fraction"], hist / pixels, atol=1e-12)
    assert stats["arrays"]["log_probs"]["nonfinite"] == 0 and 0 < stats["arrays"]["log_probs"]["ratio"] < 1


def test_a_packed_store_reads_in_place_like_the_directory(tmp_path):
    store = write_store(tmp_path / "s.zarr")
    result = subprocess.run([sys.executable, "-m", "cli", "cache-pack", str(store), str(tmp_path / "s.zip")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    packed, directory = TeacherStore(tmp_path / "s.zip"), TeacherStore(store)
    assert verify_store(packed, progress=False) == []
    for i in range(len(directory)):
        np.testing.assert_array_equal(packed.read_log_probs(i), directory.read_log_probs(i))
    assert not (tmp_path / "s.zip.tmp").exists()
