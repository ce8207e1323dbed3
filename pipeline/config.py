"""Typed configuration: dataclass defaults are the paper's Cityscapes recipe, except the pixel-wise
weight and its warm-up, which come from measurement (docs/RESULTS.md §3); YAML files in configs/
override them, and command-line options override the YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.transforms import AugmentConfig
from pipeline.errors import SkdError
from pipeline.inference import PRECISIONS

DISTILL_TERMS = ("pi", "pa", "ho", "fd")


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str | None = None  # None: ./data/<dataset>
    train_split: str = "train"
    val_split: str = "val"
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the dataset
    crop_size: list[int] | None = None  # [H, W]; None trains on whole images
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    flip: bool = False
    color_jitter: float = 0.0
    workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True

    def augment(self) -> AugmentConfig:
        """The training augmentation these settings ask for."""
        return AugmentConfig(tuple(self.crop_size) if self.crop_size else None, tuple(self.scale_range), self.flip,
                             self.color_jitter)


@dataclass
class ModelConfig:
    name: str = "pspnet_resnet18"
    width: float = 1.0
    pretrained_backbone: str | None = None  # torchvision ImageNet checkpoint for the backbone
    dropout: float = 0.1  # Dropout2d before the main and auxiliary classifiers (the reference's 0.1)
    # The module whose output (or "NAME:input") are the student's features for pa and fd; None: the
    # model's own (PSP features for skd's PSPNets, the classifier's input for torchvision's models).
    feature_layer: str | None = None


@dataclass
class TeacherModelConfig:
    """A recipe's teacher, trained by train-teacher: each setting given here replaces the model
    section's, the others are the model section's. So one recipe trains a teacher on an ImageNet
    backbone at width 1 and narrow students from scratch (model.width applies to the students)."""
    name: str | None = None
    width: float | None = None
    pretrained_backbone: str | None = None
    dropout: float | None = None


@dataclass
class DistillConfig:
    # Any subset of "pi", "pa", "ho" (the paper's terms, all three by default; train-teacher clears
    # them) and "fd" (feature distillation, beyond the paper).
    losses: list[str] = field(default_factory=lambda: ["pi", "pa", "ho"])
    cache: str | None = None  # teacher cache (directory, .zip or fsspec URL)
    teacher: str | None = None  # online mode: a teacher checkpoint, run live on every batch
    # Weight on the per-pixel mean KL. The reference sums per-image means over a batch of 8 with
    # weight 10, i.e. 80 on ours; measured, 80 swamps the task gradient (~70x its norm on the
    # student's features) and ruins students from scratch. 10, ramped up over the first third of
    # training (kd_warmup), distils best (docs/RESULTS.md §3). 80 stays available as an option.
    lambda_pi: float = 10.0
    temperature: float = 1.0
    lambda_pa: float = 0.5
    # Pair-wise node size: a fraction of the feature map in (0, 1] (0.5 = the reference's 2x2 nodes,
    # 1 = the whole map), or a fixed kernel such as "2px".
    pa_node: float | str = 0.5
    lambda_ho: float = 0.1
    lambda_gp: float = 10.0
    # The gradient penalty on every gp_every-th discriminator step, weighted by gp_every (lazy
    # regularisation, as StyleGAN2): 1 = every step, as the paper. On a CPU the penalty's double
    # backward is most of the holistic term's cost (docs/BENCHMARKS.md).
    gp_every: int = 1
    # Feature distillation: the student's PSP features through a learned 1x1 adapter to the
    # teacher's channels, squared distance per pixel (after L2 normalisation of both, by default).
    lambda_fd: float = 1.0
    fd_normalize: bool = True
    d_conditioning: str = "image"  # "image": softmax map + RGB (paper); "logits": raw logits + BatchNorm
    d_loss: str = "wgan"  # "wgan" (WGAN-GP, paper) or "hinge"
    d_optimizer: str = "sgd"  # "sgd" (reference) or "adam"
    d_lr: float = 4e-4
    # Fraction of the training iterations over which every distillation weight ramps up linearly
    # from 0: a student from scratch first learns from the labels, then the teacher pulls.
    kd_warmup: float = 0.33
    # Sanity check of the teacher signal: the task loss uses the teacher's argmax instead of the labels.
    pseudo_labels: bool = False
    # Train on the store's bank of views (exact teacher targets) when it has one; False replays its
    # whole-image maps onto fresh augmentations instead.
    views: bool = True


@dataclass
class TrainConfig:
    iterations: int = 40000
    # Train for this many minutes of wall-clock time instead of ``iterations`` (the poly schedule and
    # the distillation warm-up are then defined over the budget): methods with different step costs
    # compared at equal cost.
    budget_minutes: float | None = None
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    aux_weight: float = 0.4
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    # torch.compile the student's training forward (and so its backward). Off by default: compiling
    # takes about a minute, and it is measured on a CPU only (docs/BENCHMARKS.md). The discriminator
    # stays eager: the gradient penalty's double backward does not run through compiled graphs.
    compile: bool = False
    # Under torchrun: BatchNorm statistics over the global batch (the paper's recipes assume large
    # batches). None = on with several processes.
    sync_bn: bool | None = None
    log_every: int = 20
    log_grad_norms: bool = True  # on logged steps: each loss term's gradient norm on the PSP features
    checkpoint_every: int = 500
    # Every this many iterations (and at the end), the val split's mIoU (single scale, whole image)
    # goes into log.jsonl and the best model so far into best.pt; 0 = no validation.
    val_every: int = 0
    tensorboard: bool = False  # also write every log record as TensorBoard scalars in OUT/tensorboard/
    out: str = "runs/train"


@dataclass
class CacheConfig:
    batch_size: int = 8
    feature_pool: int = 4  # PSP features are max-pooled by this factor before storing
    teacher_scales: list[float] = field(default_factory=lambda: [1.0])
    teacher_flip: bool = False
    # [H, W]: run the teacher as sliding windows of this size; None or [] runs it on whole images.
    teacher_window: list[int] | None = None
    levels: list[float] = field(default_factory=lambda: [1.0])  # scales at which maps are stored
    # Training views stored per image with the teacher's maps on each (0: none). They are drawn with
    # the data section's augmentation (crop, scales, flip, jitter), which training must then share.
    views: int = 0
    precision: str = "fp32"  # "bf16": the teacher under bfloat16 autocast (docs/BENCHMARKS.md: fidelity)
    features: bool = True  # False: a store for evaluation, pixel-wise and holistic terms only (no pair-wise)
    # k > 0: store the features' coordinates on the top k principal directions of the teacher's
    # features, fitted on up to projection_images images of the split (dense features for fd, compact).
    feature_projection: int = 0
    projection_images: int = 256


@dataclass
class StorageConfig:
    """How stores at URLs (s3://, gs://, ...) are reached and read; a run may change all of it on resume."""
    # fsspec storage options (endpoint_url, client_kwargs.region_name, profile, ...). Credentials are
    # best left to the provider chain (environment, profile, instance role); config.json records
    # these options with every value that may be a secret redacted.
    options: dict[str, Any] = field(default_factory=dict)
    # A local folder caching a remote store's objects as they are read (None: read the store every
    # time), and its size cap (e.g. 500M, 20G); least recently used objects go first.
    cache_dir: str | None = None
    cache_dir_size: str = "20G"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    teacher_model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_for_teacher(self) -> ModelConfig:
        """The model section with the teacher_model section's settings over it: what train-teacher trains."""
        chosen = {k: v for k, v in dataclasses.asdict(self.teacher_model).items() if v is not None}
        return dataclasses.replace(self.model, **chosen)


def load_config(path: str | Path | None = None) -> Config:
    """Defaults, overridden by the YAML file at ``path`` when given. Unknown keys are errors."""
    cfg = Config()
    if path is None:
        return cfg
    path = Path(path)
    if not path.is_file():
        raise SkdError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SkdError(f"config file {path} is not valid YAML: {exc}") from None
    return merge(cfg, raw, source=str(path))


def merge(cfg: Config, updates: dict[str, Any], source: str = "options") -> Config:
    """Apply nested ``{section: {key: value}}`` updates; None values leave the field as it is."""
    if not isinstance(updates, dict):
        raise SkdError(f"{source}: expected a mapping of sections, got {type(updates).__name__}")
    for section, values in updates.items():
        if section not in {f.name for f in dataclasses.fields(Config)}:
            raise SkdError(f"{source}: unknown section '{section}' (known: data, model, teacher_model, distill, train, cache, storage)")
        target = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(target)}
        for key, value in (values or {}).items():
            if key not in known:
                raise SkdError(f"{source}: unknown option '{section}.{key}' (known: {', '.join(sorted(known))})")
            if value is not None:
                setattr(target, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    bad = [t for t in cfg.distill.losses if t not in DISTILL_TERMS]
    if bad:
        raise SkdError(f"unknown distillation term(s) {bad}: choose from {', '.join(DISTILL_TERMS)}")
    if cfg.distill.d_conditioning not in ("image", "logits"):
        raise SkdError(f"distill.d_conditioning must be 'image' or 'logits', not {cfg.distill.d_conditioning!r}")
    if cfg.distill.d_loss not in ("wgan", "hinge"):
        raise SkdError(f"distill.d_loss must be 'wgan' or 'hinge', not {cfg.distill.d_loss!r}")
    if cfg.distill.d_optimizer not in ("sgd", "adam"):
        raise SkdError(f"distill.d_optimizer must be 'sgd' or 'adam', not {cfg.distill.d_optimizer!r}")
    if cfg.data.crop_size is not None and len(cfg.data.crop_size) != 2:
        raise SkdError(f"data.crop_size must be [height, width], not {cfg.data.crop_size}")
    if len(cfg.data.scale_range) != 2 or not 0 < cfg.data.scale_range[0] <= cfg.data.scale_range[1]:
        raise SkdError(f"data.scale_range must be [low, high] with 0 < low <= high, not {cfg.data.scale_range}")
    if cfg.train.budget_minutes is not None and not cfg.train.budget_minutes > 0:
        raise SkdError(f"train.budget_minutes must be positive minutes, not {cfg.train.budget_minutes}")
    if cfg.train.iterations < 1 or cfg.train.batch_size < 1:
        raise SkdError("train.iterations and train.batch_size must be at least 1")
    if cfg.cache.feature_pool < 1:
        raise SkdError("cache.feature_pool must be at least 1")
    if cfg.cache.feature_projection < 0 or cfg.cache.projection_images < 1:
        raise SkdError("cache.feature_projection must be 0 (off) or a channel count, and cache.projection_images at least 1")
    if cfg.cache.teacher_window and (len(cfg.cache.teacher_window) != 2 or min(cfg.cache.teacher_window) < 8):
        raise SkdError(f"cache.teacher_window must be [height, width] of at least 8 pixels, not {cfg.cache.teacher_window}")
    if cfg.cache.precision not in PRECISIONS:
        raise SkdError(f"cache.precision must be one of {', '.join(PRECISIONS)}, not {cfg.cache.precision!r}")
    if cfg.cache.views < 0:
        raise SkdError(f"cache.views must be 0 (no view bank) or more, not {cfg.cache.views}")
    if cfg.cache.views and not cfg.data.crop_size:
        raise SkdError("cache.views needs data.crop_size: views are training crops")
    if not cfg.cache.levels or min(cfg.cache.levels) <= 0:
        raise SkdError(f"cache.levels must be positive scales, not {cfg.cache.levels}")
    if not 0.0 <= cfg.distill.kd_warmup <= 1.0:
        raise SkdError(f"distill.kd_warmup is a fraction of the training iterations in [0, 1], not {cfg.distill.kd_warmup}")
    parse_node_size(cfg.distill.pa_node)


NodeSpec = float | str


def parse_node_size(spec: NodeSpec) -> tuple[str, float | int]:
    """Read a pair-wise node-size option: ``("fraction", f)`` or ``("pixels", n)``.

    * a number in (0, 1]: a fraction of the feature map per node side; 0.5 (the reference
      default) gives 2×2 nodes, 1 (or 1.0) the whole map as one node.
    * a string ``"<n>px"`` with an integer n ≥ 1: a fixed kernel of n feature pixels per side
      (``"1px"`` = one node per pixel).

    Anything else — a number above 1, a non-integer pixel count — is refused rather than rounded.
    """
    if isinstance(spec, bool):
        raise SkdError(f"pair-wise node size must be a fraction in (0, 1] or '<n>px', got {spec!r}")
    if isinstance(spec, str) and spec.strip().lower().endswith("px"):
        count = spec.strip()[:-2]
        if not count.isdigit() or int(count) < 1:
            raise SkdError(f"pair-wise node size {spec!r}: the pixel count must be a whole number >= 1, e.g. '2px'")
        return "pixels", int(count)
    try:
        fraction = float(spec)
    except (TypeError, ValueError):
        raise SkdError(f"pair-wise node size must be a fraction in (0, 1] or '<n>px', got {spec!r}") from None
    if not 0.0 < fraction <= 1.0:  # also false for NaN
        hint = f"; for a kernel of {fraction:g} pixels write '{fraction:g}px'" if fraction > 1 else ""
        raise SkdError(f"pair-wise node size {spec!r} is not a fraction in (0, 1]{hint}")
    return "fraction", fraction
