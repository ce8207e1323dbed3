"""Holistic (adversarial) distillation term: input normalisation, padding, joint scoring, penalty."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DistillConfig
from pipeline.distill.holistic import HolisticTerm
from pipeline.models.discriminator import Discriminator

B, C, H, W = 2, 4, 8, 8
CPU = torch.device("cpu")


def make_term(conditioning: str = "logits", d_loss: str = "wgan", d_optimizer: str = "sgd",
              iterations: int = 10, gp_every: int = 1) -> HolisticTerm:
    cfg = DistillConfig(lambda_ho=0.5, lambda_gp=10.0, d_conditioning=conditioning, d_loss=d_loss,
                        d_optimizer=d_optimizer, d_lr=1e-2, gp_every=gp_every)
    return HolisticTerm(C, cfg, iterations=iterations, poly_power=0.9, device=CPU)


def teacher_and_images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    teacher_log_probs = torch.log_softmax(3.0 * torch.randn(B, C, H, W), dim=1)
    images = torch.randn(B, 3, H, W)  # already at the map size: the resize leaves it unchanged
    return teacher_log_probs, images


def all_valid() -> torch.Tensor:
    return torch.ones(B, H, W, dtype=torch.bool)


def d_step(term: HolisticTerm, student: torch.Tensor, teacher_log_probs: torch.Tensor, images: torch.Tensor,
           valid: torch.Tensor, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """One training step's adversarial part, as the trainer runs it: losses, one backward, update."""
    backprop, logged = term.losses(student, teacher_log_probs, images, valid, weight)
    backprop.backward()
    term.update()
    return logged


def converge_spectral_norms(d: Discriminator) -> None:
    """Power-iterate every spectral norm to its fixed point, so that more forwards leave σ as it is."""
    for module in d.modules():
        if hasattr(module, "_power_iteration"):
            module._power_iteration(300)


def offset_student(teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Student logits of the same distribution: teacher log-probs plus a large per-pixel constant."""
    return teacher_log_probs + 10.0 * torch.randn(B, 1, H, W)


# --------------------------------------------------------------------------------------------
# 1. Normalisation: a per-pixel offset must not tell student logits from teacher log-probs
# --------------------------------------------------------------------------------------------


def test_logits_conditioning_discriminator_ignores_a_per_pixel_offset():
    """log_softmax(x + c) = log_softmax(x): D with 'logits' conditioning cannot score the offset."""
    teacher_log_probs, _ = teacher_and_images()
    student = offset_student(teacher_log_probs)
    d = Discriminator(C, conditioning="logits").eval()  # eval: no spectral-norm iteration, fixed BN
    torch.testing.assert_close(d.prepare_input(student), teacher_log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(d(student), d(teacher_log_probs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conditioning", ["logits", "image"])
def test_offset_student_gives_the_teacher_inputs_and_zero_critic_gap(conditioning):
    teacher_log_probs, images = teacher_and_images()
    student = offset_student(teacher_log_probs)
    term = make_term(conditioning)
    real, fake, condition = term.inputs(student, teacher_log_probs, images, all_valid())
    # Hand facts: log_softmax of log-probs is the identity; softmax of log-probs is the probabilities.
    expected = teacher_log_probs if conditioning == "logits" else teacher_log_probs.exp()
    torch.testing.assert_close(real, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fake, expected, rtol=0, atol=1e-5)
    assert (condition is None) == (conditioning == "logits")
    # Identical inputs in one batch get identical scores: the critic gap (the WGAN d_adv) is 0.
    out = d_step(term, student, teacher_log_probs, images, all_valid())
    assert abs(out["d_adv"].item()) < 1e-5


# --------------------------------------------------------------------------------------------
# 2. Real and fake are scored together (shared BatchNorm statistics)
# --------------------------------------------------------------------------------------------


def test_real_and_fake_go_through_batchnorm_in_one_batch():
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W)
    term = make_term("logits")
    seen: list[torch.Tensor] = []
    term.discriminator.input_norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))

    term.generator_loss(student, teacher_log_probs, images, all_valid())
    assert len(seen) == 1 and seen[0].shape[0] == 2 * B
    torch.testing.assert_close(seen[0][:B], teacher_log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[0][B:], torch.log_softmax(student, dim=1))

    seen.clear()
    d_step(term, student, teacher_log_probs, images, all_valid())
    # The generator term's batch, D's own adversarial batch [real; fake], the penalty's interpolates.
    assert [x.shape[0] for x in seen] == [2 * B, 2 * B, B]
    torch.testing.assert_close(seen[0][:B], teacher_log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[0][B:], torch.log_softmax(student, dim=1))


def test_generator_loss_is_minus_the_fake_half_of_the_joint_scores():
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W)
    term = make_term("logits")
    d = copy.deepcopy(term.discriminator).train()  # same spectral-norm state and BN statistics
    joint = torch.cat([teacher_log_probs, torch.log_softmax(student, dim=1)])
    expected = -0.5 * d.score(joint)[B:].mean()  # λ_ho = 0.5
    separate = -0.5 * copy.deepcopy(term.discriminator).train().score(joint[B:]).mean()
    assert not torch.allclose(expected, separate)  # the batch composition matters with BatchNorm
    loss = term.generator_loss(student, teacher_log_probs, images, all_valid())
    torch.testing.assert_close(loss, expected)


def test_image_conditioned_generator_loss_scores_the_fake_maps_alone_with_the_same_result():
    """Without BatchNorm a score depends on its own sample only: the generator step skips the
    real half of the joint batch, and its value and gradient stay those of the joint scoring."""
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W, requires_grad=True)
    term = make_term("image")
    with torch.no_grad():
        term.discriminator.attn1.gamma.fill_(0.5)
        term.discriminator.attn2.gamma.fill_(-0.3)
    d = copy.deepcopy(term.discriminator).eval()  # eval: no power iteration, the same weights twice
    expected = -0.5 * d(torch.cat([teacher_log_probs, student]), torch.cat([images, images]))[B:].mean()
    (expected_grad,) = torch.autograd.grad(expected, student)
    calls = []
    term.discriminator.score_maps = lambda maps, cond: calls.append(len(maps)) or d.score_maps(maps, cond)
    loss = term.generator_loss(student, teacher_log_probs, images, all_valid())
    (grad,) = torch.autograd.grad(loss, student)
    assert calls == [B]  # one forward, of the fake maps only
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("conditioning", ["logits", "image"])
def test_generator_loss_gradients_reach_the_student_only(conditioning):
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W, requires_grad=True)
    teacher_log_probs.requires_grad_(True)
    term = make_term(conditioning)
    # gamma = 0 at init makes attention a no-op; open it so every path is exercised.
    with torch.no_grad():
        term.discriminator.attn1.gamma.fill_(0.5)
    loss = term.generator_loss(student, teacher_log_probs, images, all_valid())
    assert loss.dim() == 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_log_probs.grad is None
    assert all(p.grad is None for p in term.discriminator.parameters())
    assert all(p.requires_grad for p in term.discriminator.parameters())  # unfrozen again


# --------------------------------------------------------------------------------------------
# 3. Gradient penalty on the map channels only
# --------------------------------------------------------------------------------------------


def test_gradient_penalty_ignores_the_image_channels():
    """Linear critic s(x) = Σ w·[maps, image]: ∂s/∂maps = w_map, so GP = (‖w_map‖ − 1)² exactly.

    The old penalty took the norm over all channels: (‖w‖ − 1)² = (√(4 + 9) − 1)² here.
    """
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W)
    valid = all_valid()
    valid[0, :2] = False
    term = make_term("image")
    w_map = torch.full((C, H, W), 2.0 / math.sqrt(C * H * W))  # ‖w_map‖ = 2
    w_img = torch.full((3, H, W), 3.0 / math.sqrt(3 * H * W))  # ‖w_img‖ = 3
    w = torch.cat([w_map, w_img]).requires_grad_(True)
    seen_images: list[torch.Tensor] = []

    def critic(x: torch.Tensor) -> torch.Tensor:
        seen_images.append(x[:, C:].detach())
        return (w * x).sum(dim=(1, 2, 3))

    term.discriminator.score = critic  # score_maps concatenates [maps, condition] and calls this
    out = d_step(term, student, teacher_log_probs, images, valid)

    lam_ho, lam_gp = 0.5, 10.0
    assert out["d_gp"].item() == pytest.approx(lam_ho * lam_gp * (2.0 - 1.0) ** 2, rel=1e-5)
    # The image is a fixed condition in every call (never interpolated, never blanked).
    assert len(seen_images) == 2
    torch.testing.assert_close(seen_images[0], torch.cat([images, images]))
    torch.testing.assert_close(seen_images[1], images)
    # d_adv by hand: the image term cancels; padding is the uniform distribution in both maps.
    p_real = torch.where(valid[:, None], teacher_log_probs.exp(), 1.0 / C)
    p_fake = torch.where(valid[:, None], torch.softmax(student, dim=1), 1.0 / C)
    gap = ((w_map * p_fake).sum(dim=(1, 2, 3)) - (w_map * p_real).sum(dim=(1, 2, 3))).mean()
    assert out["d_adv"].item() == pytest.approx(lam_ho * gap.item(), rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["logits", "image"])
def test_padding_is_blanked_identically_in_real_and_fake(conditioning):
    teacher_log_probs, images = teacher_and_images()
    valid = all_valid()
    valid[0, :, 5:] = False
    valid[1, 6:] = False
    torch.manual_seed(2)
    garbage = 1e4 * torch.randn(B, C, H, W)
    garbage[0, 0, 0, 7] = float("nan")
    student = torch.where(valid[:, None], teacher_log_probs, garbage)  # agrees with the teacher where valid
    term = make_term(conditioning)
    real, fake, _ = term.inputs(student, teacher_log_probs, images, valid)
    torch.testing.assert_close(real, fake)
    uniform = -math.log(C) if conditioning == "logits" else 1.0 / C  # normalised all-zero logits
    pad = ~valid[:, None].expand(B, C, H, W)
    torch.testing.assert_close(fake[pad], torch.full_like(fake[pad], uniform))
    out = d_step(term, student, teacher_log_probs, images, valid)
    assert abs(out["d_adv"].item()) < 1e-5 and torch.isfinite(out["d_gp"])


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning, d_loss, d_optimizer",
                         [("image", "wgan", "sgd"), ("logits", "wgan", "adam"), ("image", "hinge", "adam")])
def test_a_step_trains_d_and_returns_weighted_tensors(conditioning, d_loss, d_optimizer):
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W, requires_grad=True)
    teacher_log_probs.requires_grad_(True)
    term = make_term(conditioning, d_loss=d_loss, d_optimizer=d_optimizer, iterations=10)
    before = [p.detach().clone() for p in term.discriminator.parameters()]
    out = d_step(term, student, teacher_log_probs, images, all_valid())
    assert set(out) == ({"ho", "d_adv", "d_gp"} if d_loss == "wgan" else {"ho", "d_adv"})
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.values())
    assert student.grad is not None and student.grad.abs().sum() > 0  # the adversarial term's pull
    assert teacher_log_probs.grad is None
    assert any(not torch.equal(a, p) for a, p in zip(before, term.discriminator.parameters()))
    assert term.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * (1 - 1 / 10) ** 0.9)


@pytest.mark.parametrize("conditioning, d_loss", [("image", "wgan"), ("logits", "wgan"), ("image", "hinge")])
def test_one_backward_gives_the_generator_and_discriminator_gradients(conditioning, d_loss):
    """The student's gradient is that of weight·λ_ho·(−mean D(fake)) with D frozen, and D's is that of
    λ_ho·L_D(D(real), D(fake)) with the fake maps detached: a generator step and a discriminator step
    at the same D, computed here by hand with a copy of D."""
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W, requires_grad=True)
    term = make_term(conditioning, d_loss=d_loss)
    term.lambda_gp = 0.0  # the penalty is tested on its own; here it would only add its random α
    with torch.no_grad():
        term.discriminator.attn1.gamma.fill_(0.5)
        term.discriminator.attn2.gamma.fill_(-0.3)
    converge_spectral_norms(term.discriminator)
    d = copy.deepcopy(term.discriminator)
    weight, lam = 0.7, 0.5

    def prepare(x):
        if conditioning == "logits":
            return torch.log_softmax(x, dim=1)
        return torch.cat([torch.softmax(x, dim=1), images], dim=1)  # images are at the map size

    fake_scores = d.score(torch.cat([prepare(teacher_log_probs), prepare(student)]))[B:]
    (student_grad,) = torch.autograd.grad(weight * lam * -fake_scores.mean(), student)
    d.zero_grad()
    scores = d.score(torch.cat([prepare(teacher_log_probs), prepare(student.detach())]))
    real, fake = scores[:B], scores[B:]
    d_loss_value = (fake.mean() - real.mean()) if d_loss == "wgan" else (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    (lam * d_loss_value).backward()

    backprop, logged = term.losses(student, teacher_log_probs, images, all_valid(), weight)
    backprop.backward()
    torch.testing.assert_close(student.grad, student_grad, rtol=1e-4, atol=1e-7)
    for (name, p), q in zip(term.discriminator.named_parameters(), d.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    torch.testing.assert_close(logged["ho"], weight * lam * -fake_scores.mean().detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logged["d_adv"], lam * d_loss_value.detach(), rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    teacher_log_probs, images = teacher_and_images()
    torch.manual_seed(1)
    student = torch.randn(B, C, H, W)
    first = make_term("logits", d_optimizer="adam")
    d_step(first, student, teacher_log_probs, images, all_valid())
    state = first.state_dict()
    assert set(state) == {"discriminator", "d_optimizer", "d_scheduler", "d_last_gp"}
    torch.manual_seed(5)
    second = make_term("logits", d_optimizer="adam")
    second.load_state_dict(copy.deepcopy(state))
    results = []
    for term in (first, second):
        torch.manual_seed(3)  # the same penalty interpolation
        results.append(d_step(term, student, teacher_log_probs, images, all_valid()))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name])
    for a, b in zip(first.discriminator.state_dict().values(), second.discriminator.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert first.scheduler.last_epoch == second.scheduler.last_epoch == 2


def test_lazy_gradient_penalty_runs_every_nth_step_at_n_times_the_weight():
    teacher_log_probs, images = teacher_and_images()
    student = offset_student(teacher_log_probs) + 0.5 * torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(4))
    penalties = {}
    for every in (1, 3):
        torch.manual_seed(0)  # the same D
        term = make_term("image", gp_every=every)
        torch.manual_seed(7)  # the same interpolation on the first step
        penalties[every] = [d_step(term, student, teacher_log_probs, images, all_valid())["d_gp"].item()
                            for _ in range(6)]
    lazy = penalties[3]
    # Penalised on steps 0 and 3; between them "d_gp" reports the most recent penalty.
    assert lazy[1] == lazy[2] == lazy[0] and lazy[4] == lazy[5] == lazy[3] != lazy[0]
    # Step 0 sees the same D and interpolation: the penalty, three times over.
    assert lazy[0] == pytest.approx(3 * penalties[1][0], rel=1e-5)
    assert all(v != 0 for v in penalties[1]) and len(set(penalties[1])) == 6
