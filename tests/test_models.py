"""Networks: output sizes, checkpoint layouts (torchvision, reference PSPNet), discriminator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from pipeline.errors import SkdError
from pipeline.models import (
    MODELS,
    Discriminator,
    LoadReport,
    SegOutput,
    build_model,
    load_backbone,
    load_checkpoint_state,
    load_reference_pspnet,
)
from pipeline.models.discriminator import SelfAttention, SpectralNormConv2d
from pipeline.models.pspnet import PSPModule

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MOBILENET_FILE = SHARED / "weights" / "mobilenet_v2_imagenet_tflite_int8_dequant_bnrecal_camvid-c2b858cd.pth"
ALL_NAMES = ["pspnet_resnet18", "pspnet_resnet34", "pspnet_resnet50", "pspnet_resnet101", "pspnet_mobilenetv2"]


def backbone_items(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Key → shape for everything but the heads, with ``prefix`` removed."""
    return {k.removeprefix(prefix): tuple(v.shape) for k, v in state.items() if not k.startswith(("head.", "dsn."))}


# --------------------------------------------------------------------------------------------
# Building and output shapes
# --------------------------------------------------------------------------------------------


def test_models_dict_has_the_required_names():
    assert set(ALL_NAMES) <= set(MODELS)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("size", [(64, 64), (57, 75)])
def test_output_shapes_train_and_eval(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, width=0.25)
    assert model.output_stride == 8 and model.num_classes == 5
    h, w = math.ceil(size[0] / 8), math.ceil(size[1] / 8)
    x = torch.randn(2, 3, *size)

    out = model.train()(x)
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 5, h, w)
    assert out.aux is not None and out.aux.shape == (2, 5, h, w)
    assert out.features.shape == (2, model.feature_channels, h, w)

    with torch.no_grad():
        out = model.eval()(x)
    assert out.aux is None
    assert out.logits.shape == (2, 5, h, w)
    assert out.features.shape == (2, model.feature_channels, h, w)


@pytest.mark.parametrize("size", [(64, 64), (57, 75), (45, 61)])
def test_deep_stem_keeps_the_ceil_grid(size):
    model = build_model("pspnet_resnet18", 3, width=0.25, deep_stem=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.logits.shape[-2:] == (math.ceil(size[0] / 8), math.ceil(size[1] / 8))


def test_360x480_gives_45x60():
    model = build_model("pspnet_resnet18", 11, width=0.125).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 360, 480)).logits.shape == (1, 11, 45, 60)


def test_feature_and_head_widths():
    # PSP width: 128 for ResNet-18/34 and MobileNetV2, 512 for ResNet-50/101, times width.
    assert build_model("pspnet_resnet18", 19).feature_channels == 128
    assert build_model("pspnet_resnet34", 19, width=0.5).feature_channels == 64
    assert build_model("pspnet_mobilenetv2", 19).feature_channels == 128
    r101 = build_model("pspnet_resnet101", 19)
    assert r101.feature_channels == 512
    assert r101.dsn[0].in_channels == 1024 and r101.dsn[0].out_channels == 512
    r50 = build_model("pspnet_resnet50", 19, width=0.25)
    assert r50.feature_channels == 128
    assert r50.head[0].stages[0][1].in_channels == 512  # 2048 × 0.25
    r18 = build_model("pspnet_resnet18", 19, width=0.25)
    assert r18.conv1.out_channels == 16 and r18.dsn[0].in_channels == 64 and r18.dsn[0].out_channels == 32
    tiny = build_model("pspnet_resnet18", 19, width=0.05)  # 64 × 0.05 = 3.2 → at least 8
    assert tiny.conv1.out_channels == 8 and tiny.feature_channels == 8


def test_deep_stem_defaults():
    assert not hasattr(build_model("pspnet_resnet18", 2, width=0.25), "conv2")
    assert not hasattr(build_model("pspnet_resnet34", 2, width=0.25), "conv2")
    r50 = build_model("pspnet_resnet50", 2, width=0.25)
    assert r50.conv1.kernel_size == (3, 3) and r50.conv3.out_channels == 32  # 128 × 0.25
    assert r50.layer1[0].conv1.in_channels == 32
    r50_tv = build_model("pspnet_resnet50", 2, width=0.25, deep_stem=False)
    assert r50_tv.conv1.kernel_size == (7, 7) and not hasattr(r50_tv, "conv2")


def test_layer3_and_layer4_are_dilated_not_strided():
    model = build_model("pspnet_resnet50", 2, width=0.25)
    for layer, dilation in ((model.layer3, 2), (model.layer4, 4)):
        for block in layer:
            assert block.conv2.stride == (1, 1)
            assert block.conv2.dilation == (dilation, dilation)
            assert block.conv2.padding == (dilation, dilation)
        assert layer[0].downsample[0].stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)


def test_build_model_errors():
    with pytest.raises(SkdError) as info:
        build_model("pspnet_resnet152", 19)
    assert "pspnet_resnet152" in str(info.value)
    assert all(name in str(info.value) for name in ALL_NAMES)
    with pytest.raises(SkdError, match="deep_stem"):
        build_model("pspnet_mobilenetv2", 19, deep_stem=True)
    with pytest.raises(SkdError, match="width"):
        build_model("pspnet_resnet18", 19, width=0)
    with pytest.raises(SkdError, match="num_classes"):
        build_model("pspnet_resnet18", 0)


def test_features_are_taken_before_dropout():
    torch.manual_seed(0)
    model = build_model("pspnet_resnet18", 4, width=0.25)
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    # Dropout2d zeroes whole channels; leaky-ReLU features are never exactly zero over a whole map.
    assert (out.features.abs().sum(dim=(2, 3)) > 0).all()
    # ... but the logits are computed from the dropped-out features.
    assert not torch.allclose(out.logits, model.head[1](out.features))
    with torch.no_grad():
        out = model.eval()(x)
        torch.testing.assert_close(out.logits, model.head[1](out.features))


def test_psp_concatenates_pooled_stages_before_the_input():
    # Reference layout: bottleneck input channels = [stage1, stage2, stage3, stage6, input features].
    torch.manual_seed(0)
    psp = PSPModule(8, 4).eval()
    with torch.no_grad():
        psp.bottleneck[0].weight[:, :16] = 0  # ignore the four 4-channel stages
        x = torch.randn(1, 8, 7, 9)
        before = psp.forward_features(x)
        for stage in psp.stages:
            stage[1].weight.normal_()
        after = psp.forward_features(x)
    torch.testing.assert_close(before, after)


# --------------------------------------------------------------------------------------------
# torchvision layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, tv_builder", [
    ("pspnet_resnet18", torchvision.models.resnet18),
    ("pspnet_resnet34", torchvision.models.resnet34),
    ("pspnet_resnet50", torchvision.models.resnet50),
])
def test_resnet_backbone_keys_equal_torchvision(name, tv_builder):
    ours = backbone_items(build_model(name, 19, deep_stem=False).state_dict())
    theirs = {k: tuple(v.shape) for k, v in tv_builder().state_dict().items() if not k.startswith("fc.")}
    assert ours == theirs


def test_torchvision_resnet18_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up would show
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)

    model = build_model("pspnet_resnet18", 19)
    report = load_backbone(model, path)
    assert report.missing == [] and report.unexpected == []  # fc.* is ignored, not unexpected
    for key, value in tv.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)

    # Up to layer2 nothing is dilated, so the stride-8 map equals torchvision's.
    x = torch.randn(1, 3, 64, 80)
    model.eval()
    with torch.no_grad():
        ours = model.layer2(model.layer1(model.forward_stem(x)))
        theirs = tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))
    torch.testing.assert_close(ours, theirs)

    built = build_model("pspnet_resnet18", 19, pretrained_backbone=str(path))
    torch.testing.assert_close(built.layer4[1].conv2.weight, tv.layer4[1].conv2.weight, rtol=0, atol=0)


def test_backbone_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    model = build_model("pspnet_resnet18", 19, deep_stem=True)  # 3×3 deep stem vs the 7×7 conv1
    with pytest.raises(SkdError) as info:
        load_backbone(model, path)
    message = str(info.value)
    assert "conv1.weight" in message and "(64, 3, 7, 7)" in message and "(64, 3, 3, 3)" in message
    assert str(path) in message


def test_unrelated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(SkdError, match="shares no key"):
        load_backbone(build_model("pspnet_resnet18", 2, width=0.25), path)


def test_mobilenet_backbone_keys_equal_torchvision():
    ours = backbone_items(build_model("pspnet_mobilenetv2", 19).state_dict(), prefix="backbone.")
    theirs = {k: tuple(v.shape) for k, v in torchvision.models.mobilenet_v2().state_dict().items()
              if k.startswith("features.") and not k.startswith("features.18.")}
    assert ours == theirs


def test_mobilenet_is_dilated_to_stride_8():
    features = build_model("pspnet_mobilenetv2", 2).backbone.features
    assert len(features) == 18  # the 1280-channel conv is gone
    total_stride = 1
    for i, block in enumerate(features):
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                total_stride *= m.stride[0]
                if m.groups > 1:
                    expected = 4 if i >= 14 else 2 if i >= 7 else 1
                    assert m.dilation == (expected, expected) and m.padding == (expected, expected)
    assert total_stride == 8
    assert features[13].out_channels == 96 and features[17].out_channels == 320


def test_mobilenet_imagenet_file_loads():
    if not MOBILENET_FILE.is_file():
        pytest.skip(f"{MOBILENET_FILE} not present")
    model = build_model("pspnet_mobilenetv2", 11)
    report = load_backbone(model, MOBILENET_FILE)
    assert report.missing == []
    assert report.unexpected == []  # classifier.* and features.18.* are ignored

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(MOBILENET_FILE, map_location="cpu", weights_only=True))
    reference.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # undilated up to features[6]: identical stride-8 maps
        torch.testing.assert_close(model.backbone.features[:7](x), reference.features[:7](x))
    built = build_model("pspnet_mobilenetv2", 11, pretrained_backbone=str(MOBILENET_FILE))
    torch.testing.assert_close(built.backbone.features[17].conv[2].weight, reference.features[17].conv[2].weight)


# --------------------------------------------------------------------------------------------
# Reference PSPNet checkpoint layout
# --------------------------------------------------------------------------------------------


def reference_layout(blocks: list[int], bottleneck: bool, psp: int, num_classes: int,
                     with_counters: bool = True) -> dict[str, tuple[int, ...]]:
    """Key → shape of a reference PSPNet checkpoint, written out from the layout description."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out_c, in_c, k, bias=False):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)
        if bias:
            shapes[f"{name}.bias"] = (out_c,)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)
        if with_counters:
            shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 3), bn("bn1", 64)
    conv("conv2", 64, 64, 3), bn("bn2", 64)
    conv("conv3", 128, 64, 3), bn("bn3", 128)
    inplanes = 128
    expansion = 4 if bottleneck else 1
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            if b == 0 and (li == 2 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1), bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    layer3 = 256 * expansion
    for i in range(4):
        conv(f"head.0.stages.{i}.1", psp, inplanes, 1), bn(f"head.0.stages.{i}.2", psp)
    conv("head.0.bottleneck.0", psp, inplanes + 4 * psp, 3), bn("head.0.bottleneck.1", psp)
    conv("head.1", num_classes, psp, 1, bias=True)
    conv("dsn.0", psp, layer3, 3, bias=True), bn("dsn.1", psp)
    conv("dsn.3", num_classes, psp, 1, bias=True)
    return shapes


def numbered_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each tensor filled with its own index, so a key landing in the wrong place would show."""
    state = {}
    for i, (key, shape) in enumerate(shapes.items()):
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        state[key] = torch.full(shape, i, dtype=dtype)
    return state


@pytest.mark.parametrize("with_counters", [True, False])
def test_reference_r101_checkpoint_loads_strictly(tmp_path, with_counters):
    shapes = reference_layout([3, 4, 23, 3], bottleneck=True, psp=512, num_classes=19, with_counters=with_counters)
    state = numbered_state(shapes)
    path = tmp_path / "psp_r101.pth"
    torch.save(state, path)
    del state

    model = build_model("pspnet_resnet101", 19)
    report = load_reference_pspnet(model, path)
    assert report.missing == [] and report.unexpected == []
    model_state = model.state_dict()
    if with_counters:
        assert {k: tuple(v.shape) for k, v in model_state.items()} == shapes
    for i, key in enumerate(shapes):
        assert model_state[key].flatten()[0].item() == i, key
        assert model_state[key].min().item() == model_state[key].max().item() == i, key


def test_reference_r18_student_layout_loads(tmp_path):
    # The reference ResNet-18 student: deep stem, PSP 512→128, aux 256→128.
    shapes = reference_layout([2, 2, 2, 2], bottleneck=False, psp=128, num_classes=19)
    path = tmp_path / "psp_r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in numbered_state(shapes).items()}}, path)
    model = build_model("pspnet_resnet18", 19, deep_stem=True)
    report = load_reference_pspnet(model, path)
    assert report.missing == [] and report.unexpected == []
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_reference_shape_mismatch_names_key_and_shapes(tmp_path):
    shapes = reference_layout([2, 2, 2, 2], bottleneck=False, psp=128, num_classes=21)
    path = tmp_path / "psp_r18_21.pth"
    torch.save(numbered_state(shapes), path)
    model = build_model("pspnet_resnet18", 19, deep_stem=True)
    with pytest.raises(SkdError) as info:
        load_reference_pspnet(model, path)
    message = str(info.value)
    assert "head.1" in message and "21" in message and "19" in message and str(path) in message


def test_reference_missing_keys_are_refused_unless_not_strict(tmp_path):
    shapes = reference_layout([2, 2, 2, 2], bottleneck=False, psp=128, num_classes=19)
    state = numbered_state(shapes)
    del state["dsn.3.weight"], state["dsn.3.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = build_model("pspnet_resnet18", 19, deep_stem=True)
    with pytest.raises(SkdError, match="dsn.3"):
        load_reference_pspnet(model, path)
    report = load_reference_pspnet(model, path, strict=False)
    assert sorted(report.missing) == ["dsn.3.bias", "dsn.3.weight"] and report.unexpected == ["extra.weight"]
    assert "2 missing" in str(report) and "extra.weight" in str(report)


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def test_checkpoint_wrappers_and_module_prefix(tmp_path):
    weights = {"conv1.weight": torch.ones(2), "layer1.0.bn1.bias": torch.zeros(3)}
    for i, wrapped in enumerate([
        weights,
        {"model": weights, "epoch": 3},
        {"state_dict": {"module." + k: v for k, v in weights.items()}},
    ]):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(wrapped, path)
        state = load_checkpoint_state(path)
        assert set(state) == set(weights)


def test_corrupt_and_missing_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(SkdError) as info:
        load_checkpoint_state(corrupt)
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)

    truncated = tmp_path / "truncated.pth"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(SkdError, match="truncated.pth"):
        load_checkpoint_state(truncated)

    with pytest.raises(SkdError, match="absent.pth"):
        load_checkpoint_state(tmp_path / "absent.pth")
    with pytest.raises(SkdError, match="absent.pth"):
        build_model("pspnet_resnet18", 2, pretrained_backbone=str(tmp_path / "absent.pth"))

    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(SkdError, match="tensor.pth"):
        load_checkpoint_state(tensor_file)


def test_load_report_str():
    assert str(LoadReport()) == "all keys matched"
    text = str(LoadReport(missing=["a", "b", "c", "d"], unexpected=["x"]))
    assert "4 missing" in text and "1 unexpected" in text and "x" in text


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["image", "logits"])
@pytest.mark.parametrize("logit_size, image_size", [((64, 64), (512, 512)), ((45, 60), (360, 480)), ((8, 8), (64, 64))])
def test_discriminator_scores_one_per_image(conditioning, logit_size, image_size):
    torch.manual_seed(0)
    d = Discriminator(num_classes=5, conditioning=conditioning)
    assert d.input_channels == (8 if conditioning == "image" else 5)
    logits = torch.randn(3, 5, *logit_size, requires_grad=True)
    image = torch.randn(3, 3, *image_size) if conditioning == "image" else None
    scores = d(logits, image)
    assert scores.shape == (3,)
    assert torch.isfinite(scores).all()
    # The adversarial term needs gradients with respect to the student's map.
    (grad,) = torch.autograd.grad(scores.sum(), logits)
    assert grad.abs().sum() > 0


def test_discriminator_layers():
    d = Discriminator(num_classes=19)
    for conv, (c_in, c_out) in zip((d.conv1, d.conv2, d.conv3, d.conv4), ((22, 64), (64, 128), (128, 256), (256, 512))):
        assert isinstance(conv, SpectralNormConv2d)
        assert (conv.in_channels, conv.out_channels) == (c_in, c_out)
        assert conv.kernel_size == (4, 4) and conv.stride == (2, 2) and conv.padding == (1, 1)
    assert not parametrize.is_parametrized(d.last)
    assert d.last.in_channels == 512 and d.last.out_channels == 1
    assert d.attn1.gamma.item() == 0 and d.attn2.gamma.item() == 0
    assert d.attn1.query.out_channels == 32 and d.attn2.key.out_channels == 64


def test_discriminator_image_input():
    torch.manual_seed(0)
    d = Discriminator(num_classes=4)
    logits = torch.randn(2, 4, 16, 20)
    image = torch.randn(2, 3, 16, 20)
    x = d.prepare_input(logits, image)
    torch.testing.assert_close(x[:, :4].sum(dim=1), torch.ones(2, 16, 20))  # class probabilities
    torch.testing.assert_close(x[:, 4:], image)  # already at logit size: unchanged
    # Softmax is shift-invariant, so D cannot see a constant added to all logits. (Eval mode:
    # in train mode each call advances the spectral-norm power iteration.)
    d.eval()
    torch.testing.assert_close(d(logits, image), d(logits + 3.0, image))
    with pytest.raises(ValueError):
        d(logits)


def test_spectral_norm_conv_is_torchs_spectral_norm_dividing_the_output():
    """The same init (same seed), outputs, gradients and power iteration as
    ``spectral_norm(nn.Conv2d)``, and its state dict (an older checkpoint's) loads."""
    torch.manual_seed(0)
    ours = SpectralNormConv2d(6, 8, 4, stride=2, padding=1)
    torch.manual_seed(0)
    reference = nn.utils.parametrizations.spectral_norm(nn.Conv2d(6, 8, 4, stride=2, padding=1))
    torch.testing.assert_close(ours.weight, reference.parametrizations.weight.original)
    x = torch.randn(3, 6, 12, 10)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        reference.train(mode == "train")
        ours.zero_grad()
        reference.zero_grad()
        out, expected = ours(x), reference(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        (out * x.new_tensor(range(out.numel())).view_as(out)).sum().backward()
        (expected * x.new_tensor(range(out.numel())).view_as(out)).sum().backward()
        torch.testing.assert_close(ours.weight.grad, reference.parametrizations.weight.original.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    # σ is the largest singular value once the power iteration has converged.
    ours._power_iteration(500)
    torch.testing.assert_close(ours.sigma(), torch.linalg.matrix_norm(ours.weight.detach().flatten(1), ord=2), rtol=1e-5, atol=0)

    loaded = SpectralNormConv2d(6, 8, 4, stride=2, padding=1)
    loaded.load_state_dict(reference.state_dict())
    torch.testing.assert_close(loaded.u, reference.parametrizations.weight[0]._u)
    loaded.eval(), reference.eval()
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-6)
    # Parameters in the same order (bias, then weight), so an optimiser's state loads too.
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in reference.parameters()]


def test_spectral_norm_conv_small_outputs_equal_the_convolution_with_double_backward():
    """Outputs of 1, 2x2 and 3x3 positions (the matrix-product path on a CPU) and of 4x4 (the conv)
    equal conv2d(x, W/σ) + b, and so do the input gradient, kept differentiable as the gradient
    penalty keeps it, and the weight gradient through it."""
    torch.manual_seed(0)
    conv = SpectralNormConv2d(5, 7, 4, stride=2, padding=1).eval()  # eval: u, v fixed between the two sides
    for size in (2, 4, 6, 8):
        x = torch.randn(3, 5, size, size + 1, requires_grad=True)
        weight_grads, input_grads, outputs = [], [], []
        for ours in (True, False):
            conv.zero_grad()
            if ours:
                out = conv(x)
            else:
                sigma = conv.u @ conv.weight.flatten(1) @ conv.v
                out = F.conv2d(x, conv.weight / sigma, conv.bias, stride=2, padding=1)
            (grad,) = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), x, create_graph=True)
            grad.square().sum().backward()
            outputs.append(out.detach())
            input_grads.append(grad.detach())
            weight_grads.append(conv.weight.grad.clone())
        assert outputs[0].shape[-2:] == (size // 2, (size + 1) // 2)
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(input_grads[0], input_grads[1], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(weight_grads[0], weight_grads[1], rtol=1e-4, atol=1e-3)


def test_self_attention_identity_at_init_and_uniform_attention():
    torch.manual_seed(0)
    attn = SelfAttention(16)
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(attn(x), x)  # gamma = 0
    with torch.no_grad():
        attn.gamma.fill_(1.0)
        attn.query.weight.zero_()
        attn.query.bias.zero_()  # all energies 0 → every position attends uniformly
        value = attn.value(x)
        expected = x + value.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(attn(x), expected)


def test_pretrained_backbone_by_torchvision_weight_name(monkeypatch):
    import urllib.error

    import torchvision

    weights = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18().state_dict()  # stands in for the download
    monkeypatch.setattr(type(weights), "get_state_dict", lambda self, *a, **k: imagenet)
    model = build_model("pspnet_resnet18", 5, pretrained_backbone="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], imagenet["layer1.0.conv1.weight"])

    def offline(self, *a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(SkdError, match=r"cannot download ResNet18_Weights.IMAGENET1K_V1 from https://.*resnet18.*"
                                       r"without internet, download that file elsewhere and pass its path"):
        build_model("pspnet_resnet18", 5, pretrained_backbone="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(SkdError, match="neither a file nor a torchvision weight name"):
        build_model("pspnet_resnet18", 5, pretrained_backbone="ResNet18_Weights.NOPE")
