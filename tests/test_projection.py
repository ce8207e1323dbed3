"""Projected (PCA) teacher features in the store: the fit, the round trip, a plain-zarr decode, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from pipeline.cache.projection import fit_projection, project, unproject
from pipeline.cache.store import TeacherStore
from pipeline.cache.writer import cache_teacher
from pipeline.config import Config, merge
from pipeline.data import build_dataset
from pipeline.data.transforms import normalize
from pipeline.errors import SkdError
from pipeline.inference import predict
from pipeline.models.outputs import SegOutput
from pipeline.train.trainer import Trainer

SIZE = (48, 64)
LENGTH = 6


class LowRankTeacher(torch.nn.Module):
    """12 feature channels made from the 3 colour channels (8x8 average pools, a 1x1 conv): the
    features span 3 directions around their mean, so 3 principal directions hold all of them."""

    feature_channels = 12

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.classifier = torch.nn.Conv2d(3, 8, 1)
        self.embed = torch.nn.Conv2d(3, self.feature_channels, 1)

    def forward(self, x):
        pooled = F.avg_pool2d(x, 8, ceil_mode=True)
        return SegOutput(logits=3 * self.classifier(pooled), aux=None, features=self.embed(pooled))


@pytest.fixture(scope="module")
def dataset():
    return build_dataset("synthetic", None, "train", size=SIZE, length=LENGTH)


def teacher_features(teacher, dataset) -> torch.Tensor:
    images = normalize(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
    return predict(teacher, images)[1]


def test_the_fit_is_the_features_pca_and_its_round_trip_error_is_what_k_leaves_out(dataset):
    teacher = LowRankTeacher().eval()
    features = teacher_features(teacher, dataset)
    pixels = features.permute(0, 2, 3, 1).reshape(-1, 12).double().numpy()
    # An independent PCA: the singular values of the centred pixels.
    singular = np.linalg.svd(pixels - pixels.mean(0), compute_uv=False)
    variance = singular ** 2 / (singular ** 2).sum()
    assert variance[3:].sum() < 1e-9  # rank 3, as built

    for k in (1, 2, 3):
        projection = fit_projection(teacher, dataset, k, images=LENGTH, progress=False)
        np.testing.assert_allclose(projection.explained, variance[:k], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(projection.components.T @ projection.components, np.eye(k), atol=1e-5)
        back = unproject(project(features, projection), projection).double().numpy()
        residual = ((back.transpose(0, 2, 3, 1).reshape(-1, 12) - pixels) ** 2).sum()
        # Over the fitted pixels the squared error left is exactly the variance of the dropped directions.
        expected = (1 - variance[:k].sum()) * ((pixels - pixels.mean(0)) ** 2).sum()
        assert residual == pytest.approx(expected, rel=1e-3, abs=1e-6 * ((pixels - pixels.mean(0)) ** 2).sum())
    assert residual < 1e-8 * ((pixels - pixels.mean(0)) ** 2).sum()  # k = 3 keeps everything


def test_a_projected_store_decodes_with_plain_zarr_as_its_attributes_say(tmp_path, dataset):
    teacher = LowRankTeacher().eval()
    info = {"name": "low-rank", "num_classes": 8, "weights_sha256": "0" * 64}
    path = cache_teacher(teacher, info, dataset, tmp_path / "projected.zarr", batch_size=2, feature_pool=1,
                         feature_projection=3, projection_images=LENGTH, workers=0, progress=False)
    group = zarr.open_group(str(path), mode="r")
    assert "feature_components" in group.attrs["decode"] and group.attrs["feature_projection"]["channels"] == 3
    assert group["features"].shape[1] == 3 and group["feature_components"].shape == (12, 3)
    assert group["features"].metadata.dimension_names == ("image", "channel", "y", "x")
    # The decode, done by hand from the arrays as zarr returns them.
    position = group["feature_position_scale"][:].astype(np.float32)[:, None]
    z = (group["features"][:] * group["feature_scale"][:][..., None, None]
         + group["feature_offset"][:][..., None, None]) * position
    decoded = np.einsum("ck,nkyx->ncyx", group["feature_components"][:], z) + group["feature_mean"][:][:, None, None]
    exact = teacher_features(teacher, dataset).numpy()
    # Rank 3, so only the 7-bit rounding of each coordinate is lost: at most half a step per
    # coordinate (times its position's scale), through orthonormal directions (each component's
    # entries at most 1 in size).
    half_steps = (group["feature_scale"][:] / 254).sum(axis=1)[:, None, None, None] * position
    assert (np.abs(decoded - exact) <= half_steps * 1.01).all()
    store = TeacherStore(path)
    assert store.projection is not None and store.feature_channels == 3


def test_training_from_a_projected_store_sees_the_teachers_features_mapped_back(tmp_path, dataset):
    teacher = LowRankTeacher().eval()
    info = {"name": "low-rank", "num_classes": 8, "weights_sha256": "0" * 64}
    store = cache_teacher(teacher, info, dataset, tmp_path / "projected.zarr", batch_size=2, feature_pool=1,
                          feature_projection=3, projection_images=LENGTH, workers=0, progress=False)
    cfg = merge(Config(), {
        "data": {"dataset": "synthetic", "options": {"size": list(SIZE), "length": LENGTH}, "workers": 0,
                 "crop_size": list(SIZE), "scale_range": [1.0, 1.0], "flip": False},
        "model": {"name": "pspnet_resnet18", "width": 0.125},
        "distill": {"losses": ["pa", "fd"], "cache": str(store), "pa_node": 1.0},
        "train": {"iterations": 1, "batch_size": 2, "device": "cpu", "out": str(tmp_path / "run")},
    })
    trainer = Trainer(cfg, progress=False)
    assert trainer.adapter.out_channels == 12  # the teacher's channels, not the 3 stored coordinates
    batch = next(iter(trainer.batches()))
    features = trainer.targets(batch, None, (6, 8))[1]
    # Whole images, no flip: the teacher's own features, up to the 8-bit rounding (rank 3 = k).
    images = normalize(batch["image"])
    exact = predict(teacher, images)[1]
    assert features.shape == exact.shape
    assert (features - exact).abs().max() <= 0.02 * exact.abs().max()
    values = trainer.step(batch)
    assert np.isfinite(values["pa"]) and np.isfinite(values["fd"]) and values["fd"] > 0


def test_a_projection_wider_than_the_teachers_features_is_refused_before_anything_is_written(tmp_path, dataset):
    info = {"name": "low-rank", "num_classes": 8, "weights_sha256": "0" * 64}
    with pytest.raises(SkdError, match="--feature-projection 13 asks for more channels than the teacher's 12"):
        cache_teacher(LowRankTeacher().eval(), info, dataset, tmp_path / "wide.zarr", feature_projection=13,
                      workers=0, progress=False)
    assert list(tmp_path.iterdir()) == []
