"""Segmentation networks (PSPNet teacher and students) and the distillation discriminator.

Every segmentation model has ``output_stride = 8``, ``num_classes``, ``feature_channels`` and
``forward(x) -> SegOutput`` for normalised B×3×H×W input; outputs are ceil(H/8) × ceil(W/8).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from pipeline.errors import SkdError
from pipeline.models.discriminator import Discriminator
from pipeline.models.mobilenet import MobileNetV2PSPNet, pspnet_mobilenetv2
from pipeline.models.outputs import SegOutput
from pipeline.models.pspnet import (
    ResNetPSPNet,
    pspnet_resnet18,
    pspnet_resnet34,
    pspnet_resnet50,
    pspnet_resnet101,
)
from pipeline.models.weights import LoadReport, load_backbone, load_checkpoint_state, load_reference_pspnet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "pspnet_resnet18": pspnet_resnet18,
    "pspnet_resnet34": pspnet_resnet34,
    "pspnet_resnet50": pspnet_resnet50,
    "pspnet_resnet101": pspnet_resnet101,
    "pspnet_mobilenetv2": pspnet_mobilenetv2,
}


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` (a key of MODELS) for ``num_classes`` classes.

    Options: ``width`` (channel multiplier, default 1.0), ``deep_stem`` (ResNets only; default
    True for ResNet-50/101, False for ResNet-18/34), ``pretrained_backbone`` (path to a
    torchvision ImageNet checkpoint). An option given as None means its default.
    """
    if name not in MODELS:
        raise SkdError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SkdError(f"num_classes must be a positive integer, got {num_classes!r}")
    constructor = MODELS[name]
    accepted = [p for p in inspect.signature(constructor).parameters if p != "num_classes"]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for key in kwargs:
        if key not in accepted:
            raise SkdError(f"model {name} has no option {key!r}; its options: {', '.join(accepted)}")
    width = kwargs.get("width", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise SkdError(f"model option width must be a positive number, got {width!r}")
    return constructor(num_classes, **kwargs)


__all__ = [
    "MODELS",
    "Discriminator",
    "LoadReport",
    "MobileNetV2PSPNet",
    "ResNetPSPNet",
    "SegOutput",
    "build_model",
    "load_backbone",
    "load_checkpoint_state",
    "load_reference_pspnet",
]
