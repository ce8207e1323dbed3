"""Augmentation replay: cached teacher maps resampled to each crop must equal the teacher on that crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import torch.nn.functional as F
from torch import nn

import pipeline.data.samples as samples_module
from pipeline.cache.replay import replay_targets
from pipeline.data.transforms import valid_mask
from pipeline.data.samples import TrainingSamples, collate
from pipeline.cache.lifecycle import finalize
from pipeline.cache.store import TeacherStore, create_store
from pipeline.cache.writer import cache_teacher
from pipeline.config import Config, merge
from pipeline.data import build_dataset
from pipeline.data.transforms import AugmentConfig, CropParams, crop_box, normalize
from pipeline.distill.losses import pairwise_loss, pixelwise_loss
from pipeline.models.outputs import SegOutput
from pipeline.train.checkpoint import file_sha256, model_from_checkpoint
from pipeline.errors import SkdError
from pipeline.train.trainer import Trainer


class PooledTeacher(nn.Module):
    """A teacher that is exactly translation-equivariant at stride 8: 1×1 convs on 8×8 average pools.

    Its output on a crop aligned to the 8-pixel grid is exactly the matching part of its output on
    the whole image, so replay has a ground truth to match.
    """

    output_stride = 8
    num_classes = 8
    feature_channels = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.classifier = nn.Conv2d(3, self.num_classes, 1)
        self.embed = nn.Conv2d(3, self.feature_channels, 1)

    def forward(self, x: torch.Tensor) -> SegOutput:
        pooled = F.avg_pool2d(x, 8, ceil_mode=True)
        return SegOutput(logits=3 * self.classifier(pooled), aux=None, features=self.embed(pooled))


def force_params(monkeypatch, params: list[CropParams]) -> None:
    """Make TrainingSamples use the given augmentation parameters, one per item read, in order."""
    queue = iter(params)
    monkeypatch.setattr(samples_module, "sample_params", lambda cfg, image_hw, rng: next(queue))


# ---------------------------------------------------------------------------------------------
# Replay equals the teacher on the crop
# ---------------------------------------------------------------------------------------------


def test_replay_of_grid_aligned_crop_equals_teacher_on_crop(tmp_path, monkeypatch):
    dataset = build_dataset("synthetic", None, "train", size=(48, 64), length=2)
    teacher = PooledTeacher().eval()
    info = {"name": "pooled", "num_classes": 8, "weights_sha256": "0" * 64}
    store = TeacherStore(cache_teacher(teacher, info, dataset, tmp_path / "pooled.zarr", batch_size=2,
                                       feature_pool=1, workers=0, progress=False))
    store.check_matches(dataset)

    # Scale 1, crop 32x40 at (top 16, left 24): on the 8-pixel grid. Image 0 as is, image 1 flipped.
    force_params(monkeypatch, [CropParams((48, 64), 16, 24, False), CropParams((48, 64), 16, 24, True)])
    samples = TrainingSamples(dataset, AugmentConfig(crop_size=(32, 40)), store)
    items = [samples[0], samples[1]]
    for i, item in enumerate(items):
        crop = dataset[i]["image"][:, 16:48, 24:64]
        assert torch.equal(item["image"], crop.flip(-1) if i == 1 else crop)
        assert item["valid"].all()
    batch = collate(items)
    t_log_probs, t_features = replay_targets(batch, (4, 5))
    assert t_log_probs.shape == (2, 8, 4, 5) and t_features.shape == (2, 6, 4, 5)

    with torch.no_grad():
        on_crops = teacher(normalize(batch["image"]))
        unflipped = teacher(normalize(items[1]["image"].flip(-1))[None])
    # Equal up to 8-bit storage: one step of log-probability (16/255); features to half of 1/127 of
    # a channel's range after division by the position's largest |value| (at most that |value| / 127).
    log_step, feature_step = 16 / 255 * 1.01, float(on_crops.features.abs().max()) / 127 * 1.01
    torch.testing.assert_close(t_log_probs.log_softmax(1), on_crops.logits.log_softmax(1), atol=log_step, rtol=0)
    torch.testing.assert_close(t_features, on_crops.features, atol=feature_step, rtol=0)
    # The flipped sample's target is the mirror image of the teacher on the unflipped crop.
    torch.testing.assert_close(t_log_probs[1].log_softmax(0), unflipped.logits[0].log_softmax(0).flip(-1), atol=log_step,
                               rtol=0)
    torch.testing.assert_close(t_features[1], unflipped.features[0].flip(-1), atol=feature_step, rtol=0)
    # ... and differs from the unmirrored one (the flip is not a no-op on this data).
    assert (t_log_probs[1] - unflipped.logits[0].log_softmax(0)).abs().max() > 0.1


def test_replay_of_scaled_crop_samples_a_ramp_bilinearly(tmp_path, monkeypatch):
    """A linear ramp stored in the cache comes back at each output pixel's centre.

    Image 48x64 at scale 2 (96x128), crop 32x40 at (top 48, left 64), student grid 4x5. Output pixel
    (i, j) is centred on scaled pixel (48 + 8i + 4, 64 + 8j + 4), i.e. original pixel
    (26 + 4i, 34 + 4j). On the stride-8 cache grid, whose cell k is centred on pixel 8k + 4, that is
    cell coordinate (26 + 4i)/8 - 0.5 = 2.75 + 0.5i and (34 + 4j)/8 - 0.5 = 3.75 + 0.5j; on the
    feature grid pooled by 2 (cell k centred on pixel 16k + 8) it is 1.125 + 0.25i and 1.625 + 0.25j.
    A bilinear sample of m[y, x] = x + 10y there is exactly that coordinate pair combined.
    """
    dataset = build_dataset("synthetic", None, "train", size=(48, 64), length=1)
    provenance = {"teacher": {"name": "ramp", "num_classes": 2},
                  "dataset": {"name": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint,
                              "ids": list(dataset.ids)}}
    partial = tmp_path / "ramp.zarr.partial"
    group = create_store(partial, provenance, np.array([[48, 64]]), num_classes=2, feature_channels=1, feature_pool=2)
    # Ramps in whole steps of the stored codes, so that storage keeps them exactly.
    step = 16 / 255
    y, x = np.mgrid[0:6, 0:8].astype(np.float32)
    group["log_probs"][0] = np.stack([-step * (x + 10 * y), -step * (57 - x - 10 * y)])
    fy, fx = np.mgrid[0:3, 0:4].astype(np.float32)
    group["features"][0] = ((fx + 10 * fy) / 127)[None]  # the features' 127 levels
    group["feature_scale"][0], group["feature_offset"][0] = 127.0, 0.0
    group["feature_position_scale"][0] = 1.0
    group["done"][0] = True
    finalize(partial, tmp_path / "ramp.zarr")
    store = TeacherStore(tmp_path / "ramp.zarr")

    i = torch.arange(4, dtype=torch.float32)[:, None]
    j = torch.arange(5, dtype=torch.float32)[None, :]
    logit_ramp = (3.75 + 0.5 * j) + 10 * (2.75 + 0.5 * i)
    feature_ramp = (1.625 + 0.25 * j) + 10 * (1.125 + 0.25 * i)

    params = CropParams((96, 128), 48, 64, False)
    force_params(monkeypatch, [params, CropParams((96, 128), 48, 64, True)])
    samples = TrainingSamples(dataset, AugmentConfig(crop_size=(32, 40), scale_range=(2.0, 2.0)), store)
    items = [samples[0], samples[0]]
    # Only the cache under the crop is read: on the 6x8 grid the box spans rows 3..5, cols 4..6.5; with
    # a one-cell margin that is rows 2..6, cols 3..8 of the logits; widened to the pooling grid,
    # rows 2..6, cols 2..8 for the features (feature cells 1..3, 1..4).
    assert items[0]["teacher_log_probs"].shape == (2, 4, 5) and items[0]["teacher_features"].shape == (1, 2, 3)
    assert torch.equal(crop_box(params, (48, 64), (32, 40)), torch.tensor([32.0, 24.0, 52.0, 40.0], dtype=torch.float64))

    t_log_probs, t_features = replay_targets(collate(items), (4, 5))
    torch.testing.assert_close(t_log_probs[0, 0], -step * logit_ramp, atol=1e-4, rtol=0)
    torch.testing.assert_close(t_log_probs[0, 1], -step * (57 - logit_ramp), atol=1e-4, rtol=0)
    torch.testing.assert_close(t_features[0, 0], feature_ramp, atol=1e-4, rtol=0)
    # The flipped sample sees the crop mirrored.
    torch.testing.assert_close(t_log_probs[1, 0], -step * logit_ramp.flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(t_features[1, 0], feature_ramp.flip(-1), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------


def test_padding_is_invalid_and_ignored_by_losses(monkeypatch):
    # A 64x80 crop of a 40x56 image: padded to 64x80, student grid 8x10. Output row i is centred on
    # pixel 8i + 4, inside the image for 8i + 4 < 40, i.e. i <= 4; columns: 8j + 4 < 56, j <= 6.
    dataset = build_dataset("synthetic", None, "train", size=(40, 56), length=1)
    force_params(monkeypatch, [CropParams((40, 56), 0, 0, False), CropParams((40, 56), 0, 0, True)])
    samples = TrainingSamples(dataset, AugmentConfig(crop_size=(64, 80)))
    plain, flipped = samples[0], samples[0]
    assert plain["image"].shape == (3, 64, 80)
    expected = torch.zeros(8, 10, dtype=torch.bool)
    expected[:5, :7] = True
    assert plain["valid"].sum() == 35
    assert torch.equal(plain["valid"], expected)
    assert torch.equal(flipped["valid"], expected.flip(-1))  # padding is on the left once mirrored
    # The padded label is ignore exactly outside the image.
    assert (plain["label"][40:] == 255).all() and (plain["label"][:, 56:] == 255).all()
    assert (plain["label"][:40, :56] != 255).any()
    # The same mask straight from the box (in original pixels).
    assert torch.equal(valid_mask(torch.tensor([0.0, 0.0, 80.0, 64.0], dtype=torch.float64), (40, 56), (8, 10)), expected)

    valid = torch.stack([plain["valid"], flipped["valid"]])
    invalid = ~valid[:, None]
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(2, 8, 8, 10, generator=g), torch.randn(2, 8, 8, 10, generator=g)
    s_feat, t_feat = torch.randn(2, 16, 8, 10, generator=g), torch.randn(2, 12, 8, 10, generator=g)

    def scramble(x: torch.Tensor) -> torch.Tensor:
        noise = 1000 * torch.randn(x.shape, generator=g)
        return torch.where(invalid.expand_as(x), noise, x)

    def losses(sl, tl, sf, tf):
        return [pixelwise_loss(sl, tl, 1.0, valid), pixelwise_loss(sl, tl, 4.0, valid)] + \
            [pairwise_loss(sf, tf, node, valid) for node in (1, 2, (4, 5))]

    before = losses(s_logits, t_logits, s_feat, t_feat)
    after = losses(scramble(s_logits), scramble(t_logits), scramble(s_feat), scramble(t_feat))
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # A change inside the image does change every loss.
    s_logits[:, 0, 0, 0] += 5  # one class only: a shift of all classes leaves the softmax as it is
    s_feat[:, 0, 0, 0] += 10  # large enough to win the max of its node
    changed = losses(s_logits, t_logits, s_feat, t_feat)
    assert all((a - b).abs() > 1e-4 for a, b in zip(before, changed))


# ---------------------------------------------------------------------------------------------
# Cached and online teachers give the same training step
# ---------------------------------------------------------------------------------------------


TINY_OPTIONS = {"size": [32, 48], "length": 8}


def tiny_store(tmp_path: Path, teacher_ckpt: Path, feature_pool: int) -> Path:
    """The tiny teacher's cache of 8 synthetic 32x48 training images."""
    dataset = build_dataset("synthetic", None, "train", **TINY_OPTIONS)
    model, arch = model_from_checkpoint(teacher_ckpt)
    info = {**arch, "checkpoint": teacher_ckpt.name, "weights_sha256": file_sha256(teacher_ckpt)}
    return cache_teacher(model, info, dataset, tmp_path / "train.zarr", batch_size=8, feature_pool=feature_pool,
                         workers=0, progress=False)


def test_cached_and_online_teacher_give_same_losses(tmp_path: Path, tiny_teacher: Path):
    options = TINY_OPTIONS
    store = tiny_store(tmp_path, tiny_teacher, feature_pool=1)

    def first_step(name: str, teacher_source: dict) -> tuple[dict, dict]:
        cfg = merge(Config(), {
            "data": {"dataset": "synthetic", "options": options, "workers": 0, "crop_size": None,
                     "scale_range": [1.0, 1.0], "flip": False, "color_jitter": 0.0, "pin_memory": False},
            "model": {"name": "pspnet_resnet18", "width": 0.125},
            "train": {"iterations": 2, "batch_size": 4, "device": "cpu", "out": str(tmp_path / name)},
            "distill": {"losses": ["pi", "pa", "ho"], **teacher_source},
            "cache": {"feature_pool": 1},
        })
        trainer = Trainer(cfg, progress=False)
        batch = next(trainer.batches())
        return batch, trainer.step(batch)

    # Built and stepped one after the other: each Trainer seeds torch, so both start from the same state.
    cached_batch, cached = first_step("cached", {"cache": str(store)})
    online_batch, online = first_step("online", {"teacher": str(tiny_teacher)})

    assert torch.equal(cached_batch["image"], online_batch["image"])
    assert set(cached) == set(online) == {"task", "pi", "pa", "ho", "d_adv", "d_gp"}  # no gradient norms asked
    assert all(np.isfinite(v) for v in cached.values())
    assert cached["pi"] > 0 and cached["pa"] > 0
    for key in cached:
        assert cached[key] == pytest.approx(online[key], rel=1e-2, abs=1e-5), key


# ---------------------------------------------------------------------------------------------
# Stored levels: crops that zoom in read a map computed at their resolution
# ---------------------------------------------------------------------------------------------


def test_a_level_2_store_replays_a_scale_2_crop_as_the_teacher_sees_it(tmp_path, monkeypatch):
    dataset = build_dataset("synthetic", None, "train", size=(48, 64), length=1)
    teacher = PooledTeacher().eval()
    info = {"name": "pooled", "num_classes": 8, "weights_sha256": "0" * 64}
    stores = {levels: TeacherStore(cache_teacher(teacher, info, dataset, tmp_path / f"levels{len(levels)}.zarr",
                                                 batch_size=1, feature_pool=1, workers=0, levels=levels,
                                                 progress=False))
              for levels in ((1.0,), (1.0, 2.0))}
    assert stores[(1.0, 2.0)].levels == [1.0, 2.0]
    assert stores[(1.0, 2.0)].group["log_probs_x2"].shape == (1, 8, 12, 16)

    # Scale 2 (96x128), crop 32x40 at (48, 64): on the 8-pixel grid of the upscaled image.
    params = CropParams((96, 128), 48, 64, False)
    replayed = {}
    for levels, store in stores.items():
        force_params(monkeypatch, [params])
        samples = TrainingSamples(dataset, AugmentConfig(crop_size=(32, 40), scale_range=(2.0, 2.0)), store,
                                  features=False)
        item = samples[0]
        replayed[levels] = replay_targets(collate([item]), (4, 5))[0].log_softmax(1)
    with torch.no_grad():
        on_crop = teacher(normalize(item["image"])[None]).logits.log_softmax(1)
    # The crop was resized from uint8 pixels (rounded), the level from float ones, and stored in 8-bit
    # steps of 16/255: a small difference.
    torch.testing.assert_close(replayed[(1.0, 2.0)], on_crop, atol=0.08, rtol=0)
    # A level-1 store can only upsample its coarser map, and misses by far more.
    assert (replayed[(1.0,)] - on_crop).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# Pair-wise nodes finer than the stored features are refused
# ---------------------------------------------------------------------------------------------


def test_pairwise_nodes_finer_than_the_stored_features_are_refused(tmp_path: Path, tiny_teacher: Path):
    options = TINY_OPTIONS
    store = tiny_store(tmp_path, tiny_teacher, feature_pool=2)
    assert TeacherStore(store).attrs["feature_stride"] == 16

    def config(node, scale_high: float) -> Config:
        return merge(Config(), {
            "data": {"dataset": "synthetic", "options": options, "workers": 0, "crop_size": [32, 32],
                     "scale_range": [1.0, scale_high]},
            "model": {"name": "pspnet_resnet18", "width": 0.125},
            "train": {"iterations": 1, "batch_size": 4, "device": "cpu", "out": str(tmp_path / "run")},
            "distill": {"losses": ["pi", "pa"], "cache": str(store), "pa_node": node},
        })

    # 4x4 output: "1px" nodes (1 pixel) and 0.5 at scales up to 1.5 (2 pixels < 2 x 1.5) are finer
    # than one stored feature cell; 0.5 at scale 1 (2 pixels = 2 x 1) is not.
    for node, scale_high in (("1px", 1.0), (0.5, 1.5)):
        with pytest.raises(SkdError, match="finer than the store's features"):
            Trainer(config(node, scale_high), progress=False)
    Trainer(config(0.5, 1.0), progress=False)


def test_a_format_1_store_still_trains_and_evaluates(tmp_path: Path):
    """tests/fixtures/v1_store.zarr was written by the format-1 writer (float16 arrays named
    ``logits``/``logits_x2``, features only scaled, one file per image): it still replays, trains
    and evaluates."""
    fixture = Path(__file__).parent / "fixtures" / "v1_store.zarr"
    store = TeacherStore(fixture)
    assert store.version == 1 and store.levels == [1.0, 2.0]
    assert store.level_arrays == {1.0: "logits", 2.0: "logits_x2"}
    assert (store.feature_offset == 0).all()
    options = {"size": [32, 48], "length": 4}
    dataset = build_dataset("synthetic", None, "train", **options)
    store.check_matches(dataset)
    # At scale 1 the replayed features are the stored ones times their scale (format 1 had no offset).
    item = collate([TrainingSamples(dataset, AugmentConfig(), store)[0]])
    assert store.feature_scale.shape == (len(store.ids), 1)  # one per image, as a channel axis of 1
    stored = store.group["features"][0].astype(np.float32) * store.feature_scale[0][:, None, None]
    torch.testing.assert_close(replay_targets(item, (2, 3))[1][0], torch.from_numpy(stored), atol=1e-3, rtol=1e-3)

    cfg = merge(Config(), {
        "data": {"dataset": "synthetic", "options": options, "workers": 0, "crop_size": [32, 32],
                 "scale_range": [1.0, 2.0], "flip": True},
        "model": {"name": "pspnet_resnet18", "width": 0.125},
        "train": {"iterations": 2, "batch_size": 2, "device": "cpu", "out": str(tmp_path / "run")},
        "distill": {"losses": ["pi", "pa", "ho"], "cache": str(fixture), "pa_node": 1.0},
    })
    trainer = Trainer(cfg, progress=False)
    record = trainer.step(next(trainer.batches()))
    assert all(np.isfinite(v) for v in record.values()) and record["pi"] > 0

    from pipeline.evaluate import evaluate_cache

    assert 0 <= evaluate_cache(store, dataset, progress=False).miou() <= 1
