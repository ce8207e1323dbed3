"""The store's schema and codecs: every array round-trips through zarr as the schema defines it,
the stored argmax is the teacher's on adversarial values and on view banks, and verify and stats
iterate every array."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.codecs import LOG_PROB_CODES, LOG_PROB_RANGE, LOG_PROB_STEP, decode_features, quantise_log_probs
from pipeline.cache.projection import Projection
from pipeline.cache.schema import TILE, StoreLayout, store_arrays
from pipeline.cache.stats import store_stats
from pipeline.cache.store import TeacherStore, create_store
from pipeline.cache.verify import verify_store
from pipeline.data.views import draw_views

VIEWS = {"count": 3, "crop_size": [24, 40], "scale_range": [0.5, 1.5], "flip": True, "color_jitter": 0.2, "seed": 0}


def through_log_prob_filter(values: torch.Tensor, tmp_path) -> np.ndarray:
    """``values`` written to and read back from a zarr array with the store's log-probability codecs."""
    spec = store_arrays(StoreLayout(np.array([[8, 8]], np.int32), 2, None, 1))[0]
    array = zarr.create_array(str(tmp_path / "lp.zarr"), shape=values.shape, dtype="float32",
                              filters=spec.filters(), fill_value=np.nan, overwrite=True)
    array[:] = np.ascontiguousarray(values.numpy())  # (numcodecs filters read a strided input in memory order)
    return array[:]


def test_argmax_survives_quantisation_at_half_code_boundaries(tmp_path):
    """A top class exactly halfway between two codes and a runner-up one step below it: with a margin
    taken in real values, both round (half to even) to one code and the argmax flips."""
    rows = []
    for code in range(10, LOG_PROB_CODES - 1):
        top = (code + 0.5) * LOG_PROB_STEP - LOG_PROB_RANGE  # halfway between two codes
        for below in (LOG_PROB_STEP, LOG_PROB_STEP * 0.999, LOG_PROB_STEP * 1.001, LOG_PROB_STEP * 0.5, 1e-6):
            rows.append([top - below, top, -LOG_PROB_RANGE])  # the teacher's top is class 1
    values = torch.tensor(rows, dtype=torch.float32).T[None, :, :, None]  # (1, 3 classes, rows, 1)
    stored = torch.from_numpy(through_log_prob_filter(quantise_log_probs(values, class_dim=1), tmp_path))
    assert (stored.argmax(dim=1) == 1).all()
    # The quantised values are on the code grid, so the filter's rounding gives their codes back.
    np.testing.assert_allclose(stored.numpy(), quantise_log_probs(values, class_dim=1).numpy(), rtol=0, atol=1e-5)
    # The top class moves by at most half a code (rounding); another class by at most one and a half
    # (rounding, then kept a whole code below the top's).
    assert (stored - values)[:, 1].abs().max() <= LOG_PROB_STEP / 2 + 1e-5
    assert (stored - values).abs().max() <= 1.5 * LOG_PROB_STEP + 1e-5


def test_random_near_ties_keep_the_argmax(tmp_path):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 32, 32, generator=generator) * 3
    # Make the runner-up sit within two codes of the top everywhere.
    top2 = logits.topk(2, dim=1).values
    gap = torch.rand(4, 1, 32, 32, generator=generator) * 2 * LOG_PROB_STEP
    logits = torch.where(logits == top2[:, 1:2], top2[:, :1] - gap, logits)
    log_probs = logits.log_softmax(dim=1)
    stored = torch.from_numpy(through_log_prob_filter(quantise_log_probs(log_probs, class_dim=1), tmp_path))
    assert torch.equal(stored.argmax(dim=1), log_probs.argmax(dim=1))


def test_a_view_bank_quantises_each_view_over_its_own_classes():
    """(B, K, C, h, w): the class axis is 2. Quantising a view must not depend on the other views
    (a max over the view axis pushed one view's classes down relative to another's)."""
    generator = torch.Generator().manual_seed(1)
    views = torch.randn(2, 4, 5, 6, 6, generator=generator).mul(4).log_softmax(dim=2)
    views[:, 0] -= 3.0  # one view far less confident than the others (its top below the others' tops)
    views = views.clamp(min=-LOG_PROB_RANGE)
    banked = quantise_log_probs(views, class_dim=2)
    for k in range(views.shape[1]):
        alone = quantise_log_probs(views[:, k], class_dim=1)
        assert torch.equal(banked[:, k], alone)
        assert torch.equal(banked[:, k].argmax(dim=1), views[:, k].argmax(dim=1))
    # View 0's top class (0) is just above its class 1 and just below view 1's value of class 0.
    near = torch.tensor([[-1.0, -1.01], [-0.995, -9.0]]).view(1, 2, 2, 1, 1)
    assert quantise_log_probs(near, class_dim=2)[0, :, :, 0, 0].argmax(dim=1).tolist() == [0, 0]


def test_feature_decoding_is_the_documented_formula():
    stored = np.array([[[0.0, 1.0]], [[0.5, 0.25]]], dtype=np.float32)  # (F=2, 1, 2)
    scale, offset = np.array([2.0, 4.0], np.float32), np.array([-1.0, 1.0], np.float32)
    position = np.array([[0.5, 2.0]], np.float32)
    expected = np.array([[[(0 * 2 - 1) * 0.5, (1 * 2 - 1) * 2.0]], [[(0.5 * 4 + 1) * 0.5, (0.25 * 4 + 1) * 2.0]]])
    np.testing.assert_allclose(decode_features(stored, scale, offset, position), expected)


def layout_with_everything(image_hw) -> tuple[StoreLayout, dict]:
    """Variable sizes over several tiles, two levels, features projected to 3 of 5 channels, a view bank."""
    return StoreLayout(np.asarray(image_hw, np.int32), 4, 3, 2, (1.0, 2.0), view_count=VIEWS["count"],
                       view_crop=tuple(VIEWS["crop_size"]), projection_channels=5, shard_images=2), \
        {"preprocessing": {"views": VIEWS}}


def test_every_array_round_trips_through_a_store_of_variable_size_images(tmp_path):
    """Canvases that are not multiples of the tile and span several tiles (a 1100x900 image is 138x113
    cells) round-trip, 5-D view arrays included; the values are drawn on each encoding's grid."""
    image_hw = [(1100, 900), (600, 800), (713, 1021), (40, 24)]
    layout, provenance = layout_with_everything(image_hw)
    rng = np.random.default_rng(0)
    components = np.linalg.qr(rng.normal(size=(5, 3)))[0].astype(np.float32)
    projection = Projection(np.zeros(5, np.float32), components, np.ones(3, np.float32))
    group = create_store(tmp_path / "s.zarr", provenance, layout.image_hw, 4, 5, 2, levels=(1.0, 2.0),
                         shard_images=2, projection=projection)
    assert group["log_probs"].shape[-2:] == (138, 128)  # 1100/8 x 1021/8, rounded up
    assert group["log_probs"].shards[-2:] == (3 * TILE, 2 * TILE)
    written = {}
    for spec in store_arrays(layout):
        if spec.written_by != "writer":
            continue
        array = group[spec.name]
        for index, hw in enumerate(layout.image_hw):
            entry = np.full(array.shape[1:], np.nan if spec.dtype.startswith("float") else 0, dtype=spec.dtype)
            region = (..., *(slice(0, s) for s in spec.extent(hw))) if spec.extent else (...,)
            shape = entry[region].shape
            if spec.encoding == "log_probs":
                values = rng.integers(0, LOG_PROB_CODES + 1, shape) * LOG_PROB_STEP - LOG_PROB_RANGE
            elif spec.encoding == "features":
                values = rng.integers(0, 128, shape) / 127
            elif spec.dtype == "int32":
                values = rng.integers(1, 100, shape)
            else:
                values = rng.uniform(0.5, 2.0, shape)
            entry[region] = values
            written[spec.name, index] = entry
        for start in range(0, layout.images, layout.shard_images):  # whole shards, as the writer writes
            array[start : start + layout.shard_images] = np.stack(
                [written[spec.name, i] for i in range(start, min(start + layout.shard_images, layout.images))])
    reopened = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for (name, index), entry in written.items():
        read = reopened[name][index]
        spec = next(s for s in store_arrays(layout) if s.name == name)
        region = (..., *(slice(0, s) for s in spec.extent(layout.image_hw[index]))) if spec.extent else (...,)
        tolerance = 1e-3 if spec.dtype == "float16" else 1e-6
        np.testing.assert_allclose(read[region], entry[region], atol=tolerance, rtol=tolerance, err_msg=name)
    np.testing.assert_array_equal(reopened["feature_components"][:], components)
    np.testing.assert_array_equal(reopened["image_hw"][:], layout.image_hw)


def complete_store(tmp_path, teacher, dataset, **kwargs):
    from pipeline.cache.writer import cache_teacher

    return cache_teacher(teacher, {"name": "pspnet_resnet18", "num_classes": dataset.num_classes, "width": 0.125},
                         dataset, tmp_path / "v.zarr", workers=0, progress=False, **kwargs)


@pytest.fixture
def ade(tmp_path):
    from test_real_layouts import make_ade

    from pipeline.data import build_dataset

    return build_dataset("ade20k", make_ade(tmp_path / "ade"), "train")


@pytest.fixture
def tiny_ade_teacher():
    from pipeline.models import build_model

    torch.manual_seed(0)
    return build_model("pspnet_resnet18", 150, width=0.125).eval()


def test_verify_finds_a_missing_view_shard_and_missing_view_crops(tmp_path, ade, tiny_ade_teacher):
    from pipeline.data.views import view_spec
    from pipeline.data.transforms import AugmentConfig

    views = view_spec(AugmentConfig((32, 32), (0.75, 1.25), True, 0.1), 2)
    path = complete_store(tmp_path, tiny_ade_teacher, ade, feature_pool=2, view_bank=views, shard_images=2)
    assert verify_store(TeacherStore(path), progress=False) == []
    spare = tmp_path / "spare.zarr"
    shutil.copytree(path, spare)
    # The shard of images 2.. of the view maps, and the plain chunk of the first images' crops.
    (path / "view_log_probs" / "c" / "1" / "0" / "0" / "0" / "0").unlink()
    (path / "view_crops" / "c" / "0" / "0" / "0").unlink()
    problems = verify_store(TeacherStore(path), progress=False)
    assert any(p.startswith("view_log_probs of image 'ADE_2'") for p in problems), problems
    assert any(p.startswith("view_crops of image 'ADE_0'") for p in problems), problems
    assert any(p.startswith("view_crops of image 'ADE_1'") for p in problems), problems
    (spare / "view_jitter" / "c" / "1" / "0" / "0").unlink()
    assert [p.split(" differs")[0] for p in verify_store(TeacherStore(spare), progress=False)] == [
        "view_jitter of image 'ADE_2' (#2)"]


def test_stats_of_a_variable_size_store_count_only_each_images_extent(tmp_path, ade, tiny_ade_teacher):
    path = complete_store(tmp_path, tiny_ade_teacher, ade, feature_pool=2)
    store = TeacherStore(path)
    stats = store_stats(store, entropy_bins=4)
    tops, cells = [], 0
    for index in range(len(store)):
        log_probs = store.read_log_probs(index)
        tops.append(np.exp(log_probs).max(axis=0).ravel())
        cells += log_probs[0].size
    assert stats["pixels"] == cells == sum(math.ceil(h / 8) * math.ceil(w / 8) for h, w in store.image_hw)
    assert stats["mean_top_probability"] == pytest.approx(np.concatenate(tops).mean(), rel=1e-5)
    assert sum(stats["entropy_histogram"]["fraction"]) == pytest.approx(1.0)
    assert all(a.get("nonfinite", 0) == 0 for a in stats["arrays"].values())
    assert stats["arrays"]["features"]["nonfinite"] == 0 and stats["arrays"]["log_probs"]["nonfinite"] == 0


def test_draws_recorded_in_a_store_are_the_banks_seeded_draws(tmp_path, ade, tiny_ade_teacher):
    from pipeline.data.views import view_spec
    from pipeline.data.transforms import AugmentConfig

    views = view_spec(AugmentConfig((32, 32), (0.75, 1.25), True, 0.1), 2, seed=3)
    store = TeacherStore(complete_store(tmp_path, tiny_ade_teacher, ade, feature_pool=2, view_bank=views))
    for index, hw in enumerate(store.image_hw):
        crops, jitter = draw_views(views, index, tuple(int(v) for v in hw))
        np.testing.assert_array_equal(store.view_crops[index], crops)
        np.testing.assert_allclose(store.view_jitter[index], jitter)
