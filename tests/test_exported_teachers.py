"""Teachers without skd's Python code: exported programs (.pt2, TorchScript, ONNX) and entry points
(package.module:function), cached through `skd cache-teacher --teacher ...`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from torch import nn

from conftest import TINY_DATA, run_main
from pipeline.cache.codecs import FEATURE_LEVELS, LOG_PROB_STEP, decode_features, quantise_log_probs
from pipeline.data import build_dataset
from pipeline.models import build_model
from pipeline.models.exported import METADATA_FORMAT, METADATA_NAME, load_user_teacher
from pipeline.train.checkpoint import save_checkpoint

ARCH = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125}
CLASSES = ["sky", "road", "sidewalk", "building", "vegetation", "vehicle", "pole", "person"]  # synthetic's
# The tiny hand-checkable teacher: one 8x8 convolution with stride 8, 3 -> 8 classes, no features.
ENTRY_MODULE = '''
import torch
from torch import nn
from pipeline.models import build_model

def pspnet(num_classes):  # no 'weights' parameter: skd loads --teacher-weights into it as a state dict
    torch.manual_seed(123)  # other weights than the checkpoint's, so the loaded ones must take over
    return build_model("pspnet_resnet18", num_classes, width=0.125)

def pspnet_with_weights(num_classes, weights):  # takes the file itself
    model = build_model("pspnet_resnet18", num_classes, width=0.125)
    model.load_state_dict(torch.load(weights, weights_only=True)["model"])
    return model

def conv(num_classes=8):
    torch.manual_seed(7)
    return nn.Conv2d(3, num_classes, 8, stride=8)

def five_classes():
    return nn.Conv2d(3, 5, 8, stride=8)

def not_a_module():
    return {"weights": None}
'''


def cli(*args: str) -> None:
    """skd ARGS in this process, for fixtures (errors raise)."""
    import cli as skd_cli

    skd_cli.cli.main(list(args), standalone_mode=False, prog_name="skd")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> dict[str, Path]:
    """A tiny skd teacher checkpoint and its store."""
    root = tmp_path_factory.mktemp("exported")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": TINY_DATA, "train": {"device": "cpu"},
                                      "cache": {"batch_size": 4, "feature_pool": 2}}))
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", {"arch": ARCH, "model": build_model(**ARCH).state_dict()})
    cli("-q", "cache-teacher", "--config", str(config), "--teacher", str(root / "teacher.pt"),
        "--cache", str(root / "original.zarr"))
    return {"root": root, "config": config, "teacher": root / "teacher.pt", "store": root / "original.zarr"}


@pytest.fixture(scope="module")
def exported(original) -> dict[str, Path]:
    """The two files `skd export` writes of the teacher. The export is at 40x64 and the data are
    32x48: the files must take other sizes than their example's."""
    files = {"pt2": original["root"] / "teacher.pt2", "ts": original["root"] / "teacher.ts"}
    for fmt, path in (("pt2", files["pt2"]), ("torchscript", files["ts"])):
        cli("export", "--checkpoint", str(original["teacher"]), "--format", fmt, "--size", "40x64",
            "--with-features", "--dataset", "synthetic", "--out", str(path))
    return files


@pytest.fixture
def entry_module(tmp_path, monkeypatch) -> str:
    module = f"my_teachers_{tmp_path.name.replace('-', '_')}"  # a fresh module per test
    (tmp_path / f"{module}.py").write_text(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return module


def assert_log_probs_within_one_code(store: Path, reference: Path) -> None:
    """The stored (decoded) log-probabilities of two stores differ by at most one 8-bit code: a value
    within float error of a rounding boundary may round either way, nothing more."""
    a, b = zarr.open_group(str(store), mode="r")["log_probs"][:], zarr.open_group(str(reference), mode="r")["log_probs"][:]
    assert a.shape == b.shape and np.isfinite(a).all()
    assert np.abs(a - b).max() <= LOG_PROB_STEP * (1 + 1e-6)


@pytest.mark.parametrize("fmt", ["pt2", "ts"])
def test_an_exported_teacher_caches_the_store_of_its_checkpoint(original, exported, monkeypatch, capsys, fmt):
    file, out = exported[fmt], original["root"] / f"{fmt}.zarr"
    code, _, err = run_main(monkeypatch, capsys, "-q", "cache-teacher", "--config", str(original["config"]),
                            "--teacher", str(file), "--cache", str(out))
    assert code == 0, err
    assert_log_probs_within_one_code(out, original["store"])
    # The (logits, features) export carries the features: equal within one 7-bit code of each channel
    # (scale / 127 at each position's scale), and one float16 step of that position scale.
    got, ref = zarr.open_group(str(out), mode="r"), zarr.open_group(str(original["store"]), mode="r")
    for i in range(ref["features"].shape[0]):
        mine, theirs = (decode_features(g["features"][i], g["feature_scale"][i], g["feature_offset"][i],
                                        g["feature_position_scale"][i]) for g in (got, ref))
        step = ref["feature_scale"][i][:, None, None] / FEATURE_LEVELS * ref["feature_position_scale"][i]
        assert np.all(np.abs(mine - theirs) <= step * (1 + 1e-5) + 2.0 ** -10 * np.abs(theirs))
    teacher = got.attrs["teacher"]
    assert teacher["weights_sha256"] == sha256(file) and teacher["checkpoint"] == file.name
    assert teacher["normalisation"]["source"] == f"{file.name} metadata"
    assert teacher["class_names"] == CLASSES and teacher["native_stride"] == 8
    assert "input_sizes" not in teacher or "any" in teacher["input_sizes"]  # not fixed at the export's 40x64


def test_an_entry_point_teacher_gets_its_weights_and_the_store_names_it(original, entry_module, tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / "entry.zarr"
    code, _, err = run_main(monkeypatch, capsys, "-q", "cache-teacher", "--config", str(original["config"]),
                            "--teacher", f"{entry_module}:pspnet", "--teacher-weights", str(original["teacher"]),
                            "--cache", str(out))
    assert code == 0, err
    assert_log_probs_within_one_code(out, original["store"])  # the checkpoint's weights, loaded as a state dict
    teacher = zarr.open_group(str(out), mode="r").attrs["teacher"]
    assert teacher["name"] == f"{entry_module}:pspnet" and teacher["weights_sha256"] == sha256(original["teacher"])
    assert len(teacher["state_sha256"]) == 64
    # Another entry point is another teacher: the store is refused to it, and left as it was.
    before = zarr.open_group(str(out), mode="r")["log_probs"][:]
    code, _, err = run_main(monkeypatch, capsys, "-q", "cache-teacher", "--config", str(original["config"]),
                            "--teacher", f"{entry_module}:pspnet_with_weights", "--teacher-weights",
                            str(original["teacher"]), "--cache", str(out))
    assert code != 0 and "another teacher" in err and len(err.strip().splitlines()) == 1
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["log_probs"][:], before)
    # A function that takes 'weights' gets the file: the same teacher's maps.
    out2 = tmp_path / "entry2.zarr"
    code, _, err = run_main(monkeypatch, capsys, "-q", "cache-teacher", "--config", str(original["config"]),
                            "--teacher", f"{entry_module}:pspnet_with_weights", "--teacher-weights",
                            str(original["teacher"]), "--cache", str(out2))
    assert code == 0, err
    assert_log_probs_within_one_code(out2, original["store"])


def expected_log_probs(images: torch.Tensor, conv: nn.Conv2d, mean, std, program_hw=None) -> torch.Tensor:
    """By hand: the teacher's own normalisation of RGB/255, (a fixed-size program's resize), the
    stride-8 convolution, bilinear onto the ceil(H/8) x ceil(W/8) grid, log-softmax."""
    x = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    if program_hw:
        x = F.interpolate(x, size=program_hw, mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = conv(x)
    grid = (-(-images.shape[-2] // 8), -(-images.shape[-1] // 8))
    if tuple(logits.shape[-2:]) != grid:
        logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
    return quantise_log_probs(logits.log_softmax(1), class_dim=1)


def synthetic_images() -> torch.Tensor:
    ds = build_dataset("synthetic", None, "train", **TINY_DATA["options"])
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_an_entry_point_sees_the_normalisation_its_flags_give(original, entry_module, tmp_path, monkeypatch, capsys):
    out = tmp_path / "conv.zarr"
    code, _, err = run_main(monkeypatch, capsys, "-q", "cache-teacher", "--config", str(original["config"]),
                            "--teacher", f"{entry_module}:conv", "--teacher-mean", "0.5,0.4,0.3",
                            "--teacher-std", "0.25,0.2,0.3", "--no-features", "--cache", str(out))
    assert code == 0, err
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 8, 8, stride=8)  # what the entry point builds
    want = expected_log_probs(synthetic_images(), conv, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    group = zarr.open_group(str(out), mode="r")
    assert np.abs(group["log_probs"][:] - want.numpy()).max() <= LOG_PROB_STEP * (1 + 1e-6)
    assert group.attrs["teacher"]["normalisation"] == {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3],
                                                       "source": "--teacher-mean/--teacher-std"}


def onnx_conv(path: Path, conv: nn.Conv2d, hw: tuple[int, int], metadata: dict | None) -> None:
    """An ONNX model built by hand (no exporter): one Conv node, batch dynamic, height and width fixed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = conv.out_channels
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["logits"], kernel_shape=[8, 8], strides=[8, 8])],
        "conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, *hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c, hw[0] // 8, hw[1] // 8])],
        [numpy_helper.from_array(conv.weight.detach().numpy(), "W"), numpy_helper.from_array(conv.bias.detach().numpy(), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        helper.set_model_props(model, {METADATA_NAME: json.dumps(metadata)})
    onnx.save(model, str(path))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="ONNX teachers need onnxruntime (and onnx to build one here): pip install 'skd[onnx]'")
def test_an_onnx_teacher_of_a_fixed_size_takes_its_metadata_and_resized_inputs(original, tmp_path, monkeypatch,
                                                                              capsys):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 8, 8, stride=8)
    metadata = {"format": METADATA_FORMAT, "mean": [0.45, 0.45, 0.45], "std": [0.2, 0.25, 0.3],
                "class_names": CLASSES, "input_hw": [16, 24], "model": "conv"}
    onnx_conv(tmp_path / "conv.onnx", conv, (16, 24), metadata)
    out = tmp_path / "onnx.zarr"
    code, _, err = run_main(monkeypatch, capsys, "-q", "cache-teacher", "--config", str(original["config"]),
                            "--teacher", str(tmp_path / "conv.onnx"), "--no-features", "--cache", str(out))
    assert code == 0, err
    # 32x48 images resized to the 16x24 the file accepts; its 2x3 logits resampled onto the 4x6 grid.
    want = expected_log_probs(synthetic_images(), conv, metadata["mean"], metadata["std"], program_hw=(16, 24))
    group = zarr.open_group(str(out), mode="r")
    assert np.abs(group["log_probs"][:] - want.numpy()).max() <= LOG_PROB_STEP * (1 + 1e-6)
    teacher = group.attrs["teacher"]
    assert teacher["input_sizes"] == "16x24" and teacher["format"] == "onnx" and teacher["name"] == "onnx:conv"
    assert teacher["normalisation"]["mean"] == [0.45, 0.45, 0.45]


def test_a_program_exported_at_a_fixed_size_says_so_and_is_run_at_it(tmp_path):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 8, 8, stride=8).eval()
    program = torch.export.export(conv, (torch.zeros(2, 3, 16, 24),))  # static shapes: 16x24 only
    torch.export.save(program, str(tmp_path / "conv.pt2"))
    model, info = load_user_teacher(str(tmp_path / "conv.pt2"), num_classes=8, class_names=CLASSES)
    assert info["input_sizes"] == "16x24" and info["normalisation"]["source"] == "default (ImageNet)"
    images = synthetic_images()[:2]
    x = (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        got = model(x).logits
    want = F.interpolate(conv(F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False)),
                         size=(4, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def write_ts_with_classes(path: Path, names: list[str]) -> None:
    torch.manual_seed(7)
    scripted = torch.jit.script(nn.Conv2d(3, 8, 8, stride=8))
    metadata = {"format": METADATA_FORMAT, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "class_names": names}
    torch.jit.save(scripted, str(path), _extra_files={METADATA_NAME: json.dumps(metadata)})


def test_bad_teachers_get_one_line_each_and_nothing_is_written(original, entry_module, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.pt2").write_bytes(b"not a zip archive")
    write_ts_with_classes(tmp_path / "reordered.ts", CLASSES[::-1])
    cases = [
        (["--teacher", "no_such_package_here.models:build"], "no module named 'no_such_package_here'"),
        (["--teacher", f"{entry_module}:missing"], f"{entry_module} has no function 'missing'"),
        (["--teacher", f"{entry_module}:not_a_module"], "returned a builtins.dict, not a torch.nn.Module"),
        (["--teacher", f"{entry_module}:five_classes", "--no-features"], "predicts 5 classes, the dataset has 8"),
        (["--teacher", f"{entry_module}:conv"], "gives no features: cache with --no-features"),
        (["--teacher", f"{entry_module}:pspnet", "--teacher-weights", str(tmp_path / "absent.pt")],
         "absent.pt: no such file"),
        (["--teacher", f"{entry_module}:conv", "--teacher-mean", "123.675,116.28,103.53", "--no-features"],
         "divide 0-255 statistics"),
        (["--teacher", str(tmp_path / "absent.pt2")], "teacher file not found"),
        (["--teacher", str(tmp_path / "broken.pt2")], "cannot read"),
        (["--teacher", str(tmp_path / "reordered.ts"), "--no-features"], "calls class 0 'person', the dataset 'sky'"),
        (["--teacher", str(tmp_path / "broken.pt2"), "--teacher-features", "model.head"], "cannot be hooked"),
        (["--teacher", str(tmp_path / "reordered.ts"), "--teacher-mean", "0.5,0.5,0.5"],
         "disagree with reordered.ts's own"),
    ]
    out = tmp_path / "never.zarr"
    for args, message in cases:
        code, _, err = run_main(monkeypatch, capsys, "-q", "cache-teacher", "--config", str(original["config"]),
                                *args, "--cache", str(out))
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, err)
        assert not out.exists() and not Path(f"{out}.partial").exists()
