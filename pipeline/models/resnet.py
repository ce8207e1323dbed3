"""Dilated ResNet backbones at output stride 8.

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...) so torchvision ImageNet checkpoints load unchanged (minus ``fc``).
The optional deep stem (three 3×3 convs, ``conv1..3`` / ``bn1..3``) is the one of the reference
PSPNet code and of its released checkpoints.

layer3 and layer4 keep their resolution: their strides are removed and every block in them uses
dilation 2 and 4 respectively. That is what the reference code does (the released teacher was
trained so); torchvision's ``replace_stride_with_dilation`` differs only in giving the first block
of each stage the previous stage's dilation.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.width import scale_channels


class BasicBlock(nn.Module):
    """Two 3×3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided / dilated), 1×1 expand (ResNet-50/101); stride on the 3×3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """ResNet trunk without the classifier; ``forward_stages`` returns the layer3 and layer4 maps.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. [2, 2, 2, 2] (ResNet-18) or [3, 4, 23, 3] (ResNet-101).
        width: channel multiplier for thin students (1.0 = the standard network).
        deep_stem: three 3×3 convs (3→64→64→128) instead of torchvision's single 7×7 conv.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 width: float = 1.0, deep_stem: bool = False) -> None:
        super().__init__()
        self.deep_stem = deep_stem
        stem_channels = scale_channels(64, width)
        if deep_stem:
            self.conv1 = nn.Conv2d(3, stem_channels, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.conv2 = nn.Conv2d(stem_channels, stem_channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(stem_channels)
            self.conv3 = nn.Conv2d(stem_channels, scale_channels(128, width), 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(scale_channels(128, width))
            self.inplanes = scale_channels(128, width)
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.inplanes = stem_channels
        self.relu = nn.ReLU(inplace=True)
        # The reference deep stem pools with ceil_mode=True. With padding 1 that only appends one
        # extra row/column on even sizes (the other windows are identical), and it would break the
        # ceil(H/8) output size every skd model shares (512 → 65 instead of 64), so floor mode here.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.layer1 = self._make_layer(block, scale_channels(64, width), layers[0])
        self.layer2 = self._make_layer(block, scale_channels(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(block, scale_channels(256, width), layers[2], dilation=2)
        self.layer4 = self._make_layer(block, scale_channels(512, width), layers[3], dilation=4)
        self.layer3_channels = scale_channels(256, width) * block.expansion
        self.layer4_channels = scale_channels(512, width) * block.expansion

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: Tensor) -> Tensor:
        """Stride-4 map entering layer1."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        return self.maxpool(x)

    def forward_stages(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(layer3 output, layer4 output), both at stride 8."""
        x = self.layer2(self.layer1(self.forward_stem(x)))
        c3 = self.layer3(x)
        return c3, self.layer4(c3)
