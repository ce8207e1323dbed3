"""MobileNetV2 PSPNet student, dilated to output stride 8.

The backbone is torchvision's ``mobilenet_v2().features`` (so ``backbone.features.N...`` maps
one-to-one onto torchvision checkpoints' ``features.N...``) with two changes:

* the stride-2 depthwise convs of ``features[7]`` and ``features[14]`` get stride 1; every
  depthwise conv from ``features[7]`` on is dilated by 2, from ``features[14]`` on by 4 (padding =
  dilation, so sizes are kept), the same scheme as the dilated ResNets;
* ``features[18]`` (the 320→1280 1×1 conv, made for the classifier) is dropped.

The aux head reads ``features[13]`` (96 ch × width), the PSP head ``features[17]`` (320 ch × width).
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from pipeline.models.outputs import SegOutput
from pipeline.models.pspnet import init_head, make_aux_head, make_psp_head, run_heads
from pipeline.models.weights import load_pretrained_backbone
from pipeline.models.width import scale_channels

# Index of the first block of each dilated stretch, and its dilation.
_DILATED_FROM = ((7, 2), (14, 4))
_AUX_END = 14  # features[:14] → 96-ch map (stride 16 in the undilated network)
_MAIN_END = 18  # features[:18] → 320-ch map; features[18] is dropped


def dilated_mobilenet_v2_features(width: float = 1.0) -> nn.Sequential:
    """torchvision's MobileNetV2 ``features[:18]`` at output stride 8."""
    features = torchvision.models.mobilenet_v2(weights=None, width_mult=width).features[:_MAIN_END]
    for start, dilation in _DILATED_FROM:
        for block in features[start:]:
            for m in block.modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups > 1:  # depthwise
                    m.stride = (1, 1)
                    m.dilation = (dilation, dilation)
                    m.padding = (dilation, dilation)
            if hasattr(block, "stride"):
                block.stride = 1
    return features


class MobileNetV2Backbone(nn.Module):
    """Holds ``features`` so the model's keys read ``backbone.features.N...``."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.features = dilated_mobilenet_v2_features(width)
        self.aux_channels = scale_channels(96, width)
        self.out_channels = scale_channels(320, width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features[13] output, features[17] output), both at stride 8."""
        aux = self.features[:_AUX_END](x)
        return aux, self.features[_AUX_END:](aux)


class MobileNetV2PSPNet(nn.Module):
    """Light PSPNet on a dilated MobileNetV2 (PSP and aux heads 128 ch × width)."""

    output_stride = 8
    # torchvision checkpoint keys ``features.N...`` → ``backbone.features.N...``; the classifier
    # and the dropped 1280-ch conv are ignored (see weights.load_backbone).
    backbone_prefix = "backbone."
    backbone_ignore = ("classifier.", f"features.{_MAIN_END}.")

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = MobileNetV2Backbone(width)
        self.feature_channels = scale_channels(128, width)
        self.head = make_psp_head(self.backbone.out_channels, self.feature_channels, num_classes)
        self.dsn = make_aux_head(self.backbone.aux_channels, self.feature_channels, num_classes)
        init_head(self.head)
        init_head(self.dsn)

    def forward(self, x: Tensor) -> SegOutput:
        c3, c4 = self.backbone(x)
        return run_heads(self.head, self.dsn, c3, c4, self.training)


def pspnet_mobilenetv2(num_classes: int, *, width: float = 1.0,
                       pretrained_backbone: str | None = None) -> MobileNetV2PSPNet:
    """MobileNetV2 PSPNet student; ``pretrained_backbone`` = a torchvision-format MobileNetV2 checkpoint."""
    model = MobileNetV2PSPNet(num_classes, width=width)
    if pretrained_backbone is not None:
        load_pretrained_backbone(model, pretrained_backbone)
    return model
