"""The bank of stored training views: exact teacher targets under the full training augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.replay import replay_targets
from pipeline.data.samples import TrainingSamples, collate
from pipeline.cache.store import TeacherStore
from pipeline.data.views import view_for_epoch, view_spec
from pipeline.cache.writer import cache_teacher
from pipeline.config import Config, merge
from pipeline.data import build_dataset
from pipeline.data.transforms import AugmentConfig, normalize
from pipeline.errors import SkdError
from pipeline.inference import predict
from pipeline.train.checkpoint import file_sha256, model_from_checkpoint
from pipeline.train.trainer import Trainer

OPTIONS = {"size": [40, 56], "length": 6}
AUGMENT = AugmentConfig(crop_size=(32, 32), scale_range=(0.75, 1.5), flip=True, color_jitter=0.3)
VIEWS = 3


def view_store(tmp_path: Path, teacher_ckpt: Path, name: str = "views.zarr", teacher=None, shard_images: int = 16) -> Path:
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    model, arch = model_from_checkpoint(teacher_ckpt)
    info = {**arch, "checkpoint": teacher_ckpt.name, "weights_sha256": file_sha256(teacher_ckpt)}
    return cache_teacher(teacher or model, info, dataset, tmp_path / name, batch_size=2, feature_pool=1,
                         view_bank=view_spec(AUGMENT, VIEWS), shard_images=shard_images, workers=0, progress=False)


def test_stored_views_are_exactly_what_the_teacher_computes_on_the_training_sample(tmp_path, tiny_teacher):
    """Under crops, scales, flips and colour jitter, the cached targets of every sample equal the
    teacher run on the very image the student gets: the cache is as good as an online teacher."""
    store = TeacherStore(view_store(tmp_path, tiny_teacher))
    teacher, _ = model_from_checkpoint(tiny_teacher)
    dataset = build_dataset("synthetic", None, "train", **OPTIONS)
    samples = TrainingSamples(dataset, AUGMENT, store, use_view_bank=True)
    seen_flips, seen_sizes = set(), set()
    for epoch in range(VIEWS):
        samples.epoch = epoch
        batch = collate([samples[i] for i in range(len(dataset))])
        logits, features = replay_targets(batch, (4, 4))
        online_logits, online_features = predict(teacher.eval(), normalize(batch["image"]))
        # Up to 8-bit storage: the teacher's argmax, a KL at the level of one step (16/255) of
        # log-probability, half a step of each view's feature range.
        log_p, log_q = online_logits.log_softmax(1), logits.log_softmax(1)
        assert (log_p.argmax(1) == log_q.argmax(1)).all()
        assert (log_p.exp() * (log_p - log_q)).sum(1).mean() <= 2e-4
        torch.testing.assert_close(features, online_features, atol=float(online_features.abs().max()) / 255 * 1.01,
                                   rtol=0)
        seen_flips |= set(store.view_crops[:, :, 4].ravel().tolist())
        seen_sizes |= {tuple(row[:2]) for row in store.view_crops.reshape(-1, 5).tolist()}
    assert seen_flips == {0, 1} and len(seen_sizes) > 3  # the bank really holds varied augmentations
    jitter = store.view_jitter.reshape(-1, 3)
    assert (np.abs(jitter - 1) <= 0.3 + 1e-6).all() and (jitter != 1).any()


def test_each_view_is_used_once_before_any_repeats():
    for index in range(5):
        used = [view_for_epoch(4, seed=7, index=index, epoch=e) for e in range(12)]
        for start in (0, 4, 8):
            assert sorted(used[start : start + 4]) == [0, 1, 2, 3]
    # The order differs between images (so one epoch does not use view 0 of every image).
    assert len({tuple(view_for_epoch(4, 7, index, e) for e in range(4)) for index in range(8)}) > 1


def test_an_interrupted_view_bank_resumes_to_the_same_store(tmp_path, tiny_teacher):
    model, _ = model_from_checkpoint(tiny_teacher)

    class StopsOnThirdBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.calls = model, 0
            self.feature_channels = model.feature_channels

        def forward(self, x):
            self.calls += x.shape[-1] == OPTIONS["size"][1]  # whole images, not views
            if self.calls == 3:  # the third batch of two images
                raise KeyboardInterrupt
            return self.model(x)

    with pytest.raises(KeyboardInterrupt):
        view_store(tmp_path, tiny_teacher, teacher=StopsOnThirdBatch(), shard_images=2)
    partial = zarr.open_group(str(tmp_path / "views.zarr.partial"), mode="r")
    assert partial["done"][:].tolist() == [True] * 4 + [False] * 2
    resumed = zarr.open_group(str(view_store(tmp_path, tiny_teacher, shard_images=2)), mode="r")
    reference = zarr.open_group(str(view_store(tmp_path, tiny_teacher, name="reference.zarr", shard_images=2)), mode="r")
    view_arrays = [name for name in reference.array_keys() if name.startswith("view_")]
    assert len(view_arrays) == 7
    for name in view_arrays:
        np.testing.assert_array_equal(resumed[name][:], reference[name][:], err_msg=name)


def test_training_with_another_augmentation_is_refused_unless_views_are_off(tmp_path, tiny_teacher):
    store = view_store(tmp_path, tiny_teacher)

    def config(views: bool, **data) -> Config:
        return merge(Config(), {
            "data": {"dataset": "synthetic", "options": OPTIONS, "workers": 0, "crop_size": [32, 32],
                     "scale_range": [0.75, 1.5], "flip": True, "color_jitter": 0.3, **data},
            "model": {"name": "pspnet_resnet18", "width": 0.125},
            "train": {"iterations": 1, "batch_size": 2, "device": "cpu", "out": str(tmp_path / "run")},
            "distill": {"losses": ["pi", "pa", "ho"], "cache": str(store), "views": views},
        })

    assert Trainer(config(True), progress=False).use_views
    with pytest.raises(SkdError, match=r"scale_range \[0.75, 1.5\] \(this run: \[0.5, 2.0\]\).*--no-views"):
        Trainer(config(True, scale_range=[0.5, 2.0]), progress=False)
    trainer = Trainer(config(False, scale_range=[0.5, 2.0]), progress=False)
    assert not trainer.use_views
    record = trainer.step(next(trainer.batches()))
    assert all(np.isfinite(v) for v in record.values())
