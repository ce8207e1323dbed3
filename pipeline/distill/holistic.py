"""Holistic (adversarial) distillation: the discriminator, its optimiser and schedule, and both losses.

Real = the teacher's maps, fake = the student's. Both go through the same path before D sees them,
so that only the class distributions can tell them apart:

* padding (``valid`` False) is blanked to 0 in both, before normalisation;
* both are normalised per pixel (softmax for ``"image"`` conditioning, log_softmax for
  ``"logits"``), which removes the log-sum-exp offset between student logits and teacher
  log-probabilities;
* real and fake are scored in one concatenated batch, so D's BatchNorm input layer (``"logits"``)
  normalises them with the same statistics.

With the paper's setting (WGAN loss, ``"image"`` conditioning) one D forward and one backward per
step serve both the student's adversarial term and D's own loss (``HolisticTerm.losses``); the
other settings score the maps twice, as a generator step and a discriminator step.

The WGAN-GP penalty interpolates the normalised maps only; the resized image is a fixed condition
and its channels take no part in the gradient norm (the student cannot move them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from pipeline.config import DistillConfig
from pipeline.distill.losses import discriminator_loss, generator_loss, gradient_penalty
from pipeline.models.discriminator import Discriminator
from pipeline.parallel import average_gradients, broadcast_module, current, sync_batchnorm
from pipeline.schedule import Progress, poly_schedule


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # noqa: ANN001
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad * ctx.factor, None


class HolisticTerm:
    """The λ_ho-weighted adversarial term of the student loss and the online discriminator.

    Args:
        num_classes: C, channels of the segmentation maps.
        cfg: ``lambda_ho``, ``lambda_gp``, ``gp_every``, ``d_conditioning``, ``d_loss``, ``d_optimizer``, ``d_lr``.
        iterations, poly_power: the poly schedule of D's learning rate (the student's schedule: a
            number of steps, or the trainer's ``Progress`` for a wall-clock budget).
        device: where D lives.
        autocast_cuda: run D's forward in a separate generator step (hinge loss or ``"logits"``
            conditioning) under bf16 autocast, on CUDA only (as the trainer runs the student). D's
            own loss, and the joint forward that serves both, stay in float32: the gradient penalty
            differentiates twice, and D's weights are updated from these gradients.
    """

    def __init__(
        self,
        num_classes: int,
        cfg: DistillConfig,
        iterations: int | Progress,
        poly_power: float,
        device: torch.device,
        autocast_cuda: bool = True,
    ) -> None:
        if cfg.d_loss not in ("wgan", "hinge"):
            raise ValueError(f"unknown d_loss {cfg.d_loss!r}; expected 'wgan' or 'hinge'")
        self.lambda_ho = cfg.lambda_ho
        self.lambda_gp = cfg.lambda_gp
        if cfg.gp_every < 1:
            raise ValueError(f"gp_every must be at least 1, not {cfg.gp_every}")
        self.gp_every = cfg.gp_every
        self.kind = cfg.d_loss
        self.discriminator = Discriminator(num_classes, conditioning=cfg.d_conditioning).to(device)
        if current().size > 1:
            # Under torchrun, "logits" conditioning's input BatchNorm normalises with the global
            # batch's statistics, as one process scoring every rank's maps would.
            sync_batchnorm(self.discriminator)
        broadcast_module(self.discriminator)  # under torchrun, every rank's D starts as rank 0's
        params = self.discriminator.parameters()
        if cfg.d_optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.d_lr, momentum=0.9)
        elif cfg.d_optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.d_lr, betas=(0.9, 0.99))
        else:
            raise ValueError(f"unknown d_optimizer {cfg.d_optimizer!r}; expected 'sgd' or 'adam'")
        self.scheduler = poly_schedule(self.optimizer, iterations, poly_power)
        # The most recent penalty computed: what "d_gp" reports on every step, so that a record
        # every log_every steps shows one whatever gp_every is.
        self.last_gp = torch.zeros((), device=device)
        use_amp = autocast_cuda and torch.device(device).type == "cuda"
        self._amp: Callable[[], AbstractContextManager] = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
        )

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(
        self, student_logits: Tensor, teacher_log_probs: Tensor, images: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(real maps, fake maps, condition) exactly as D sees them.

        Teacher maps are detached; the student maps keep their graph. The condition is the
        image resized to the map grid (None for ``"logits"`` conditioning).
        """
        if student_logits.shape != teacher_log_probs.shape or student_logits.dim() != 4:
            raise ValueError("student logits and teacher log-probs must both be B×C×h×w, got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_log_probs.shape)}")
        b, _, h, w = student_logits.shape
        if tuple(valid.shape) != (b, h, w):
            raise ValueError(f"valid mask must be B×h×w = {(b, h, w)}, got {tuple(valid.shape)}")
        if images.dim() != 4 or images.shape[0] != b:
            raise ValueError(f"images must be B×3×H×W with B = {b}, got {tuple(images.shape)}")
        # Padding carries no teacher signal: both maps are blanked there, identically.
        mask = valid.bool()[:, None]
        d = self.discriminator
        real = d.normalize_maps(torch.where(mask, teacher_log_probs.detach().float(), 0.0))
        fake = d.normalize_maps(torch.where(mask, student_logits.float(), 0.0))
        condition = d.condition(images.detach(), (h, w))
        return real, fake, condition

    def _scores(self, real: Tensor, fake: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        """D's float32 scores for real and fake, computed in one batch (shared BatchNorm statistics)."""
        both = None if condition is None else torch.cat([condition, condition])
        scores = self.discriminator.score_maps(torch.cat([real, fake]), both).float()
        return scores[: real.shape[0]], scores[real.shape[0]:]

    # -- one training step ------------------------------------------------------------------------
    def losses(
        self, student_logits: Tensor, teacher_log_probs: Tensor, images: Tensor, valid: Tensor, weight: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This step's adversarial terms, for one backward together with the student's loss.

        Returns ``(backprop, logged)``. ``backward()`` of ``backprop`` (added to the student's loss)
        puts on the student the gradient of its term ``weight·λ_ho·L_G`` and on D's parameters the
        gradient of D's loss (``λ_ho·L_D`` plus the penalty), both at D's current weights, as a
        generator step followed by a discriminator step on the same maps would. ``update()`` then
        steps D. ``logged`` holds the values, detached: "ho" (the student's term), "d_adv", "d_gp"
        (the most recent penalty computed: this step's, or, with ``gp_every`` > 1, an earlier one's).

        With the paper's WGAN loss and a D that scores each sample alone, L_G = −mean D(fake) is
        −1 × the fake half of L_D, so one D forward over [real; fake] serves both: the fake maps pass
        through a gradient scale of −weight, and D's loss's gradient reaching the student is the
        generator's. Otherwise (hinge, or the BatchNorm of ``"logits"`` conditioning, where the real
        half's scores depend on the fake maps) the generator term scores the maps with D frozen,
        and D's loss scores them again, detached.
        """
        self.discriminator.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.kind == "wgan" and self.discriminator.batch_independent:
            real, fake, condition = self.inputs(student_logits, teacher_log_probs, images, valid)
            d_real, d_fake = self._scores(real, _ScaleGradient.apply(fake, -weight), condition)
            d_adv = self.lambda_ho * discriminator_loss(d_real, d_fake, self.kind)
            logged = {"ho": (weight * self.lambda_ho * generator_loss(d_fake, self.kind)).detach()}
            backprop = d_adv
        else:
            g = weight * self.generator_loss(student_logits, teacher_log_probs, images, valid)
            real, fake, condition = self.inputs(student_logits.detach(), teacher_log_probs, images, valid)
            d_adv = self.lambda_ho * discriminator_loss(*self._scores(real, fake, condition), self.kind)
            logged = {"ho": g.detach()}
            backprop = g + d_adv
        logged["d_adv"] = d_adv.detach()
        if self.kind == "wgan":
            if self.scheduler.last_epoch % self.gp_every == 0:
                d_gp = self._penalty(real, fake.detach(), condition)
                self.last_gp = d_gp.detach()
                backprop = backprop + d_gp
            logged["d_gp"] = self.last_gp  # the same keys every step (one sync, logs)
        return backprop, logged

    def generator_loss(self, student_logits: Tensor, teacher_log_probs: Tensor, images: Tensor, valid: Tensor) -> Tensor:
        """λ_ho·L_G alone, with D frozen: gradients flow to student_logits only."""
        real, fake, condition = self.inputs(student_logits, teacher_log_probs, images, valid)
        self.discriminator.train()
        self.discriminator.requires_grad_(False)
        try:
            with self._amp():
                if self.discriminator.batch_independent:  # scoring real too would change nothing
                    d_fake = self.discriminator.score_maps(fake, condition).float()
                else:
                    _, d_fake = self._scores(real, fake, condition)
        finally:
            self.discriminator.requires_grad_(True)
        return self.lambda_ho * generator_loss(d_fake, self.kind)

    def _penalty(self, real: Tensor, fake: Tensor, condition: Tensor | None) -> Tensor:
        """λ_ho·λ_gp·gp_every × the WGAN-GP penalty, on every gp_every-th D step.

        Lazy regularisation (StyleGAN2): weighted by gp_every so that its mean pull stays the same.
        The count is the scheduler's, which checkpoints keep, so a resumed run penalises the same steps.
        """
        # The critic is scored on interpolated maps with the image held fixed; the gradient (and so
        # the penalty) is taken w.r.t. the maps only. α for the global batch, this rank's slice of
        # it: the same draws as one process.
        world, b = current(), real.shape[0]
        alpha = torch.rand(b * world.size, device=real.device)[world.rank * b : (world.rank + 1) * b]
        gp = gradient_penalty(self.discriminator.score_maps, real, fake, condition, alpha)
        return self.lambda_ho * self.lambda_gp * self.gp_every * gp

    def update(self) -> None:
        """D's optimiser and scheduler step, after the backward of ``losses``' ``backprop``."""
        # Under torchrun each rank scores its own samples; D's update is the mean over ranks (every
        # rank starts from the same seeded D and so stays in step).
        average_gradients(self.discriminator.parameters())
        self.optimizer.step()
        self.scheduler.step()

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The keys the trainer has always written, so older checkpoints resume, and the last penalty."""
        return {
            "discriminator": self.discriminator.state_dict(),
            "d_optimizer": self.optimizer.state_dict(),
            "d_scheduler": self.scheduler.state_dict(),
            "d_last_gp": self.last_gp.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["d_optimizer"])
        self.scheduler.load_state_dict(state["d_scheduler"])
        # Checkpoints from before it: 0 until the next penalty.
        self.last_gp = state.get("d_last_gp", torch.zeros(())).to(self.last_gp.device)
