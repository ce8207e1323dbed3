"""Channel counts for width-scaled (thin) students."""

from __future__ import annotations


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest multiple of 8 (at least 8).

    Same rule as torchvision's ``_make_divisible`` (used by MobileNetV2's ``width_mult``): never
    round down by more than 10%, so thin ResNets and MobileNets are scaled the same way.
    """
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    if rounded < 0.9 * scaled:
        rounded += 8
    return rounded
