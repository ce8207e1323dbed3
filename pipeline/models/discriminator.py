"""Discriminator for holistic (adversarial) distillation: a SAGAN-style critic D(Q | I).

Four spectral-norm 4×4 stride-2 convs (in → 64 → 128 → 256 → 512, LeakyReLU 0.1), self-attention
after the 256- and 512-channel convs, a final plain 4×4 conv to one channel, averaged over the
remaining positions: one Wasserstein score per image (DESIGN.md §1 "Holistic").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONDITIONINGS = ("image", "logits")
# Four stride-2 convs and a final 4×4 conv (padding 1) leave at least 1×1 from 32×32.
MIN_SIZE = 32
# Output positions per image below which a CPU spectral-norm conv runs as a matrix product.
SMALL_OUTPUT = 16


class SpectralNormConv2d(nn.Module):
    """A conv whose weight is divided by its largest singular value σ, estimated by power iteration.

    The same function, gradients and state as ``spectral_norm(nn.Conv2d(...))`` from
    ``torch.nn.utils.parametrizations`` (one power-iteration step per training forward, u and v held
    constant in the gradient, σ = uᵀWv), but σ divides the conv's *output* instead of its weight:
    conv(x, W/σ) = conv(x, W)/σ. The discriminator's weights (up to 2 M values) are much larger than
    its outputs on segmentation maps, and dividing them and differentiating the division cost more
    than the convolutions themselves on a CPU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)  # its default init
        # bias before weight: the parameter order of the parametrized conv, so optimiser states of
        # checkpoints written with it load.
        self.bias = nn.Parameter(conv.bias.detach())
        self.weight = nn.Parameter(conv.weight.detach())
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.eps = eps
        self.register_buffer("u", F.normalize(torch.empty(out_channels).normal_(0, 1), dim=0, eps=eps))
        self.register_buffer("v", F.normalize(torch.empty(self.weight[0].numel()).normal_(0, 1), dim=0, eps=eps))
        # As torch's spectral_norm starts: 15 steps, and one more in the forward its registration runs.
        self._power_iteration(16)

    @torch.no_grad()
    def _power_iteration(self, steps: int) -> None:
        weight = self.weight.flatten(1)
        for _ in range(steps):  # in place, as torch does (buffers shared with replicas stay current)
            F.normalize(torch.mv(weight, self.v), dim=0, eps=self.eps, out=self.u)
            F.normalize(torch.mv(weight.T, self.u), dim=0, eps=self.eps, out=self.v)

    def sigma(self) -> Tensor:
        """σ = uᵀWv, differentiable in W (u and v are constants)."""
        return torch.vdot(self.u.clone(), torch.mv(self.weight.flatten(1), self.v.clone()))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._power_iteration(1)
        out = self._conv(x)
        sigma = self.sigma().to(out.dtype)
        return out / sigma + self.bias.to(out.dtype)[:, None, None]

    def _conv(self, x: Tensor) -> Tensor:
        """conv(x, W) without bias. On a CPU, an output of fewer than 16 positions per image (D's
        last convs on small maps) is computed as one matrix product of W with the unfolded input:
        the same values, but oneDNN's backward and double backward (the gradient penalty's) on
        such outputs take 1.7-2.6x as long as the product's (docs/BENCHMARKS.md)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1
        if x.device.type != "cpu" or ho * wo >= SMALL_OUTPUT:
            return F.conv2d(x, self.weight, None, self.stride, self.padding)
        columns = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # B × (C·kh·kw) × ho·wo
        return (self.weight.flatten(1).to(columns.dtype) @ columns).unflatten(-1, (ho, wo))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # Checkpoints written with torch's parametrized spectral_norm name the same tensors so.
        for old, new in (("parametrizations.weight.original", "weight"),
                         ("parametrizations.weight.0._u", "u"), ("parametrizations.weight.0._v", "v")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SelfAttention(nn.Module):
    """SAGAN self-attention: out = gamma · attention(x) + x, gamma starts at 0 (identity at init)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # B×N×C'
        k = self.key(x).flatten(2)  # B×C'×N
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # B×N×N, row i = weights over positions j
        v = self.value(x).flatten(2)  # B×C×N
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class Discriminator(nn.Module):
    """Scores segmentation maps: higher = more teacher-like.

    Args:
        num_classes: C, channels of the segmentation logits.
        conditioning: ``"image"`` (the paper's default): input = softmax(logits) concatenated with
            the RGB image resized to the logit resolution (C + 3 channels). ``"logits"``:
            log_softmax(logits) through a BatchNorm2d(C), no image (the later reference code feeds
            raw logits; normalising removes the per-pixel log-sum-exp offset that would otherwise
            tell teacher log-probabilities from student logits for free).

    The input is built in three pieces so that callers can interpolate the maps alone (the
    gradient penalty) or score several batches together: ``normalize_maps`` → ``condition`` →
    ``score_maps``. ``forward(logits, image)`` chains them.
    """

    def __init__(self, num_classes: int, conditioning: str = "image") -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown discriminator conditioning {conditioning!r}; expected one of {CONDITIONINGS}")
        self.num_classes = num_classes
        self.conditioning = conditioning
        self.input_channels = num_classes + 3 if conditioning == "image" else num_classes
        self.input_norm = nn.BatchNorm2d(num_classes) if conditioning == "logits" else nn.Identity()
        # Without BatchNorm each sample's score depends on that sample alone.
        self.batch_independent = conditioning != "logits"

        self.conv1 = SpectralNormConv2d(self.input_channels, 64, 4, stride=2, padding=1)
        self.conv2 = SpectralNormConv2d(64, 128, 4, stride=2, padding=1)
        self.conv3 = SpectralNormConv2d(128, 256, 4, stride=2, padding=1)
        self.attn1 = SelfAttention(256)
        self.conv4 = SpectralNormConv2d(256, 512, 4, stride=2, padding=1)
        self.attn2 = SelfAttention(512)
        self.last = nn.Conv2d(512, 1, 4, padding=1)

    def normalize_maps(self, seg_logits: Tensor) -> Tensor:
        """Per-pixel class distributions: softmax ("image") or log_softmax ("logits").

        Both are invariant to adding a per-pixel constant, so logits and log-probabilities of the
        same distribution look the same to D.
        """
        if seg_logits.dim() != 4 or seg_logits.shape[1] != self.num_classes:
            raise ValueError(f"expected B×{self.num_classes}×H×W logits, got {tuple(seg_logits.shape)}")
        if self.conditioning == "logits":
            return torch.log_softmax(seg_logits, dim=1)
        return torch.softmax(seg_logits, dim=1)

    def condition(self, image: Tensor | None, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The image resized to the map grid (``"image"`` conditioning); None for ``"logits"``."""
        if self.conditioning == "logits":
            return None
        if image is None:
            raise ValueError("conditioning='image' needs the input image")
        return F.interpolate(image.to(dtype), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)

    def score_maps(self, maps: Tensor, condition: Tensor | None = None) -> Tensor:
        """(B,) scores for normalised maps (``normalize_maps``) and their ``condition``."""
        if (condition is None) != (self.conditioning == "logits"):
            raise ValueError(f"conditioning={self.conditioning!r} "
                             f"{'takes no' if self.conditioning == 'logits' else 'needs a'} condition")
        x = maps if condition is None else torch.cat([maps, condition.to(maps.dtype)], dim=1)
        return self.score(x)

    def prepare_input(self, seg_logits: Tensor, image: Tensor | None = None) -> Tensor:
        """The map D actually looks at: [softmax(logits), resized image] or log_softmax(logits)."""
        maps = self.normalize_maps(seg_logits)
        condition = self.condition(image, maps.shape[-2:], maps.dtype)
        return maps if condition is None else torch.cat([maps, condition], dim=1)

    def score(self, x: Tensor) -> Tensor:
        """(B,) scores for a prepared input (see ``prepare_input``)."""
        x = self.input_norm(x)
        h, w = x.shape[-2:]
        if h < MIN_SIZE or w < MIN_SIZE:
            # Replicate padding keeps softmax maps valid distributions at the border.
            ph, pw = max(0, MIN_SIZE - h), max(0, MIN_SIZE - w)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        x = F.leaky_relu(self.conv1(x), 0.1)
        x = F.leaky_relu(self.conv2(x), 0.1)
        x = self.attn1(F.leaky_relu(self.conv3(x), 0.1))
        x = self.attn2(F.leaky_relu(self.conv4(x), 0.1))
        return self.last(x).mean(dim=(1, 2, 3))

    def forward(self, seg_logits: Tensor, image: Tensor | None = None) -> Tensor:
        """(B,) scores for B×C×h×w logits (and B×3×H×W images with ``conditioning="image"``)."""
        return self.score(self.prepare_input(seg_logits, image))
