"""Segmentation networks (PSPNet teacher and students) and the distillation discriminator.

Every segmentation model has ``output_stride = 8``, ``num_classes``, ``feature_channels`` and
``forward(x) -> SegOutput`` for normalised B×3×H×W input; outputs are ceil(H/8) × ceil(W/8).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

from pipeline.errors import SkdError
from pipeline.models.adapter import AdaptedModel
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
from pipeline.models.torchvision_models import (
    TORCHVISION_MODELS,
    build_torchvision_model,
    is_torchvision_spec,
    load_torchvision_teacher,
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
    """Build the model ``name`` (a key of MODELS, or ``torchvision:NAME`` for a key of
    TORCHVISION_MODELS) for ``num_classes`` classes.

    Options: ``width`` (channel multiplier, default 1.0), ``deep_stem`` (ResNets only; default
    True for ResNet-50/101, False for ResNet-18/34), ``pretrained_backbone`` (path to a
    torchvision ImageNet checkpoint), ``feature_layer`` (the module whose output, or
    ``"NAME:input"``, are the features for pa and fd; for skd's own models the network is then
    wrapped in an AdaptedModel), ``aux_loss`` (torchvision's models only, see
    ``build_torchvision_model``). An option given as None means its default.
    """
    if name not in MODELS and not is_torchvision_spec(name):
        known = [*MODELS, *(f"torchvision:{n}" for n in TORCHVISION_MODELS)]
        raise SkdError(f"unknown model {name!r}; known models: {', '.join(known)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SkdError(f"num_classes must be a positive integer, got {num_classes!r}")
    constructor = functools.partial(build_torchvision_model, name) if is_torchvision_spec(name) else MODELS[name]
    accepted = [p for p in inspect.signature(constructor).parameters if p != "num_classes"]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    # skd's networks have their features built in; another layer's come through a hook.
    hooked_layer = kwargs.pop("feature_layer", None) if name in MODELS else None
    for key in kwargs:
        if key not in accepted:
            raise SkdError(f"model {name} has no option {key!r}; its options: {', '.join(accepted)}")
    width = kwargs.get("width", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise SkdError(f"model option width must be a positive number, got {width!r}")
    model = constructor(num_classes, **kwargs)
    return AdaptedModel(model, feature_layer=hooked_layer) if hooked_layer else model


__all__ = [
    "MODELS",
    "AdaptedModel",
    "Discriminator",
    "LoadReport",
    "MobileNetV2PSPNet",
    "ResNetPSPNet",
    "SegOutput",
    "TORCHVISION_MODELS",
    "build_model",
    "is_torchvision_spec",
    "load_torchvision_teacher",
    "load_backbone",
    "load_checkpoint_state",
    "load_reference_pspnet",
]
