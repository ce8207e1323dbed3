"""torchvision's segmentation models as skd teachers and students: ``torchvision:NAME``.

The model is torchvision's own (its module names, its state-dict format), built with random
weights (never a download) and run without its final upsampling to the input size: skd resamples
the logits from their native stride onto its stride-8 grid (:class:`AdaptedModel`), which for the
stride-8 models is no resampling at all. The features for pair-wise and feature distillation are,
by default, the input of the final class-scoring convolution (the classifier's features); any
module can be named instead (``feature_layer``).

Native strides: DeepLabV3 and FCN on ResNet-50/101 predict at 8 (dilated layer3 and layer4),
DeepLabV3 on MobileNetV3 at 16, LR-ASPP at 8 (its low-level branch; the high-level branch is at 16
and upsampled inside the head).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import segmentation

from pipeline.errors import SkdError
from pipeline.models.adapter import AdaptedModel
from pipeline.models.weights import file_sha256, load_checkpoint_state, load_pretrained_backbone, load_state

PREFIX = "torchvision:"

TORCHVISION_MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3_resnet50": segmentation.deeplabv3_resnet50,
    "deeplabv3_resnet101": segmentation.deeplabv3_resnet101,
    "deeplabv3_mobilenet_v3_large": segmentation.deeplabv3_mobilenet_v3_large,
    "fcn_resnet50": segmentation.fcn_resnet50,
    "fcn_resnet101": segmentation.fcn_resnet101,
    "lraspp_mobilenet_v3_large": segmentation.lraspp_mobilenet_v3_large,
}

# The input of the final class-scoring conv: DeepLabHead is (ASPP, conv, BN, ReLU, conv), FCNHead
# (conv, BN, ReLU, Dropout, conv) — its ReLU's output is that input before dropout, as skd's PSP
# features are —, LR-ASPP adds low_classifier(low) to high_classifier(high features).
DEFAULT_FEATURE_LAYERS = {
    "deeplabv3_resnet50": "classifier.3",
    "deeplabv3_resnet101": "classifier.3",
    "deeplabv3_mobilenet_v3_large": "classifier.3",
    "fcn_resnet50": "classifier.2",
    "fcn_resnet101": "classifier.2",
    "lraspp_mobilenet_v3_large": "classifier.high_classifier:input",
}

# The final class-scoring conv, whose output channels are the class count.
CLASSIFIER_WEIGHTS = {
    "deeplabv3": "classifier.4.weight",
    "fcn": "classifier.4.weight",
    "lraspp": "classifier.low_classifier.weight",
}


def is_torchvision_spec(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def _model_name(spec: str) -> str:
    name = spec.removeprefix(PREFIX)
    if name not in TORCHVISION_MODELS:
        raise SkdError(f"unknown torchvision model {spec!r}; known: {', '.join(PREFIX + n for n in TORCHVISION_MODELS)}")
    return name


class NativeStride(nn.Module):
    """torchvision's segmentation model without the final upsampling of its logits to the input size.

    The children are the model's own (``backbone``, ``classifier``, ``aux_classifier``), so the
    state dict is torchvision's. Returns ``{"out": logits, "aux": aux logits}`` at the heads' own
    stride; the auxiliary head runs in training mode only.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = getattr(model, "aux_classifier", None)
        self.lraspp = isinstance(model, segmentation.LRASPP)  # its head reads the backbone's whole dict

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        result = {"out": self.classifier(features if self.lraspp else features["out"])}
        if self.aux_classifier is not None and self.training:
            result["aux"] = self.aux_classifier(features["aux"])
        return result


def build_torchvision_model(spec: str, num_classes: int, *, width: float = 1.0, aux_loss: bool | None = None,
                            pretrained_backbone: str | None = None, feature_layer: str | None = None) -> AdaptedModel:
    """``torchvision:NAME`` for ``num_classes`` classes, random weights, as an skd model.

    ``aux_loss`` (default: on where the model has an auxiliary head, as torchvision trains them)
    builds the auxiliary classifier; ``pretrained_backbone`` loads ImageNet weights into the
    backbone from a torchvision checkpoint file or weight name (e.g. ``ResNet50_Weights.IMAGENET1K_V1``,
    ``MobileNet_V3_Large_Weights.IMAGENET1K_V1``); ``feature_layer`` names the features' module
    (default: the classifier's features, see DEFAULT_FEATURE_LAYERS). torchvision's models have
    no width multiplier here, so ``width`` must be 1.
    """
    name = _model_name(spec)
    if width != 1.0:
        raise SkdError(f"{spec} has no width option (torchvision builds it at full width); leave --width at 1")
    options = {} if name.startswith("lraspp") else {"aux_loss": True if aux_loss is None else aux_loss}
    if name.startswith("lraspp") and aux_loss:
        raise SkdError(f"{spec} has no auxiliary head: leave aux_loss unset")
    network = NativeStride(TORCHVISION_MODELS[name](weights=None, weights_backbone=None, num_classes=num_classes,
                                                    **options))
    if pretrained_backbone is not None:
        load_pretrained_backbone(_imagenet_view(network), pretrained_backbone)
    return AdaptedModel(network, feature_layer=feature_layer or DEFAULT_FEATURE_LAYERS[name])


def _imagenet_view(network: NativeStride) -> nn.Module:
    """The backbone's modules under the names of torchvision's ImageNet classifier, for
    ``load_pretrained_backbone`` (the view shares the parameters). The segmentation backbones keep
    the classifier's names for ResNets (``conv1``, ``layer1``...) and drop ``features.`` for MobileNetV3."""
    if "conv1" in network.backbone:  # ResNet
        view = network.backbone
        view.backbone_ignore = ("fc.",)
    else:  # MobileNetV3: the backbone is its `features`
        view = nn.ModuleDict({"features": network.backbone})
        view.backbone_ignore = ("classifier.",)
    return view


def load_torchvision_teacher(spec: str, weights: str | None, feature_layer: str | None,
                             num_classes: int) -> tuple[AdaptedModel, dict]:
    """A teacher ``torchvision:NAME`` with the weights in ``weights`` (torchvision's state-dict
    format: what ``torch.save(model.state_dict())`` writes, with or without the auxiliary
    classifier; also skd's checkpoint of such a model). Returns the model (CPU, eval mode) and the
    store's ``teacher`` provenance. A file for another class count than ``num_classes`` is refused.
    """
    name = _model_name(spec)
    if weights is None:
        raise SkdError(f"--teacher {spec} needs --teacher-weights FILE (its trained weights in torchvision's "
                       "state-dict format); a randomly initialised teacher teaches nothing")
    state = load_checkpoint_state(weights)
    if any(k.startswith("network.") for k in state):  # skd's checkpoint of a torchvision model (AdaptedModel)
        state = {k.removeprefix("network."): v for k, v in state.items()}
    key = CLASSIFIER_WEIGHTS[name.split("_")[0]]
    if key not in state:
        raise SkdError(f"--teacher-weights {weights} has no {key}: not a {spec} state dict "
                       f"(its keys e.g. {', '.join(list(state)[:3])})")
    file_classes = int(state[key].shape[0])
    if file_classes != num_classes:
        raise SkdError(f"--teacher-weights {weights} predicts {file_classes} classes ({key}), the dataset has "
                       f"{num_classes}: a teacher must be trained on the dataset's classes")
    # The teacher never needs its auxiliary head: drop it whether the file has one or not.
    state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    model = build_torchvision_model(spec, num_classes, aux_loss=None if name.startswith("lraspp") else False,
                                    feature_layer=feature_layer)
    load_state(model.network, state, weights, strict=True)
    info = {"name": spec, "num_classes": num_classes, "checkpoint": Path(weights).name,
            "weights_sha256": file_sha256(weights), "native_stride": model.native_stride,
            "feature_layer": model.feature_layer, "feature_stride": model.feature_stride}
    return model.eval(), info

