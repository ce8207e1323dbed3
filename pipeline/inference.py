"""One way to run a segmentation network on images: used by the cache writer, the online teacher
and evaluation, so that the three can never disagree.

``predict`` covers whole-image inference, test-time scales, horizontal flip and sliding windows.
A sliding window runs the network on crops of a fixed size — the size it was trained on — so that
its pyramid pooling sees the same amount of context as in training, instead of the whole image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_STRIDE = 8  # every network here predicts at 1/8 of its input resolution
LOG_PROB_FLOOR = -1.0e4  # log(0) would be -inf; float16 holds this and softmax treats it as zero
PRECISIONS = ("fp32", "bf16")


def output_size(input_hw: Sequence[int]) -> tuple[int, int]:
    """The stride-8 output grid of an input of ``input_hw`` pixels (ceil, as the networks do)."""
    return math.ceil(input_hw[0] / OUTPUT_STRIDE), math.ceil(input_hw[1] / OUTPUT_STRIDE)


def scaled_size(image_hw: Sequence[int], scale: float) -> tuple[int, int]:
    """An image's size after resizing by ``scale`` (the rounding training augmentation uses too)."""
    return max(1, round(image_hw[0] * scale)), max(1, round(image_hw[1] * scale))


def resize(images: torch.Tensor, scale: float) -> torch.Tensor:
    """A normalised batch resized by ``scale`` (bilinear), as test-time scales and cache levels use it."""
    if scale == 1.0:
        return images
    return F.interpolate(images, size=scaled_size(images.shape[-2:], scale), mode="bilinear", align_corners=False)


def window_starts(cells: int, window_cells: int, stride_cells: int) -> list[int]:
    """Window origins (in output cells) that cover ``cells``: every ``stride_cells``, the last flush
    with the end. One window when it already covers everything."""
    if window_cells >= cells:
        return [0]
    starts = list(range(0, cells - window_cells + 1, stride_cells))
    if starts[-1] != cells - window_cells:
        starts.append(cells - window_cells)
    return starts


def _features(out) -> torch.Tensor:
    """The output's features in float32; a network without any (features None, e.g. an exported
    model that returns logits alone) gets an empty map of 0 channels, so that every path stays one."""
    if out.features is None:
        return out.logits.new_zeros(out.logits.shape[0], 0, *out.logits.shape[-2:], dtype=torch.float32)
    return out.features.float()


def _sliding_window(model: nn.Module, x: torch.Tensor, window: tuple[int, int],
                    stride: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (as log of the averaged probabilities) and averaged features on ``x``'s output grid,
    from windows of ``window`` pixels every ``stride`` pixels (both multiples of the stride).

    Windows sit on the output grid, so each window's output lands exactly on its cells. Where a
    window overhangs the bottom/right edge by less than one cell, the input is padded with zeros.
    """
    height, width = x.shape[-2:]
    n, m = output_size((height, width))
    wh, ww = min(window[0] // OUTPUT_STRIDE, n), min(window[1] // OUTPUT_STRIDE, m)
    sh, sw = max(1, stride[0] // OUTPUT_STRIDE), max(1, stride[1] // OUTPUT_STRIDE)
    rows, cols = window_starts(n, wh, sh), window_starts(m, ww, sw)
    # A dimension that needs several windows is padded to a whole number of cells.
    pad_h = n * OUTPUT_STRIDE - height if len(rows) > 1 else 0
    pad_w = m * OUTPUT_STRIDE - width if len(cols) > 1 else 0
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    probs = features = None
    count = torch.zeros(n, m, device=x.device)
    for r in rows:
        for c in cols:
            y0, x0 = r * OUTPUT_STRIDE, c * OUTPUT_STRIDE
            y1 = y0 + wh * OUTPUT_STRIDE if len(rows) > 1 else x.shape[-2]
            x1 = x0 + ww * OUTPUT_STRIDE if len(cols) > 1 else x.shape[-1]
            out = model(x[..., y0:y1, x0:x1])
            p, f = out.logits.float().softmax(dim=1), _features(out)
            if probs is None:
                probs = x.new_zeros(p.shape[0], p.shape[1], n, m)
                features = x.new_zeros(f.shape[0], f.shape[1], n, m)
            probs[..., r : r + wh, c : c + ww] += p
            features[..., r : r + wh, c : c + ww] += f
            count[r : r + wh, c : c + ww] += 1
    return (probs / count).log(), features / count


def _forward(model: nn.Module, x: torch.Tensor, window: tuple[int, int] | None,
             stride: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if window is None:
        out = model(x)
        return out.logits.float(), _features(out)
    if stride is None:
        # Two thirds of the window, on the output grid: every pixel is seen by one or two windows.
        stride = tuple(max(OUTPUT_STRIDE, (2 * w // 3) // OUTPUT_STRIDE * OUTPUT_STRIDE) for w in window)
    return _sliding_window(model, x, window, stride)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: tuple[int, int] | None = None,
    window_stride: tuple[int, int] | None = None,
    out_hw: tuple[int, int] | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and PSP features of a normalised batch (B, 3, H, W).

    With several ``scales`` and/or ``flip`` the class probabilities are averaged over all test-time
    passes. Features come from the scale closest to 1, averaged over its passes, so that a flipped
    replay stays exact. ``window`` (H, W pixels, rounded down to the output stride) runs every pass
    as overlapping sliding windows (``window_stride``, default two thirds
    of the window) instead of whole. ``precision`` "bf16" runs the model under bfloat16 autocast
    (on the images' device); outputs are float32 either way. Both outputs are on the stride-8 grid
    of the input (or ``out_hw``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    height, width = images.shape[-2:]
    out_hw = out_hw or output_size((height, width))
    if window is not None:
        window = tuple(max(OUTPUT_STRIDE, w // OUTPUT_STRIDE * OUTPUT_STRIDE) for w in window)
    feature_scale = min(scales, key=lambda s: abs(s - 1.0))
    probs = features = torch.zeros(())
    tta_passes = feature_passes = 0
    for scale in scales:
        x = resize(images, scale)
        for flipped in (False, True) if flip else (False,):
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, feats = _forward(model, x.flip(-1) if flipped else x, window, window_stride)
            if flipped:
                logits, feats = logits.flip(-1), feats.flip(-1)
            if tuple(logits.shape[-2:]) != out_hw:
                logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
            probs = probs + logits.softmax(dim=1)
            tta_passes += 1
            if scale == feature_scale:
                if tuple(feats.shape[-2:]) != out_hw:
                    feats = F.interpolate(feats, size=out_hw, mode="bilinear", align_corners=False)
                features = features + feats
                feature_passes += 1
    log_probs = (probs / tta_passes).log().clamp(min=LOG_PROB_FLOOR)
    return log_probs, features / feature_passes
