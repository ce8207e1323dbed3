"""How a store encodes the teacher's outputs: 8-bit log-probabilities and 7-bit features.

Both are numcodecs filters that zarr applies itself, so a store opens with plain ``zarr`` and its
arrays read back as float32; what skd adds is the preparation before the filters (quantising
log-probabilities so that the stored argmax is the teacher's, scaling features so that each
position keeps its precision) and the decoding of features after them.

Every function takes its class or channel axis explicitly: a map may be (B, C, h, w) or a view
bank's (B, K, C, h, w).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from zarr.codecs import Crc32cCodec, Delta, FixedScaleOffset, ZstdCodec

from pipeline.cache.projection import Projection, project

# Log-probabilities are clipped at -LOG_PROB_RANGE (probabilities below 1e-7 count as 1e-7) and
# quantised to LOG_PROB_CODES + 1 levels (8 bits).
LOG_PROB_RANGE = 16.0
LOG_PROB_CODES = 255
LOG_PROB_STEP = LOG_PROB_RANGE / LOG_PROB_CODES
# Features are stored divided by a scale per position (the largest |value| over the channels there,
# so that each position keeps its precision relative to itself: the pair-wise loss normalises every
# node), then mapped per image and channel onto [0, 1] and quantised to 127 levels: the teacher's
# features = (stored x feature_scale + feature_offset) x feature_position_scale. docs/CACHE.md
# measures the choice: at the bytes of 8 bits per channel alone, a quarter of its pair-wise error.
FEATURE_LEVELS = 127

# The numcodecs filters are zarr-python's own (zarr.codecs.numcodecs); zarr warns that other
# implementations may lack them, on every array opened. Said once, in docs/CACHE.md, instead.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
# Canvas cells outside an image but inside a tile it touches hold NaN, which the 8-bit filters cast
# to some code: those cells are never read (every reader cuts to the image's extent).
warnings.filterwarnings("ignore", message="invalid value encountered in cast", category=RuntimeWarning,
                        module="numcodecs.fixedscaleoffset")


def log_prob_filters() -> list:
    return [FixedScaleOffset(offset=-LOG_PROB_RANGE, scale=LOG_PROB_CODES / LOG_PROB_RANGE, dtype="<f4", astype="u1"),
            Delta(dtype="u1")]


def feature_filters() -> list:
    return [FixedScaleOffset(offset=0, scale=FEATURE_LEVELS, dtype="<f4", astype="u1"), Delta(dtype="u1")]


def compressors() -> list:
    """Every chunk carries a crc32c checksum: a corrupted chunk is reported (with its image) instead
    of read as wrong numbers."""
    return [ZstdCodec(level=9), Crc32cCodec()]


CODECS = {
    "log_probs": f"float32 -> FixedScaleOffset(offset=-{LOG_PROB_RANGE:g}, scale={LOG_PROB_CODES}/{LOG_PROB_RANGE:g}, "
                 "uint8) -> Delta(uint8) -> zstd(9) -> crc32c, in shards of images",
    "features": "float32 in [0, 1] ((x feature_scale + feature_offset, per image and channel) x feature_position_scale "
                "= the features, or their PCA coordinates: see decode) -> "
                f"FixedScaleOffset(offset=0, scale={FEATURE_LEVELS}, uint8) -> Delta(uint8) -> zstd(9) -> crc32c, "
                "in shards of images",
}
DECODE_NOTE = ("zarr decodes the stored uint8 values to float32 itself (the FixedScaleOffset and Delta filters "
               "are numcodecs codecs): read the arrays as they are")
FEATURE_DECODE_NOTE = ("; features decode to (features x feature_scale + feature_offset) x feature_position_scale, for "
                       "image i: (features[i] * feature_scale[i][:, None, None] + feature_offset[i][:, None, None]) * "
                       "feature_position_scale[i]")
PROJECTION_NOTE = ("; features hold PCA coordinates z: the teacher's features are feature_mean + "
                   "feature_components @ z at every pixel (einsum('ck,nkyx->ncyx', components, z) + mean), up to the "
                   "variance of the directions left out")


def quantise_log_probs(log_probs: torch.Tensor, class_dim: int) -> torch.Tensor:
    """Log-probabilities as the 8-bit store holds them, as float32 values on its code grid (the
    filter's rounding then gives exactly these codes back).

    Clipped at -LOG_PROB_RANGE; every class but the top one is kept at least one code below the top
    class's code, so that the stored argmax is the teacher's (exact ties aside). The guarantee is
    made on the integer codes themselves: a margin in real values is not enough, since two values a
    step apart can round to one code at a half-code boundary (round half to even).
    """
    codes = torch.round((log_probs.float().clamp(-LOG_PROB_RANGE, 0.0) + LOG_PROB_RANGE) / LOG_PROB_STEP)
    top = codes.amax(dim=class_dim, keepdim=True)
    is_top = log_probs == log_probs.amax(dim=class_dim, keepdim=True)
    codes = torch.where(is_top, top, torch.minimum(codes, top - 1).clamp(min=0))
    return codes * LOG_PROB_STEP - LOG_PROB_RANGE


def encode_features(features: torch.Tensor, pool: int,
                    projection: Projection | None = None) -> tuple[torch.Tensor, ...]:
    """Features (B, F, h, w) max-pooled by ``pool`` and encoded as the store keeps them: values in
    [0, 1] (B, F, h, w), per-channel scale and offset (B, F) and a scale per position (B, h, w),
    float16: features = (values x scale + offset) x position scale.

    The pair-wise loss compares cosine similarities of nodes, each normalised to unit length, so a
    node whose features are all small (the leaky ReLU's negative side) needs its precision relative
    to itself: each position is divided by its largest |value| first. Per channel then, not per
    image, so that a few large channels do not set the step of all. (docs/CACHE.md: worst pair-wise
    error 5.4 % per image, 1.3 % per channel, 0.4 % per position and channel, at 1024x2048.)
    The position scale is relative to the image's largest value (float16 keeps its range); the
    rest of the magnitude goes into the channel scale and offset. With a ``projection``, the pooled
    features' coordinates on its directions are stored instead."""
    if pool > 1:
        features = F.max_pool2d(features, pool, pool, ceil_mode=True)
    if projection is not None:
        features = project(features, projection)
    features = features.float()
    peak = features.abs().amax(dim=1)  # (B, h, w)
    image_peak = peak.flatten(1).amax(dim=1).clamp(min=1e-30)[:, None, None]
    # Rounded to float16 before dividing, so that the stored scale is exactly the one used; at
    # least float16's smallest step, so that no position divides by 0.
    position = (peak / image_peak).half().clamp(min=2.0 ** -24)
    scaled = features / (position.float() * image_peak)[:, None]
    flat = scaled.flatten(2)
    offset = flat.amin(dim=2)
    scale = (flat.amax(dim=2) - offset).clamp(min=1e-12)
    values = ((scaled - offset[..., None, None]) / scale[..., None, None]).clamp(0, 1)
    top = image_peak.flatten(1)
    return values, scale * top, offset * top, position


def decode_features(stored: np.ndarray, scale: np.ndarray, offset: np.ndarray,
                    position_scale: np.ndarray | None) -> np.ndarray:
    """One image's (or view's) features (F, h, w) from the stored values in [0, 1], their channel
    ``scale`` and ``offset`` (F,) and the ``position_scale`` (h, w) (None: stores written before
    position scales)."""
    features = stored * scale[:, None, None] + offset[:, None, None]
    if position_scale is not None:
        features *= position_scale
    return features
