"""Loss functions checked against hand-computed values and invariances."""

import math

import pytest
import torch

from pipeline.distill.losses import (
    discriminator_loss,
    feature_loss,
    generator_loss,
    gradient_penalty,
    pairwise_loss,
    pixelwise_loss,
    pool_mask_to_nodes,
    pool_to_nodes,
    resolve_node_size,
    task_loss,
)
from pipeline.errors import SkdError


def logits_map(values_per_pixel):
    """[[c0, c1, ...] per pixel along the width] -> 1×C×1×W tensor."""
    t = torch.tensor(values_per_pixel, dtype=torch.float64)  # W×C
    return t.t()[None, :, None, :]


def softmax2(a, b):
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def kl2(teacher, student):
    """KL(p_T ‖ p_S) for two classes, by hand."""
    pt = softmax2(*teacher)
    ps = softmax2(*student)
    return sum(pt[i] * (math.log(pt[i]) - math.log(ps[i])) for i in range(2))


# ------------------------------------------------------------------------------------------
# task_loss
# ------------------------------------------------------------------------------------------


def ce2(logit0, logit1, label):
    """Cross-entropy for two classes, by hand."""
    z = math.log(math.exp(logit0) + math.exp(logit1))
    return z - (logit0 if label == 0 else logit1)


def test_task_loss_hand_value_with_ignore():
    # A 1×1 map upsampled to 2×2 is constant: every pixel has logits (1, 3).
    logits = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    label = torch.tensor([[[0, 1], [255, 0]]])
    expected = (2 * ce2(1, 3, 0) + ce2(1, 3, 1)) / 3
    assert task_loss(logits, label).item() == pytest.approx(expected, rel=1e-6)


def test_task_loss_upsamples_bilinear_without_align_corners():
    # Class-0 logit 0 | 4 across the width, class-1 logit 0. Upsampling 2 -> 4 with
    # align_corners=False samples at x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1):
    # class-0 logits 0, 1, 3, 4. (align_corners=True would give 0, 4/3, 8/3, 4.)
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, :, 1] = 4.0
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    expected = sum(ce2(x, 0.0, 0) for x in (0.0, 1.0, 3.0, 4.0)) / 4
    assert task_loss(logits, label).item() == pytest.approx(expected, rel=1e-6)


def test_task_loss_aux_weight():
    logits = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    aux = torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1)
    label = torch.tensor([[[1]]])
    expected = ce2(1, 3, 1) + 0.4 * ce2(2, -1, 1)
    assert task_loss(logits, label, aux_logits=aux).item() == pytest.approx(expected, rel=1e-6)
    expected_w = ce2(1, 3, 1) + 1.5 * ce2(2, -1, 1)
    assert task_loss(logits, label, aux_logits=aux, aux_weight=1.5).item() == pytest.approx(expected_w, rel=1e-6)


def test_task_loss_all_ignored_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    label = torch.full((2, 8, 8), 255, dtype=torch.long)
    loss = task_loss(logits, label)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------------------------------
# pixelwise_loss
# ------------------------------------------------------------------------------------------


def test_pixelwise_one_pixel_hand_kl():
    student, teacher = (0.0, 1.0), (2.0, 0.0)
    loss = pixelwise_loss(logits_map([student]), logits_map([teacher]))
    assert loss.item() == pytest.approx(kl2(teacher, student), rel=1e-12)


def test_pixelwise_temperature_two():
    student, teacher = (0.0, 1.0), (2.0, 0.0)
    T = 2.0
    expected = kl2((2.0 / T, 0.0), (0.0, 1.0 / T)) * T * T
    loss = pixelwise_loss(logits_map([student]), logits_map([teacher]), temperature=T)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Not the same as T = 1 (the softened distributions differ), so the test can fail.
    assert expected != pytest.approx(kl2(teacher, student), rel=1e-3)


def test_pixelwise_identical_inputs_zero():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    assert pixelwise_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_pixelwise_mean_and_valid_mask():
    s = [(0.0, 1.0), (1.0, -1.0), (0.5, 0.5)]
    t = [(2.0, 0.0), (-1.0, 1.0), (0.0, 3.0)]
    k = [kl2(t[i], s[i]) for i in range(3)]
    student, teacher = logits_map(s), logits_map(t)
    assert pixelwise_loss(student, teacher).item() == pytest.approx(sum(k) / 3, rel=1e-12)
    valid = torch.tensor([[[True, False, True]]])
    assert pixelwise_loss(student, teacher, valid=valid).item() == pytest.approx((k[0] + k[2]) / 2, rel=1e-12)


def test_pixelwise_mean_over_batch():
    # The loss is a per-pixel mean over the whole batch (batch-size independent).
    s = logits_map([(0.0, 1.0), (1.0, -1.0)])
    t = logits_map([(2.0, 0.0), (-1.0, 1.0)])
    k = [kl2((2.0, 0.0), (0.0, 1.0)), kl2((-1.0, 1.0), (1.0, -1.0))]
    batch_s = torch.cat([s, s.flip(-1)])
    batch_t = torch.cat([t, t.flip(-1)])
    assert pixelwise_loss(batch_s, batch_t).item() == pytest.approx(sum(k) / 2, rel=1e-12)


def test_pixelwise_no_valid_pixel_is_zero_and_invalid_pixels_not_read():
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 2)
    none = torch.zeros(1, 2, 2, dtype=torch.bool)
    loss = pixelwise_loss(student, teacher, valid=none)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))

    # Padding that holds NaN in the teacher must not reach the loss or the gradient.
    student.grad = None
    teacher_nan = teacher.clone()
    teacher_nan[0, :, 1, 1] = float("nan")
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    valid[0, 1, 1] = False
    loss = pixelwise_loss(student, teacher_nan, valid=valid)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[0, :, 1, 1], torch.zeros(3))


def test_pixelwise_zero_teacher_probability_is_safe():
    # Teacher (0, -inf): p_T = (1, 0); student (0, 0): p_S = (1/2, 1/2). KL = 1·(log 1 − log 1/2).
    student = logits_map([(0.0, 0.0)]).requires_grad_(True)
    teacher = logits_map([(0.0, float("-inf"))])
    loss = pixelwise_loss(student, teacher)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-12)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_pixelwise_half_inputs_computed_in_float32():
    student = torch.randn(2, 19, 4, 4)
    teacher = torch.randn(2, 19, 4, 4)
    ref = pixelwise_loss(student.half().double(), teacher.half().double())
    loss = pixelwise_loss(student.half(), teacher.half())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_pixelwise_shape_mismatch_raises():
    with pytest.raises(ValueError):
        pixelwise_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3))


# ------------------------------------------------------------------------------------------
# pairwise_loss and node pooling
# ------------------------------------------------------------------------------------------

INV_SQRT2 = 1.0 / math.sqrt(2.0)


def four_block_teacher():
    """2×4×4 teacher map whose 2×2 max-pooled nodes are (1,0), (0,1), (1,1), (2,0).

    Max pooling is per channel: the bottom-left block has (1,0) and (0,1) in different pixels,
    so its node is (1,1).
    """
    f = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    f[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # top-left block
    f[0, :, 0, 2] = torch.tensor([0.0, 0.5])  # top-right block
    f[0, :, 1, 3] = torch.tensor([0.0, 1.0])
    f[0, :, 2, 0] = torch.tensor([1.0, 0.0])  # bottom-left block
    f[0, :, 3, 1] = torch.tensor([0.0, 1.0])
    f[0, :, 2, 2] = torch.tensor([2.0, 0.0])  # bottom-right block
    f[0, :, 3, 3] = torch.tensor([0.5, 0.0])
    return f


def test_pool_to_nodes_per_channel_max():
    nodes = pool_to_nodes(four_block_teacher(), 2)
    expected = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    assert torch.equal(nodes[0], expected)


def test_pairwise_hand_cosine_matrix_2x2_nodes():
    teacher = four_block_teacher()
    # Teacher cosine matrix of nodes (1,0), (0,1), (1,1), (2,0), written out by hand:
    r = INV_SQRT2
    a_t = torch.tensor(
        [
            [1, 0, r, 1],
            [0, 1, r, 0],
            [r, r, 1, r],
            [1, 0, r, 1],
        ],
        dtype=torch.float64,
    )
    # A one-channel, strictly positive student: every node is parallel, all cosines are 1.
    student = torch.rand(1, 1, 4, 4, dtype=torch.float64) + 0.5
    expected = ((a_t - 1.0) ** 2).mean().item()
    assert expected == pytest.approx((4 + 6 * (1 - r) ** 2) / 16)
    assert pairwise_loss(student, teacher, node_size=2).item() == pytest.approx(expected, abs=1e-7)


def test_pairwise_mask_excludes_nodes():
    teacher = four_block_teacher()
    student = torch.rand(1, 1, 4, 4, dtype=torch.float64) + 0.5
    r = INV_SQRT2
    # Bottom-right block invalid: pairs among the other three nodes only (9 pairs).
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 2:, 2:] = False
    expected = (2 * 1 + 4 * (1 - r) ** 2) / 9
    assert pairwise_loss(student, teacher, node_size=2, valid=valid).item() == pytest.approx(expected, abs=1e-7)


def test_pairwise_mask_excludes_pixels_inside_a_node():
    teacher = four_block_teacher()
    student = torch.rand(1, 1, 4, 4, dtype=torch.float64) + 0.5
    # Masking the (0,1) pixel of the bottom-left block turns that node into (1,0):
    # nodes (1,0), (0,1), (1,0), (2,0) -> node 2 is orthogonal to the three others, which are
    # parallel. Against an all-ones student: 3 pairs (both orders) with difference 1.
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 3, 1] = False
    assert pairwise_loss(student, teacher, node_size=2, valid=valid).item() == pytest.approx(6 / 16, abs=1e-7)


def test_pool_to_nodes_masked_negative_features():
    # Valid pixels (-1,-2) and (-3,-1); invalid pixels 0 and 5 must not win the max.
    f = torch.tensor([[[-1.0, -3.0], [0.0, 5.0]], [[-2.0, -1.0], [0.0, 5.0]]]).reshape(1, 2, 2, 2)
    valid = torch.tensor([[[True, True], [False, False]]])
    assert pool_to_nodes(f, 2, valid=valid).flatten().tolist() == [-1.0, -1.0]
    # A node without any valid pixel becomes 0 and is marked invalid.
    none = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert pool_to_nodes(f, 2, valid=none).flatten().tolist() == [0.0, 0.0]
    assert pool_mask_to_nodes(none, 2).tolist() == [[[False]]]
    assert pool_mask_to_nodes(valid, 2).tolist() == [[[True]]]


def test_pairwise_identical_inputs_zero():
    x = torch.randn(2, 8, 5, 7)
    assert pairwise_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert pairwise_loss(x, x.clone(), node_size=(2, 3)).item() == pytest.approx(0.0, abs=1e-10)


def test_pairwise_invariant_to_scaling_one_node():
    torch.manual_seed(0)
    s = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    s_scaled = s.clone()
    s_scaled[1, :, 2, 0] *= 7.3
    before = pairwise_loss(s, t).item()
    assert before > 0.01
    assert pairwise_loss(s_scaled, t).item() == pytest.approx(before, rel=1e-9)
    # A negative factor flips the direction and does change the loss.
    s_flipped = s.clone()
    s_flipped[1, :, 2, 0] *= -1.0
    assert pairwise_loss(s_flipped, t).item() != pytest.approx(before, rel=1e-3)


def test_pairwise_different_channel_counts():
    torch.manual_seed(0)
    student = torch.randn(2, 128, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 512, 8, 8)
    loss = pairwise_loss(student, teacher, node_size=2)
    assert 0.0 < loss.item() < 4.0
    loss.backward()
    assert student.grad.abs().sum() > 0
    # Repeating each student channel 4 times keeps every cosine, so a 512-ch teacher built that
    # way matches the 128-ch student exactly.
    repeated = student.detach().repeat(1, 4, 1, 1)
    assert pairwise_loss(student.detach(), repeated, node_size=2).item() == pytest.approx(0.0, abs=1e-10)


def test_pairwise_spatial_mismatch_raises():
    with pytest.raises(ValueError):
        pairwise_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9))


def test_pairwise_all_invalid_zero_and_differentiable():
    student = torch.randn(1, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 5, 4, 4)
    loss = pairwise_loss(student, teacher, node_size=2, valid=torch.zeros(1, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_pairwise_gradcheck():
    torch.manual_seed(0)
    # Distinct random values: no ties inside the 2×2 max-pooling windows.
    student = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: pairwise_loss(s, t, node_size=2), (student, teacher))
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, :, 2:] = False
    assert torch.autograd.gradcheck(lambda s, t: pairwise_loss(s, t, node_size=(2, 1), valid=valid), (student, teacher))


def test_resolve_node_size():
    assert resolve_node_size((64, 64), 0.5) == (32, 32)
    assert resolve_node_size((65, 33), 0.5) == (33, 17)
    # ceil kernels give exactly 2×2 nodes on odd maps too.
    nodes = pool_to_nodes(torch.randn(1, 2, 65, 33), resolve_node_size((65, 33), 0.5))
    assert nodes.shape[-2:] == (2, 2)
    assert resolve_node_size((64, 32), 1.0) == (64, 32)
    assert resolve_node_size((64, 32), 0.25) == (16, 8)
    # 1 and 1.0 mean the same: the whole map as one node (never a 1-pixel kernel).
    assert resolve_node_size((64, 32), 1) == (64, 32)
    assert resolve_node_size((64, 32), "2px") == (2, 2)
    assert resolve_node_size((64, 32), "1px") == (1, 1)
    assert resolve_node_size((64, 32), "40px") == (40, 32)
    assert resolve_node_size((64, 32), "0.5") == (32, 16)  # from the command line
    # Nothing that could be read two ways is rounded: 2.5 pixels, 2 (pixels or a fraction?), '2.5px'.
    for bad in (0, -1, 0.0, 1.5, 2, 2.5, True, "2.5px", "0px", "2", float("nan")):
        with pytest.raises(SkdError):
            resolve_node_size((64, 64), bad)


# ------------------------------------------------------------------------------------------
# Adversarial losses
# ------------------------------------------------------------------------------------------


def test_discriminator_and_generator_losses():
    d_real = torch.tensor([1.0, 2.0])
    d_fake = torch.tensor([0.5, -1.0])
    # wgan: −(1 + 2)/2 + (0.5 − 1)/2 = −1.5 − 0.25
    assert discriminator_loss(d_real, d_fake).item() == pytest.approx(-1.75)
    # hinge: relu(0), relu(−1) -> 0; relu(1.5), relu(0) -> 0.75
    assert discriminator_loss(d_real, d_fake, kind="hinge").item() == pytest.approx(0.75)
    d_real2 = torch.tensor([0.25, -0.5])
    # hinge: relu(0.75), relu(1.5) -> 1.125
    assert discriminator_loss(d_real2, d_fake, kind="hinge").item() == pytest.approx(1.125 + 0.75)
    assert generator_loss(d_fake).item() == pytest.approx(0.25)
    assert generator_loss(d_fake, kind="hinge").item() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        discriminator_loss(d_real, d_fake, kind="lsgan")
    with pytest.raises(ValueError):
        generator_loss(d_fake, kind="lsgan")


def linear_discriminator(norm: float, shape=(3, 4, 4)):
    w = torch.randn(shape, dtype=torch.float64)
    w = w / w.norm() * norm
    return w, lambda x: (w * x).sum(dim=(1, 2, 3))


def test_gradient_penalty_unit_gradient_is_zero():
    torch.manual_seed(0)
    _, d = linear_discriminator(1.0)
    real = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    fake = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    assert gradient_penalty(d, real, fake).item() < 1e-10


def test_gradient_penalty_norm_three_hand_value_and_gradient():
    torch.manual_seed(0)
    w, _ = linear_discriminator(3.0)
    w.requires_grad_(True)
    real = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    fake = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    gp = gradient_penalty(lambda x: (w * x).sum(dim=(1, 2, 3)), real, fake)
    assert gp.item() == pytest.approx((3.0 - 1.0) ** 2, rel=1e-12)
    # d/dw (‖w‖ − 1)² = 2(‖w‖ − 1)·w/‖w‖ = 4w/3: the penalty trains the discriminator.
    gp.backward()
    assert torch.allclose(w.grad, 4.0 * w.detach() / 3.0, rtol=1e-10, atol=1e-12)


def test_gradient_penalty_conditional_passes_image():
    torch.manual_seed(0)
    w, _ = linear_discriminator(3.0)
    image = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    seen = []

    def d(x, img):
        seen.append(img)
        # The condition adds to the score but the penalty only looks at ∂D/∂x.
        return (w * x).sum(dim=(1, 2, 3)) + 5.0 * img.sum(dim=(1, 2, 3))

    real = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    fake = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    gp = gradient_penalty(d, real, fake, image=image)
    assert seen and seen[0] is image
    assert gp.item() == pytest.approx(4.0, rel=1e-12)


def test_gradient_penalty_gradcheck_wrt_discriminator_parameters():
    torch.manual_seed(1)
    real = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    fake = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    weight = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    head = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def penalty(weight, bias, head):
        def d(x):
            return torch.tanh(x.flatten(1) @ weight.t() + bias) @ head

        torch.manual_seed(0)  # the same alpha on every evaluation
        return gradient_penalty(d, real, fake)

    assert torch.autograd.gradcheck(penalty, (weight, bias, head))


def test_gradient_penalty_does_not_train_real_or_fake():
    torch.manual_seed(0)
    w, _ = linear_discriminator(2.0)
    w.requires_grad_(True)
    real = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    gp = gradient_penalty(lambda x: (w * x).sum(dim=(1, 2, 3)), real, fake)
    assert gp.item() == pytest.approx(1.0, rel=1e-12)
    gp.backward()
    assert w.grad is not None
    assert real.grad is None and fake.grad is None


# --------------------------------------------------------------------------------------------
# Feature distillation
# --------------------------------------------------------------------------------------------


def test_feature_loss_is_zero_when_the_adapter_maps_student_to_teacher_exactly():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 4, 6)
    adapter = torch.nn.Conv2d(5, 7, 1)
    teacher = adapter(student).detach()  # the teacher's features are exactly an adapter of the student's
    for normalize in (True, False):
        assert feature_loss(adapter(student), teacher, normalize=normalize).item() == pytest.approx(0.0, abs=1e-12)
    # Normalised, a per-pixel positive scale of the teacher changes nothing; plain, it does.
    scaled = teacher * torch.rand(2, 1, 4, 6).add(0.5)
    assert feature_loss(adapter(student), scaled).item() == pytest.approx(0.0, abs=1e-10)
    assert feature_loss(adapter(student), scaled, normalize=False).item() > 1e-3


def test_feature_loss_values_and_where_its_gradient_goes():
    # One pixel, student (1, 0) vs teacher (0, 1): normalised, |s - t|^2 = 2; plain, mean of (1, 1) = 1.
    student = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).requires_grad_(True)
    teacher = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).requires_grad_(True)
    assert feature_loss(student, teacher).item() == pytest.approx(2.0, rel=1e-6)
    assert feature_loss(student, teacher, normalize=False).item() == pytest.approx(1.0, rel=1e-6)
    # Through an adapter the gradient reaches the student and the adapter, never the teacher's targets.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    adapter = torch.nn.Conv2d(3, 2, 1)
    target = torch.randn(2, 2, 4, 4, requires_grad=True)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[:, :, 2:] = False
    loss = feature_loss(adapter(x), target, valid)
    loss.backward()
    assert x.grad.abs().sum() > 0 and adapter.weight.grad.abs().sum() > 0
    assert target.grad is None
    assert torch.equal(x.grad[:, :, :, 2:], torch.zeros_like(x.grad[:, :, :, 2:]))  # masked pixels get nothing
