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
