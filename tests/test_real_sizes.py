"""Images at real sizes, mixed: a folder dataset of landscape and portrait images from 480x640 to
2048 pixels on the long side goes through every command a user runs on it (tiny models)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.cache.store import TeacherStore
from pipeline.models import build_model
from pipeline.train.checkpoint import save_checkpoint

# (H, W): none a multiple of the 64-cell tile at stride 8 beyond the first tile, one 2048 px tall.
SIZES = {"train": [(600, 800), (713, 1021), (480, 640), (1100, 900), (2048, 1152)], "val": [(713, 1021), (480, 640)]}
CLASSES = ["road", "building", "sky", "car", "person"]


def make_folder_dataset(root):
    rng = np.random.default_rng(0)
    for split, sizes in SIZES.items():
        for i, (h, w) in enumerate(sizes):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            # Horizontal bands of classes with noise: something a teacher map can follow.
            label = np.repeat((np.arange(h) * len(CLASSES) // h).astype(np.uint8)[:, None], w, axis=1)
            image = np.stack([label * 50, 255 - label * 50, np.full_like(label, 128)], -1)
            image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{split}_{i}.jpg")
            Image.fromarray(label).save(root / "masks" / split / f"{split}_{i}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": CLASSES}))
    return root


def test_mixed_real_sizes_run_through_every_command(tmp_path, monkeypatch):
    import cli

    root = make_folder_dataset(tmp_path / "street")
    config = tmp_path / "street.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "folder", "root": str(root), "crop_size": [192, 256], "scale_range": [0.5, 1.5],
                 "flip": True, "workers": 0},
        "model": {"name": "pspnet_resnet18", "width": 0.125},
        "train": {"batch_size": 2, "device": "cpu", "log_every": 1},
        "cache": {"feature_pool": 1, "levels": [1.0, 1.5], "teacher_window": [512, 512], "views": 2},
    }))
    torch.manual_seed(0)
    arch = {"name": "pspnet_resnet18", "num_classes": len(CLASSES), "width": 0.125}
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, {"arch": arch, "model": build_model(**arch).state_dict()})

    def skd(*args):
        monkeypatch.setattr(sys, "argv", ["skd", "--quiet", *args])
        try:
            cli.main()  # returns on success, exits non-zero on an error
        except SystemExit as exc:
            if exc.code:
                pytest.fail(f"skd {' '.join(args)} exited with {exc.code}")

    store = tmp_path / "street.zarr"
    skd("check-data", "--config", str(config))
    skd("cache-teacher", "--config", str(config), "--teacher", str(teacher), "--cache", str(store))
    cached = TeacherStore(store)
    largest = (2048 // 8, 1152 // 8)  # the canvas: the tallest and the widest image
    assert cached.array("log_probs").shape == (5, len(CLASSES), *largest)
    assert cached.array("log_probs_x1.5").shape == (5, len(CLASSES), 1.5 * 2048 // 8, 1.5 * 1152 // 8)
    for i, (h, w) in enumerate(SIZES["train"]):
        assert cached.read_log_probs(i).shape[-2:] == (math.ceil(h / 8), math.ceil(w / 8))
        assert cached.read_log_probs(i, 1.5).shape[-2:] == (math.ceil(round(1.5 * h) / 8), math.ceil(round(1.5 * w) / 8))
    skd("cache-verify", str(store))
    skd("cache-stats", str(store), "--output", str(tmp_path / "stats.json"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert 1 / len(CLASSES) <= stats["mean_top_probability"] <= 1
    assert stats["pixels"] == sum(math.ceil(h / 8) * math.ceil(w / 8) for h, w in SIZES["train"])
    for views in ("--views", "--no-views"):  # exact stored views, then replay from the levels
        run = tmp_path / f"student{views}"
        skd("train-student", "--config", str(config), "--cache", str(store), "--losses", "pi,pa,ho,fd", views,
            "--iterations", "2", "--out", str(run))
        record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
        assert all(np.isfinite(record[term]) for term in ("task", "pi", "pa", "ho", "fd"))
    skd("evaluate", "--config", str(config), "--cache", str(store), "--split", "train",
        "--output", str(tmp_path / "cached.json"))
    assert 0 <= json.loads((tmp_path / "cached.json").read_text())["miou"] <= 1
    skd("predict", str(root / "images" / "val"), "--checkpoint", str(tmp_path / "student--views" / "model.pt"),
        "--out", str(tmp_path / "predictions"))
    for i, (h, w) in enumerate(SIZES["val"]):
        assert Image.open(tmp_path / "predictions" / f"val_{i}_label.png").size == (w, h)
