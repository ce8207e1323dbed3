"""Training loop for teachers, baseline students and distilled students (one code path).

Per step (Liu et al.): L = CE + aux·CE_aux + λ_pi·L_pi + λ_pa·L_pa + λ_ho·L_ho,G for the student, then
one step of the discriminator on teacher ("real") vs student ("fake") maps. Teacher targets come
from the cache (replayed to each augmented crop) or, in online mode, from the teacher run live;
after that the code is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline import parallel
from pipeline.cache.store import TeacherStore, redact
from pipeline.cache.views import spec_augment
from pipeline.config import Config
from pipeline.data import build_dataset
from pipeline.data.samples import EpochBatches, TrainingSamples, collate
from pipeline.data.transforms import IGNORE_INDEX, normalize
from pipeline.device import resolve_device, set_cpu_threads
from pipeline.distill.holistic import HolisticTerm
from pipeline.distill.losses import feature_loss, pairwise_loss, pixelwise_loss, resolve_node_size, task_loss
from pipeline.distill.targets import CachedTargets, OnlineTargets
from pipeline.errors import SkdError
from pipeline.inference import OUTPUT_STRIDE, output_size
from pipeline.models import build_model
from pipeline.schedule import Progress, kd_weight, poly_schedule
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        # Under torchrun: one process per GPU (or CPU worker); rank 0 alone writes logs and checkpoints.
        self.world = parallel.current()
        self.show_progress = progress and self.world.main
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the rank's own GPU
        set_cpu_threads(self.device, cfg.data.workers)
        self.out = Path(cfg.train.out)
        if cfg.train.batch_size % self.world.size:
            raise SkdError(f"batch size {cfg.train.batch_size} does not split over {self.world.size} processes: "
                           f"--batch-size is the global batch; use a multiple of {self.world.size}")

        data = cfg.data
        self.dataset = build_dataset(data.dataset, data.root, data.train_split, **data.options)
        if len(self.dataset) < cfg.train.batch_size:
            raise SkdError(f"{data.dataset}/{data.train_split} has {len(self.dataset)} images, fewer than the batch size {cfg.train.batch_size}")
        terms = set(cfg.distill.losses)
        self.terms = terms
        self.store = None
        self.use_views = False
        self.targets: CachedTargets | OnlineTargets | None = None
        teacher_channels = None
        if terms or cfg.distill.pseudo_labels:
            if cfg.distill.teacher:
                teacher, arch = model_from_checkpoint(cfg.distill.teacher)
                if arch["num_classes"] != self.dataset.num_classes:
                    raise SkdError(f"teacher {cfg.distill.teacher} predicts {arch['num_classes']} classes, "
                                   f"{data.dataset} has {self.dataset.num_classes}")
                bf16 = cfg.train.amp and self.device.type == "cuda"
                self.targets = OnlineTargets(teacher.to(self.device), precision="bf16" if bf16 else "fp32")
                teacher_channels = teacher.feature_channels
                log.info("online distillation: %s runs on every batch%s", cfg.distill.teacher,
                         " (the cache setting is ignored)" if cfg.distill.cache else "")
            elif cfg.distill.cache:
                self.store = TeacherStore(cfg.distill.cache)
                self.store.check_matches(self.dataset)
                self.use_views = bool(self.store.views) and cfg.distill.views
                if self.use_views:
                    self._check_views()
                if terms & {"pa", "fd"} and not self.store.has_features:
                    raise SkdError(f"{redact(cfg.distill.cache)} holds no teacher features (cached with --no-features): "
                                   "pair-wise and feature distillation (pa, fd) need them; re-cache, or train with "
                                   "--losses pi,ho")
                if "pa" in terms:
                    self._check_feature_resolution()
                # Projected features come back mapped to the teacher's channels.
                self.targets = CachedTargets(self.store.projection)
                teacher_channels = (len(self.store.projection.mean) if self.store.projection is not None
                                    else self.store.feature_channels)
                log.info("distilling from the cache %s (teacher %s, %s)", redact(cfg.distill.cache),
                         self.store.attrs["teacher"].get("name"),
                         f"{self.store.views['count']} stored views per image" if self.use_views
                         else f"maps at levels {self.store.levels}")
            else:
                raise SkdError("distillation needs a teacher: pass --cache STORE or --teacher CHECKPOINT")

        # Seeded here, after any teacher was built (its init draws random numbers too), so that the
        # student starts from the same weights with a cache and with an online teacher.
        torch.manual_seed(cfg.train.seed)
        self.student = build_model(cfg.model.name, self.dataset.num_classes, width=cfg.model.width,
                                   pretrained_backbone=cfg.model.pretrained_backbone).to(self.device)
        for module in self.student.modules():
            if isinstance(module, torch.nn.Dropout2d):
                module.p = cfg.model.dropout
        t = cfg.train
        sync_bn = t.sync_bn if t.sync_bn is not None else self.world.size > 1
        if sync_bn and self.world.size > 1:  # statistics of the global batch, as one process would have
            self.student = parallel.sync_batchnorm(self.student)
        # Feature distillation: a 1x1 conv from the student's PSP features to the teacher's channels,
        # trained with the student (and kept out of model.pt: deployment needs the student alone).
        self.adapter = (torch.nn.Conv2d(self.student.feature_channels, teacher_channels, 1).to(self.device)
                        if "fd" in terms else None)
        # What the step calls: the modules themselves, or their DDP wrappers (gradients averaged over
        # ranks); checkpoints always hold the plain modules.
        self.model, self.adapt = self._replicated(self.student), self._replicated(self.adapter)
        if t.compile:  # the step calls the compiled wrapper; validation and checkpoints use the module
            self.model = torch.compile(self.model)
        params = [*self.student.parameters(), *(self.adapter.parameters() if self.adapter is not None else [])]
        self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        # Progress by iterations, or by training seconds against --budget-minutes.
        self.progress = Progress(t.iterations, 60.0 * t.budget_minutes if t.budget_minutes else None)
        self.scheduler = poly_schedule(self.optimizer, self.progress, t.poly_power)
        self.amp = t.amp and self.device.type == "cuda"
        self.holistic = (HolisticTerm(self.dataset.num_classes, cfg.distill, self.progress, t.poly_power, self.device,
                                      autocast_cuda=self.amp) if "ho" in terms else None)

        self.iteration = 0
        self.best_val_miou: float | None = None
        self._val_set = None
        if resume:
            self._resume()
        elif (self.out / "last.pt").exists():
            raise SkdError(f"{self.out} already holds a training run: pass --resume to continue it or choose another --out")

    def _replicated(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        if module is None or not self.world.distributed:
            return module
        # An auxiliary head that no loss uses (aux_weight 0) gets no gradient: DDP must be told.
        unused = module is self.student and self.cfg.train.aux_weight == 0
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=unused)

    # -- checkpoints ---------------------------------------------------------------------------
    def arch(self) -> dict:
        return {"name": self.cfg.model.name, "num_classes": self.dataset.num_classes, "width": self.cfg.model.width}

    def state(self) -> dict:
        state = {
            "arch": self.arch(), "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "iteration": self.iteration, "config": public_config(self.cfg),
            "torch_rng": torch.get_rng_state(), "elapsed_s": self.progress.elapsed_s,
        }
        if self.device.type == "cuda":  # the gradient penalty's α and dropout draw on the device
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.holistic is not None:
            state |= self.holistic.state_dict()
        if self.adapter is not None:
            state["fd_adapter"] = self.adapter.state_dict()
        if self.best_val_miou is not None:
            state["best_val_miou"] = self.best_val_miou
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
        if self.holistic is not None:
            if "discriminator" not in state:
                raise SkdError(f"--resume: {path} has no discriminator state but holistic distillation is on")
            self.holistic.load_state_dict(state)
        if self.adapter is not None:
            if "fd_adapter" not in state:
                raise SkdError(f"--resume: {path} has no feature-distillation adapter but fd is on")
            self.adapter.load_state_dict(state["fd_adapter"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.iteration = int(state["iteration"])
        self.progress.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.best_val_miou = state.get("best_val_miou")
        log.info("resumed %s at iteration %d", path, self.iteration)

    def save(self) -> None:
        if self.world.main:
            save_checkpoint(self.out / "last.pt", self.state())

    # -- data ----------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        data, t = self.cfg.data, self.cfg.train
        samples = TrainingSamples(self.dataset, data.augment(), self.store, seed=t.seed, features=bool(self.terms & {"pa", "fd"}),
                                  views=self.use_views)
        loader = DataLoader(
            samples, batch_sampler=EpochBatches(len(samples), t.batch_size, t.seed, self.iteration, self.world.rank,
                                                self.world.size),
            num_workers=data.workers, collate_fn=collate, pin_memory=data.pin_memory and self.device.type == "cuda",
            prefetch_factor=data.prefetch_factor if data.workers > 0 else None,
            # Its own generator: a loader drawing its worker seed from the global RNG would shift
            # dropout and the gradient penalty after a resume. (Samples are seeded by (seed,
            # epoch, index) alone, whatever the worker.)
            generator=torch.Generator().manual_seed(t.seed),
        )
        yield from loader

    def _check_views(self) -> None:
        """A bank of views fixes the training augmentation: refuse a run that asks for another."""
        bank, stored, wanted = self.store.views, spec_augment(self.store.views), self.cfg.data.augment()
        def shown(value):  # as the config and the command line write it
            return list(value) if isinstance(value, tuple) else value

        differ = [f"{f.name} {shown(getattr(stored, f.name))} (this run: {shown(getattr(wanted, f.name))})"
                  for f in dataclasses.fields(stored) if getattr(stored, f.name) != getattr(wanted, f.name)]
        if differ:
            raise SkdError(
                f"{redact(self.cfg.distill.cache)} holds {bank['count']} training views per image drawn with "
                f"{'; '.join(differ)}: train with the store's augmentation, re-cache with this one, or pass "
                "--no-views to replay the whole-image maps onto fresh augmentations")

    def _check_feature_resolution(self) -> None:
        """Pair-wise targets come from features stored max-pooled by the store's ``feature_pool``;
        a node smaller than one stored cell (as the student sees it at the largest training scale)
        would compare the student against an upsampled blur, worse than no target at all."""
        data = self.cfg.data
        crop = data.crop_size or self.dataset.image_size(0)
        out_hw = output_size(crop)
        node = resolve_node_size(out_hw, self.cfg.distill.pa_node)
        # One stored feature cell, in output pixels (views are stored on the student's own grid).
        cell = self.store.feature_pool * (1.0 if self.use_views else max(data.scale_range))
        if min(node) < cell:
            raise SkdError(
                f"pair-wise nodes of {node[0]}x{node[1]} output pixels (--pa-node {self.cfg.distill.pa_node} on a "
                f"{out_hw[0]}x{out_hw[1]} output) are finer than the store's features: one stored cell "
                f"(feature stride {self.store.feature_stride} px, training scales up to {max(data.scale_range):g}) "
                f"covers {cell:g} output pixels. Use larger nodes, or re-cache with a smaller --feature-pool "
                f"(1 keeps the teacher's full stride-{OUTPUT_STRIDE} features)")

    # -- one step ------------------------------------------------------------------------------
    def step(self, batch: dict, grad_norms: bool = False) -> dict[str, float]:
        """One student step (and one discriminator step with holistic distillation).

        With ``grad_norms`` the record also holds, per loss term, the norm of the gradient it puts
        on the student's PSP features (the last layer every term passes through): how hard each
        term pulls, which is what a weight sweep balances.
        """
        cfg, d = self.cfg, self.cfg.distill
        # The named scopes show up in torch.profiler traces (bench/step_time.py --profile).
        with record_function("student forward"):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            images = normalize(batch["image"])
            self.student.train()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                try:
                    out = self.model(images)
                except torch._dynamo.exc.BackendCompilerFailed as exc:  # --compile only: the first step compiles
                    raise SkdError(f"--compile: torch.compile could not compile the student "
                                   f"({type(exc.inner_exception).__name__}: {str(exc.inner_exception)[:300]}); "
                                   "train without --compile; this step wrote nothing") from exc
            out_hw = tuple(out.logits.shape[-2:])
            logits = out.logits.float()
        label = batch["label"]
        t_log_probs = t_features = None
        if self.targets is not None:
            with record_function("teacher targets"):
                t_log_probs, t_features = self.targets(batch, images, out_hw)
            if d.pseudo_labels:
                label = pseudo_labels(t_log_probs, batch["valid"], label.shape[-2:])
        weight = self._kd_weight()
        with record_function("losses"):
            losses = {"task": task_loss(logits, label, out.aux.float() if out.aux is not None else None,
                                        aux_weight=cfg.train.aux_weight)}
            valid = batch["valid"]
            if "pi" in self.terms:
                losses["pi"] = weight * d.lambda_pi * pixelwise_loss(logits, t_log_probs, d.temperature, valid)
            if "pa" in self.terms:
                node = resolve_node_size(out_hw, d.pa_node)
                losses["pa"] = weight * d.lambda_pa * pairwise_loss(out.features.float(), t_features, node, valid)
            if "fd" in self.terms:
                adapted = self.adapt(out.features.float())
                losses["fd"] = weight * d.lambda_fd * feature_loss(adapted, t_features, valid, d.fd_normalize)
        # The adversarial terms join the student's loss in one backward: it gives the student its
        # adversarial gradient and D its loss's gradient (see HolisticTerm.losses).
        backprop, logged = torch.zeros((), device=self.device), {}
        if self.holistic is not None:
            with record_function("discriminator"):
                backprop, logged = self.holistic.losses(logits, t_log_probs, images, valid, weight)
        total = sum(losses.values()) + backprop
        if grad_norms:
            pulls = losses | ({"ho": backprop} if "ho" in self.terms else {})  # only the student's term reaches the features
            logged |= {f"grad_{name}": _grad_norm(loss, out.features) for name, loss in pulls.items()}
        with record_function("backward and update"):
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.holistic is not None:
                self.holistic.update()
        losses |= logged
        # The step's one host sync. A non-finite value stops the run; the state on disk is the last
        # checkpoint, written before this step.
        return self._checked_values(losses)

    def _kd_weight(self) -> float:
        """The distillation warm-up factor of this step: over the iterations, or over a budget."""
        warmup = self.cfg.distill.kd_warmup
        if self.progress.budget_s:
            return 1.0 if warmup <= 0 else min(1.0, self.progress.fraction(self.iteration) / warmup)
        return kd_weight(self.iteration, round(warmup * self.cfg.train.iterations))

    def _checked_values(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss values as floats, averaged over ranks (one device sync for all of them); a NaN/inf
        stops the run (on every rank: they all see the same values)."""
        stacked = parallel.all_mean(torch.stack([v.detach().float() for v in losses.values()]))
        values = dict(zip(losses, stacked.tolist()))
        for name, value in values.items():
            if not math.isfinite(value):
                last = self.out / "last.pt"
                kept = f"the last good checkpoint {last} is intact" if last.exists() else "no checkpoint was written yet"
                raise SkdError(f"loss term '{name}' became {value} at iteration {self.iteration + 1}; "
                               f"stopping ({kept}); try a lower learning rate or weight for '{name}'")
        return values

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """The val split's mIoU now (rank 0 only); keeps the best model so far in best.pt."""
        from pipeline.evaluate import evaluate_model

        data = self.cfg.data
        if self._val_set is None:
            self._val_set = build_dataset(data.dataset, data.root, data.val_split, **data.options)
        cm = evaluate_model(self.student, self._val_set, device=self.device, progress=False)
        self.student.train()
        miou = float(cm.miou())
        if self.best_val_miou is None or miou > self.best_val_miou:
            self.best_val_miou = miou
            save_checkpoint(self.out / "best.pt", {"arch": self.arch(), "model": self.student.state_dict(),
                                                   "iteration": self.iteration, "val_miou": miou})
        return {"val_miou": miou, "best_val_miou": self.best_val_miou}

    # -- loop ----------------------------------------------------------------------------------
    def finished(self) -> bool:
        """Every iteration done, or, with --budget-minutes, the training time spent."""
        if self.progress.budget_s:
            return self.progress.elapsed_s >= self.progress.budget_s
        return self.iteration >= self.cfg.train.iterations

    def fit(self) -> Path:
        t = self.cfg.train
        main = self.world.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(public_config(self.cfg), indent=2))
        # A resumed run continues its log; a new one (in a folder without a checkpoint: a run stopped
        # before its first, or a failed start) begins a fresh one.
        log_file = open(self.out / "log.jsonl", "a" if self.iteration else "w") if main else None
        from tqdm import tqdm

        budget = self.progress.budget_s
        bar = tqdm(total=None if budget else t.iterations, initial=self.iteration, desc="train", unit="it",
                   disable=not self.show_progress)
        started, window = time.perf_counter(), []
        with _stop_requests() as stop, contextlib.ExitStack() as cleanup:
            cleanup.callback(bar.close)
            if log_file is not None:
                cleanup.callback(log_file.close)
            board = cleanup.enter_context(_tensorboard(self.out / "tensorboard")) if t.tensorboard and main else None
            last = time.perf_counter()
            for batch in self.batches():
                if self.finished():
                    break
                tic = time.perf_counter()
                logged = (self.iteration + 1) % t.log_every == 0 or (not budget and self.iteration + 1 == t.iterations)
                record = self.step(batch, grad_norms=logged and t.log_grad_norms)
                self.iteration += 1
                now = time.perf_counter()
                window.append(now - tic)
                self.progress.elapsed_s += now - last  # data loading and checkpoints count against a budget
                if budget and self.world.size > 1:  # every rank stops at the same step: the slowest one's time
                    self.progress.elapsed_s = parallel.all_max(self.progress.elapsed_s, self.device)
                last = now
                bar.update(1)
                done = self.finished()
                if t.val_every and (self.iteration % t.val_every == 0 or done):
                    if main:
                        record |= self.validate()
                    parallel.barrier()  # the other ranks wait for rank 0's evaluation
                if self.iteration % t.log_every == 0 or done or "val_miou" in record:
                    record |= {"iteration": self.iteration, "lr": self.scheduler.get_last_lr()[0],
                               "step_s": sum(window) / len(window), "elapsed_s": self.progress.elapsed_s}
                    window = []
                    if main:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    if board is not None:
                        for name, value in record.items():
                            if name != "iteration":
                                board.add_scalar(name if name.startswith(("val_", "best_")) else f"train/{name}",
                                                 value, self.iteration)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                     if k not in ("iteration", "lr", "step_s", "elapsed_s") and not k.startswith("grad_")})
                    if not self.show_progress and main:
                        log.info("it %d/%s  %s", self.iteration, "-" if budget else t.iterations,
                                 "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "iteration"))
                if self.iteration % t.checkpoint_every == 0 or done or stop:  # stop: Ctrl-C or SIGTERM
                    self.save()
                if stop and not done:
                    log.warning("stopped by a signal at iteration %d; %s holds it: re-run with --resume to continue",
                                self.iteration, self.out / "last.pt")
                    raise KeyboardInterrupt
        final = self.out / "model.pt"
        if main:
            save_checkpoint(final, {"arch": self.arch(), "model": self.student.state_dict()})
        parallel.barrier()  # no rank returns before model.pt exists
        log.info("trained %s in %.0f s -> %s", self.cfg.model.name, time.perf_counter() - started, final)
        return final


@contextlib.contextmanager
def _tensorboard(folder: Path) -> Iterator:
    """A TensorBoard SummaryWriter (the tensorboard package, pip install 'skd[tensorboard]')."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SkdError("train.tensorboard (--tensorboard) needs the tensorboard package: "
                       "pip install 'skd[tensorboard]' (or pip install tensorboard)") from None
    writer = SummaryWriter(str(folder))
    try:
        yield writer
    finally:
        writer.close()


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """While training, SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) ask the loop to stop after
    the current step, with a checkpoint of it, instead of losing every step since the last one."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield requested
        return
    previous = {s: signal.signal(s, lambda signum, frame: requested.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def public_config(cfg: Config) -> dict:
    """The run's settings as written to config.json and checkpoints: a store URL without its
    credentials (files outlive the run and travel with it)."""
    settings = cfg.to_dict()
    if settings["distill"].get("cache"):
        settings["distill"]["cache"] = redact(settings["distill"]["cache"])
    return settings


def _grad_norm(loss: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, tensor, retain_graph=True, allow_unused=True)
    return torch.zeros((), device=tensor.device) if grad is None else grad.float().norm()


def pseudo_labels(teacher_log_probs: torch.Tensor, valid: torch.Tensor, label_hw: tuple[int, int]) -> torch.Tensor:
    """The teacher's argmax at label resolution, ignore where there is no teacher target (padding).
    A sanity check of the teacher signal: a student trained on these alone should approach the teacher."""
    up = F.interpolate(teacher_log_probs.float(), size=label_hw, mode="bilinear", align_corners=False)
    keep = F.interpolate(valid[:, None].float(), size=label_hw, mode="nearest")[:, 0] > 0
    return torch.where(keep, up.argmax(1), IGNORE_INDEX)


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the model of ``cfg`` (distilled when ``cfg.distill.losses`` is not empty); returns model.pt."""
    return Trainer(cfg, resume=resume, progress=progress).fit()
