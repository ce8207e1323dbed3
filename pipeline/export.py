"""Export a network alone (no discriminator, teacher or training state): a student for deployment,
or a teacher (with its features) for ``cache-teacher --teacher FILE``. Each file carries skd's JSON
metadata, and the export is checked against PyTorch on a real image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import SkdError
from pipeline.models.exported import METADATA_FORMAT, METADATA_NAME

FORMATS = ("torchscript", "pt2", "onnx")


class LogitsOnly(nn.Module):
    """The network as a deployed model sees it: normalised image in, class logits (B×C×H/8×W/8) out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).logits


class LogitsAndFeatures(nn.Module):
    """The network as a teacher for skd's cache: normalised image in, (logits, features) out, both
    B×C×H/8×W/8, so that a store cached from the file holds the features pair-wise and feature
    distillation need."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.logits, out.features


def export_metadata(arch: dict[str, Any], *, input_hw: tuple[int, int] | None, with_features: bool,
                    class_names: list[str] | None) -> dict[str, Any]:
    """What ``cache-teacher`` reads from an exported file (docs/TEACHERS.md): the model, its input
    normalisation, outputs, the input size it is fixed to (None: any) and the class names."""
    return {"format": METADATA_FORMAT, "version": 1, "model": arch.get("name"), "arch": arch,
            "input": "float32 (N, 3, H, W): RGB / 255, minus mean, divided by std",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "outputs": ["logits", "features"] if with_features else ["logits"], "output_stride": 8,
            "input_hw": list(input_hw) if input_hw else None, "class_names": class_names}


def export_model(model: nn.Module, fmt: str, size: tuple[int, int], out: Path, *, arch: dict[str, Any] | None = None,
                 with_features: bool = False, class_names: list[str] | None = None) -> Path:
    """:func:`export_with_metadata`, returning the path alone."""
    return export_with_metadata(model, fmt, size, out, arch=arch, with_features=with_features,
                                class_names=class_names)[0]


def export_with_metadata(model: nn.Module, fmt: str, size: tuple[int, int], out: Path, *,
                         arch: dict[str, Any] | None = None, with_features: bool = False,
                         class_names: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``model`` in ``fmt`` for inputs of N×3×``size`` (ImageNet-normalised RGB), with skd's
    metadata (JSON: ``arch``, normalisation, outputs, fixed input size if any, ``class_names``):

    - "pt2": torch.export with the batch, height and width dynamic where torch.export allows (a
      dimension it has to specialise stays fixed, and the metadata says so); loaded with torch.export.load.
    - "torchscript": torch.jit.trace at ``size``, then run at a second size against PyTorch: if it
      differs there, the metadata fixes the input to ``size``.
    - "onnx": torch.onnx (needs the onnx and onnxscript packages); batch dynamic, height and width
      fixed at ``size``.

    ``with_features`` exports (logits, features) instead of the logits alone: a teacher for a cache
    with features. Returns the file and the metadata written into it."""
    if fmt not in FORMATS:
        raise SkdError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS)}")
    wrapped = LogitsAndFeatures(model) if with_features else LogitsOnly(model)
    arch = arch or {"name": type(model).__name__, "num_classes": getattr(model, "num_classes", None)}
    example = torch.zeros(1, 3, *size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)  # torch.export.save wants its suffix
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise SkdError("ONNX export needs the onnx and onnxscript packages (pip install onnx onnxscript; "
                           "onnxruntime too, to check the result)") from None
    names = ["logits", "features"] if with_features else ["logits"]

    written: dict[str, Any] = {}

    def metadata(input_hw: tuple[int, int] | None) -> str:
        written.update(export_metadata(arch, input_hw=input_hw, with_features=with_features, class_names=class_names))
        return json.dumps(written)

    try:
        with torch.no_grad():
            if fmt == "torchscript":
                traced = torch.jit.trace(wrapped, example)
                fixed = None if _traced_follows_size(traced, wrapped, size) else size
                torch.jit.save(traced, str(tmp), _extra_files={METADATA_NAME: metadata(fixed)})
            elif fmt == "pt2":
                # Traced on a batch of 2: torch.export specialises a dimension whose example size is 1.
                dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
                program = torch.export.export(wrapped, (torch.zeros(2, 3, *size),), dynamic_shapes={"images": dims})
                fixed = size if _program_fixes_size(program) else None
                torch.export.save(program, str(tmp), extra_files={METADATA_NAME: metadata(fixed)})
            else:
                # Batch only: with dynamic height and width the export runs, but the pyramid pooling's
                # bins stay laid out for `size` and other sizes come out wrong (measured: 90 % argmax
                # agreement at 120x160 for a 96x128 export), so the size is fixed and others refused.
                torch.onnx.export(wrapped, (example,), str(tmp), input_names=["image"], output_names=names,
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
                _add_onnx_metadata(tmp, metadata(size))
        tmp.replace(out)  # a half-written model never sits at the final path
    finally:
        tmp.unlink(missing_ok=True)
    return out, written


def _traced_follows_size(traced: torch.jit.ScriptModule, wrapped: nn.Module, size: tuple[int, int]) -> bool:
    """Whether a traced model computes what the model does at another input size (a trace records
    sizes the code turned into Python numbers as constants)."""
    other = torch.randn(1, 3, size[0] + 16, size[1] + 24, generator=torch.Generator().manual_seed(0))
    try:
        got, want = traced(other), wrapped(other)
    except Exception:  # a constant size that no longer fits
        return False
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    return all(g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
               for g, w in zip(got, want))


def _program_fixes_size(program: torch.export.ExportedProgram) -> bool:
    """Whether an exported program's height or width came out as a fixed number."""
    name = next(s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return any(isinstance(d, int) for d in node.meta["val"].shape[2:])


def _add_onnx_metadata(path: Path, text: str) -> None:
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {METADATA_NAME: text})
    onnx.save(proto, str(path))


def check_export(path: Path, fmt: str, model: nn.Module, image: torch.Tensor) -> dict[str, Any]:
    """Run the exported model and PyTorch on ``image`` (1×3×H×W normalised): max |Δ logits| and
    argmax agreement. ONNX is run with onnxruntime when installed (else the check is skipped)."""
    with torch.no_grad():
        reference = LogitsOnly(model)(image)
        if fmt == "torchscript":
            exported = torch.jit.load(str(path))(image)
        elif fmt == "pt2":
            exported = torch.export.load(str(path)).module()(image)
        else:
            try:
                import onnxruntime
            except ImportError:
                return {"checked": False, "reason": "onnxruntime is not installed"}
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            exported = torch.from_numpy(session.run(None, {"image": image.numpy()})[0])
    if isinstance(exported, (tuple, list)):  # exported with its features: (logits, features)
        exported = exported[0]
    return {"checked": True, "max_abs_diff": float((exported - reference).abs().max()),
            "argmax_agreement": float((exported.argmax(1) == reference.argmax(1)).float().mean())}
