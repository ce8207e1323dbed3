"""Loading pretrained weights: torchvision ImageNet backbones and reference PSPNet checkpoints.

Models say how a torchvision checkpoint maps onto them with two class attributes:
``backbone_prefix`` (prepended to checkpoint keys, e.g. ``"backbone."``) and ``backbone_ignore``
(checkpoint key prefixes that have no place in a segmentation model, e.g. ``"fc."``). Everything
outside ``head.*`` and ``dsn.*`` is the backbone.

BatchNorm's ``num_batches_tracked`` counters are never reported missing: InPlace-ABN checkpoints
(the reference code's) do not store them, and they do not affect inference or training with the
default momentum.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.errors import SkdError


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (weights files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

HEAD_PREFIXES = ("head.", "dsn.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch puts terminal bold codes in some of its messages


@dataclass
class LoadReport:
    """Keys the model expected but the checkpoint lacked, and checkpoint keys the model has no place for."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.missing and not self.unexpected:
            return "all keys matched"
        return (f"{len(self.missing)} missing key(s){_examples(self.missing)}, "
                f"{len(self.unexpected)} unexpected key(s){_examples(self.unexpected)}")


def _examples(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    more = ", ..." if len(keys) > n else ""
    return " (" + ", ".join(keys[:n]) + more + ")"


def read_checkpoint(path: str | Path) -> dict:
    """The dict stored at ``path`` (CPU, ``weights_only=True``); any problem is an SkdError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SkdError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # A plain pickle file makes torch warn about its protocol before refusing it: one message is enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, pickle with forbidden globals...
        text = _ANSI.sub("", str(exc))
        if "Weights only load failed" in text:
            # torch's message advises weights_only=False, which would run the file's code: not for skd's users.
            found = re.search(r"GLOBAL (\S+)", text)
            what = f"a pickled Python object ({found.group(1)})" if found else "pickled Python data"
            raise SkdError(f"refusing checkpoint {path}: it holds {what}, not only tensors and numbers; skd "
                           "loads checkpoints with weights_only=True and never runs their code (if you trust the "
                           "file, re-save its weights alone with torch.save(model.state_dict(), ...))") from None
        first_line = (text.strip().splitlines() or [""])[0]
        raise SkdError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first_line}") from None
    if not isinstance(obj, dict):
        raise SkdError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def state_dict_of(checkpoint: dict, path: str | Path) -> dict[str, Tensor]:
    """The model weights in a checkpoint dict: a plain state_dict or the one under ``"model"`` /
    ``"state_dict"``; a leading ``module.`` (DataParallel / DDP) is stripped, non-tensors dropped."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise SkdError(f"checkpoint {path} holds no tensors")
    return state


def load_checkpoint_state(path: str | Path) -> dict[str, Tensor]:
    """Read a state_dict from ``path`` (see ``read_checkpoint`` and ``state_dict_of``)."""
    return state_dict_of(read_checkpoint(path), path)


def load_state(model: nn.Module, state: dict[str, Tensor], path: str | Path, strict: bool = True) -> LoadReport:
    """Load ``state`` into ``model``: shape mismatches always raise SkdError naming the key; with
    ``strict`` so do missing or unexpected keys."""
    model_state = model.state_dict()
    _check_shapes(model_state, state, path)
    missing = [k for k in model_state if k not in state and _counts_as_missing(k)]
    unexpected = [k for k in state if k not in model_state]
    report = LoadReport(missing=missing, unexpected=unexpected)
    if strict and (missing or unexpected):
        raise SkdError(f"checkpoint {path} does not match the {type(model).__name__} layout: {report}")
    model.load_state_dict({k: v for k, v in state.items() if k in model_state}, strict=False)
    return report


def _check_shapes(model_state: dict[str, Tensor], state: dict[str, Tensor], path: str | Path) -> None:
    for key, value in state.items():
        if key in model_state and model_state[key].shape != value.shape:
            raise SkdError(f"checkpoint {path}: {key} has shape {tuple(value.shape)}, "
                           f"the model expects {tuple(model_state[key].shape)}")


def _counts_as_missing(key: str) -> bool:
    return not key.endswith("num_batches_tracked")


def load_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """Load an ImageNet checkpoint (torchvision ResNet / MobileNetV2 layout) into ``model``'s backbone.

    Classifier keys (``fc.*``, ``classifier.*``) are ignored; ``missing`` lists backbone keys the
    file lacks, ``unexpected`` file keys that fit nowhere. Shape mismatches and a file sharing no
    key with the backbone raise SkdError.
    """
    prefix: str = getattr(model, "backbone_prefix", "")
    ignore: tuple[str, ...] = getattr(model, "backbone_ignore", ())
    model_state = model.state_dict()
    backbone_keys = [k for k in model_state if not k.startswith(HEAD_PREFIXES)]

    mapped: dict[str, Tensor] = {}
    for key, value in _backbone_state(path).items():
        if key.startswith(ignore):
            continue
        # Files saved from an skd model already carry the prefix.
        mapped[key if key.startswith(prefix) else prefix + key] = value
    unexpected = [k for k in mapped if k not in backbone_keys]
    selected = {k: v for k, v in mapped.items() if k in backbone_keys}
    if not selected:
        raise SkdError(f"checkpoint {path} shares no key with the {type(model).__name__} backbone "
                       f"(file keys e.g. {list(mapped)[:3]}, backbone keys e.g. {backbone_keys[:3]})")
    _check_shapes(model_state, selected, path)
    model.load_state_dict(selected, strict=False)
    missing = [k for k in backbone_keys if k not in selected and _counts_as_missing(k)]
    return LoadReport(missing=missing, unexpected=unexpected)


def _backbone_state(source: str | Path) -> dict[str, Tensor]:
    """An ImageNet state_dict from a file, or from torchvision's weight name (e.g.
    ``ResNet18_Weights.IMAGENET1K_V1``, ``MobileNet_V2_Weights.DEFAULT``), downloaded once into
    torch's hub cache."""
    name = str(source)
    if Path(name).exists() or "_Weights." not in name:
        return load_checkpoint_state(source)
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise SkdError(f"--pretrained-backbone {name}: neither a file nor a torchvision weight name "
                       "(e.g. ResNet18_Weights.IMAGENET1K_V1, MobileNet_V2_Weights.IMAGENET1K_V1)") from None
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, HTTPError, timeouts, a proxy's answer...
        raise SkdError(f"cannot download {name} from {weights.url} ({type(exc).__name__}: {exc}): on a machine "
                       "without internet, download that file elsewhere and pass its path") from None


def load_pretrained_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """``load_backbone`` that refuses a partial load (used by ``build_model(pretrained_backbone=...)``)."""
    report = load_backbone(model, path)
    if report.missing:
        raise SkdError(f"checkpoint {path} does not cover the {type(model).__name__} backbone: {report}")
    return report


def load_reference_pspnet(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a reference-layout PSPNet state_dict (conv1..3/bn1..3, layer1..4, head.0/1, dsn) into ``model``.

    skd's ResNet PSPNets use exactly that layout, so a matching file loads with nothing missing or
    unexpected. With ``strict`` (default) any missing or unexpected key raises SkdError; otherwise
    the matching keys are loaded and the report says what was left out. Shape mismatches always
    raise SkdError naming the key and both shapes.
    """
    return load_state(model, load_checkpoint_state(path), path, strict)
