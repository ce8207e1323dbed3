"""PSPNet heads and the dilated-ResNet PSPNets (teacher and students).

The module names reproduce the reference checkpoint layout (DESIGN.md §1), so a released
PSPNet-R101 state_dict loads strictly:

    conv1.* bn1.* [conv2.* bn2.* conv3.* bn3.*]  layer1..4.*        backbone (deep stem optional)
    head.0.stages.{i}.1  (1×1 conv)  head.0.stages.{i}.2  (BN)      pyramid pooling, bins 1, 2, 3, 6
    head.0.bottleneck.0  (3×3 conv)  head.0.bottleneck.1  (BN)      fuse, then Dropout2d(0.1)
    head.1               (1×1 conv with bias)                       classifier
    dsn.0 (3×3 conv, bias)  dsn.1 (BN)  dsn.3 (1×1 conv)            auxiliary head on layer3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.outputs import SegOutput
from pipeline.models.resnet import BasicBlock, Bottleneck, DilatedResNet
from pipeline.models.weights import load_pretrained_backbone
from pipeline.models.width import scale_channels

PSP_BINS = (1, 2, 3, 6)


class BNAct(nn.BatchNorm2d):
    """BatchNorm followed by leaky ReLU (slope 0.01): the reference's InPlace-ABN, minus the in-place trick.

    Subclassing BatchNorm2d keeps the state_dict keys (weight, bias, running_mean, running_var)
    identical to the reference checkpoints.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(super().forward(x), negative_slope=0.01)


class PSPModule(nn.Module):
    """Pyramid pooling: pool to 1×1, 2×2, 3×3 and 6×6, project, upsample, concatenate, fuse.

    ``forward`` matches the reference (dropout included); ``forward_features`` stops before the
    dropout and gives the features that pair-wise distillation compares.
    """

    def __init__(self, in_channels: int, out_channels: int, bins: tuple[int, ...] = PSP_BINS) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                          BNAct(out_channels))
            for b in bins
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + len(bins) * out_channels, out_channels, 3, padding=1, bias=False),
            BNAct(out_channels),
            nn.Dropout2d(0.1),
        )

    def forward_features(self, feats: Tensor) -> Tensor:
        size = feats.shape[-2:]
        pyramid = [F.interpolate(stage(feats), size=size, mode="bilinear", align_corners=True)
                   for stage in self.stages]
        # Order [pooled stages..., input] as in the reference code: the bottleneck conv's input
        # channels of released checkpoints are laid out this way.
        x = torch.cat(pyramid + [feats], dim=1)
        return self.bottleneck[1](self.bottleneck[0](x))

    def forward(self, feats: Tensor) -> Tensor:
        return self.bottleneck[2](self.forward_features(feats))


def make_psp_head(in_channels: int, psp_channels: int, num_classes: int) -> nn.Sequential:
    """``head``: Sequential(PSPModule, 1×1 classifier)."""
    return nn.Sequential(PSPModule(in_channels, psp_channels), nn.Conv2d(psp_channels, num_classes, 1))


def make_aux_head(in_channels: int, mid_channels: int, num_classes: int) -> nn.Sequential:
    """``dsn``: 3×3 conv (with bias, as the reference), BN + leaky ReLU, dropout, 1×1 classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1),
        BNAct(mid_channels),
        nn.Dropout2d(0.1),
        nn.Conv2d(mid_channels, num_classes, 1),
    )


def init_head(module: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero BN, zero conv biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def run_heads(head: nn.Sequential, dsn: nn.Sequential, aux_input: Tensor, main_input: Tensor,
              training: bool) -> SegOutput:
    """Main head on ``main_input``, aux head on ``aux_input`` (training only)."""
    psp: PSPModule = head[0]
    features = psp.forward_features(main_input)
    logits = head[1](psp.bottleneck[2](features))
    aux = dsn(aux_input) if training else None
    return SegOutput(logits=logits, aux=aux, features=features)


class ResNetPSPNet(DilatedResNet):
    """PSPNet on a dilated ResNet, output stride 8.

    The backbone layers live directly on the model (no ``backbone.`` prefix) so its state_dict
    keys are exactly the reference checkpoint's.
    """

    output_stride = 8
    # How torchvision ImageNet checkpoints map onto this model (see weights.load_backbone).
    backbone_prefix = ""
    backbone_ignore = ("fc.",)

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int,
                 psp_channels: int, width: float = 1.0, deep_stem: bool = False) -> None:
        super().__init__(block, layers, width=width, deep_stem=deep_stem)
        self.num_classes = num_classes
        self.feature_channels = scale_channels(psp_channels, width)
        self.head = make_psp_head(self.layer4_channels, self.feature_channels, num_classes)
        self.dsn = make_aux_head(self.layer3_channels, self.feature_channels, num_classes)
        init_head(self.head)
        init_head(self.dsn)

    def forward(self, x: Tensor) -> SegOutput:
        c3, c4 = self.forward_stages(x)
        return run_heads(self.head, self.dsn, c3, c4, self.training)


def _resnet_pspnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int], psp_channels: int,
                   num_classes: int, width: float, deep_stem: bool, pretrained_backbone: str | None) -> ResNetPSPNet:
    model = ResNetPSPNet(block, layers, num_classes, psp_channels, width=width, deep_stem=deep_stem)
    if pretrained_backbone is not None:
        load_pretrained_backbone(model, pretrained_backbone)
    return model


def pspnet_resnet18(num_classes: int, *, width: float = 1.0, deep_stem: bool = False,
                    pretrained_backbone: str | None = None) -> ResNetPSPNet:
    """ResNet-18 PSPNet student (PSP 128 ch, aux 128 ch on the 256-ch layer3)."""
    return _resnet_pspnet(BasicBlock, [2, 2, 2, 2], 128, num_classes, width, deep_stem, pretrained_backbone)


def pspnet_resnet34(num_classes: int, *, width: float = 1.0, deep_stem: bool = False,
                    pretrained_backbone: str | None = None) -> ResNetPSPNet:
    """ResNet-34 PSPNet (PSP 128 ch, aux 128 ch on the 256-ch layer3)."""
    return _resnet_pspnet(BasicBlock, [3, 4, 6, 3], 128, num_classes, width, deep_stem, pretrained_backbone)


def pspnet_resnet50(num_classes: int, *, width: float = 1.0, deep_stem: bool = True,
                    pretrained_backbone: str | None = None) -> ResNetPSPNet:
    """ResNet-50 PSPNet (PSP 512 ch, aux 512 ch on the 1024-ch layer3)."""
    return _resnet_pspnet(Bottleneck, [3, 4, 6, 3], 512, num_classes, width, deep_stem, pretrained_backbone)


def pspnet_resnet101(num_classes: int, *, width: float = 1.0, deep_stem: bool = True,
                     pretrained_backbone: str | None = None) -> ResNetPSPNet:
    """ResNet-101 PSPNet: the paper's teacher (PSP 512 ch, aux 512 ch on the 1024-ch layer3)."""
    return _resnet_pspnet(Bottleneck, [3, 4, 23, 3], 512, num_classes, width, deep_stem, pretrained_backbone)
