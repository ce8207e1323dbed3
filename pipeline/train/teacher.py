"""A run's teacher: an online teacher checkpoint or a store of its outputs, checked against the run
before any step (classes, data, augmentation, feature resolution)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from pipeline.cache.readcache import read_cache
from pipeline.cache.store import TeacherStore, redact
from pipeline.data.views import spec_augment
from pipeline.config import Config
from pipeline.distill.losses import resolve_node_size
from pipeline.distill.targets import CachedTargets, OnlineTargets
from pipeline.errors import SkdError
from pipeline.inference import OUTPUT_STRIDE, output_size
from pipeline.train.checkpoint import model_from_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    targets: CachedTargets | OnlineTargets
    feature_channels: int  # what the fd adapter maps the student's features to
    store: TeacherStore | None = None  # None: online
    use_views: bool = False  # the samples are the store's bank of views


def build_teacher(cfg: Config, dataset, device: torch.device) -> Teacher:
    """The teacher ``cfg.distill`` names: ``teacher`` (online, run on every batch) or ``cache``."""
    d = cfg.distill
    if d.teacher:
        model, arch = model_from_checkpoint(d.teacher)
        if arch["num_classes"] != dataset.num_classes:
            raise SkdError(f"teacher {d.teacher} predicts {arch['num_classes']} classes, "
                           f"{cfg.data.dataset} has {dataset.num_classes}")
        bf16 = cfg.train.amp and device.type == "cuda"
        log.info("online distillation: %s runs on every batch%s", d.teacher, " (the cache setting is ignored)" if d.cache else "")
        return Teacher(OnlineTargets(model.to(device), precision="bf16" if bf16 else "fp32"), model.feature_channels)
    if not d.cache:
        raise SkdError("distillation needs a teacher: pass --cache STORE or --teacher CHECKPOINT")
    store = TeacherStore(d.cache, cfg.storage.options or None, read_cache(cfg.storage.cache_dir, cfg.storage.cache_dir_size))
    store.check_matches(dataset)
    use_views = bool(store.views) and d.views
    terms = set(d.losses)
    if use_views:
        check_views(store, cfg)
    if terms & {"pa", "fd"} and not store.has_features:
        raise SkdError(f"{redact(d.cache)} holds no teacher features (cached with --no-features): pair-wise and "
                       "feature distillation (pa, fd) need them; re-cache, or train with --losses pi,ho")
    if "pa" in terms:
        check_feature_resolution(store, cfg, dataset, use_views)
    if "fd" in terms:
        check_dense_features(store, cfg)
    if not use_views:
        warn_coarse_levels(store, cfg.data.scale_range)
    log.info("distilling from the cache %s (teacher %s, %s)%s", redact(d.cache), store.attrs["teacher"].get("name"),
             f"{store.views['count']} stored views per image" if use_views else f"maps at levels {store.levels}",
             f", read through the local cache {store.read_cache.directory}" if store.read_cache else "")
    # Projected features come back mapped to the teacher's channels.
    channels = len(store.projection.mean) if store.projection is not None else store.feature_channels
    return Teacher(CachedTargets(store.projection), channels, store, use_views)


def warn_coarse_levels(store: TeacherStore, scale_range: list[float]) -> None:
    """One warning (rank 0) when training zooms in further than the store's finest map: replay then
    upsamples that map for those crops, so their targets are blurrier than the teacher's own."""
    from pipeline import parallel

    top, finest = max(scale_range), max(store.levels)
    if top <= finest * 1.01 or not parallel.current().main:
        return
    levels = [f"{level:g}" for level in store.levels]
    log.warning("training scales up to %g but the store %s has maps at levels [%s]: crops that zoom in beyond %g are "
                "replayed from a coarser map; cache with --levels %s,%g", top, redact(store.url), ", ".join(levels),
                finest, ",".join(levels), top)


def check_views(store: TeacherStore, cfg: Config) -> None:
    """A bank of views fixes the training augmentation: refuse a run that asks for another."""
    bank, stored, wanted = store.views, spec_augment(store.views), cfg.data.augment()

    def shown(value):  # as the config and the command line write it
        return list(value) if isinstance(value, tuple) else value

    differ = [f"{f.name} {shown(getattr(stored, f.name))} (this run: {shown(getattr(wanted, f.name))})"
              for f in dataclasses.fields(stored) if getattr(stored, f.name) != getattr(wanted, f.name)]
    if differ:
        raise SkdError(
            f"{redact(cfg.distill.cache)} holds {bank['count']} training views per image drawn with "
            f"{'; '.join(differ)}: train with the store's augmentation, re-cache with this one, or pass "
            "--no-views to replay the whole-image maps onto fresh augmentations")


def check_dense_features(store: TeacherStore, cfg: Config) -> None:
    """Feature distillation regresses each output pixel on the teacher's feature at that pixel.
    Features stored max-pooled and upsampled by replay are a blur of their neighbourhood's maxima,
    not that feature (an online teacher gives the dense one), so fd needs a store at feature_pool 1.
    The same holds for a bank of views, stored pooled on the student's grid."""
    if store.feature_pool > 1:
        raise SkdError(
            f"{redact(cfg.distill.cache)} holds teacher features max-pooled by {store.feature_pool} (feature_pool "
            f"{store.feature_pool}): feature distillation (fd) regresses every output pixel on the teacher's own "
            "feature there, which pooled features upsampled are not. Re-cache with --feature-pool 1 (add "
            "--feature-projection K for compact dense features), use --teacher for an online teacher, or train without fd")


def check_feature_resolution(store: TeacherStore, cfg: Config, dataset, use_views: bool) -> None:
    """Pair-wise targets come from features stored max-pooled by the store's ``feature_pool``;
    a node smaller than one stored cell (as the student sees it at the largest training scale)
    would compare the student against an upsampled blur, worse than no target at all."""
    data = cfg.data
    crop = data.crop_size or dataset.image_size(0)
    out_hw = output_size(crop)
    node = resolve_node_size(out_hw, cfg.distill.pa_node)
    # One stored feature cell, in output pixels (views are stored on the student's own grid). A
    # teacher that computes its features at a coarser stride than 8 (stored resampled onto the
    # stride-8 grid) has one feature per stride / 8 cells, whatever the pool.
    teacher_stride = store.attrs["teacher"].get("feature_stride") or OUTPUT_STRIDE
    cell = max(store.feature_pool, teacher_stride / OUTPUT_STRIDE) * (1.0 if use_views else max(data.scale_range))
    if min(node) < cell:
        raise SkdError(
            f"pair-wise nodes of {node[0]}x{node[1]} output pixels (--pa-node {cfg.distill.pa_node} on a "
            f"{out_hw[0]}x{out_hw[1]} output) are finer than the store's features: one stored cell "
            f"(feature stride {store.feature_stride} px, the teacher's own {teacher_stride} px, training scales up "
            f"to {max(data.scale_range):g}) covers {cell:g} output pixels. Use larger nodes, or re-cache with "
            + (f"a smaller --feature-pool (1 keeps the teacher's full stride-{OUTPUT_STRIDE} features)"
               if store.feature_pool * OUTPUT_STRIDE > teacher_stride else
               "features of a finer layer of the teacher (cache-teacher --teacher-features)"))


def check_student_feature_resolution(feature_stride: int | None, cfg: Config, dataset) -> None:
    """The student's features at a coarser stride than 8 are resampled onto the stride-8 grid: a
    pair-wise node smaller than one of its own feature cells would compare interpolated values."""
    cells = (feature_stride or OUTPUT_STRIDE) / OUTPUT_STRIDE
    out_hw = output_size(cfg.data.crop_size or dataset.image_size(0))
    node = resolve_node_size(out_hw, cfg.distill.pa_node)
    if min(node) < cells:
        raise SkdError(
            f"pair-wise nodes of {node[0]}x{node[1]} output pixels (--pa-node {cfg.distill.pa_node} on a "
            f"{out_hw[0]}x{out_hw[1]} output) are finer than the student's features, computed at stride "
            f"{feature_stride} ({cells:g} output pixels each): use nodes of at least {cells:g}px, or another "
            "--student-features layer")
