"""skd predict: label, colour and overlay PNGs for files, folders and patterns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CAMVID
from pipeline.data.io import read_image
from pipeline.data.transforms import normalize
from pipeline.errors import SkdError
from pipeline.models import build_model
from pipeline.predict import expand_inputs, palette_for, predict_files
from pipeline.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125}


def test_inputs_expand_from_files_folders_and_patterns(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "notes.txt"):
        (tmp_path / "in").mkdir(exist_ok=True)
        if name.endswith("txt"):
            (tmp_path / "in" / name).write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "in" / name)
    assert [p.name for p in expand_inputs([str(tmp_path / "in")])] == ["a.png", "b.jpg"]
    assert [p.name for p in expand_inputs([str(tmp_path / "in" / "*.jpg")])] == ["b.jpg"]
    with pytest.raises(SkdError, match="no image file"):
        expand_inputs([str(tmp_path / "nothing*.png")])
    with pytest.raises(SkdError, match="named a"):
        expand_inputs([str(tmp_path / "in" / "a.png"), str(tmp_path / "in")])


def test_predict_writes_the_models_argmax_as_label_colour_and_overlay(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (44, 60, 3), dtype=np.uint8)).save(tmp_path / "in" / "street.png")
    torch.manual_seed(0)
    model = build_model(**ARCH).eval()
    save_checkpoint(tmp_path / "model.pt", {"arch": ARCH, "model": model.state_dict()})
    result = subprocess.run([sys.executable, "-m", "cli", "--quiet", "predict", str(tmp_path / "in"), "--checkpoint",
                             str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--device", "cpu",
                             "--dataset", "synthetic"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    label = np.asarray(Image.open(tmp_path / "out" / "street_label.png"))
    image = read_image(tmp_path / "in" / "street.png")
    # The model's own argmax, upsampled to the image, computed here without the predict code.
    with torch.no_grad():
        logits = model(normalize(image[None])).logits
    expected = torch.nn.functional.interpolate(logits, size=(44, 60), mode="bilinear", align_corners=False).argmax(1)[0]
    assert label.shape == (44, 60) and (label == expected.numpy()).mean() > 0.999
    colour = np.asarray(Image.open(tmp_path / "out" / "street_color.png"))
    palette = np.asarray(palette_for("synthetic", 8), dtype=np.uint8)
    assert (colour == palette[label]).all()
    blended = np.asarray(Image.open(tmp_path / "out" / "street_overlay.png")).astype(int)[:44, :60]  # legend below
    assert np.abs(blended - (image.numpy().transpose(1, 2, 0).astype(int) + palette[label].astype(int)) / 2).max() <= 1


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_predict_on_a_real_camvid_image(tmp_path):
    arch = {**ARCH, "num_classes": 11}
    image = sorted((CAMVID / "val").iterdir())[0]
    labels = predict_files(build_model(**arch), [image], tmp_path, palette_for("camvid", 11), torch.device("cpu"),
                           progress=False)
    label = np.asarray(Image.open(labels[0]))
    assert label.shape == (360, 480) and label.max() < 11


def test_batched_evaluation_with_workers_equals_one_image_at_a_time(tmp_path):
    from pipeline.data import build_dataset
    from pipeline.evaluate import evaluate_model
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model("pspnet_resnet18", 8, width=0.125).eval()
    val = build_dataset("synthetic", None, "val", size=[32, 48], length=10)
    one = evaluate_model(model, val, batch_size=1, progress=False)
    batched = evaluate_model(model, val, batch_size=4, workers=2, progress=False)  # batches of 4, 4 and 2
    assert one.matrix.sum() == batched.matrix.sum() == 10 * 32 * 48 - sum(int((val[i]["label"] == 255).sum()) for i in range(10))
    # The same predictions up to float noise in batched convolutions: at most a pixel or two apart.
    assert (one.matrix - batched.matrix).abs().sum().item() <= 4
