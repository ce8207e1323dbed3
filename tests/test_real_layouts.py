"""The pipeline on real layouts: variable-size images (ADE20K) through the cache and replay, and
real CamVid through cache-teacher -> train-student -> evaluate on the command line."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.cache.replay import replay_targets
from pipeline.data.samples import TrainingSamples, collate
from pipeline.cache.store import TeacherStore
from pipeline.cache.writer import cache_teacher
from pipeline.data import build_dataset
from pipeline.data.transforms import AugmentConfig
from pipeline.models import build_model
from conftest import CAMVID

ADE_SIZES = [(40, 56), (72, 48), (24, 88)]  # (H, W): different sizes and aspect ratios


def make_ade(root):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        for i, (h, w) in enumerate(ADE_SIZES):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8)).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


def test_variable_size_images_are_cached_on_a_canvas_and_replayed_within_their_extent(tmp_path):
    dataset = build_dataset("ade20k", make_ade(tmp_path / "ade"), "train")
    torch.manual_seed(0)
    teacher = build_model("pspnet_resnet18", 150, width=0.125).eval()
    path = tmp_path / "ade.zarr"
    cache_teacher(teacher, {"name": "pspnet_resnet18", "num_classes": 150, "width": 0.125}, dataset, path,
                  feature_pool=2, workers=0, progress=False)
    store = TeacherStore(path)
    # Canvas = the largest extent in each direction, at stride 8; each image keeps its own extent.
    assert store.group["log_probs"].shape == (3, 150, math.ceil(72 / 8), math.ceil(88 / 8))
    for i, (h, w) in enumerate(ADE_SIZES):
        logits, features = store.read(i)
        assert logits.shape == (150, math.ceil(h / 8), math.ceil(w / 8))
        assert features.shape[-2:] == (math.ceil(math.ceil(h / 8) / 2), math.ceil(math.ceil(w / 8) / 2))
        assert np.isfinite(logits).all() and np.isfinite(features).all()  # the canvas fill (NaN) is never read
    # Crops larger than some images: the replayed targets stay finite and padding is masked out.
    samples = TrainingSamples(dataset, AugmentConfig((48, 64), (0.75, 1.5), flip=True), store, seed=0)
    batch = collate([samples[i] for i in range(3)])
    logits, features = replay_targets(batch, (6, 8))
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    assert not batch["valid"].all() and batch["valid"].any()


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid not found at {CAMVID}")
def test_camvid_cache_train_evaluate_on_the_command_line(tmp_path, monkeypatch):
    import cli

    config = tmp_path / "camvid.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "camvid", "root": str(CAMVID), "train_split": "val", "crop_size": [96, 128],
                 "scale_range": [0.5, 1.0], "flip": True, "workers": 0},
        "train": {"batch_size": 4, "device": "cpu", "log_every": 1},
        "cache": {"batch_size": 4, "feature_pool": 4},
    }))
    torch.manual_seed(0)
    arch = {"name": "pspnet_resnet18", "num_classes": 11, "width": 0.125}
    teacher = tmp_path / "teacher.pt"
    torch.save({"arch": arch, "model": build_model(**arch).state_dict()}, teacher)

    def skd(*args):
        monkeypatch.setattr(sys, "argv", ["skd", "--quiet", *args])
        try:
            cli.main()  # returns on success, exits non-zero on an error
        except SystemExit as exc:
            pytest.fail(f"skd {' '.join(args)} exited with {exc.code}")

    # Cache the 101 CamVid val images (small, so the test stays fast), train on them, evaluate.
    store = tmp_path / "camvid-val.zarr"
    skd("cache-teacher", "--config", str(config), "--teacher", str(teacher), "--split", "val", "--cache", str(store))
    assert TeacherStore(store).group["log_probs"].shape == (101, 11, 45, 60)
    skd("train-student", "--config", str(config), "--cache", str(store), "--losses", "pi,pa,ho",
        "--model", "pspnet_resnet18", "--width", "0.125", "--iterations", "2", "--out", str(tmp_path / "student"))
    log = [json.loads(line) for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert {"task", "pi", "pa", "ho", "d_adv", "d_gp"} <= set(log[-1])
    skd("evaluate", "--config", str(config), "--checkpoint", str(tmp_path / "student" / "model.pt"),
        "--output", str(tmp_path / "student.json"))
    report = json.loads((tmp_path / "student.json").read_text())
    assert list(report["per_class_iou"]) == ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                                             "Fence", "Car", "Pedestrian", "Bicyclist"]
    assert 0.0 <= report["pixel_accuracy"] <= 1.0
