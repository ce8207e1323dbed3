"""Training loop for teachers, baseline students and distilled students (one code path).

Per step (Liu et al.): L = CE + aux·CE_aux + λ_pi·L_pi + λ_pa·L_pa + λ_ho·L_ho,G for the student, then
one step of the discriminator on teacher ("real") vs student ("fake") maps. Teacher targets come
from the cache (replayed to each augmented crop) or, in online mode, from the teacher run live;
after that the code is the same.

The run's teacher is set up in ``teacher.py``, its folder (checkpoints, resume) kept by
``checkpoint.RunCheckpoints`` and its records written by ``logger.MetricLogger``; here are the
student, one step, and the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader

from pipeline import parallel
from pipeline.cache.readcache import ParallelSamples
from pipeline.cache.store import is_url
from pipeline.config import Config
from pipeline.data import build_dataset
from pipeline.data.samples import EpochBatches, TrainingSamples, collate
from pipeline.data.transforms import IGNORE_INDEX, normalize
from pipeline.device import resolve_device, set_cpu_threads
from pipeline.distill.holistic import HolisticTerm
from pipeline.distill.losses import feature_loss, pairwise_loss, pixelwise_loss, resolve_node_size, task_loss
from pipeline.errors import SkdError
from pipeline.models import build_model
from pipeline.schedule import Progress, kd_weight, poly_schedule
from pipeline.train.checkpoint import RunCheckpoints
from pipeline.train.logger import MetricLogger
from pipeline.train.teacher import build_teacher, check_student_feature_resolution

log = logging.getLogger(__name__)


class Trainer:
    """One training run of ``cfg``: :meth:`fit` runs it to the end (``resume``: from the run folder's
    last checkpoint, which must be of the same settings); :meth:`step` is one step of it."""

    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        self.cfg, t = cfg, cfg.train
        # Under torchrun: one process per GPU (or CPU worker); rank 0 alone writes logs and checkpoints.
        self.world = parallel.current()
        self.show_progress = progress and self.world.main
        self.device = resolve_device(t.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the rank's own GPU
        set_cpu_threads(self.device, cfg.data.workers)
        self.out = Path(t.out)
        if t.batch_size % self.world.size:
            raise SkdError(f"batch size {t.batch_size} does not split over {self.world.size} processes: "
                           f"--batch-size is the global batch; use a multiple of {self.world.size}")
        data = cfg.data
        self.dataset = build_dataset(data.dataset, data.root, data.train_split, **data.options)
        if len(self.dataset) < t.batch_size:
            raise SkdError(f"{data.dataset}/{data.train_split} has {len(self.dataset)} images, fewer than the batch size {t.batch_size}")
        self.terms = set(cfg.distill.losses)
        teacher = build_teacher(cfg, self.dataset, self.device) if self.terms or cfg.distill.pseudo_labels else None
        self.targets = teacher.targets if teacher else None
        self.store, self.use_views = (teacher.store, teacher.use_views) if teacher else (None, False)
        # The teacher's mIoU that cache-teacher recorded in the store (None when unknown): a run whose
        # own validation beats it is told so, once.
        self.teacher_score = self.store.attrs.get("teacher_miou") if self.store is not None else None
        self._beat_teacher_said = False
        if self.teacher_score and self.world.main:
            s = self.teacher_score
            log.info("the store's teacher: mIoU %.2f on %s/%s (%d images, its maps as stored)", 100 * s["miou"],
                     s["dataset"], s["split"], s["images"])

        # Seeded here, after any teacher was built (its init draws random numbers too), so that the
        # student starts from the same weights with a cache and with an online teacher.
        torch.manual_seed(t.seed)
        try:
            self._build_student(teacher.feature_channels if "fd" in self.terms else None)
        except SkdError as exc:
            if not (cfg.model.pretrained_backbone and cfg.model.width != 1 and "shape" in str(exc)):
                raise
            raise SkdError(f"{exc} (ImageNet backbones are width 1 and model.width is {cfg.model.width:g}: train the "
                           "teacher with --width 1, or give the recipe a teacher_model section with width: 1; "
                           "model.width is then the students')") from None
        if "pa" in self.terms:
            check_student_feature_resolution(getattr(self.student, "feature_stride", None), cfg, self.dataset)
        params = [*self.student.parameters(), *(self.adapter.parameters() if self.adapter is not None else [])]
        self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        # Progress by iterations, or by training seconds against --budget-minutes.
        self.progress = Progress(t.iterations, 60.0 * t.budget_minutes if t.budget_minutes else None)
        self.scheduler = poly_schedule(self.optimizer, self.progress, t.poly_power)
        self.amp = t.amp and self.device.type == "cuda"
        self.holistic = (HolisticTerm(self.dataset.num_classes, cfg.distill, self.progress, t.poly_power, self.device,
                                      autocast_cuda=self.amp) if "ho" in self.terms else None)

        self.iteration = 0
        self.best_val_miou: float | None = None
        self._val_set = None
        arch = {"name": cfg.model.name, "num_classes": self.dataset.num_classes, "width": cfg.model.width}
        if cfg.model.feature_layer:  # rebuilt with the same hook (absent: the arch of older checkpoints)
            arch["feature_layer"] = cfg.model.feature_layer
        parts = {"model": self.student, "optimizer": self.optimizer, "scheduler": self.scheduler}
        self.checkpoints = RunCheckpoints(self.out, cfg, arch, parts | ({"fd_adapter": self.adapter} if self.adapter else {}),
                                          {"discriminator": self.holistic} if self.holistic else {})
        if resume:
            self._resume()
        else:
            self.checkpoints.refuse_existing()

    def _build_student(self, teacher_channels: int | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.student = build_model(cfg.model.name, self.dataset.num_classes, width=cfg.model.width,
                                   pretrained_backbone=cfg.model.pretrained_backbone,
                                   feature_layer=cfg.model.feature_layer).to(self.device)
        for module in self.student.modules():
            if isinstance(module, torch.nn.Dropout2d):
                module.p = cfg.model.dropout
        sync_bn = t.sync_bn if t.sync_bn is not None else self.world.size > 1
        if sync_bn and self.world.size > 1:  # statistics of the global batch, as one process would have
            self.student = parallel.sync_batchnorm(self.student)
        # Feature distillation: a 1x1 conv from the student's PSP features to the teacher's channels,
        # trained with the student (and kept out of model.pt: deployment needs the student alone).
        self.adapter = (torch.nn.Conv2d(self.student.feature_channels, teacher_channels, 1).to(self.device)
                        if teacher_channels else None)
        # What the step calls: the modules themselves, or their DDP wrappers (gradients averaged over
        # ranks); checkpoints always hold the plain modules.
        self.model, self.adapt = self._replicated(self.student), self._replicated(self.adapter)
        if t.compile:  # the step calls the compiled wrapper; validation and checkpoints use the module
            self.model = torch.compile(self.model)

    def _replicated(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        if module is None or not self.world.distributed:
            return module
        # An auxiliary head that no loss uses (aux_weight 0) gets no gradient: DDP must be told.
        unused = module is self.student and self.cfg.train.aux_weight == 0
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=unused)

    # -- checkpoints ---------------------------------------------------------------------------
    def _resume(self) -> None:
        state = self.checkpoints.resume()
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.iteration = int(state["iteration"])
        self.progress.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.best_val_miou = state.get("best_val_miou")

    def save(self) -> None:
        if not self.world.main:
            return
        extra = {"elapsed_s": self.progress.elapsed_s}
        if self.device.type == "cuda":  # the gradient penalty's α and dropout draw on the device
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.best_val_miou is not None:
            extra["best_val_miou"] = self.best_val_miou
        self.checkpoints.save(self.iteration, extra)

    # -- data ----------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        data, t = self.cfg.data, self.cfg.train
        samples = TrainingSamples(self.dataset, data.augment(), self.store, seed=t.seed, features=bool(self.terms & {"pa", "fd"}),
                                  use_view_bank=self.use_views)
        if self.store is not None and is_url(self.store.url):
            samples = ParallelSamples(samples)  # a batch's reads from object storage at the same time
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
            out = self._forward(images)
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
            logged |= {f"grad_{name}": _grad_square_norm(loss, out.features) for name, loss in pulls.items()}
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

    def _forward(self, images: torch.Tensor):
        """The student's training forward (bf16 autocast on CUDA with amp)."""
        self.student.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            try:
                return self.model(images)
            except torch._dynamo.exc.BackendCompilerFailed as exc:  # --compile only: the first step compiles
                raise SkdError(f"--compile: torch.compile could not compile the student "
                               f"({type(exc.inner_exception).__name__}: {str(exc.inner_exception)[:300]}); "
                               "train without --compile; this step wrote nothing") from exc

    def _kd_weight(self) -> float:
        """The distillation warm-up factor of this step: over the iterations, or over a budget."""
        warmup = self.cfg.distill.kd_warmup
        if self.progress.budget_s:
            return 1.0 if warmup <= 0 else min(1.0, self.progress.fraction(self.iteration) / warmup)
        return kd_weight(self.iteration, round(warmup * self.cfg.train.iterations))

    def _checked_values(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss values as floats, averaged over ranks (one device sync for all of them), and the
        gradient norms of the global batch's loss; a NaN/inf stops the run (on every rank: they all
        see the same values)."""
        stacked = parallel.all_mean(torch.stack([v.detach().float() for v in losses.values()]))
        values = dict(zip(losses, stacked.tolist()))
        # Each rank's loss is the mean over its 1/world of the batch, so its gradient on its own
        # features is world × theirs in the gradient of the global mean: that gradient's norm is
        # sqrt(Σ_ranks |g_r|²) / world = sqrt(mean_ranks |g_r|² / world), as one process has it.
        for name in values:
            if name.startswith("grad_"):
                values[name] = math.sqrt(values[name] / self.world.size)
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
        s = self.teacher_score
        if s and miou > s["miou"] and not self._beat_teacher_said:
            self._beat_teacher_said = True
            log.warning("this run's val mIoU %.2f (iteration %d) beats its teacher's %.2f on %s/%s: the student "
                        "learns the teacher's mistakes from a weaker teacher; train a stronger one (longer, "
                        "pretrained, larger) before distilling", 100 * miou, self.iteration, 100 * s["miou"],
                        s["dataset"], s["split"])
        if self.best_val_miou is None or miou > self.best_val_miou:
            self.best_val_miou = miou
            self.checkpoints.save_weights("best.pt", self.student, iteration=self.iteration, val_miou=miou)
        return {"val_miou": miou, "best_val_miou": self.best_val_miou}

    # -- loop ----------------------------------------------------------------------------------
    def finished(self) -> bool:
        """Every iteration done, or, with --budget-minutes, the training time spent."""
        if self.progress.budget_s:
            return self.progress.elapsed_s >= self.progress.budget_s
        return self.iteration >= self.cfg.train.iterations

    def fit(self) -> Path:
        t, main, budget = self.cfg.train, self.world.main, self.progress.budget_s
        if main:
            self.checkpoints.begin()  # config.json and a fresh log, or the log cut back to the checkpoint
        started, window = time.perf_counter(), []
        logger = MetricLogger(self.out, main=main, iteration=self.iteration, total=None if budget else t.iterations,
                              tensorboard=t.tensorboard, progress=self.show_progress)
        with _stop_requests() as stop, logger:
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
                logger.tick()
                done = self.finished()
                if t.val_every and (self.iteration % t.val_every == 0 or done):
                    if main:
                        record |= self.validate()
                    parallel.barrier()  # the other ranks wait for rank 0's evaluation
                if self.iteration % t.log_every == 0 or done or "val_miou" in record:
                    logger.write(record | {"iteration": self.iteration, "lr": self.scheduler.get_last_lr()[0],
                                           "step_s": sum(window) / len(window), "elapsed_s": self.progress.elapsed_s})
                    window = []
                if self.iteration % t.checkpoint_every == 0 or done or stop:  # stop: Ctrl-C or SIGTERM
                    self.save()
                if stop and not done:
                    log.warning("stopped by a signal at iteration %d; %s holds it: re-run with --resume to continue",
                                self.iteration, self.checkpoints.last)
                    raise KeyboardInterrupt
        final = self.out / "model.pt"
        if main:
            self.checkpoints.save_weights("model.pt", self.student)
        parallel.barrier()  # no rank returns before model.pt exists
        log.info("trained %s in %.0f s -> %s", self.cfg.model.name, time.perf_counter() - started, final)
        return final


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


def _grad_square_norm(loss: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """|∂loss/∂tensor|², squared so that ranks' values add up (see ``_checked_values``)."""
    (grad,) = torch.autograd.grad(loss, tensor, retain_graph=True, allow_unused=True)
    return torch.zeros((), device=tensor.device) if grad is None else grad.float().square().sum()


def pseudo_labels(teacher_log_probs: torch.Tensor, valid: torch.Tensor, label_hw: tuple[int, int]) -> torch.Tensor:
    """The teacher's argmax at label resolution, ignore where there is no teacher target (padding).
    A sanity check of the teacher signal: a student trained on these alone should approach the teacher."""
    up = F.interpolate(teacher_log_probs.float(), size=label_hw, mode="bilinear", align_corners=False)
    keep = F.interpolate(valid[:, None].float(), size=label_hw, mode="nearest")[:, 0] > 0
    return torch.where(keep, up.argmax(1), IGNORE_INDEX)


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the model of ``cfg`` (distilled when ``cfg.distill.losses`` is not empty); returns model.pt."""
    return Trainer(cfg, resume=resume, progress=progress).fit()
