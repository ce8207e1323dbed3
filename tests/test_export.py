"""skd export: the student alone, in a format that runs without skd, equal to PyTorch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CAMVID
from pipeline.data import build_dataset
from pipeline.data.io import read_image
from pipeline.data.transforms import normalize
from pipeline.errors import SkdError
from pipeline.export import check_export, export_model
from pipeline.models import build_model
from pipeline.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"name": "pspnet_resnet18", "num_classes": 11, "width": 0.125}


def real_or_synthetic_image(size: tuple[int, int]) -> torch.Tensor:
    if CAMVID.is_dir():
        image = read_image(sorted((CAMVID / "val").glob("*.png"))[0])[:, : size[0], : size[1]]
    else:
        image = build_dataset("synthetic", None, "val", size=list(size), length=1)[0]["image"]
    return normalize(image[None])


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_an_exported_student_runs_without_skd_and_matches_pytorch(tmp_path, fmt):
    torch.manual_seed(0)
    model = build_model(**ARCH).eval()
    path = export_model(model, fmt, (96, 128), tmp_path / f"student.{fmt}")
    image = real_or_synthetic_image((96, 128))
    # Loaded with torch alone: a deployment needs no skd code.
    loaded = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image).logits, atol=1e-5, rtol=1e-5)
    check = check_export(path, fmt, model, image)
    assert check["checked"] and check["max_abs_diff"] <= 1e-5 and check["argmax_agreement"] == 1.0
    assert not path.with_name(path.name + ".tmp").exists()


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is not None, reason="onnx export is available here")
def test_onnx_without_its_packages_is_a_clear_error(tmp_path):
    with pytest.raises(SkdError, match="pip install onnx onnxscript"):
        export_model(build_model(**ARCH), "onnx", (64, 64), tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


def test_skd_export_reports_its_check(tmp_path):
    save_checkpoint(tmp_path / "model.pt", {"arch": ARCH, "model": build_model(**ARCH).state_dict()})
    result = subprocess.run([sys.executable, "-m", "cli", "export", "--checkpoint", str(tmp_path / "model.pt"),
                             "--format", "torchscript", "--size", "64x96", "--out", str(tmp_path / "s.ts")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "argmax agreement 100.000 %" in result.stdout and (tmp_path / "s.ts").is_file()


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="ONNX export needs onnx and onnxscript, its check onnxruntime: pip install onnx onnxscript "
                           "onnxruntime")
def test_onnx_export_runs_in_onnxruntime_like_pytorch(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = build_model(**ARCH).eval()
    path = export_model(model, "onnx", (96, 128), tmp_path / "student.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = torch.cat([real_or_synthetic_image((96, 128)), torch.randn(2, 3, 96, 128)])  # batch is dynamic
    (ours,) = session.run(None, {name: images.numpy()})
    with torch.no_grad():
        reference = model(images).logits
    assert ours.shape == tuple(reference.shape)
    assert (torch.from_numpy(ours).argmax(1) == reference.argmax(1)).float().mean().item() >= 0.999
    assert float((torch.from_numpy(ours) - reference).abs().max()) < 1e-3
    # Height and width are fixed (the pyramid pooling's bins are laid out for them): another size
    # is refused by the runtime rather than answered wrongly.
    with pytest.raises(Exception, match="invalid dimensions"):
        session.run(None, {name: torch.randn(1, 3, 120, 160).numpy()})
    check = check_export(path, "onnx", model, real_or_synthetic_image((96, 128)))
    assert check["checked"] and check["argmax_agreement"] >= 0.999
