"""The teacher cache: store layout and provenance, fidelity, resume, refusals, zip stores, TTA."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import pipeline
from pipeline.cache.replay import replay_targets
from pipeline.data.samples import TrainingSamples, collate
from pipeline.cache.store import TeacherStore, create_store, redact
from pipeline.inference import predict
from pipeline.cache.writer import cache_teacher
from pipeline.data import build_dataset
from pipeline.data.transforms import AugmentConfig, normalize
from pipeline.errors import SkdError
from pipeline.evaluate import evaluate_cache, evaluate_model
from pipeline.models import build_model
from pipeline.train.checkpoint import model_from_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Neither dimension is a multiple of 8 (44 / 8 = 5.5, 60 / 8 = 7.5), so the stride-8 grid is a ceil.
SIZE = (44, 60)
LENGTH = 6
POOL = 3  # 6x8 logit grid -> ceil(6/3) x ceil(8/3) = 2x3 feature grid
LOGIT_HW = (6, 8)
FEATURE_HW = (2, 3)
TEACHER_ARCH = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.25}


def make_teacher(path: Path, seed: int, gain: float = 1.0) -> Path:
    """A random teacher. A random PSPNet is absurdly confident (median log-probability -25); with
    its classifier scaled by ``gain`` 0.1 its maps look like a trained teacher's (log-probabilities
    mostly above -8, the top class at p = 0.5 on the median pixel)."""
    torch.manual_seed(seed)
    model = build_model(**TEACHER_ARCH)
    with torch.no_grad():
        model.head[-1].weight.mul_(gain)
    save_checkpoint(path, {"arch": TEACHER_ARCH, "model": model.state_dict()})
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher_info(path: Path) -> dict:
    """What the command line records about a teacher checkpoint."""
    return {**TEACHER_ARCH, "checkpoint": path.name, "weights_sha256": sha256(path)}


def write_config(path: Path, size: tuple[int, int], length: int) -> Path:
    path.write_text(yaml.safe_dump({"data": {"dataset": "synthetic", "options": {"size": list(size), "length": length}}}))
    return path


def cli_args(config: Path, teacher: Path, out: Path, split: str, batch_size: int, pool: int) -> list[str]:
    return [sys.executable, "-m", "cli", "cache-teacher", "--config", str(config), "--teacher", str(teacher),
            "--split", split, "--cache", str(out), "--batch-size", str(batch_size), "--feature-pool", str(pool),
            "--workers", "0", "--device", "cpu"]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", seed=0)


@pytest.fixture(scope="module")
def val_set():
    return build_dataset("synthetic", None, "val", size=SIZE, length=LENGTH)


@pytest.fixture(scope="module")
def val_store(tmp_path_factory, teacher_ckpt) -> Path:
    """The val split cached by the command line (which computes the checksum itself)."""
    tmp = tmp_path_factory.mktemp("store")
    out = tmp / "val.zarr"
    result = run_cli(cli_args(write_config(tmp / "data.yaml", SIZE, LENGTH), teacher_ckpt, out, "val", 4, POOL))
    assert result.returncode == 0, result.stderr
    return out


def teacher_float32(teacher_ckpt: Path, dataset) -> torch.Tensor:
    """The teacher's float32 logits on every image, computed here without the cache code."""
    model, _ = model_from_checkpoint(teacher_ckpt)
    model.eval()
    with torch.no_grad():
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).float() / 255.0
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return model((images - mean) / std).logits


# ---------------------------------------------------------------------------------------------
# Layout and provenance
# ---------------------------------------------------------------------------------------------


def test_store_round_trip(val_store, teacher_ckpt, val_set):
    assert val_store.is_dir()
    assert not val_store.with_name(val_store.name + ".partial").exists()

    group = zarr.open_group(str(val_store), mode="r")
    logits, features = group["log_probs"], group["features"]
    # Stored as 8-bit codes in shards; plain zarr decodes them to float32 itself.
    assert logits.shape == (LENGTH, 8, *LOGIT_HW) and logits.dtype == np.float32
    assert logits.chunks == (1, 8, *LOGIT_HW) and logits.shards == (LENGTH, 8, *LOGIT_HW)  # 6 images < a shard
    assert logits.metadata.dimension_names == ("image", "class", "y", "x")
    assert features.shape[0] == LENGTH and features.shape[2:] == FEATURE_HW and features.dtype == np.float32
    assert features.shape[1] == build_model(**TEACHER_ARCH).feature_channels
    assert (group["image_hw"][:] == np.array([SIZE] * LENGTH)).all()
    assert group["done"][:].dtype == bool and group["done"][:].all()
    assert np.isfinite(logits[:]).all() and np.isfinite(features[:]).all()  # every image written
    assert logits[:].min() >= -16 and logits[:].max() <= 0  # log-probabilities, clipped at -16
    assert len(list((val_store / "log_probs").rglob("*"))) <= 6  # one shard file (and its folders)

    attrs = dict(group.attrs)
    assert attrs["complete"] is True
    assert attrs["teacher"]["name"] == "pspnet_resnet18"
    assert attrs["teacher"]["num_classes"] == 8
    assert attrs["teacher"]["weights_sha256"] == sha256(teacher_ckpt)
    ds = attrs["dataset"]
    assert (ds["name"], ds["split"]) == ("synthetic", "val")
    assert ds["fingerprint"] == val_set.fingerprint
    assert ds["ids"] == [f"synthetic/val/{i:06d}" for i in range(LENGTH)] == list(val_set.ids)
    pre = attrs["preprocessing"]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["teacher_scales"] == [1.0] and pre["teacher_flip"] is False
    assert "FixedScaleOffset" in attrs["codecs"]["log_probs"] and "crc32c" in attrs["codecs"]["features"]
    assert attrs["format_version"] == 2 and attrs["features"] is True
    assert attrs["feature_pool"] == POOL
    assert attrs["skd_version"] == pipeline.__version__
    time.strptime(attrs["created"][:19], "%Y-%m-%dT%H:%M:%S")  # an ISO time stamp

    # The reader gives the same maps, cut to the image's true extent, and the features decoded as
    # the attributes say: (stored x scale + offset, per channel) x position scale.
    store = TeacherStore(val_store)
    store.check_matches(val_set)
    cached_logits, cached_features = store.read(2)
    np.testing.assert_array_equal(cached_logits, logits[2])
    decoded = ((features[2] * group["feature_scale"][2][:, None, None] + group["feature_offset"][2][:, None, None])
               * group["feature_position_scale"][2].astype(np.float32))
    np.testing.assert_allclose(cached_features, decoded, rtol=1e-6, atol=0)


def test_stored_logits_match_float32_teacher(val_store, teacher_ckpt, val_set):
    reference = teacher_float32(teacher_ckpt, val_set)  # (N, C, 6, 8)
    stored = torch.from_numpy(zarr.open_group(str(val_store), mode="r")["log_probs"][:])
    assert stored.shape == reference.shape

    # 8-bit codes keep the teacher's argmax: every other class is stored at least one step below.
    assert (stored.argmax(1) == reference.argmax(1)).float().mean().item() >= 0.999
    # Valid logits of the same distribution: KL to the float32 teacher at the level of the 8-bit step
    # (16/255 in log space: at most about step²/24 ≈ 2e-4).
    log_p, log_q = reference.log_softmax(1), stored.log_softmax(1)
    assert (log_p.exp() * (log_p - log_q)).sum(1).mean().item() <= 2e-4
    torch.testing.assert_close(stored.softmax(1), reference.softmax(1), atol=0.03, rtol=0)


def test_evaluate_cache_matches_evaluate_model(tmp_path, val_set):
    # Evaluation upsamples the maps: log-probabilities clipped at -16 interpolate differently from
    # the raw ones where they were clipped, so the check needs a teacher with a trained teacher's
    # range (on real CamVid the cache and the model agree to 0.01 mIoU, docs/CACHE.md).
    model, arch = model_from_checkpoint(make_teacher(tmp_path / "t.pt", seed=0, gain=0.1))
    store = cache_teacher(model, {**arch, "weights_sha256": "0" * 64}, val_set, tmp_path / "v.zarr", batch_size=4,
                          feature_pool=POOL, workers=0, progress=False)
    from_model = evaluate_model(model, val_set, progress=False)
    from_cache = evaluate_cache(TeacherStore(store), val_set, progress=False)
    total = from_model.matrix.sum().item()
    assert total == from_cache.matrix.sum().item() > 0
    # 8-bit steps may move pixels near a tie between classes once the map is upsampled, few others.
    assert (from_model.matrix - from_cache.matrix).abs().sum().item() <= 2 * round(0.01 * total)
    assert from_cache.miou() == pytest.approx(from_model.miou(), abs=1e-2)


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_resume_after_kill(tmp_path, teacher_ckpt):
    # Enough images that the run is still going when the first one is done: it is killed right then.
    size, length = (96, 128), 48
    config = write_config(tmp_path / "data.yaml", size, length)
    out = tmp_path / "train.zarr"
    partial = tmp_path / "train.zarr.partial"
    args = cli_args(config, teacher_ckpt, out, "train", 1, 2)

    killed_log = tmp_path / "killed.log"
    with open(killed_log, "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    done_before_kill = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done_before_kill = int(zarr.open_group(str(partial), mode="r")["done"][:].sum())
            except Exception:  # the store is still being created
                done_before_kill = 0
            if done_before_kill > 0:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 0 < done_before_kill < length, \
        f"could not interrupt the run part-way ({done_before_kill}/{length} done): {killed_log.read_text()[-2000:]}"
    assert not out.exists()
    assert partial.is_dir()
    killed = zarr.open_group(str(partial), mode="r")
    done = killed["done"][:]
    done_at_kill = int(done.sum())
    assert 0 < done_at_kill < length
    # Writes run in background threads: still, nothing is marked done before all of it is on disk
    # (the arrays' fill value is NaN, so a missing chunk would show).
    for index in np.flatnonzero(done):
        assert np.isfinite(killed["log_probs"][index]).all() and np.isfinite(killed["features"][index]).all(), index
        assert np.isfinite(killed["feature_scale"][index]).all()

    # A different teacher must not be mixed into the partial store.
    other = make_teacher(tmp_path / "other.pt", seed=1)
    assert sha256(other) != sha256(teacher_ckpt)
    dataset = build_dataset("synthetic", None, "train", size=size, length=length)
    other_model, _ = model_from_checkpoint(other)
    with pytest.raises(SkdError, match="different teacher"):
        cache_teacher(other_model, teacher_info(other), dataset, out, batch_size=1, feature_pool=2, workers=0,
                      progress=False)
    assert not out.exists() and int(zarr.open_group(str(partial), mode="r")["done"][:].sum()) == done_at_kill

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert f"{done_at_kill} of {length}" in resumed.stderr
    assert out.is_dir() and not partial.exists()

    # An uninterrupted run of the same teacher gives the very same maps.
    model, _ = model_from_checkpoint(teacher_ckpt)
    reference = cache_teacher(model, teacher_info(teacher_ckpt), dataset, tmp_path / "reference.zarr",
                              batch_size=1, feature_pool=2, workers=0, progress=False)
    got, want = zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r")
    assert got["done"][:].all() and got.attrs["complete"] is True
    np.testing.assert_array_equal(got["log_probs"][:], want["log_probs"][:])
    np.testing.assert_array_equal(got["features"][:], want["features"][:])


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_check_matches_refuses_other_data(val_store, val_set):
    store = TeacherStore(val_store)
    store.check_matches(val_set)  # the right data passes

    other_seed = build_dataset("synthetic", None, "val", size=SIZE, length=LENGTH, seed=1)
    assert other_seed.ids == val_set.ids  # only the content differs
    with pytest.raises(SkdError, match="fingerprint"):
        store.check_matches(other_seed)

    other_split = build_dataset("synthetic", None, "train", size=SIZE, length=LENGTH)
    with pytest.raises(SkdError, match="synthetic/val, not synthetic/train"):
        store.check_matches(other_split)

    with pytest.raises(SkdError, match="8-class.*5 classes"):
        store.check_matches(val_set, num_classes=5)


def test_incomplete_store_is_refused(tmp_path, val_store, val_set):
    complete = TeacherStore(val_store)
    out = tmp_path / "val.zarr"
    partial = tmp_path / "val.zarr.partial"
    provenance = {k: v for k, v in complete.attrs.items() if k in ("teacher", "dataset", "preprocessing")}
    group = create_store(partial, provenance, complete.image_hw, 8, 16, POOL)
    group["done"][0] = True

    with pytest.raises(SkdError, match=r"incomplete \(1/6 images cached\)"):
        TeacherStore(partial).check_matches(val_set)
    # The final path does not exist yet: the message points at the partial store.
    with pytest.raises(SkdError, match="partial store exists"):
        TeacherStore(out)


# ---------------------------------------------------------------------------------------------
# Zip stores, missing stores, URLs in messages
# ---------------------------------------------------------------------------------------------


def test_zip_store_reads_like_directory(tmp_path, val_store, teacher_ckpt, val_set):
    model, _ = model_from_checkpoint(teacher_ckpt)
    out = tmp_path / "val.zip"
    cache_teacher(model, teacher_info(teacher_ckpt), val_set, out, batch_size=4, feature_pool=POOL, workers=0,
                  progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.zip"]  # no partial or temporary left
    assert out.is_file() and zipfile.is_zipfile(out)

    zipped, directory = TeacherStore(out), TeacherStore(val_store)
    zipped.check_matches(val_set)
    assert zipped.complete and zipped.ids == directory.ids and zipped.feature_pool == POOL
    for i in range(LENGTH):
        for a, b in zip(zipped.read(i), directory.read(i)):
            np.testing.assert_array_equal(a, b)


def test_zip_and_url_stores_work_in_forked_loader_workers(tmp_path, val_store, teacher_ckpt, val_set):
    """Zip and fsspec stores opened in a parent break in forked workers; each worker must reopen its own."""
    model, _ = model_from_checkpoint(teacher_ckpt)
    zipped = tmp_path / "val.zip"
    cache_teacher(model, teacher_info(teacher_ckpt), val_set, zipped, batch_size=4, feature_pool=POOL, workers=0,
                  progress=False)
    expected = [TeacherStore(val_store).read(i)[0] for i in range(LENGTH)]
    for url in (str(zipped), Path(val_store).resolve().as_uri()):  # a .zip and a file:// URL (fsspec)
        store = TeacherStore(url)
        store.read(0)  # opened in the parent first, as a training script would
        samples = TrainingSamples(val_set, AugmentConfig(), store)
        loader = torch.utils.data.DataLoader(samples, batch_size=2, num_workers=2, collate_fn=collate)
        got = torch.cat([batch["teacher_log_probs"] for batch in loader])
        for i in range(LENGTH):
            np.testing.assert_array_equal(got[i].numpy(), expected[i])


def test_features_are_not_read_when_not_needed(val_store, val_set):
    store = TeacherStore(val_store)
    with_features = collate([TrainingSamples(val_set, AugmentConfig(), store)[i] for i in range(2)])
    without = collate([TrainingSamples(val_set, AugmentConfig(), store, features=False)[i] for i in range(2)])
    assert "teacher_features" not in without and "feature_box" not in without
    torch.testing.assert_close(without["teacher_log_probs"], with_features["teacher_log_probs"])
    logits, features = replay_targets(without, (6, 8))
    assert features is None and logits.shape[-2:] == (6, 8)


def test_missing_store_and_redaction(tmp_path):
    with pytest.raises(SkdError, match="no teacher cache"):
        TeacherStore(tmp_path / "nothing.zarr")
    with pytest.raises(SkdError, match="nothing.zip"):
        TeacherStore(tmp_path / "nothing.zip")

    shown = redact("s3://user:secret@host/bucket/store.zarr?token=x")
    assert "secret" not in shown and "token" not in shown and "user" not in shown
    assert shown == "s3://host/bucket/store.zarr"


# ---------------------------------------------------------------------------------------------
# Test-time augmentation
# ---------------------------------------------------------------------------------------------


def test_predict_flip_and_scales(teacher_ckpt, val_set):
    model, _ = model_from_checkpoint(teacher_ckpt)
    image = normalize(val_set[0]["image"])[None]
    flipped = image.flip(-1)

    log_probs, features = predict(model, image, flip=True)
    log_probs_f, features_f = predict(model, flipped, flip=True)
    assert log_probs.shape == (1, 8, *LOGIT_HW)
    torch.testing.assert_close(log_probs_f, log_probs.flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features_f, features.flip(-1), atol=1e-5, rtol=1e-5)
    # Without the flip view the teacher itself is not symmetric (so the check above means something).
    plain, _ = predict(model, image)
    plain_f, _ = predict(model, flipped)
    assert (plain_f - plain.flip(-1)).abs().max() > 1e-3

    log_probs, features = predict(model, image, scales=(0.5, 1.0))
    assert log_probs.shape == (1, 8, *LOGIT_HW)
    assert features.shape[-2:] == LOGIT_HW
    # The probabilities are the mean of the two views' probabilities on the stride-8 grid of the image.
    with torch.no_grad():
        half = torch.nn.functional.interpolate(image, size=(22, 30), mode="bilinear", align_corners=False)
        half_logits = torch.nn.functional.interpolate(model(half).logits, size=LOGIT_HW, mode="bilinear",
                                                      align_corners=False)
        full = model(image)
    expected = (half_logits.softmax(1) + full.logits.softmax(1)) / 2
    torch.testing.assert_close(log_probs.exp(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features, full.features, atol=1e-5, rtol=1e-4)  # features of the scale-1 view


def test_feature_views_are_averaged_by_their_own_count(teacher_ckpt, val_set):
    # Two identical scale-1 views: their mean is one view (the old code divided by 2 only for a flip).
    model, _ = model_from_checkpoint(teacher_ckpt)
    image = normalize(val_set[0]["image"])[None]
    with torch.no_grad():
        once = model.eval()(image)
    log_probs, features = predict(model, image, scales=(1.0, 1.0))
    torch.testing.assert_close(features, once.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_probs, once.logits.log_softmax(1), atol=1e-5, rtol=1e-5)
    _, features = predict(model, image, scales=(1.0, 1.0), flip=True)  # four views of the features
    with torch.no_grad():
        mirrored = model(image.flip(-1)).features.flip(-1)
    torch.testing.assert_close(features, (once.features + mirrored) / 2, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------


class StrideEightTeacher(torch.nn.Module):
    """Exactly translation-equivariant at stride 8 (1x1 convs on 8x8 average pools): whole-image
    and windowed inference must agree on it."""

    feature_channels = 4

    def __init__(self, feature_gain: float | list[float] = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.classifier = torch.nn.Conv2d(3, 8, 1)
        self.embed = torch.nn.Conv2d(3, self.feature_channels, 1)
        self.feature_gain = torch.tensor(feature_gain).reshape(-1, 1, 1)  # one, or one per channel

    def forward(self, x):
        from pipeline.models.outputs import SegOutput

        pooled = torch.nn.functional.avg_pool2d(x, 8, ceil_mode=True)
        return SegOutput(logits=3 * self.classifier(pooled), aux=None, features=self.feature_gain * self.embed(pooled))


def test_sliding_window_tiles_the_output_grid(teacher_ckpt, val_set):
    image = normalize(torch.stack([val_set[i]["image"] for i in range(2)]))[..., :40, :56]  # 5x7 cells
    equivariant = StrideEightTeacher().eval()
    whole = predict(equivariant, image)
    for window in ((16, 16), (24, 32), (40, 56), (64, 64)):
        windowed = predict(equivariant, image, window=window)
        torch.testing.assert_close(windowed[0], whole[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(windowed[1], whole[1], atol=1e-5, rtol=1e-5)

    # A PSPNet is not equivariant (its pyramid pools the whole input): a cell seen by one window
    # only gets exactly that window's output. 32x32 windows (4x4 cells) on a 5x7 grid, stride 16 px
    # (2 cells): rows start at cells 0, 1 and columns at 0, 2, 3, so cells (0, 0) and (0, 1) lie in
    # the top-left window only.
    model, _ = model_from_checkpoint(teacher_ckpt)
    model.eval()
    windowed, _ = predict(model, image, window=(32, 32), window_stride=(16, 16))
    with torch.no_grad():
        top_left = model(image[..., :32, :32]).logits.log_softmax(1)
    torch.testing.assert_close(windowed[..., :1, :2], top_left[..., :1, :2], atol=1e-5, rtol=1e-5)
    assert (windowed - predict(model, image)[0]).abs().max() > 1e-3  # and it is not whole-image inference


def test_cache_teacher_with_windows_and_levels_records_them(tmp_path, val_set):
    teacher = StrideEightTeacher().eval()
    info = {"name": "stride8", "num_classes": 8, "weights_sha256": "0" * 64}
    path = cache_teacher(teacher, info, val_set, tmp_path / "w.zarr", batch_size=2, feature_pool=1, workers=0,
                         window=(24, 24), levels=(1.0, 1.5), progress=False)
    store = TeacherStore(path)
    pre = store.attrs["preprocessing"]
    assert pre["teacher_window"] == [24, 24] and pre["levels"] == [1.0, 1.5]
    assert store.levels == [1.0, 1.5] and store.feature_stride == 8
    # 44x60 at 1.5 is 66x90 pixels: a 9x12 grid.
    assert store.read_log_probs(0, 1.5).shape == (8, 9, 12)
    # Equivariant teacher: windows give the whole-image map, except in the last, partial row and column
    # of cells (44 = 5.5 cells, 60 = 7.5), where windows see zero padding instead of a partial cell.
    images = normalize(torch.stack([val_set[i]["image"] for i in range(LENGTH)]))
    stored = torch.from_numpy(store.group["log_probs"][:, :, :5, :7]).log_softmax(1)
    # Within one 8-bit step (16/255; a class next to the top one is kept a step below it).
    torch.testing.assert_close(stored, predict(teacher, images)[0][..., :5, :7].log_softmax(1), atol=0.07, rtol=0)


# ---------------------------------------------------------------------------------------------
# Values float16 cannot hold
# ---------------------------------------------------------------------------------------------


def test_huge_features_are_stored_scaled_and_replay_exactly(tmp_path, val_set):
    # Features of 1e6 (a randomly initialised ResNet-101 reaches 8e5): beyond float16's 65504. The
    # other channels are far smaller: each keeps 7 bits of its own range after each position is
    # divided by its largest |value| (the precision the pair-wise loss's unit-length nodes need).
    teacher = StrideEightTeacher(feature_gain=[1e6, 1.0, 1e-2, 1e3]).eval()
    info = {"name": "stride8", "num_classes": 8, "weights_sha256": "0" * 64}
    store = TeacherStore(cache_teacher(teacher, info, val_set, tmp_path / "big.zarr", batch_size=2, feature_pool=1,
                                       workers=0, progress=False))
    stored = store.group["features"][:]
    assert np.isfinite(stored).all() and stored.min() >= 0 and stored.max() <= 1.0
    images = normalize(torch.stack([val_set[i]["image"] for i in range(LENGTH)]))
    exact = predict(teacher, images)[1].numpy()
    assert np.abs(exact).max() > 65504
    assert store.feature_scale.shape == (LENGTH, exact.shape[1])
    restored = np.stack([store.read_features(i, (slice(0, LOGIT_HW[0]), slice(0, LOGIT_HW[1]))) for i in range(LENGTH)])
    # 127 levels: within half a step (1/254) of each channel's range of x / peak, times the position's
    # peak (the stored one: the largest |value| there, rounded to float16 and relative to the image's).
    peak = store.group["feature_position_scale"][:].astype(np.float32)[:, None]
    np.testing.assert_allclose(peak, np.abs(exact).max(axis=1, keepdims=True) / np.abs(exact).max(axis=(1, 2, 3), keepdims=True),
                               rtol=1e-3)
    relative = exact / peak
    half_step = (relative.max(axis=(2, 3)) - relative.min(axis=(2, 3)))[:, :, None, None] / 254 * peak
    assert (np.abs(restored - exact) <= half_step * 1.01).all()
    # Replay hands the trainer the teacher's own values.
    batch = collate([TrainingSamples(val_set, AugmentConfig(), store)[i] for i in range(2)])
    _, features = replay_targets(batch, LOGIT_HW)
    assert ((features - torch.from_numpy(exact[:2])).abs() <= torch.from_numpy(half_step[:2]) * 1.01).all()


def test_non_finite_teacher_output_names_the_image_and_keeps_earlier_ones(tmp_path, val_set):
    class BreaksOnThirdImage(StrideEightTeacher):
        calls = 0

        def forward(self, x):
            out = super().forward(x)
            BreaksOnThirdImage.calls += 1
            if BreaksOnThirdImage.calls == 3:
                out.logits[0, 0, 0, 0] = float("nan")
            return out

    info = {"name": "broken", "num_classes": 8, "weights_sha256": "0" * 64}
    out = tmp_path / "broken.zarr"
    with pytest.raises(SkdError, match=r"image 'synthetic/val/000002' \(#2\) are not finite"):
        cache_teacher(BreaksOnThirdImage().eval(), info, val_set, out, batch_size=1, feature_pool=1, workers=0,
                      shard_images=2, progress=False)
    assert not out.exists()
    done = zarr.open_group(str(out) + ".partial", mode="r")["done"][:]
    assert done.tolist() == [True, True] + [False] * (LENGTH - 2)
