"""Loss functions for structured knowledge distillation (Liu et al., CVPR 2019).

Every loss here is a pure function of tensors: no modules, no state. The student objective is

    L = task_loss + λ_pi·pixelwise_loss + λ_pa·pairwise_loss + λ_ho·generator_loss

and the discriminator is trained with ``discriminator_loss + λ_gp·gradient_penalty`` (times λ_ho).
Multiplying by the λ weights is the caller's job; nothing here applies them.

Conventions that differ from the reference code (keep them in mind when copying its weights):

* Pixel-wise: ours is the *mean* over pixels of the batch (batch-size independent). The reference
  computes ``Σ_{b,pixels} −p_T·log p_S / (H·W)``, i.e. a per-image pixel mean *summed* over the
  batch, and uses λ_pi = 10 with batch 8. Its effective weight on our batch-mean definition is
  therefore λ_pi · batch = 10 · 8 = 80. The reference's cross-entropy differs from our KL by the
  teacher entropy, which is constant w.r.t. the student, so the gradients are identical.
* Pair-wise: the reference divides the summed squared differences by (n²·B), the same mean over
  batch·n·n as ours, so λ_pa (0.5 in the run script) carries over unchanged. The reference detaches
  the L2 norm before dividing; we do not, so the gradient is the exact gradient of the cosine
  similarity. A fractional node size uses ``ceil`` (the reference uses ``int``), so a scale of 0.5
  always gives 2×2 nodes, also on odd-sized maps.
* Gradient penalty: returned without λ_gp (= 10 in the paper).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import NodeSpec, parse_node_size

_NORM_EPS = 1e-8


def _at_least_float32(x: Tensor) -> Tensor:
    # Half-precision softmax/norms over many classes or channels lose too much; float64 stays
    # float64 so that gradcheck works.
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


# --------------------------------------------------------------------------------------------
# Task loss
# --------------------------------------------------------------------------------------------


def _cross_entropy(logits: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    if logits.dim() != 4 or label.dim() != 3 or logits.shape[0] != label.shape[0]:
        raise ValueError(
            f"expected logits B×C×h×w and label B×H×W, got {tuple(logits.shape)} and {tuple(label.shape)}"
        )
    logits = _at_least_float32(logits)
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    label = label.long()
    # Sum / count instead of reduction="mean": identical value, but an all-ignored batch gives 0
    # instead of 0/0 = NaN.
    total = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    count = (label != ignore_index).sum().clamp(min=1)
    return total / count


def task_loss(
    logits: Tensor,
    label: Tensor,
    aux_logits: Tensor | None = None,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
) -> Tensor:
    """Segmentation cross-entropy, with an optional auxiliary head.

    ``logits`` (B, C, h, w) are bilinearly upsampled (align_corners=False) to the size of
    ``label`` (B, H, W) first. Pixels labelled ``ignore_index`` are left out of the mean; if every
    pixel is ignored the loss is 0 (still part of the graph), not NaN.
    """
    loss = _cross_entropy(logits, label, ignore_index)
    if aux_logits is not None:
        loss = loss + aux_weight * _cross_entropy(aux_logits, label, ignore_index)
    return loss


# --------------------------------------------------------------------------------------------
# Pixel-wise distillation
# --------------------------------------------------------------------------------------------


def pixelwise_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    valid: Tensor | None = None,
) -> Tensor:
    """Mean over valid pixels of KL(p_T ‖ p_S) · T², softmax over the class dim (dim 1).

    Both inputs are B×C×H×W of the same size. ``valid`` is an optional bool mask B×H×W; invalid
    pixels are never read, so padding may hold anything (even NaN). No valid pixel gives 0.
    Computed in at least float32. The teacher is not detached here: pass a detached or cached
    tensor when the teacher must not be trained.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 4:
        raise ValueError(
            "pixelwise_loss needs student and teacher logits of the same B×C×H×W shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = _at_least_float32(student_logits) / temperature
    t = _at_least_float32(teacher_logits) / temperature
    if valid is not None:
        if valid.shape != (student_logits.shape[0], *student_logits.shape[2:]):
            raise ValueError(
                f"valid mask must be B×H×W = {(student_logits.shape[0], *student_logits.shape[2:])}, "
                f"got {tuple(valid.shape)}"
            )
        # Masked sums, not boolean indexing: indexing waits for the device to count the pixels.
        # Invalid pixels are replaced (not multiplied) by 0, so NaN there never reaches the sum.
        keep = valid.bool()[:, None]
        s, t = torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)
    log_p_s = F.log_softmax(s, dim=1)
    log_p_t = F.log_softmax(t, dim=1)
    p_t = log_p_t.exp()
    # 0·log 0 = 0: where p_T is exactly 0 (e.g. a -inf logit) the term is dropped, and masking the
    # difference (not the product) keeps both the value and its gradient finite.
    diff = torch.where(p_t > 0, log_p_t - log_p_s, torch.zeros_like(log_p_s))
    kl = (p_t * diff).sum(dim=1)
    if valid is None:
        return kl.mean() * (temperature**2)
    # No valid pixel: 0 (the sum is 0 and stays connected to the student's graph).
    return kl.sum() / valid.sum().clamp(min=1) * (temperature**2)


# --------------------------------------------------------------------------------------------
# Pair-wise distillation
# --------------------------------------------------------------------------------------------


def resolve_node_size(feature_hw: tuple[int, int], spec: NodeSpec) -> tuple[int, int]:
    """Turn a node-size option (see :func:`parse_node_size`) into a pooling kernel (kh, kw) for a
    feature map of ``feature_hw``. A fraction gives ``ceil`` kernels, so 0.5 always means 2×2 nodes,
    also on odd-sized maps; a pixel kernel is clamped to the map (a larger one pools the same node)."""
    h, w = int(feature_hw[0]), int(feature_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"feature size must be positive, got {feature_hw}")
    kind, value = parse_node_size(spec)
    if kind == "pixels":
        return min(value, h), min(value, w)
    return max(1, math.ceil(h * value)), max(1, math.ceil(w * value))


def _as_pair(node_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(node_size, int):
        return node_size, node_size
    kh, kw = node_size
    return int(kh), int(kw)


def pool_to_nodes(
    feat: Tensor, node_size: int | tuple[int, int], valid: Tensor | None = None
) -> Tensor:
    """Max-pool a B×C×H×W map into graph nodes (kernel = stride = ``node_size``, ceil mode).

    ``node_size`` 1 (or (1, 1)) returns the map unchanged. With a bool ``valid`` mask (B×H×W),
    invalid pixels take no part in the max: they are set to -inf before pooling (multiplying by
    the mask would let a 0 win over negative features), and nodes with no valid pixel at all are
    set to 0 afterwards (exclude them from any loss with :func:`pool_mask_to_nodes`).
    """
    kernel = _as_pair(node_size)
    if valid is not None:
        if valid.shape != (feat.shape[0], *feat.shape[2:]):
            raise ValueError(
                f"valid mask must be B×H×W = {(feat.shape[0], *feat.shape[2:])}, got {tuple(valid.shape)}"
            )
        feat = feat.masked_fill(~valid.bool()[:, None], float("-inf"))
    if kernel != (1, 1):
        feat = F.max_pool2d(feat, kernel_size=kernel, stride=kernel, ceil_mode=True)
    if valid is not None:
        feat = feat.masked_fill(torch.isneginf(feat), 0.0)
    return feat


def pool_mask_to_nodes(valid: Tensor, node_size: int | tuple[int, int]) -> Tensor:
    """Node validity (B×h×w bool): a node is valid if any of its pixels is valid."""
    kernel = _as_pair(node_size)
    v = valid.bool()
    if kernel == (1, 1):
        return v
    pooled = F.max_pool2d(v[:, None].float(), kernel_size=kernel, stride=kernel, ceil_mode=True)
    return pooled[:, 0] > 0


def _similarity(nodes: Tensor) -> Tensor:
    """B×C×h×w nodes -> B×n×n cosine similarities (n = h·w)."""
    x = nodes.flatten(2)
    x = x / (x.norm(dim=1, keepdim=True) + _NORM_EPS)
    return torch.bmm(x.transpose(1, 2), x)


def pairwise_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    node_size: int | tuple[int, int] = 1,
    valid: Tensor | None = None,
) -> Tensor:
    """Pair-wise distillation: mean squared difference of the node cosine-similarity matrices.

    Both maps (B×C_S×H×W and B×C_T×H×W; channel counts may differ, spatial sizes must match) are
    max-pooled into nodes with :func:`pool_to_nodes`, each node is L2-normalised over channels
    (x / (‖x‖ + 1e-8)), and the loss is the mean over batch·n·n of (a_T − a_S)². With a bool
    ``valid`` mask (B×H×W at the feature resolution), pairs involving a node without any valid
    pixel are left out of the mean; no valid pair gives 0.
    """
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise ValueError(
            f"pairwise_loss needs B×C×H×W features, got {tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}"
        )
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            "pairwise_loss needs student and teacher features with the same batch and spatial size, got "
            f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}"
        )
    s = pool_to_nodes(_at_least_float32(student_feat), node_size, valid)
    t = pool_to_nodes(_at_least_float32(teacher_feat), node_size, valid)
    sq = (_similarity(t) - _similarity(s)) ** 2
    if valid is None:
        return sq.mean()
    node_valid = pool_mask_to_nodes(valid, node_size).flatten(1)  # B×n
    pair_valid = node_valid[:, :, None] & node_valid[:, None, :]  # B×n×n
    # Invalid nodes were pooled to 0, so ``sq`` is finite; no valid pair gives 0 (no host sync).
    return torch.where(pair_valid, sq, torch.zeros_like(sq)).sum() / pair_valid.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# Feature distillation (beyond the paper: canonical feature KD)
# --------------------------------------------------------------------------------------------


def feature_loss(adapted_student: Tensor, teacher_feat: Tensor, valid: Tensor | None = None,
                 normalize: bool = True) -> Tensor:
    """Feature distillation: squared distance between the student's features, already mapped to the
    teacher's channels by an adapter, and the teacher's (B×C×H×W each), summed over channels and
    averaged over valid pixels. With ``normalize`` both sides are L2-normalised per pixel first
    (the loss is then 2 − 2·cos, blind to feature scale); without, it is the plain squared error
    averaged over channels too. The teacher is detached; no valid pixel gives 0.
    """
    if adapted_student.shape != teacher_feat.shape or adapted_student.dim() != 4:
        raise ValueError("feature_loss needs adapted student and teacher features of the same B×C×H×W shape, got "
                         f"{tuple(adapted_student.shape)} and {tuple(teacher_feat.shape)}")
    s = _at_least_float32(adapted_student)
    t = _at_least_float32(teacher_feat).detach()
    if normalize:
        s = s / (s.norm(dim=1, keepdim=True) + _NORM_EPS)
        t = t / (t.norm(dim=1, keepdim=True) + _NORM_EPS)
    per_pixel = ((s - t) ** 2).sum(dim=1) / (1 if normalize else s.shape[1])
    if valid is None:
        return per_pixel.mean()
    keep = valid.bool()
    return torch.where(keep, per_pixel, torch.zeros_like(per_pixel)).sum() / keep.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# Holistic (adversarial) distillation
# --------------------------------------------------------------------------------------------

_GAN_KINDS = ("wgan", "hinge")


def _check_kind(kind: str) -> None:
    if kind not in _GAN_KINDS:
        raise ValueError(f"unknown adversarial loss kind {kind!r}; expected one of {_GAN_KINDS}")


def discriminator_loss(d_real: Tensor, d_fake: Tensor, kind: str = "wgan") -> Tensor:
    """Discriminator loss; real = teacher maps, fake = student maps.

    wgan: −mean(d_real) + mean(d_fake); hinge: mean(relu(1 − d_real)) + mean(relu(1 + d_fake)).
    """
    _check_kind(kind)
    if kind == "wgan":
        return -d_real.mean() + d_fake.mean()
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def generator_loss(d_fake: Tensor, kind: str = "wgan") -> Tensor:
    """Student adversarial term: −mean(d_fake) for both kinds (SAGAN's hinge G loss is the same)."""
    _check_kind(kind)
    return -d_fake.mean()


def gradient_penalty(discriminator, real: Tensor, fake: Tensor, image: Tensor | None = None,
                     alpha: Tensor | None = None) -> Tensor:
    """WGAN-GP penalty: mean over the batch of (‖∇_x D(x)‖₂ − 1)² at random interpolates x.

    x = α·real + (1 − α)·fake with α ~ U(0, 1) per sample (drawn here unless ``alpha``, B values,
    is given); real and fake are detached, so only the discriminator receives gradients (the graph
    is kept, create_graph=True). When ``image`` is given it is the condition: ``discriminator(x,
    image)``, and the gradient is taken w.r.t. x only. The caller multiplies by λ_gp (10 in the paper).
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    if alpha is None:
        alpha = torch.rand(alpha_shape, dtype=real.dtype, device=real.device)
    alpha = alpha.reshape(alpha_shape).to(real.dtype)
    interp = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
    scores = discriminator(interp) if image is None else discriminator(interp, image)
    (grads,) = torch.autograd.grad(scores.sum(), interp, create_graph=True)
    grad_norm = grads.flatten(1).norm(2, dim=1)
    return ((grad_norm - 1.0) ** 2).mean()
