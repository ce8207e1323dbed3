"""Training loop for teachers, baseline students and distilled students (one code path).

Per step (Liu et al.): L = CE + aux·CE_aux + λ_pi·L_pi + λ_pa·L_pa + λ_ho·L_ho,G for the student, then
one step of the discriminator on teacher ("real") vs student ("fake") maps. Teacher targets come
from the cache (replayed to each augmented crop) or, in online mode, from the teacher run live;
after that the code is the same.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.cache.replay import TrainingSamples, collate, replay_targets
from pipeline.cache.store import TeacherStore, redact
from pipeline.cache.teacher import run_teacher
from pipeline.config import Config
from pipeline.data import build_dataset
from pipeline.data.transforms import AugmentConfig, normalize
from pipeline.distill.losses import (
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    pairwise_loss,
    pixelwise_loss,
    resolve_node_size,
    task_loss,
)
from pipeline.device import resolve_device, set_cpu_threads
from pipeline.errors import SkdError
from pipeline.models import build_model
from pipeline.models.discriminator import Discriminator
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def poly_schedule(optimizer: torch.optim.Optimizer, iterations: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, iterations) / iterations) ** power)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of a seeded per-epoch permutation, starting at ``start`` (so a resumed run sees the
    same data order as an uninterrupted one)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        for b in range(self.start, self.n // self.batch_size):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        set_cpu_threads(self.device, cfg.data.workers)
        self.out = Path(cfg.train.out)

        data = cfg.data
        self.dataset = build_dataset(data.dataset, data.root, data.train_split, **data.options)
        if len(self.dataset) < cfg.train.batch_size:
            raise SkdError(f"{data.dataset}/{data.train_split} has {len(self.dataset)} images, fewer than the batch size {cfg.train.batch_size}")
        terms = set(cfg.distill.losses)
        self.terms = terms
        self.store = self.teacher = None
        if terms:
            if cfg.distill.teacher:
                self.teacher, arch = model_from_checkpoint(cfg.distill.teacher)
                if arch["num_classes"] != self.dataset.num_classes:
                    raise SkdError(f"teacher {cfg.distill.teacher} predicts {arch['num_classes']} classes, "
                                   f"{data.dataset} has {self.dataset.num_classes}")
                self.teacher.to(self.device).eval().requires_grad_(False)
                log.info("online distillation: %s runs on every batch%s", cfg.distill.teacher,
                         " (the cache setting is ignored)" if cfg.distill.cache else "")
            elif cfg.distill.cache:
                self.store = TeacherStore(cfg.distill.cache)
                self.store.check_matches(self.dataset)
                log.info("distilling from the cache %s (teacher %s)", redact(cfg.distill.cache),
                         self.store.attrs["teacher"].get("name"))
            else:
                raise SkdError("distillation needs a teacher: pass --cache STORE or --teacher CHECKPOINT")

        # Seeded here, after any teacher was built (its init draws random numbers too), so that the
        # student starts from the same weights with a cache and with an online teacher.
        torch.manual_seed(cfg.train.seed)
        self.student = build_model(cfg.model.name, self.dataset.num_classes, width=cfg.model.width,
                                   pretrained_backbone=cfg.model.pretrained_backbone).to(self.device)
        t = cfg.train
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.scheduler = poly_schedule(self.optimizer, t.iterations, t.poly_power)
        self.discriminator = self.d_optimizer = self.d_scheduler = None
        if "ho" in terms:
            d = cfg.distill
            self.discriminator = Discriminator(self.dataset.num_classes, conditioning=d.d_conditioning).to(self.device)
            params = self.discriminator.parameters()
            self.d_optimizer = (torch.optim.SGD(params, lr=d.d_lr, momentum=0.9) if d.d_optimizer == "sgd"
                                else torch.optim.Adam(params, lr=d.d_lr, betas=(0.9, 0.99)))
            self.d_scheduler = poly_schedule(self.d_optimizer, t.iterations, t.poly_power)

        self.iteration = 0
        if resume:
            self._resume()
        elif (self.out / "last.pt").exists():
            raise SkdError(f"{self.out} already holds a training run: pass --resume to continue it or choose another --out")

    # -- checkpoints ---------------------------------------------------------------------------
    def arch(self) -> dict:
        return {"name": self.cfg.model.name, "num_classes": self.dataset.num_classes, "width": self.cfg.model.width}

    def state(self) -> dict:
        state = {
            "arch": self.arch(), "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "iteration": self.iteration, "config": self.cfg.to_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.discriminator is not None:
            state |= {"discriminator": self.discriminator.state_dict(), "d_optimizer": self.d_optimizer.state_dict(),
                      "d_scheduler": self.d_scheduler.state_dict()}
        return state

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.exists():
            raise SkdError(f"--resume: no checkpoint at {path}")
        state = load_checkpoint(path)
        if state.get("arch") != self.arch():
            raise SkdError(f"--resume: {path} holds {state.get('arch')}, but the run is configured for {self.arch()}")
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.discriminator is not None:
            if "discriminator" not in state:
                raise SkdError(f"--resume: {path} has no discriminator state but holistic distillation is on")
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
            self.d_scheduler.load_state_dict(state["d_scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        log.info("resumed %s at iteration %d", path, self.iteration)

    def save(self) -> None:
        save_checkpoint(self.out / "last.pt", self.state())

    # -- data ----------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        data, t = self.cfg.data, self.cfg.train
        augment = AugmentConfig(tuple(data.crop_size) if data.crop_size else None, tuple(data.scale_range),
                                data.flip, data.color_jitter)
        samples = TrainingSamples(self.dataset, augment, self.store, seed=t.seed, features="pa" in self.terms)
        per_epoch = len(self.dataset) // t.batch_size
        epoch, start = divmod(self.iteration, per_epoch)
        while True:
            samples.epoch = epoch  # workers are re-created each epoch and pick this up
            loader = DataLoader(
                samples, batch_sampler=EpochBatches(len(samples), t.batch_size, t.seed, epoch, start),
                num_workers=data.workers, collate_fn=collate, pin_memory=data.pin_memory and self.device.type == "cuda",
                prefetch_factor=data.prefetch_factor if data.workers > 0 else None,
                # Its own generator: a loader drawing its worker seed from the global RNG would shift
                # dropout and the gradient penalty after a mid-epoch resume.
                generator=torch.Generator().manual_seed(t.seed * 100003 + epoch),
            )
            yield from loader
            epoch, start = epoch + 1, 0

    def targets(self, batch: dict, images: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is not None:
            return run_teacher(self.teacher, images, out_hw=out_hw)
        return replay_targets(batch, out_hw)

    # -- one step ------------------------------------------------------------------------------
    def step(self, batch: dict) -> dict[str, float]:
        cfg, d = self.cfg, self.cfg.distill
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        images = normalize(batch["image"])
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.amp and self.device.type == "cuda")
        self.student.train()
        with amp:
            out = self.student(images)
        out_hw = tuple(out.logits.shape[-2:])
        losses = {"task": task_loss(out.logits.float(), batch["label"], out.aux.float() if out.aux is not None else None,
                                    aux_weight=cfg.train.aux_weight)}
        if self.terms:
            t_logits, t_features = self.targets(batch, images, out_hw)
            valid = batch["valid"]
            if "pi" in self.terms:
                losses["pi"] = d.lambda_pi * pixelwise_loss(out.logits.float(), t_logits, d.temperature, valid)
            if "pa" in self.terms:
                node = resolve_node_size(out_hw, d.pa_node if d.pa_node < 1 else int(d.pa_node))
                losses["pa"] = d.lambda_pa * pairwise_loss(out.features.float(), t_features, node, valid)
            if "ho" in self.terms:
                # Padding carries no teacher signal: both maps are blanked there, identically.
                fake = torch.where(valid[:, None], out.logits.float(), 0.0)
                real = torch.where(valid[:, None], t_logits, 0.0)
                self.discriminator.requires_grad_(False)
                with amp:
                    losses["ho"] = d.lambda_ho * generator_loss(self.discriminator(fake, images).float(), d.d_loss)
                self.discriminator.requires_grad_(True)
        record = self._checked_values(losses)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        if "ho" in self.terms:
            record |= self.discriminator_step(real, fake.detach(), images)
        return record

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
        d = self.cfg.distill
        self.discriminator.train()
        # The penalty acts on what D looks at (softmax maps + image), as in WGAN-GP, not on logits.
        real_in = self.discriminator.prepare_input(real, images)
        fake_in = self.discriminator.prepare_input(fake, images)
        d_real, d_fake = self.discriminator.score(real_in), self.discriminator.score(fake_in)
        losses = {"d_adv": d.lambda_ho * discriminator_loss(d_real, d_fake, d.d_loss)}
        if d.d_loss == "wgan":
            losses["d_gp"] = d.lambda_ho * d.lambda_gp * gradient_penalty(self.discriminator.score, real_in, fake_in)
        record = self._checked_values(losses)
        self.d_optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.d_optimizer.step()
        self.d_scheduler.step()
        return record

    def _checked_values(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss values as floats (one device sync for all of them); a NaN/inf stops the run."""
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        for name, value in values.items():
            if not math.isfinite(value):
                last = self.out / "last.pt"
                kept = f"the last good checkpoint {last} is intact" if last.exists() else "no checkpoint was written yet"
                raise SkdError(f"loss term '{name}' became {value} at iteration {self.iteration + 1}; "
                               f"stopping ({kept}); try a lower learning rate or weight for '{name}'")
        return values

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> Path:
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        log_file = open(self.out / "log.jsonl", "a")
        from tqdm import tqdm

        bar = tqdm(total=t.iterations, initial=self.iteration, desc="train", unit="it", disable=not self.progress)
        started, window = time.perf_counter(), []
        try:
            for batch in self.batches():
                if self.iteration >= t.iterations:
                    break
                tic = time.perf_counter()
                record = self.step(batch)
                self.iteration += 1
                window.append(time.perf_counter() - tic)
                bar.update(1)
                if self.iteration % t.log_every == 0 or self.iteration == t.iterations:
                    record |= {"iteration": self.iteration, "lr": self.scheduler.get_last_lr()[0],
                               "step_s": sum(window) / len(window)}
                    window = []
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("iteration", "lr", "step_s")})
                    if not self.progress:
                        log.info("it %d/%d  %s", self.iteration, t.iterations,
                                 "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "iteration"))
                if self.iteration % t.checkpoint_every == 0 or self.iteration == t.iterations:
                    self.save()
        finally:
            bar.close()
            log_file.close()
        final = self.out / "model.pt"
        save_checkpoint(final, {"arch": self.arch(), "model": self.student.state_dict()})
        log.info("trained %s in %.0f s -> %s", self.cfg.model.name, time.perf_counter() - started, final)
        return final


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the model of ``cfg`` (distilled when ``cfg.distill.losses`` is not empty); returns model.pt."""
    return Trainer(cfg, resume=resume, progress=progress).fit()
