"""Your own teacher and student: any network through AdaptedModel, torchvision's segmentation models
by name, features by layer name, and networks at other output strides than skd's 8.

Expected values are computed by hand from the bilinear rule (align_corners=False: output pixel i
reads the source at (i + 0.5) * in / out - 0.5, clamped to the first and last source pixel).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import SkdError
from pipeline.models.adapter import AdaptedModel, split_network_output
from pipeline.models.outputs import SegOutput


def ramp_image(size: int = 64) -> torch.Tensor:
    """1x3xSxS, each channel (col - 7.5) / 16 along the width: every 16x16 block averages to its column index."""
    cols = (torch.arange(size, dtype=torch.float32) - 7.5) / 16
    return cols.expand(1, 3, size, size).clone()


class Stride16(nn.Module):
    """Logits = 16x16 average pool of the input (stride 16); features = the input itself (stride 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(16)
        self.scale = nn.Parameter(torch.ones(()))  # the probe needs a parameter to find the device

    def forward(self, x):
        return {"out": self.pool(x) * self.scale, "aux": self.pool(x) * 2}


def test_split_network_output_reads_every_form():
    a, b, c = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3), torch.full((1, 4, 3, 3), 2.0)
    assert split_network_output(a) == (a, None, None)
    assert split_network_output((a, c)) == (a, None, c)
    assert split_network_output([a, c]) == (a, None, c)
    assert split_network_output({"out": a, "aux": b}) == (a, b, None)
    assert split_network_output({"logits": a, "features": c}) == (a, None, c)
    assert split_network_output(SegOutput(a, b, c)) == (a, b, c)
    with pytest.raises(SkdError, match="keys \\['scores'\\].*'out' .*'logits'"):
        split_network_output({"scores": a})
    with pytest.raises(SkdError, match="tuple of 3 items"):
        split_network_output((a, b, c))


def test_stride16_logits_and_stride1_features_land_on_the_stride8_grid_as_computed_by_hand():
    model = AdaptedModel(Stride16(), feature_layer="pool:input")
    assert (model.num_classes, model.feature_channels, model.native_stride, model.feature_stride) == (3, 3, 16, 1)
    out = model.eval()(ramp_image())
    # 4 columns 0, 1, 2, 3 at stride 16 -> 8 columns: source positions i/2 - 0.25, clamped to [0, 3].
    expected_logits = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])
    # 64 input columns -> 8: column i reads input column 8i + 3.5, whose value is (8i + 3.5 - 7.5) / 16.
    expected_features = torch.tensor([(8 * i - 4) / 16 for i in range(8)])
    assert out.logits.shape == out.features.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out.logits[0, 1, 5], expected_logits)
    torch.testing.assert_close(out.features[0, 2, 0], expected_features)
    assert out.aux is None  # eval mode, as skd's networks
    aux = model.train()(ramp_image()).aux
    torch.testing.assert_close(aux[0, 0, 7], 2 * expected_logits)


def test_a_network_without_features_and_the_grid_of_odd_sizes():
    model = AdaptedModel(nn.Conv2d(3, 5, 3, stride=4, padding=1))
    assert (model.num_classes, model.feature_channels, model.native_stride, model.feature_stride) == (5, 0, 4, None)
    out = model(torch.zeros(2, 3, 50, 70))
    assert out.logits.shape == (2, 5, 7, 9) and out.features is None  # ceil(50 / 8), ceil(70 / 8)


def test_a_missing_feature_layer_names_the_closest_modules():
    network = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))
    with pytest.raises(SkdError, match=r"feature layer '1\.2' is not a module of Sequential; closest names: 1\.1, 1\.0"):
        AdaptedModel(network, feature_layer="1.2")
    out = AdaptedModel(network, feature_layer="1.0")(torch.zeros(1, 3, 16, 16))  # hooks the ReLU's output
    assert out.features.shape == (1, 4, 2, 2)


# -- a teacher at strides 16 (logits) and 32 (features), through the store ------------------------


class RampNetwork(nn.Module):
    """Whatever the image: logits c * j / 2 for class c in column j of a stride-16 grid, and its own
    features (k + 1) * j in column j of a stride-32 grid (ceil, as convolutions with padding)."""

    def __init__(self, classes: int = 8, channels: int = 4) -> None:
        super().__init__()
        self.classes, self.channels = classes, channels
        self.unused = nn.Parameter(torch.zeros(()))

    @staticmethod
    def ramp(x: torch.Tensor, depth: int, stride: int, step: float, start: float) -> torch.Tensor:
        rows, cols = -(-x.shape[-2] // stride), -(-x.shape[-1] // stride)
        values = (torch.arange(depth, dtype=torch.float32)[:, None] + start) * torch.arange(cols) * step
        return values[None, :, None, :].expand(x.shape[0], depth, rows, cols)

    def forward(self, x):
        return {"out": self.ramp(x, self.classes, 16, 0.5, 0.0), "features": self.ramp(x, self.channels, 32, 1.0, 1.0)}


def test_the_store_of_a_stride16_teacher_holds_the_hand_computed_bilinear_maps(tmp_path):
    from pipeline.cache.store import TeacherStore
    from pipeline.cache.writer import cache_teacher
    from pipeline.data import build_dataset

    teacher = AdaptedModel(RampNetwork()).eval()
    assert (teacher.native_stride, teacher.feature_stride, teacher.feature_channels) == (16, 32, 4)
    ds = build_dataset("synthetic", None, "train", size=[32, 48], length=2)
    info = {"name": "ramp", "num_classes": 8, "weights_sha256": "none", "native_stride": 16, "feature_stride": 32}
    out = cache_teacher(teacher, info, ds, tmp_path / "ramp.zarr", batch_size=2, feature_pool=1, workers=0, progress=False)
    log_probs, features = TeacherStore(out).read(1)
    assert log_probs.shape == (8, 4, 6) and features.shape == (4, 4, 6)
    # Logits: 3 columns (0, 1, 2) x c/2 at stride 16 -> 6 columns read at x/2 - 1/4, clamped to [0, 2].
    column = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.0])
    logits = torch.arange(8.0)[:, None] * column / 2
    expected = logits - torch.logsumexp(logits, dim=0)  # log-softmax over the classes, by its definition
    torch.testing.assert_close(torch.from_numpy(log_probs[:, 2]), expected, atol=0.035, rtol=0)  # 8-bit codes: 16/255 steps
    # Features: 2 columns (0, 1) x (k + 1) at stride 32 -> 6 columns read at x/3 - 1/3, clamped to [0, 1].
    column = torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    for k in range(4):
        torch.testing.assert_close(torch.from_numpy(features[k, 3]), (k + 1) * column, atol=(k + 1) / 127, rtol=0)
    assert TeacherStore(out).attrs["teacher"]["feature_stride"] == 32


# -- torchvision's models ---------------------------------------------------------------------------


def test_torchvision_models_at_their_native_stride_give_torchvision_s_own_output():
    """NativeStride skips torchvision's final upsampling to the input size; upsampling skd's stride-8
    map the same way gives back torchvision's output exactly (LR-ASPP predicts at stride 8)."""
    from torchvision.models import segmentation

    from pipeline.models.torchvision_models import NativeStride

    torch.manual_seed(0)
    reference = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    model = AdaptedModel(NativeStride(reference), feature_layer="classifier.high_classifier:input").eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(x)
        expected = reference(x)["out"]
    assert (model.native_stride, model.feature_stride, model.feature_channels) == (8, 8, 128)
    upsampled = torch.nn.functional.interpolate(out.logits, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled, expected)


def test_teacher_weights_in_torchvision_format_load_with_or_without_the_aux_head(tmp_path):
    from torchvision.models import segmentation

    from pipeline.models import load_torchvision_teacher

    torch.manual_seed(0)
    reference = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=8,
                                                          aux_loss=False).eval()
    torch.save(reference.state_dict(), tmp_path / "no_aux.pth")
    model, info = load_torchvision_teacher("torchvision:deeplabv3_mobilenet_v3_large", str(tmp_path / "no_aux.pth"),
                                           None, 8)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # The network's own stride-16 logits, upsampled as torchvision does: the file's weights, loaded.
        native = model.network(x)["out"]
        torch.testing.assert_close(torch.nn.functional.interpolate(native, size=(64, 64), mode="bilinear",
                                                                   align_corners=False), reference(x)["out"])
    assert info["native_stride"] == 16 and info["feature_stride"] == 16 and info["feature_layer"] == "classifier.3"
    assert info["checkpoint"] == "no_aux.pth" and len(info["weights_sha256"]) == 64


def test_imagenet_backbones_load_from_torchvision_classifier_files(tmp_path):
    import torchvision

    from pipeline.models import build_model

    torch.manual_seed(0)
    imagenet = torchvision.models.mobilenet_v3_large().state_dict()
    torch.save(imagenet, tmp_path / "mnv3.pth")
    model = build_model("torchvision:lraspp_mobilenet_v3_large", 3, pretrained_backbone=str(tmp_path / "mnv3.pth"))
    backbone = model.network.backbone.state_dict()
    assert all(torch.equal(backbone[key.removeprefix("features.")], value)
               for key, value in imagenet.items() if key.startswith("features."))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "part.pth")
    with pytest.raises(SkdError, match="part.pth does not cover the"):
        build_model("torchvision:fcn_resnet50", 3, pretrained_backbone=str(tmp_path / "part.pth"))


def test_pairwise_nodes_finer_than_the_student_s_feature_stride_are_refused():
    from pipeline.config import Config
    from pipeline.data import build_dataset
    from pipeline.train.teacher import check_student_feature_resolution

    cfg, ds = Config(), build_dataset("synthetic", None, "train", size=[32, 48], length=1)
    cfg.data.crop_size = [32, 32]
    cfg.distill.pa_node = "1px"
    with pytest.raises(SkdError, match="finer than the student's features, computed at stride 16 .2 output pixels"):
        check_student_feature_resolution(16, cfg, ds)
    check_student_feature_resolution(8, cfg, ds)  # one node per feature: fine
    cfg.distill.pa_node = "2px"
    check_student_feature_resolution(16, cfg, ds)


# -- the commands, end to end ------------------------------------------------------------------------

TINY = """
data: {dataset: synthetic, options: {size: [32, 48], length: 8}, workers: 0, crop_size: [32, 32],
       scale_range: [0.75, 1.25], flip: true}
model: {name: "torchvision:lraspp_mobilenet_v3_large"}
train: {iterations: 2, batch_size: 4, log_every: 1, checkpoint_every: 2, device: cpu}
cache: {batch_size: 4, feature_pool: 1}
"""


def test_cache_a_torchvision_teacher_and_train_evaluate_predict_profile_export_a_torchvision_student(
        tmp_path, monkeypatch, capsys):
    """A DeepLabV3-MobileNetV3 teacher (stride 16, 256 features; weights with the aux head) cached with
    a bank of views and two levels, an LR-ASPP student (stride 8, 128 features) trained from it with
    every term, then every command that takes a checkpoint."""
    import json

    from torchvision.models import segmentation

    from conftest import run_main
    from pipeline.cache.store import TeacherStore
    from pipeline.data import build_dataset
    from pipeline.data.io import read_image  # noqa: F401  (the image below is written as predict reads it)
    from PIL import Image

    torch.manual_seed(0)
    teacher = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=8, aux_loss=True)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    cfg, store, run = ["--config", str(config)], str(tmp_path / "store.zarr"), tmp_path / "student"

    code, out, err = run_main(monkeypatch, capsys, "cache-teacher", *cfg, "--teacher", "torchvision:deeplabv3_mobilenet_v3_large",
                              "--teacher-weights", str(tmp_path / "teacher.pth"), "--cache", store, "--views", "2",
                              "--levels", "1,1.5")
    assert code == 0, err
    teacher_info = TeacherStore(store).attrs["teacher"]
    assert {k: teacher_info[k] for k in ("name", "native_stride", "feature_layer", "feature_stride")} == {
        "name": "torchvision:deeplabv3_mobilenet_v3_large", "native_stride": 16, "feature_layer": "classifier.3",
        "feature_stride": 16}
    assert TeacherStore(store).feature_channels == 256

    # Nodes of one output pixel are finer than the teacher's stride-16 features (2 pixels each).
    code, _, err = run_main(monkeypatch, capsys, "train-student", *cfg, "--cache", store, "--losses", "pa",
                            "--pa-node", "1px", "--out", str(tmp_path / "refused"))
    assert code == 2 and "finer than the store's features" in err and "the teacher's own 16 px" in err and "--teacher-features" in err, err
    assert len(err.strip().splitlines()) == 1

    code, _, err = run_main(monkeypatch, capsys, "train-student", *cfg, "--cache", store, "--losses", "pi,pa,ho,fd",
                            "--out", str(run))
    assert code == 0, err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(records[-1][term] > 0 for term in ("pi", "pa", "ho", "fd"))
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["fd_adapter"]["weight"].shape == (256, 128, 1, 1)  # the student's channels to the teacher's
    model_pt = run / "model.pt"
    assert torch.load(model_pt, weights_only=True)["arch"]["name"] == "torchvision:lraspp_mobilenet_v3_large"

    code, out, err = run_main(monkeypatch, capsys, "evaluate", *cfg, "--checkpoint", str(model_pt),
                              "--output", str(tmp_path / "eval.json"))
    assert code == 0, err
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["miou"] <= 1

    image = build_dataset("synthetic", None, "val", size=[32, 48], length=1)[0]["image"]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "scene.png")
    code, out, err = run_main(monkeypatch, capsys, "predict", str(tmp_path / "scene.png"), "--checkpoint", str(model_pt),
                              "--out", str(tmp_path / "pred"))
    assert code == 0, err
    assert Image.open(tmp_path / "pred" / "scene_label.png").size == (48, 32)

    code, out, err = run_main(monkeypatch, capsys, "profile", "--checkpoint", str(model_pt), "--size", "32x48",
                              "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--device", "cpu")
    assert code == 0, err
    assert "torchvision:lraspp_mobilenet_v3_large" in out and "3.22 M parameters" in out

    code, out, err = run_main(monkeypatch, capsys, "export", "--checkpoint", str(model_pt), "--format", "torchscript",
                              "--size", "32x48", "--out", str(tmp_path / "student.ts"))
    assert code == 0, err
    assert "argmax agreement 100.000 %" in out


def test_a_wrong_class_count_and_a_missing_layer_each_get_one_line(tmp_path, monkeypatch, capsys):
    from torchvision.models import segmentation

    from conftest import run_main

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    voc = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    torch.save(voc.state_dict(), tmp_path / "voc.pth")
    code, _, err = run_main(monkeypatch, capsys, "cache-teacher", "--config", str(config), "--teacher",
                            "torchvision:lraspp_mobilenet_v3_large", "--teacher-weights", str(tmp_path / "voc.pth"),
                            "--cache", str(tmp_path / "s.zarr"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "voc.pth predicts 21 classes (classifier.low_classifier.weight), the dataset has 8" in err
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()

    code, _, err = run_main(monkeypatch, capsys, "train-student", "--config", str(config), "--losses", "none",
                            "--student-features", "classifier.high", "--out", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "feature layer 'classifier.high' is not a module of NativeStride; closest names: classifier.high_classifier" in err
