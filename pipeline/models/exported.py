"""Teachers whose Python code skd does not have: a torch.export archive (``.pt2``), TorchScript
(``.ts``), an ONNX file (``.onnx``, run by onnxruntime), or a Python entry point
``package.module:function`` that returns an ``nn.Module``.

The contract (docs/TEACHERS.md): the network takes a normalised float32 image batch (N, 3, H, W)
and returns logits (N, C, h, w) at any stride, a (logits, features) pair, or a dict with "out" or
"logits" and optional "features". Each is wrapped in :class:`AdaptedModel`, which puts its outputs
on skd's stride-8 grid, so the writer sees what an skd network gives.

skd feeds every teacher images normalised with ImageNet's mean and std. A teacher that expects
another normalisation (from the file's metadata, which ``skd export`` writes, or from
``--teacher-mean``/``--teacher-std``) gets its input converted first: one affine map per channel.
A program that accepts only some input sizes (an export at a fixed size) gets its input resized to
the nearest size it accepts; AdaptedModel resamples the outputs back onto the input's grid.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import SkdError
from pipeline.models.adapter import AdaptedModel
from pipeline.models.weights import file_sha256, load_checkpoint_state, load_state

log = logging.getLogger(__name__)

# skd's input normalisation (pipeline.data.transforms.IMAGENET_MEAN / _STD; models sit below data).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What `skd export` writes beside the program: JSON text, an extra file of .pt2 and .ts archives and
# a metadata property of .onnx models.
METADATA_NAME = "skd.json"
METADATA_FORMAT = "skd-exported-model"
FILE_FORMATS = {".pt2": "pt2", ".ts": "torchscript", ".onnx": "onnx"}
ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Normalisation:
    """The teacher's input: (RGB / 255 - mean) / std, and where these numbers came from."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "default (ImageNet)"

    def as_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}

    def is_skd(self) -> bool:
        return tuple(self.mean) == IMAGENET_MEAN and tuple(self.std) == IMAGENET_STD


def renormalise(x: Tensor, norm: Normalisation) -> Tensor:
    """A batch normalised with ImageNet's mean/std, normalised with ``norm``'s instead:
    (x·s0 + m0 - m) / s per channel."""
    if norm.is_skd():
        return x  # exactly as given: an exported skd model sees what the original sees
    s0, m0 = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in (IMAGENET_STD, IMAGENET_MEAN))
    s, m = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1) for v in (norm.std, norm.mean))
    return (x * s0 + m0 - m) / s


def is_user_teacher(spec: str) -> bool:
    """A teacher this module loads: a .pt2/.ts/.onnx file, a TorchScript archive under another name,
    or ``package.module:function``."""
    path = Path(spec)
    return path.suffix.lower() in FILE_FORMATS or is_torchscript_archive(path) or bool(ENTRY_POINT.match(str(spec)))


def is_torchscript_archive(path: Path) -> bool:
    """torch.jit.save writes a zip with compiled code (``code/``) beside ``constants.pkl``; torch.save
    (skd's checkpoints) writes ``data.pkl`` and no code. Lets a TorchScript file named .pt be taken as one."""
    if path.suffix.lower() in FILE_FORMATS or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_user_teacher(spec: str, *, num_classes: int, class_names: Sequence[str], weights: str | None = None,
                      feature_layer: str | None = None, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> tuple[AdaptedModel, dict[str, Any]]:
    """The teacher ``spec`` (see :func:`is_user_teacher`) as an :class:`AdaptedModel` in eval mode,
    and its ``teacher_info`` for the store's provenance (what makes a re-run resume and another
    teacher be refused: the file's sha256, or the entry point's name, weights file and state hash).

    ``num_classes`` and ``class_names`` are the dataset's: a teacher with another class count, or
    whose file names other classes, is refused. ``mean``/``std`` (RGB in [0, 1]) give the teacher's
    input normalisation when its file does not say it (they must agree with it when it does)."""
    flags = _normalisation_flags(mean, std)
    if ENTRY_POINT.match(str(spec)) and not Path(spec).exists():
        network, info = load_entry_point(spec, weights, num_classes)
        norm = flags or Normalisation()
        if not norm.is_skd():
            network.register_forward_pre_hook(lambda module, args: (renormalise(args[0], norm), *args[1:]))
        probe_hw = (64, 64)
    else:
        path = Path(spec)
        if weights is not None:
            raise SkdError(f"--teacher-weights is for entry points and torchvision models: {path.name} holds its "
                           "own weights")
        if feature_layer is not None:
            raise SkdError(f"--teacher-features {feature_layer}: {path.name} is a compiled program, whose layers cannot "
                           "be hooked; export it returning (logits, features) instead (skd export --with-features)")
        network, info, metadata = load_file(path)
        norm = _normalisation(path, metadata, flags)
        network.normalisation = norm
        if metadata.get("class_names") is not None:
            _check_class_names(path, metadata["class_names"], class_names)
        probe_hw = network.probe_hw()
    try:
        model = AdaptedModel(network, feature_layer=feature_layer, probe_hw=probe_hw).eval()
    except SkdError:
        raise
    except Exception as exc:  # the program refused the probe's input: say which teacher, in one line
        raise SkdError(f"teacher {spec} failed on a 1x3x{probe_hw[0]}x{probe_hw[1]} image batch: "
                       f"{type(exc).__name__}: {_first_line(exc)}") from None
    if model.num_classes != num_classes:
        raise SkdError(f"teacher {spec} predicts {model.num_classes} classes, the dataset has {num_classes}")
    info |= {"num_classes": model.num_classes, "class_names": list(class_names), "normalisation": norm.as_dict(),
             "native_stride": model.native_stride, "feature_layer": feature_layer,
             "feature_stride": model.feature_stride}
    return model, info


# --- files: .pt2, .ts, .onnx ------------------------------------------------------------------------


class FileNetwork(nn.Module):
    """A compiled program as a network: renormalises its input, resizes it into the sizes the
    program accepts, and returns what the program returns (a tensor, a pair or a dict of tensors).

    ``accepted``: per input dimension (height, width), the (min, max) size the program takes (None:
    no limit); ``batch``: the same for the batch, which is run in slices the program takes (the
    last one padded with zeros). ``train()``/``eval()`` do not reach into the program: an exported
    program is fixed in the mode it was exported in (and torch.export's refuse to be switched)."""

    def __init__(self, path: Path, program: nn.Module | Callable[[Tensor], Any],
                 accepted: tuple[tuple[int | None, int | None], ...] = ((None, None), (None, None)),
                 batch: tuple[int | None, int | None] = (None, None)) -> None:
        super().__init__()
        self.path = path
        self.program = program  # a module is registered, so that .to(device) moves its weights
        self.accepted = accepted
        self.batch = batch
        self.normalisation = Normalisation()
        self._warned = False

    def train(self, mode: bool = True) -> "FileNetwork":
        self.training = mode
        return self

    def probe_hw(self) -> tuple[int, int]:
        """A size the program accepts, near 64x64 (a fixed-size program is probed at its size)."""
        return self._accepted_hw((64, 64))

    def _accepted_hw(self, hw: Sequence[int]) -> tuple[int, int]:
        return tuple(min(max(s, lo or s), hi or s) for s, (lo, hi) in zip(hw, self.accepted))

    def forward(self, x: Tensor) -> Any:
        x = renormalise(x, self.normalisation)
        hw = self._accepted_hw(x.shape[-2:])
        if hw != tuple(x.shape[-2:]):
            if not self._warned:
                log.warning("%s accepts inputs of %s only: inputs of %dx%d are resized to %dx%d (its outputs are "
                            "resampled back); export it with dynamic sizes, or run it in windows of a size it accepts "
                            "(--teacher-window)", self.path.name, _describe_accepted(self.accepted),
                            x.shape[-2], x.shape[-1], *hw)
                self._warned = True
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
        lo, hi = self.batch
        n = len(x)
        if (lo is None or n >= lo) and (hi is None or n <= hi):
            return self.program(x)
        step = hi or lo  # the largest batch the program takes
        parts = []
        for i in range(0, n, step):
            part = x[i : i + step]
            if lo is not None and len(part) < lo:
                part = torch.cat([part, part.new_zeros(lo - len(part), *part.shape[1:])])
            parts.append(self.program(part))
        return _concat_outputs(parts, n)


def _concat_outputs(parts: list[Any], n: int) -> Any:
    """The outputs of slices of a batch as one output of ``n`` items: tensors, pairs or dicts of them."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)[:n]
    if isinstance(first, dict):
        return {k: _concat_outputs([p[k] for p in parts], n) if isinstance(first[k], Tensor) else first[k]
                for k in first}
    return type(first)(_concat_outputs([p[i] for p in parts], n) for i in range(len(first)))


def _describe_accepted(accepted: tuple[tuple[int | None, int | None], ...]) -> str:
    if all(lo is not None and lo == hi for lo, hi in accepted):
        return "x".join(str(lo) for lo, _ in accepted)
    return " by ".join(f"{lo or 1}..{hi if hi is not None else 'any'}" for lo, hi in accepted) + " pixels"


def load_file(path: Path) -> tuple[FileNetwork, dict[str, Any], dict[str, Any]]:
    """The program in ``path`` as a :class:`FileNetwork`, its ``teacher_info`` (format, file name and
    sha256) and its skd metadata ({} when the file has none)."""
    if not path.is_file():
        raise SkdError(f"teacher file not found: {path}")
    fmt = FILE_FORMATS.get(path.suffix.lower(), "torchscript")
    loaders = {"pt2": _load_pt2, "torchscript": _load_torchscript, "onnx": _load_onnx}
    network, metadata = loaders[fmt](path)
    if metadata.get("input_hw") and all(lo is None for lo, _ in network.accepted):
        # TorchScript and some ONNX files do not declare their sizes; skd export's metadata does.
        network.accepted = tuple((s, s) for s in metadata["input_hw"])
    info = {"name": f"{fmt}:{metadata.get('model', path.stem)}", "format": fmt, "checkpoint": path.name,
            "weights_sha256": file_sha256(path)}
    if any(lo is not None or hi is not None for lo, hi in network.accepted):
        info["input_sizes"] = _describe_accepted(network.accepted)
    return network, info, metadata


def _load_pt2(path: Path) -> tuple[FileNetwork, dict[str, Any]]:
    extra = {METADATA_NAME: ""}
    if not zipfile.is_zipfile(path):
        raise SkdError(f"cannot read {path} as a torch.export archive (.pt2): not a zip archive (truncated, or not "
                       "written by torch.export.save)")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # it logs a whole traceback before raising: the one line below says it
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:
        raise SkdError(f"cannot read {path} as a torch.export archive (.pt2): {_first_line(exc)}") from None
    finally:
        export_log.setLevel(level)
    inputs = [spec for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    if len(inputs) != 1:
        raise SkdError(f"{path} takes {len(inputs)} inputs; a teacher takes one, the image batch (N, 3, H, W)")
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    shape = placeholder.meta["val"].shape
    if len(shape) != 4:
        raise SkdError(f"{path} takes a {len(shape)}-dimensional input; a teacher takes (N, 3, H, W)")
    accepted = tuple(_dim_range(program, s) for s in shape[2:])
    return (FileNetwork(path, program.module(), accepted, _dim_range(program, shape[0])),
            _parse_metadata(path, extra[METADATA_NAME]))


def _dim_range(program, size) -> tuple[int | None, int | None]:
    """(min, max) of one input dimension of an exported program: a fixed size, or its symbol's range."""
    if isinstance(size, int):
        return size, size
    ranges = program.range_constraints.get(size.node.expr)
    if ranges is None:
        return None, None
    bounds = []
    for bound in (ranges.lower, ranges.upper):
        try:
            bounds.append(int(bound))
        except Exception:  # sympy's (or torch's int_oo) infinity: no bound
            bounds.append(None)
    return bounds[0], bounds[1]


def _load_torchscript(path: Path) -> tuple[FileNetwork, dict[str, Any]]:
    extra = {METADATA_NAME: ""}
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but files in it are what many users have.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise SkdError(f"cannot read {path} as TorchScript (torch.jit.save): {_first_line(exc)}") from None
    module.eval()
    text = extra[METADATA_NAME]
    return FileNetwork(path, module), _parse_metadata(path, text.decode() if isinstance(text, bytes) else text)


def _load_onnx(path: Path) -> tuple[FileNetwork, dict[str, Any]]:
    try:
        import onnxruntime
    except ImportError:
        raise SkdError(f"{path.name}: ONNX teachers run in onnxruntime: pip install 'skd[onnx]'") from None
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise SkdError(f"cannot read {path} as an ONNX model: {_first_line(exc)}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise SkdError(f"{path} takes inputs {[(i.name, i.shape) for i in inputs]}; a teacher takes one, the image "
                       "batch (N, 3, H, W)")
    accepted, batch = [tuple((s, s) if isinstance(s, int) else (None, None) for s in dims)
                       for dims in (inputs[0].shape[2:], inputs[0].shape[:1])]
    names = [o.name for o in session.get_outputs()]

    def run(x: Tensor) -> Any:
        arrays = session.run(None, {inputs[0].name: x.detach().float().cpu().numpy()})
        outputs = [torch.from_numpy(a).to(x.device) for a in arrays]
        if "features" in names:  # named outputs: a dict, as split_network_output reads it
            return dict(zip(names, outputs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    metadata = session.get_modelmeta().custom_metadata_map.get(METADATA_NAME, "")
    return FileNetwork(path, run, accepted, batch[0]), _parse_metadata(path, metadata)


def _parse_metadata(path: Path, text: str) -> dict[str, Any]:
    """skd export's metadata, checked; {} when the file has none."""
    if not text:
        return {}
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SkdError(f"{path}: its {METADATA_NAME} metadata is not JSON ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        raise SkdError(f"{path}: its {METADATA_NAME} metadata is not skd export's (format {METADATA_FORMAT!r})")
    for key in ("mean", "std"):
        value = metadata.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise SkdError(f"{path}: its {METADATA_NAME} metadata has {key} {value!r}, not three numbers")
    names = metadata.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise SkdError(f"{path}: its {METADATA_NAME} metadata has class_names {names!r}, not a list of names")
    hw = metadata.get("input_hw")
    if hw is not None and not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(s, int) and s > 0 for s in hw)):
        raise SkdError(f"{path}: its {METADATA_NAME} metadata has input_hw {hw!r}, not [height, width]")
    return metadata


def _normalisation_flags(mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalisation | None:
    if mean is None and std is None:
        return None
    for name, value in (("--teacher-mean", mean), ("--teacher-std", std)):
        if value is not None and len(value) != 3:
            raise SkdError(f"{name} takes three numbers (R,G,B), got {len(value)}")
    if mean is not None and any(v > 1 for v in mean) or std is not None and any(v > 1 or v <= 0 for v in std):
        raise SkdError(f"--teacher-mean {mean} / --teacher-std {std}: give them for RGB values in [0, 1] (divide "
                       "0-255 statistics such as 123.675,116.28,103.53 by 255), std > 0")
    return Normalisation(tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD), "--teacher-mean/--teacher-std")


def _normalisation(path: Path, metadata: dict[str, Any], flags: Normalisation | None) -> Normalisation:
    if not metadata:
        return flags or Normalisation()
    stored = Normalisation(tuple(metadata["mean"]), tuple(metadata["std"]), f"{path.name} metadata")
    if flags is not None and (flags.mean, flags.std) != (stored.mean, stored.std):
        raise SkdError(f"--teacher-mean/--teacher-std {list(flags.mean)}/{list(flags.std)} disagree with {path.name}'s "
                       f"own metadata, mean {list(stored.mean)} std {list(stored.std)}: leave the flags out")
    return stored


def _check_class_names(path: Path, teacher: Sequence[str], dataset: Sequence[str]) -> None:
    if len(teacher) != len(dataset):
        raise SkdError(f"teacher {path.name} names {len(teacher)} classes, the dataset has {len(dataset)}")
    for i, (a, b) in enumerate(zip(teacher, dataset)):
        if a.strip().lower() != b.strip().lower():
            raise SkdError(f"teacher {path.name} calls class {i} {a!r}, the dataset {b!r}: its classes are in "
                           "another order or from another label set")


# --- entry points: package.module:function ------------------------------------------------------------


def load_entry_point(spec: str, weights: str | None, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """``package.module:function()`` -> nn.Module (eval mode), and its ``teacher_info``.

    The function gets ``num_classes=`` if it has that parameter, and ``weights=FILE`` if it has a
    ``weights`` parameter; otherwise a ``weights`` file is loaded into the returned module as a
    state dict (``torch.load(weights_only=True)``, strictly). The store's identity includes the
    entry point's name, the weights file's sha256 and a sha256 of the module's parameters and buffers."""
    module_name, _, function_name = str(spec).partition(":")
    if weights is not None and not Path(weights).is_file():
        raise SkdError(f"--teacher-weights {weights}: no such file")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module beside the command, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise SkdError(f"--teacher {spec}: no module named {exc.name!r} (install it, or add its folder to "
                           "PYTHONPATH)") from None
        raise SkdError(f"--teacher {spec}: importing {module_name} failed: {_first_line(exc)}") from None
    except Exception as exc:
        raise SkdError(f"--teacher {spec}: importing {module_name} failed: {type(exc).__name__}: "
                       f"{_first_line(exc)}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SkdError(f"--teacher {spec}: {module_name} has no function {function_name!r}")
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs: dict[str, Any] = {}
    if "num_classes" in parameters:
        kwargs["num_classes"] = num_classes
    if weights is not None and "weights" in parameters:
        kwargs["weights"] = weights
    network = function(**kwargs)
    if not isinstance(network, nn.Module):
        raise SkdError(f"--teacher {spec} returned a {type(network).__module__}.{type(network).__qualname__}, not a "
                       "torch.nn.Module")
    if weights is not None and "weights" not in parameters:
        load_state(network, load_checkpoint_state(weights), weights, strict=True)
    info = {"name": str(spec), "format": "entry point", "checkpoint": Path(weights).name if weights else None,
            "weights_sha256": file_sha256(weights) if weights else None, "state_sha256": state_sha256(network)}
    return network.eval(), info


def state_sha256(module: nn.Module) -> str:
    """sha256 over the module's parameters and buffers (names, dtypes, shapes, values): the weights
    it runs with, wherever they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()



def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
