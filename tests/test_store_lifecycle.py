"""A store's life cycle: an interrupted replacement resumes, a finished zip is left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.cache.store import TeacherStore
from pipeline.cache.writer import cache_teacher
from pipeline.data import build_dataset
from pipeline.errors import SkdError
from pipeline.models import build_model

OPTIONS = {"size": [32, 40], "length": 6}


class CountingTeacher(nn.Module):
    """The teacher, counting the images it runs on; raises KeyboardInterrupt at batch ``stop_at``."""

    def __init__(self, model: nn.Module, stop_at: int | None = None):
        super().__init__()
        self.model, self.stop_at, self.images, self.batches = model, stop_at, 0, 0
        self.feature_channels = model.feature_channels

    def forward(self, x):
        self.batches += 1
        if self.batches == self.stop_at:
            raise KeyboardInterrupt
        self.images += len(x)
        return self.model(x)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return build_model("pspnet_resnet18", 8, width=0.125).eval()


def cache(teacher, out, feature_pool=2, **kwargs):
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    info = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125, "weights_sha256": "0" * 64}
    return cache_teacher(teacher, info, dataset, out, batch_size=2, feature_pool=feature_pool, shard_images=2,
                         workers=0, progress=False, **kwargs)


def test_an_interrupted_overwrite_resumes_and_keeps_the_old_store_until_done(tmp_path, teacher):
    out = tmp_path / "s.zarr"
    cache(teacher, out, feature_pool=2)
    interrupted = CountingTeacher(teacher, stop_at=3)  # after two shards of two images
    with pytest.raises(KeyboardInterrupt):
        cache(interrupted, out, feature_pool=1, overwrite=True)
    assert TeacherStore(out).feature_pool == 2  # the old store is still whole and in place
    with pytest.raises(SkdError, match="pass --overwrite again to resume it"):
        cache(teacher, out, feature_pool=1)
    resumed = CountingTeacher(teacher)
    cache(resumed, out, feature_pool=1, overwrite=True)
    assert resumed.images == 2  # only the last shard was left
    store, reference = TeacherStore(out), TeacherStore(cache(teacher, tmp_path / "ref.zarr", feature_pool=1))
    assert store.feature_pool == 1 and store.complete
    for i in range(len(store)):
        np.testing.assert_array_equal(store.read_log_probs(i), reference.read_log_probs(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.zarr", "s.zarr"]


def test_a_finished_zip_store_is_left_as_it_is_on_a_rerun(tmp_path, teacher):
    out = tmp_path / "s.zip"
    cache(teacher, out)
    before = out.stat().st_mtime_ns
    again = CountingTeacher(teacher)
    assert cache(again, out) == out
    assert again.images == 0 and out.stat().st_mtime_ns == before
    with pytest.raises(SkdError, match="already exists"):
        cache(teacher, out, feature_pool=1)
    replaced = cache(teacher, out, feature_pool=1, overwrite=True)
    assert TeacherStore(replaced).feature_pool == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zip"]
