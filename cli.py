"""skd command line: cache a teacher once, train students from the cache, evaluate.

    skd train-teacher --dataset synthetic --model pspnet_resnet18 --out runs/teacher
    skd cache-teacher --dataset synthetic --teacher runs/teacher/model.pt
    skd train-student --dataset synthetic --cache ./data/synthetic.zarr --losses pi,pa,ho
    skd evaluate --dataset synthetic --checkpoint runs/student/model.pt
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.config import Config, DistillConfig, TrainConfig, load_config, merge
from pipeline.errors import SkdError

log = logging.getLogger("skd")
_D = DistillConfig()  # the defaults shown in --help


def default_cache(dataset: str, split: str = "train", root: str | None = None) -> str:
    """./data/<dataset>.zarr for the train split, ./data/<dataset>-<split>.zarr for the others; a
    folder dataset's stores carry its root's name (two custom datasets must not share a store)."""
    name = f"{dataset}-{Path(root).resolve().name}" if dataset == "folder" and root else dataset
    return f"./data/{name}.zarr" if split == "train" else f"./data/{name}-{split}.zarr"


def run_folder(cfg: Config, out: str | None, command_default: str) -> None:
    """--out, else the config's train.out, else the command's own default."""
    if out is None and cfg.train.out == TrainConfig.out:
        cfg.train.out = command_default


def parse_hw(value: str | None) -> list[int] | None:
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        raise SkdError(f"expected HEIGHTxWIDTH (e.g. 512x512) or one number, not {value!r}") from None
    return hw * 2 if len(hw) == 1 else hw


def parse_floats(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SkdError(f"expected comma-separated numbers, not {value!r}") from None


def parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs as fsspec storage options; dotted keys nest (``client_kwargs.region_name=...``),
    values read as YAML scalars (numbers, true/false)."""
    options: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SkdError(f"--storage-option {item.split('=')[0]!r}...: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value) if value else ""
    return options


def reading_options(cache_dir: bool = True):
    """--storage-option for a command that reads a store, and --cache-dir/--cache-dir-size for one
    that reads it image by image (training, evaluation)."""
    def decorate(f):
        if cache_dir:
            f = click.option("--cache-dir-size", envvar="SKD_CACHE_DIR_SIZE", default=None, metavar="SIZE",
                             help="Size cap of --cache-dir (e.g. 500M, 20G): the least recently used objects are "
                                  "deleted beyond it. Also SKD_CACHE_DIR_SIZE. [default: storage.cache_dir_size, 20G]")(f)
            f = click.option("--cache-dir", envvar="SKD_CACHE_DIR", type=click.Path(file_okay=False), default=None,
                             help="With a store at a URL: keep its objects in this local folder as they are read, so "
                                  "later epochs and runs read local disk (checksums are still checked on every "
                                  "read). Also SKD_CACHE_DIR. [default: storage.cache_dir, none]")(f)
        return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                            help="An fsspec storage option for a store at a URL, e.g. endpoint_url=http://minio:9000 "
                                 "(repeat for more; dotted keys nest; over the config's storage.options). Credentials "
                                 "come from the usual places (AWS_* environment variables, ~/.aws, an instance role) "
                                 "and are never printed.")(f)
    return decorate


def storage_updates(cfg: Config, storage_options: tuple[str, ...], cache_dir: str | None,
                    cache_dir_size: str | None) -> None:
    """The command line's storage options (over the config's, key by key) and read cache into ``cfg``."""
    cfg.storage.options = {**cfg.storage.options, **parse_storage_options(storage_options)}
    cfg.storage.cache_dir = cache_dir or cfg.storage.cache_dir
    cfg.storage.cache_dir_size = cache_dir_size or cfg.storage.cache_dir_size


def parse_terms(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [] if value.strip().lower() in ("", "none") else [t.strip() for t in value.split(",")]


def data_options(f):
    f = click.option("--data-root", type=click.Path(), default=None,
                     help="Dataset folder. [default: ./data/<dataset>]")(f)
    f = click.option("--dataset", default=None,
                     help="synthetic (built in), camvid, cityscapes, ade20k or folder. [default: synthetic, or the config's]")(f)
    f = click.option("--config", "config_path", type=click.Path(), default=None,
                     help="YAML recipe (see configs/); options given here override it.")(f)
    return f


def train_options(f):
    for decorator in reversed([
        click.option("--model", default=None, help="Network, e.g. pspnet_resnet18, pspnet_resnet101, pspnet_mobilenetv2."),
        click.option("--width", type=float, default=None, help="Channel width multiplier of the network (small students)."),
        click.option("--pretrained-backbone", type=click.Path(), default=None,
                     help="ImageNet weights for the backbone: a torchvision checkpoint file, or a torchvision weight "
                          "name such as ResNet18_Weights.IMAGENET1K_V1 (downloaded once into torch's cache)."),
        click.option("--iterations", type=int, default=None, help="Training iterations. [default: 40000]"),
        click.option("--budget-minutes", type=float, default=None,
                     help="Train for this many minutes of wall-clock time instead of --iterations; the poly "
                          "schedule and the distillation warm-up run over the budget (compare methods at equal cost)."),
        click.option("--batch-size", type=int, default=None,
                     help="Global batch: under torchrun each of N processes takes batch-size / N. [default: 8]"),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the network's training forward (the discriminator stays eager): about a "
                          "minute to compile first; the gain is measured in docs/BENCHMARKS.md. [default: off]"),
        click.option("--sync-bn/--no-sync-bn", default=None,
                     help="Under torchrun: BatchNorm statistics over the global batch. [default: on with 2+ processes]"),
        click.option("--lr", type=float, default=None, help="SGD learning rate, poly decay. [default: 0.01]"),
        click.option("--crop-size", default=None, help="Random crop HxW, e.g. 512x512. [default: whole images]"),
        click.option("--scale-range", default=None, help="Random scale range LOW,HIGH, e.g. 0.5,2.0. [default: 1,1]"),
        click.option("--flip/--no-flip", default=None, help="Random horizontal flip."),
        click.option("--workers", type=int, default=None, help="DataLoader worker processes. [default: 2]"),
        click.option("--val-every", type=int, default=None,
                     help="Every N iterations and at the end, log the val split's mIoU and keep the best model "
                          "in OUT/best.pt. [default: 0, no validation]"),
        click.option("--tensorboard/--no-tensorboard", default=None,
                     help="Also write the log as TensorBoard scalars in OUT/tensorboard (needs tensorboard). "
                          "[default: off]"),
        click.option("--seed", type=int, default=None, help="[default: 0]"),
        click.option("--device", default=None, help="auto, cpu, cuda, cuda:1 ... [default: auto]"),
        click.option("--out", type=click.Path(), default=None, help="Run folder for checkpoints and logs."),
        click.option("--resume", is_flag=True,
                     help="Continue the run in --out from its last checkpoint, with the settings it was started "
                          "with (where it runs and how it reports may change: --device, --workers, --data-root, "
                          "--compile, --val-every, --tensorboard)."),
    ]):
        f = decorator(f)
    return f


@contextlib.contextmanager
def distributed_run(ctx: click.Context, device: str) -> Iterator[bool]:
    """Under torchrun, join the process group (NCCL on GPUs, gloo on the CPU) for the command's
    duration; yields whether this process is rank 0 (the only one that logs and prints)."""
    from pipeline.device import resolve_device
    from pipeline import parallel

    world = parallel.init(resolve_device(device).type)
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)
        ctx.obj["progress"] = False
    try:
        yield world.main
    finally:
        parallel.shutdown()


def build_config(config_path: str | None, **sections: dict[str, Any]) -> Config:
    cfg = load_config(config_path)
    return merge(cfg, sections)


def common_train_updates(kw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "data": {"dataset": kw["dataset"], "root": kw["data_root"], "crop_size": parse_hw(kw["crop_size"]),
                 "scale_range": parse_floats(kw["scale_range"]), "flip": kw["flip"], "workers": kw["workers"]},
        "model": {"name": kw["model"], "width": kw["width"], "pretrained_backbone": kw["pretrained_backbone"]},
        "train": {"iterations": kw["iterations"], "budget_minutes": kw["budget_minutes"], "batch_size": kw["batch_size"], "lr": kw["lr"], "seed": kw["seed"], "sync_bn": kw["sync_bn"], "compile": kw["compile_"], "val_every": kw["val_every"], "tensorboard": kw["tensorboard"],
                  "device": kw["device"], "out": kw["out"]},
    }


# The pair `make install` pins: the one install path the README gives.
TORCH_INSTALL = "pip install torch==2.14.1 torchvision==0.29.1"


def installed_version(package: str) -> str | None:
    """The installed distribution's version from its metadata (no import), or None."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def torch_torchvision_match(torch_version: str, torchvision_version: str) -> bool:
    """Whether the versions are a published pair: torchvision 0.(N + 15) is built for torch 2.N, and
    both builds carry the same local label (+cpu, +cu130, or none)."""
    torch_release, _, torch_build = torch_version.partition("+")
    vision_release, _, vision_build = torchvision_version.partition("+")
    try:
        torch_major, torch_minor = (int(v) for v in torch_release.split(".")[:2])
        vision_major, vision_minor = (int(v) for v in vision_release.split(".")[:2])
    except ValueError:
        return False
    return (torch_major, vision_major, vision_minor - torch_minor, torch_build) == (2, 0, 15, vision_build)


def torchvision_ops_load() -> bool:
    """Whether torchvision's compiled operators load with this torch (imports both: seconds)."""
    try:
        import torch
        import torchvision  # noqa: F401  (raises "operator torchvision::nms does not exist" on a mismatch)
    except Exception:
        return False
    return hasattr(torch.ops.torchvision, "nms")


def check_torch_torchvision() -> None:
    """Refuse a torch and torchvision that do not work together, in one line naming both and the fix.

    The versions are compared from the packages' metadata (cheap); only a pair that is not a
    published one is confirmed by loading torchvision's operators, so unusual builds that work pass.
    """
    torch_version, vision_version = installed_version("torch"), installed_version("torchvision")
    if torch_version is None or vision_version is None:
        return
    if torch_torchvision_match(torch_version, vision_version) or torchvision_ops_load():
        return
    raise SkdError(f"torch {torch_version} and torchvision {vision_version} do not match (torchvision's compiled "
                   f"operators do not load): run `{TORCH_INSTALL}` (what `make install` does), then `pip install -e .`")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, warnings and errors only.")
@click.version_option(package_name="skd")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """skd: structured knowledge distillation for semantic segmentation, with a cached teacher.

    \b
    1. train-teacher   train (or fine-tune) a teacher, or a baseline student, with the task loss
    2. cache-teacher   run the teacher once over a split and store its outputs (Zarr v3)
    3. train-student   train a student from the store: task + pixel-wise + pair-wise + holistic
    4. evaluate        mIoU / per-class IoU of a checkpoint or of the cached teacher
    """
    check_torch_torchvision()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ctx.obj = {"progress": not quiet and sys.stderr.isatty()}


@cli.command("train-teacher")
@data_options
@train_options
@click.pass_context
def train_teacher(ctx: click.Context, config_path: str | None, resume: bool, **kw: Any) -> None:
    """Train a model with the task loss only (a teacher, or a baseline student).

    The model is the recipe's teacher_model section over its model section (model is then the
    students'), and --model, --width, --pretrained-backbone over both.
    Cross-entropy on the main head plus 0.4 x the auxiliary head, SGD with poly decay.
    Writes OUT/model.pt (weights + architecture), OUT/last.pt (resumable) and OUT/log.jsonl.
    """
    from pipeline.train.trainer import train

    updates = common_train_updates(kw)
    updates["train"]["out"] = kw["out"]
    cfg = load_config(config_path)
    cfg.model = cfg.model_for_teacher()  # a recipe's teacher_model section; its model section is the students'
    cfg = merge(cfg, updates)
    run_folder(cfg, kw["out"], "runs/teacher")
    cfg.distill.losses = []
    with distributed_run(ctx, cfg.train.device) as main:
        path = train(cfg, resume=resume, progress=ctx.obj["progress"])
    if main:
        click.echo(f"model written to {path}")


@cli.command("train-student")
@data_options
@train_options
@click.option("--cache", type=click.Path(), default=None,
              help="Teacher cache (directory, .zip or fsspec URL). [default: ./data/<dataset>.zarr]")
@click.option("--teacher", type=click.Path(), default=None,
              help="Online mode: a teacher checkpoint run live on every batch instead of a cache.")
@click.option("--losses", default=None,
              help="Distillation terms, any of pi (pixel-wise), pa (pair-wise), ho (holistic), fd (feature "
                   "distillation through a learned adapter, beyond the paper), or 'none'. [default: pi,pa,ho]")
@click.option("--lambda-pi", type=float, default=None,
              help=f"Pixel-wise weight on the per-pixel mean KL (the reference's 10 x batch 8 = 80 is available, "
                   f"but ruins students trained from scratch: see docs/RESULTS.md). [default: {_D.lambda_pi:g}]")
@click.option("--temperature", type=float, default=None, help=f"Pixel-wise softmax temperature. [default: {_D.temperature:g}]")
@click.option("--lambda-pa", type=float, default=None, help=f"Pair-wise weight. [default: {_D.lambda_pa:g}]")
@click.option("--lambda-ho", type=float, default=None, help=f"Holistic (adversarial) weight. [default: {_D.lambda_ho:g}]")
@click.option("--lambda-fd", type=float, default=None, help=f"Feature-distillation weight. [default: {_D.lambda_fd:g}]")
@click.option("--pa-node", default=None,
              help=f"Pair-wise node size: a fraction of the feature map in (0, 1] (0.5 = 2x2 nodes, 1 = whole map) "
                   f"or a fixed kernel such as 2px. [default: {_D.pa_node}]")
@click.option("--kd-warmup", type=float, default=None,
              help="Fraction of the iterations over which the distillation weights ramp up linearly from 0 "
                   f"(the student learns from the labels first). [default: {_D.kd_warmup:g}]")
@click.option("--pseudo-labels", is_flag=True, default=None,
              help="Sanity check: train on the teacher's argmax instead of the labels (with --losses none).")
@click.option("--views/--no-views", default=None,
              help="With a store that holds a bank of training views (cache-teacher --views), train on them "
                   "(exact teacher targets), or replay its whole-image maps onto fresh augmentations. [default: views]")
@reading_options()
@click.option("--student-features", default=None, metavar="LAYER",
              help="The student's features for pa and fd: the output of this module (a name from "
                   "model.named_modules(), e.g. classifier.3), or its input with LAYER:input. [default: the PSP "
                   "module's output for skd's PSPNets, the final classifier conv's input for torchvision:NAME]")
@click.pass_context
def train_student(ctx: click.Context, config_path: str | None, resume: bool, **kw: Any) -> None:
    """Train a student from cached teacher outputs (or an online teacher).

    L = CE + 0.4 CE_aux + lambda_pi L_pi + lambda_pa L_pa + lambda_ho L_ho, with the discriminator
    trained online, one step per student step. The store must come from the same dataset split.
    """
    from pipeline.train.trainer import train

    updates = common_train_updates(kw)
    updates["train"]["out"] = kw["out"]
    updates["distill"] = {"losses": parse_terms(kw["losses"]), "lambda_pi": kw["lambda_pi"], "lambda_pa": kw["lambda_pa"],
                          "lambda_ho": kw["lambda_ho"], "lambda_fd": kw["lambda_fd"], "pa_node": kw["pa_node"], "teacher": kw["teacher"],
                          "cache": kw["cache"], "temperature": kw["temperature"], "kd_warmup": kw["kd_warmup"],
                          "pseudo_labels": kw["pseudo_labels"], "views": kw["views"]}
    updates["model"]["feature_layer"] = kw["student_features"]
    cfg = build_config(config_path, **updates)
    storage_updates(cfg, kw["storage_options"], kw["cache_dir"], kw["cache_dir_size"])
    if (cfg.distill.losses or cfg.distill.pseudo_labels) and not cfg.distill.teacher and not cfg.distill.cache:
        cfg.distill.cache = default_cache(cfg.data.dataset, cfg.data.train_split, cfg.data.root)
    run_folder(cfg, kw["out"], "runs/student")
    with distributed_run(ctx, cfg.train.device) as main:
        path = train(cfg, resume=resume, progress=ctx.obj["progress"])
    if main:
        click.echo(f"model written to {path}")


@cli.command("cache-teacher")
@data_options
@click.option("--teacher", type=click.Path(), required=True,
              help="Teacher checkpoint (skd's, or a plain state_dict with --teacher-arch), torchvision:NAME "
                   "with --teacher-weights, an exported model (FILE.pt2 from torch.export, FILE.ts from "
                   "TorchScript, FILE.onnx with pip install 'skd[onnx]'), or package.module:function returning an "
                   "nn.Module (docs/TEACHERS.md).")
@click.option("--teacher-arch", default=None, help="Architecture of a plain state_dict, e.g. pspnet_resnet101.")
@click.option("--teacher-weights", type=click.Path(), default=None,
              help="With --teacher torchvision:NAME (e.g. torchvision:deeplabv3_resnet101): its weights in "
                   "torchvision's state-dict format (auxiliary classifier or not). With --teacher "
                   "package.module:function: passed as weights=FILE if the function takes 'weights', else "
                   "loaded into the returned module as a state dict.")
@click.option("--teacher-mean", default=None, metavar="R,G,B",
              help="An exported or entry-point teacher's input mean, for RGB in [0, 1], when its file's metadata "
                   "does not give it (skd export writes it). [default: ImageNet's, 0.485,0.456,0.406]")
@click.option("--teacher-std", default=None, metavar="R,G,B",
              help="The same for the input's standard deviation. [default: ImageNet's, 0.229,0.224,0.225]")
@click.option("--teacher-features", default=None, metavar="LAYER",
              help="The teacher's features for pa and fd: the output of this module (a name from "
                   "model.named_modules()), or its input with LAYER:input. [default: the PSP module's output for "
                   "skd's PSPNets, the final classifier conv's input for torchvision:NAME]")
@click.option("--num-classes", type=int, default=None, help="Classes of a plain state_dict. [default: the dataset's]")
@click.option("--split", default="train", help="Dataset split to cache.")
@click.option("--cache", "--out", "cache", type=click.Path(), default=None,
              help="Store to write: a directory, or a path ending in .zip. [default: ./data/<dataset>.zarr for the "
                   "train split, ./data/<dataset>-<split>.zarr for others; a folder dataset's name includes its root's]")
@click.option("--batch-size", type=int, default=None, help="[default: 8]")
@click.option("--feature-pool", type=int, default=None, help="Max-pool factor for the stored PSP features. [default: 4]")
@click.option("--teacher-scales", default=None, help="Test-time scales averaged into the stored map, e.g. 0.75,1,1.25. [default: 1]")
@click.option("--teacher-flip/--no-teacher-flip", default=None, help="Also average the horizontally flipped view.")
@click.option("--teacher-window", default=None,
              help="Run the teacher as sliding windows of HxW pixels (e.g. its training crop), or 'whole' for whole "
                   "images. [default: the config's, else whole images]")
@click.option("--levels", default=None,
              help="Also store the teacher's map of the image resized by these scales, e.g. 1,2; training reads the "
                   "level nearest each crop's scale. [default: 1]")
@click.option("--views", type=int, default=None,
              help="Also store K augmented training views per image, drawn with the config's crop, scales, flip "
                   "and jitter, with the teacher's maps on each: exact targets for training at K times the "
                   "bytes of one crop's maps. [default: 0]")
@click.option("--features/--no-features", default=None,
              help="Store the teacher's PSP features (pair-wise distillation needs them; evaluation and the "
                   "pixel-wise and holistic terms do not). [default: features]")
@click.option("--feature-projection", type=int, default=None, metavar="K",
              help="Store the features as their coordinates on the top K principal directions of the teacher's "
                   "features (PCA fitted on this split first; the projection is kept in the store): dense features "
                   "for feature distillation (fd) at a fraction of the bytes, e.g. --feature-pool 1 "
                   "--feature-projection 32. 0 stores the features themselves. [default: 0]")
@click.option("--projection-images", type=int, default=None,
              help="Images (spread over the split) the projection is fitted on. [default: 256]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="Run the teacher in float32 or under bfloat16 autocast (faster on GPUs; fidelity in "
                   "docs/BENCHMARKS.md). [default: fp32]")
@click.option("--crop-size", default=None, help="With --views: the training crop HxW the views are drawn with. [default: the config's]")
@click.option("--scale-range", default=None, help="With --views: the training scales LOW,HIGH. [default: the config's]")
@click.option("--flip/--no-flip", default=None, help="With --views: random horizontal flips. [default: the config's]")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes. [default: 2]")
@click.option("--device", default=None, help="auto, cpu, cuda ... [default: auto]")
@click.option("--overwrite", is_flag=True, help="Replace an existing (or partial) store instead of refusing / resuming.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="An fsspec storage option for a store at a URL, e.g. endpoint_url=http://minio:9000 (repeat "
                   "for more; dotted keys nest). Credentials come from the usual places (AWS_* environment "
                   "variables, ~/.aws, an instance role) and are never printed.")
@click.pass_context
def cache_teacher_cmd(ctx: click.Context, config_path: str | None, dataset: str | None, data_root: str | None,
                      teacher: str, teacher_arch: str | None, teacher_weights: str | None,
                      teacher_mean: str | None, teacher_std: str | None,
                      teacher_features: str | None, num_classes: int | None, split: str, cache: str | None,
                      batch_size: int | None, feature_pool: int | None, teacher_scales: str | None,
                      teacher_flip: bool | None, teacher_window: str | None, levels: str | None, views: int | None,
                      features: bool | None, feature_projection: int | None, projection_images: int | None,
                      precision: str | None, crop_size: str | None, scale_range: str | None, flip: bool | None,
                      workers: int | None,
                      device: str | None, overwrite: bool, storage_options: tuple[str, ...]) -> None:
    """Run the teacher once over a split and write its outputs to a Zarr v3 store: a directory, a
    .zip, or a URL on object storage (s3://bucket/prefix/name.zarr; pip install 'skd[s3]').

    Stores 8-bit log-probabilities at output stride 8 (at each of --levels), max-pooled PSP features
    (or their PCA coordinates, --feature-projection),
    optionally a bank of --views augmented training crops with the teacher's maps on each, image ids,
    per-image done flags and JSON provenance. An interrupted run resumes where it stopped.
    """
    from pipeline.cache.store import redact
    from pipeline.data.views import view_spec
    from pipeline.cache.writer import cache_teacher
    from pipeline.data import build_dataset
    from pipeline.train.checkpoint import file_sha256, model_from_checkpoint
    from pipeline.device import resolve_device
    from pipeline.models import AdaptedModel, is_torchvision_spec, load_torchvision_teacher
    from pipeline.models.exported import is_user_teacher, load_user_teacher

    cfg = build_config(config_path, data={"dataset": dataset, "root": data_root, "workers": workers,
                                          "crop_size": parse_hw(crop_size), "scale_range": parse_floats(scale_range),
                                          "flip": flip},
                       cache={"batch_size": batch_size, "feature_pool": feature_pool,
                              "teacher_scales": parse_floats(teacher_scales), "teacher_flip": teacher_flip,
                              "teacher_window": [] if (teacher_window or "").lower() == "whole" else parse_hw(teacher_window),
                              "levels": parse_floats(levels), "views": views, "precision": precision,
                              "features": features, "feature_projection": feature_projection,
                              "projection_images": projection_images},
                       train={"device": device})
    ds = build_dataset(cfg.data.dataset, cfg.data.root, split, **cfg.data.options)
    if is_torchvision_spec(teacher):
        model, info = load_torchvision_teacher(teacher, teacher_weights, teacher_features, ds.num_classes)
    elif is_user_teacher(teacher):  # .pt2 / .ts / .onnx, or package.module:function
        model, info = load_user_teacher(teacher, num_classes=ds.num_classes, class_names=ds.class_names,
                                        weights=teacher_weights, feature_layer=teacher_features,
                                        mean=parse_floats(teacher_mean), std=parse_floats(teacher_std))
    else:
        if teacher_weights:
            raise SkdError(f"--teacher-weights is for --teacher torchvision:NAME; {teacher} holds its own weights")
        arch = {"name": teacher_arch, "num_classes": num_classes or ds.num_classes} if teacher_arch else None
        model, arch = model_from_checkpoint(teacher, arch)
        if arch["num_classes"] != ds.num_classes:
            raise SkdError(f"teacher {teacher} predicts {arch['num_classes']} classes, {cfg.data.dataset} has {ds.num_classes}")
        info = {**arch, "checkpoint": Path(teacher).name, "weights_sha256": file_sha256(teacher)}
        if teacher_features:  # another layer of skd's network, through a hook
            model = AdaptedModel(model, feature_layer=teacher_features)
            info |= {"feature_layer": teacher_features, "feature_stride": model.feature_stride}
    if (teacher_mean or teacher_std) and not is_user_teacher(teacher):
        raise SkdError(f"--teacher-mean/--teacher-std are for exported and entry-point teachers; {teacher} is "
                       "normalised as skd normalises (ImageNet's mean and std)")
    if cfg.cache.features and not model.feature_channels:
        raise SkdError(f"teacher {teacher} gives no features: cache with --no-features (pi and ho need none), or "
                       "give it features (skd export --with-features; a (logits, features) output; --teacher-features)")
    out = cache or default_cache(cfg.data.dataset, split, cfg.data.root)
    c = cfg.cache
    with distributed_run(ctx, cfg.train.device) as main:
        path = cache_teacher(model, info, ds, out, batch_size=c.batch_size, device=resolve_device(cfg.train.device),
                             feature_pool=c.feature_pool, scales=c.teacher_scales, flip=c.teacher_flip,
                             window=tuple(c.teacher_window) if c.teacher_window else None, levels=c.levels,
                             view_bank=view_spec(cfg.data.augment(), c.views) if c.views else None, precision=c.precision,
                             features=c.features, feature_projection=c.feature_projection,
                             projection_images=c.projection_images, workers=cfg.data.workers, overwrite=overwrite,
                             progress=ctx.obj["progress"], storage_options=parse_storage_options(storage_options))
    if main:
        click.echo(f"teacher cache written to {redact(str(path))}")


@cli.command("evaluate")
@data_options
@click.option("--checkpoint", type=click.Path(), default=None, help="Model checkpoint to evaluate (student or teacher).")
@click.option("--cache", type=click.Path(), default=None, help="Evaluate the cached teacher maps in this store instead.")
@click.option("--split", default="val", help="Dataset split.")
@click.option("--scales", default="1", help="Test scales, e.g. 0.75,1,1.25 (probabilities averaged).")
@click.option("--flip", is_flag=True, help="Also average the horizontally flipped image.")
@click.option("--window", default=None, help="Sliding-window inference with HxW windows (two-thirds stride). [default: whole image]")
@click.option("--device", default="auto", help="auto, cpu, cuda ...")
@click.option("--batch-size", type=int, default=8, help="Images per forward pass (one at a time when sizes differ).")
@click.option("--workers", type=int, default=2, help="DataLoader worker processes reading the images.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              help="Run the model in float32 or under bfloat16 autocast (faster on GPUs).")
@click.option("--output", type=click.Path(), default=None, help="Write the results as JSON here.")
@click.option("--save-images", type=int, default=0, help="Save this many coloured image | truth | prediction PNGs into a folder named after --output "
                   "without its extension (R.json -> R/).")
@click.option("--name", default=None, help="Row name in the results (default: the checkpoint or store).")
@reading_options()
@click.pass_context
def evaluate_cmd(ctx: click.Context, config_path: str | None, dataset: str | None, data_root: str | None,
                 checkpoint: str | None, cache: str | None, split: str, scales: str, flip: bool, window: str | None, device: str,
                 batch_size: int, workers: int, precision: str, output: str | None, save_images: int,
                 name: str | None, storage_options: tuple[str, ...], cache_dir: str | None,
                 cache_dir_size: str | None) -> None:
    """mIoU, pixel accuracy and per-class IoU of a checkpoint or of a teacher cache (--cache).

    Single scale, whole image, no flip by default. Prints a table; --output writes JSON and, beside
    it, the confusion matrix as a PNG (<output>_confusion.png).
    """
    from pipeline.cache.readcache import read_cache
    from pipeline.cache.store import TeacherStore, redact
    from pipeline.data import build_dataset
    from pipeline.evaluate import evaluate_cache, evaluate_model
    from pipeline.metrics import evaluation_report, format_table
    from pipeline.profile import count_flops
    from pipeline.visualize import confusion_image, save_png
    from pipeline.train.checkpoint import model_from_checkpoint
    from pipeline.device import resolve_device

    if (checkpoint is None) == (cache is None):
        raise SkdError("give exactly one of --checkpoint or --cache")
    cfg = build_config(config_path, data={"dataset": dataset, "root": data_root})
    storage_updates(cfg, storage_options, cache_dir, cache_dir_size)
    ds = build_dataset(cfg.data.dataset, cfg.data.root, split, **cfg.data.options)
    save_dir = Path(output).with_suffix("") if output and save_images else None
    progress = ctx.obj["progress"]
    if checkpoint:
        model, arch = model_from_checkpoint(checkpoint)
        if arch["num_classes"] != ds.num_classes:
            raise SkdError(f"{checkpoint} predicts {arch['num_classes']} classes, {cfg.data.dataset} has {ds.num_classes}")
        cm = evaluate_model(model, ds, resolve_device(device), scales=parse_floats(scales), flip=flip,
                            window=tuple(parse_hw(window)) if window else None, progress=progress,
                            save_dir=save_dir, save_images=save_images, batch_size=batch_size, workers=workers,
                            precision=precision)
        # The paper's tables put the model's cost next to its mIoU (single scale, the first image's size).
        size = tuple(int(v) for v in ds.image_size(0))
        source = {"checkpoint": checkpoint, "arch": arch, "parameters": sum(p.numel() for p in model.parameters()),
                  "gflops_per_image": count_flops(model.cpu(), size) / 1e9, "flops_image_size": list(size)}
    else:
        store = TeacherStore(cache, cfg.storage.options or None,
                             read_cache(cfg.storage.cache_dir, cfg.storage.cache_dir_size))
        cm = evaluate_cache(store, ds, progress=progress, save_dir=save_dir, save_images=save_images)
        source = {"cache": redact(cache)}
    report = {"name": name or checkpoint or redact(cache), **source, "dataset": cfg.data.dataset, "split": split,
              "scales": parse_floats(scales), "flip": flip, "window": parse_hw(window),
              "precision": precision if checkpoint else None, **evaluation_report(cm, ds.class_names)}
    rows = [{"class": c, "IoU": "n/a" if v is None else f"{100 * v:.2f}"} for c, v in report["per_class_iou"].items()]
    click.echo(format_table(rows, ["class", "IoU"]))
    cost = (f"  {report['parameters'] / 1e6:.2f} M parameters, {report['gflops_per_image']:.1f} GFLOPs per "
            f"{size[0]}x{size[1]} image" if checkpoint else "")
    click.echo(f"mIoU {100 * report['miou']:.2f}  pixel accuracy {100 * report['pixel_accuracy']:.2f}  "
               f"({len(ds)} images, {cfg.data.dataset}/{split}){cost}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
        confusion = Path(output).with_name(Path(output).stem + "_confusion.png")
        save_png(confusion, confusion_image(cm.matrix, list(ds.class_names)))
        click.echo(f"results -> {output}, confusion matrix -> {confusion}")


@cli.command("check-data")
@data_options
@click.option("--split", "splits", multiple=True, default=("train", "val"), help="Split(s) to scan.")
def check_data_cmd(config_path: str | None, dataset: str | None, data_root: str | None, splits: tuple[str, ...]) -> None:
    """Scan a dataset and report every problem at once, each split's under its summary: unreadable
    images (every image decoded in full, and JPEGs checked for damaged compressed data), missing or
    mis-sized labels, label values outside the class range. Exits non-zero when anything is wrong."""
    from pipeline.data import build_dataset, check_dataset
    from pipeline.data.check import describe_pairing

    cfg = build_config(config_path, data={"dataset": dataset, "root": data_root})
    problems = 0
    for split in splits:
        ds = build_dataset(cfg.data.dataset, cfg.data.root, split, **cfg.data.options)
        found = check_dataset(ds)
        click.echo(f"{cfg.data.dataset}/{split}: {len(ds)} images, {len(found)} problem(s)")
        if pairing := describe_pairing(ds):  # what was paired with what, before any problem
            click.echo(f"  {pairing}")
        for p in found:  # under their own split's summary
            click.echo(f"  {p}")
        problems += len(found)
    if problems:
        raise SystemExit(1)


@cli.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--checkpoint", type=click.Path(), required=True, help="Model checkpoint (skd's model.pt).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for the outputs.")
@click.option("--dataset", default=None, help="Colour and name classes as this dataset does (camvid, cityscapes, "
              "ade20k, synthetic when the class counts agree; folder: its classes.yaml, with --data-root). "
              "[default: the --config's dataset, else a VOC-style palette]")
@click.option("--data-root", type=click.Path(), default=None, help="The folder dataset's root (its classes.yaml).")
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="YAML recipe whose data section (dataset, root) gives the classes.")
@click.option("--scales", default="1", help="Test scales, e.g. 0.75,1,1.25 (probabilities averaged).")
@click.option("--flip", is_flag=True, help="Also average the horizontally flipped image.")
@click.option("--window", default=None, help="Sliding-window inference with HxW windows. [default: whole image]")
@click.option("--device", default="auto", help="auto, cpu, cuda ...")
@click.pass_context
def predict_cmd(ctx: click.Context, images: tuple[str, ...], checkpoint: str, out: str, dataset: str | None,
                data_root: str | None, config_path: str | None, scales: str, flip: bool, window: str | None,
                device: str) -> None:
    """Segment IMAGES (files, folders, glob patterns): for each, OUT/<name>_label.png (class
    indices), OUT/<name>_color.png (coloured mask) and OUT/<name>_overlay.png (with a legend of
    the classes present)."""
    from pipeline.device import resolve_device
    from pipeline.predict import classes_for, expand_inputs, predict_files
    from pipeline.train.checkpoint import model_from_checkpoint

    if config_path:
        cfg = build_config(config_path, data={"dataset": dataset, "root": data_root})
        dataset, data_root = cfg.data.dataset, cfg.data.root
    paths = expand_inputs(images)
    model, arch = model_from_checkpoint(checkpoint)
    names, palette = classes_for(dataset, arch["num_classes"], data_root)
    written = predict_files(model, paths, Path(out), palette, resolve_device(device),
                            parse_floats(scales), flip, tuple(parse_hw(window)) if window else None,
                            progress=ctx.obj["progress"], names=names)
    click.echo(f"predicted {len(written)} image(s) into {out}")


@cli.command("export")
@click.option("--checkpoint", type=click.Path(), required=True, help="Model checkpoint (skd's model.pt).")
@click.option("--format", "fmt", type=click.Choice(["torchscript", "pt2", "onnx"]), default="torchscript",
              help="torchscript (torch.jit.trace at --size; checked at a second size, and fixed to --size in its "
                   "metadata if it differs there), pt2 (torch.export; batch, height and width dynamic where "
                   "torch.export allows, a dimension it must specialise fixed) or onnx (needs onnx + onnxscript; "
                   "batch dynamic, height and width fixed at --size).")
@click.option("--size", default="512x1024", help="Input HxW the model is exported (and checked) at.")
@click.option("--check-image", type=click.Path(), default=None,
              help="Image to check the export on (resized to --size). [default: a synthetic street scene]")
@click.option("--with-features", is_flag=True,
              help="Output (logits, features) instead of the logits alone: a teacher for cache-teacher --teacher "
                   "FILE whose store holds features (pair-wise and feature distillation).")
@click.option("--dataset", default=None,
              help="Write this dataset's class names into the file's metadata (cache-teacher checks them against "
                   "the data it caches). [default: none written]")
@click.option("--data-root", type=click.Path(), default=None, help="With --dataset folder: its root (classes.yaml).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="File to write.")
def export_cmd(checkpoint: str, fmt: str, size: str, check_image: str | None, with_features: bool,
               dataset: str | None, data_root: str | None, out: str) -> None:
    """Export the network alone (logits, or with --with-features (logits, features), from a normalised
    image; no discriminator, teacher or training state) and check it against PyTorch on an image: max
    |difference| of the logits and argmax agreement. The file carries JSON metadata (architecture,
    input mean and std, outputs, class names, the input size if fixed) that cache-teacher reads."""
    from pipeline.data import build_dataset
    from pipeline.data.io import read_image
    from pipeline.data.transforms import normalize
    import torch

    from pipeline.export import check_export, export_with_metadata
    from pipeline.train.checkpoint import model_from_checkpoint

    hw = tuple(parse_hw(size))
    model, arch = model_from_checkpoint(checkpoint)
    names = None
    if dataset:
        from pipeline.predict import classes_for

        names, _ = classes_for(dataset, arch["num_classes"], data_root)
        if names == [f"class {i}" for i in range(arch["num_classes"])]:
            raise SkdError(f"--dataset {dataset}: no class names for a {arch['num_classes']}-class model (its class "
                           "count differs from the model's)")
    path, metadata = export_with_metadata(model, fmt, hw, Path(out), arch=arch, with_features=with_features,
                                          class_names=names)
    image = (read_image(check_image) if check_image else
             build_dataset("synthetic", None, "val", size=list(hw), length=1)[0]["image"])
    image = normalize(image[None])
    if tuple(image.shape[-2:]) != hw:
        image = torch.nn.functional.interpolate(image, size=hw, mode="bilinear", align_corners=False)
    check = check_export(path, fmt, model, image)
    sizes = "fixed at {}x{}".format(*metadata["input_hw"]) if metadata["input_hw"] else "any height and width"
    click.echo(f"exported {arch['name']} x{arch.get('width', 1.0)} to {path} ({fmt}, input Nx3xHxW, {sizes}; "
               f"outputs {', '.join(metadata['outputs'])})")
    if check["checked"]:
        click.echo(f"check against PyTorch on {check_image or 'a synthetic image'}: max |logit difference| "
                   f"{check['max_abs_diff']:.2e}, argmax agreement {100 * check['argmax_agreement']:.3f} %")
    else:
        click.echo(f"not checked: {check['reason']}")


@cli.command("profile")
@click.option("--checkpoint", type=click.Path(), required=True, help="Model checkpoint (skd's model.pt or last.pt).")
@click.option("--size", default="512x1024", help="Input HxW.")
@click.option("--batch-sizes", default="1,8", help="Batch sizes to time.")
@click.option("--device", default="auto", help="auto, cpu, cuda ...")
@click.option("--warmup", type=int, default=5, help="Untimed forward passes first, at each batch size.")
@click.option("--repeats", type=int, default=20, help="Timed forward passes, at each batch size.")
@click.option("--output", type=click.Path(), default=None, help="Write the numbers as JSON here.")
def profile(checkpoint: str, size: str, batch_sizes: str, device: str, warmup: int, repeats: int,
            output: str | None) -> None:
    """Model-card numbers: parameters, GFLOPs per image (torch's FlopCounterMode), latency at each
    batch size (median of --repeats timed runs after --warmup untimed ones, with quartiles and
    min-max; a note when they spread widely), images/s, and peak memory, on the CPU or a GPU."""
    from pipeline.device import resolve_device
    from pipeline.profile import format_profile, profile_model
    from pipeline.train.checkpoint import model_from_checkpoint

    model, arch = model_from_checkpoint(checkpoint)
    report = profile_model(model, tuple(parse_hw(size)), resolve_device(device),
                           tuple(int(b) for b in batch_sizes.split(",")), repeats=repeats, warmup=warmup)
    report["arch"] = arch
    click.echo(format_profile(f"{arch['name']} x{arch.get('width', 1.0)}", report))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))


@cli.command("cache-info")
@click.argument("store")
@reading_options(cache_dir=False)
def cache_info(store: str, storage_options: tuple[str, ...]) -> None:
    """Print a teacher cache's provenance, arrays (shape, chunks, shards, codecs, size) and progress."""
    from pipeline.cache.store import TeacherStore, array_table, provenance_json

    s = TeacherStore(store, parse_storage_options(storage_options))
    click.echo(provenance_json(s.attrs))
    click.echo(array_table(s))
    click.echo(f"{s.done_count()}/{len(s)} images cached, complete: {s.complete}")


@cli.command("cache-stats")
@click.argument("store")
@click.option("--labels", default=None,
              help="DATASET/SPLIT (e.g. camvid/val): also the cached teacher's mIoU on it. Checked before the "
                   "statistics are computed.")
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="YAML recipe whose data section (root, options such as suffixes) the --labels dataset is "
                   "built with when it names the same dataset.")
@click.option("--data-root", default=None, help="Root of the --labels dataset. [default: the config's, else ./data/<dataset>]")
@click.option("--output", type=click.Path(), default=None,
              help="Write the statistics as JSON here (written before the mIoU is computed, and again with it).")
@reading_options(cache_dir=False)
@click.pass_context
def cache_stats(ctx: click.Context, store: str, labels: str | None, config_path: str | None, data_root: str | None,
                output: str | None, storage_options: tuple[str, ...]) -> None:
    """Bytes and compression per array, non-finite values, the teacher's class frequencies, mean
    top-class probability and entropy histogram, computed chunk-parallel with dask from the store.

    A --labels that cannot be used (bad name, missing split, data other than the store's) fails at
    once, before any statistic is computed. If scoring fails later (a damaged label file), the
    statistics printed so far are also in --output's JSON, without the mIoU.
    """
    import contextlib

    from dask.diagnostics import ProgressBar

    from pipeline.cache.stats import format_stats, store_stats
    from pipeline.cache.store import TeacherStore

    s = TeacherStore(store, parse_storage_options(storage_options))
    dataset = None
    if labels:
        from pipeline.data import build_dataset

        if labels.count("/") != 1:
            raise SkdError(f"--labels takes DATASET/SPLIT, e.g. camvid/val, not {labels!r}")
        name, split = labels.split("/")
        cfg = build_config(config_path)
        same = name == cfg.data.dataset  # the config's root and options belong to its own dataset
        root = data_root or (cfg.data.root if same else None)
        dataset = build_dataset(name, root, split, **(cfg.data.options if same else {}))
        s.check_matches(dataset)
    with ProgressBar() if ctx.obj["progress"] else contextlib.nullcontext():
        stats = store_stats(s)
    click.echo(format_stats(stats))

    def write_json() -> None:
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(stats, indent=2))

    write_json()
    if dataset is not None:
        from pipeline.evaluate import evaluate_cache

        try:
            stats["miou"] = evaluate_cache(s, dataset, progress=ctx.obj["progress"]).miou()
        except SkdError as e:
            kept = f" (the statistics, without the mIoU, are in {output})" if output else ""
            raise SkdError(f"{e}{kept}") from None
        click.echo(f"\ncached teacher on {labels}: mIoU {100 * stats['miou']:.2f}")
        write_json()


@cli.command("cache-list")
@click.argument("url")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="An fsspec storage option for a URL, e.g. endpoint_url=http://minio:9000 (repeat for more).")
@click.option("--output", type=click.Path(), default=None, help="Also write the list as JSON here.")
def cache_list(url: str, storage_options: tuple[str, ...], output: str | None) -> None:
    """The teacher stores under URL (a folder, or a bucket prefix such as s3://team/camvid): teacher,
    weights hash, dataset and split, images, levels, views, complete, size. A team's catalogue."""
    from pipeline.cache.catalogue import format_catalogue, list_stores

    rows = list_stores(url, parse_storage_options(storage_options))
    click.echo(format_catalogue(rows))
    if output:
        Path(output).write_text(json.dumps(rows, indent=2))


@cli.command("cache-pack")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def cache_pack(store: str, out: str) -> None:
    """Pack a complete store directory into one .zip that skd (and zarr) read in place: a single
    file to hand to a teammate or upload."""
    from pipeline.cache.lifecycle import pack_store
    from pipeline.cache.store import TeacherStore

    if not out.endswith(".zip"):
        raise SkdError(f"{out}: the packed store's name must end in .zip")
    source = TeacherStore(store)
    if not source.complete:
        raise SkdError(f"{store} is incomplete ({source.done_count()}/{len(source)} images cached): finish it first")
    click.echo(f"packed {store} into {pack_store(Path(store), Path(out))}")


@cli.command("cache-copy")
@click.argument("src")
@click.argument("dst")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="An fsspec storage option for a URL (SRC or DST), e.g. endpoint_url=http://minio:9000 (repeat "
                   "for more). Credentials come from the usual chain and are never printed.")
@click.option("--source-option", "source_options", multiple=True, metavar="KEY=VALUE",
              help="Storage options for SRC alone, when it lives on another endpoint than DST (replace "
                   "--storage-option for SRC).")
@click.option("--threads", type=int, default=8, help="Objects copied (and chunks verified) at a time.")
@click.pass_context
def cache_copy(ctx: click.Context, src: str, dst: str, storage_options: tuple[str, ...],
               source_options: tuple[str, ...], threads: int) -> None:
    """Copy the complete store SRC to DST, each a directory, a .zip or a URL (s3://bucket/prefix/name.zarr).

    Bit for bit, object by object; every chunk is read back from DST (checksums) before DST is marked
    complete. Resumable: a stopped copy, re-run, copies only what is missing. An incomplete SRC is
    refused, and so is a DST holding a different store; DST holding this store already is left as it is.
    """
    from pipeline.cache.copy import copy_store
    from pipeline.cache.store import redact

    report = copy_store(src, dst, parse_storage_options(storage_options),
                        parse_storage_options(source_options) if source_options else None,
                        threads=threads, progress=ctx.obj["progress"])
    if report.already_there:
        click.echo(f"{redact(dst)} already holds this store, complete: nothing copied")
    else:
        kept = f" ({report.kept} already there from an earlier run)" if report.kept else ""
        click.echo(f"copied {redact(src)} to {redact(dst)}: {report.copied} objects, "
                   f"{report.bytes / 2**20:.2f} MiB{kept}; every chunk verified")


@cli.command("cache-verify")
@click.argument("store")
@reading_options(cache_dir=False)
@click.pass_context
def cache_verify(ctx: click.Context, store: str, storage_options: tuple[str, ...]) -> None:
    """Read every chunk of a teacher cache (checksums), check its flags, ids and provenance, and
    name each problem; exits non-zero if there is any."""
    from pipeline.cache.store import TeacherStore, redact
    from pipeline.cache.verify import verify_store

    problems = verify_store(TeacherStore(store, parse_storage_options(storage_options)), progress=ctx.obj["progress"])
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise SkdError(f"{redact(store)}: {len(problems)} problem(s) found")
    click.echo(f"{redact(store)}: every chunk read and checked, no problem found")


@cli.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default="curves.png", help="PNG to write.")
def plot_cmd(runs: tuple[str, ...], out: str) -> None:
    """Training curves of one or several runs (their --out folders) in one PNG: every loss term, and
    the val mIoU of runs trained with --val-every. Needs matplotlib (pip install 'skd[plot]')."""
    from pipeline.plot import plot_runs

    panels = plot_runs([Path(r) for r in runs], Path(out))
    click.echo(f"{len(runs)} run(s), {len(panels)} panels ({', '.join(panels)}) -> {out}")


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="skd")
    except SkdError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: re-run the same command (with --resume for training) to continue", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
