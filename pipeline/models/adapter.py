"""Any segmentation network as an skd model.

skd's own networks return a :class:`SegOutput` on the stride-8 grid (ceil(H/8) x ceil(W/8)); the
store, the training samples and every loss are laid out on that grid. :class:`AdaptedModel` puts
another network there: its logits (and auxiliary logits, and features) at whatever stride it
computes them are resampled bilinearly onto the grid, so nothing downstream changes.

Features for pair-wise and feature distillation come from a layer named as in
``network.named_modules()`` (a forward hook on that module's output, or on its input with
``"NAME:input"``), or from the network's own output when it returns them.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import SkdError
from pipeline.models.outputs import SegOutput

OUTPUT_STRIDE = 8  # pipeline.inference.OUTPUT_STRIDE; inference imports nothing from models, nor models from it


def split_network_output(out) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(logits, aux, features) from what a network returns: a Tensor (logits), a (logits, features)
    tuple/list, a dict with "out" (torchvision) or "logits" and optional "aux" / "features", or skd's
    SegOutput. Anything else raises SkdError saying what came back."""
    if isinstance(out, SegOutput):  # a NamedTuple: before the plain tuple case
        return out.logits, out.aux, out.features
    if isinstance(out, Tensor):
        return out, None, None
    if isinstance(out, Mapping):
        logits = out.get("out", out.get("logits"))
        if isinstance(logits, Tensor):
            return logits, out.get("aux"), out.get("features")
        raise SkdError(f"the network returned a dict with keys {sorted(map(str, out))}: skd needs the logits "
                       "under 'out' (as torchvision's models) or 'logits'")
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out):
        return out[0], None, out[1]
    what = type(out).__name__ + (f" of {len(out)} items" if isinstance(out, (tuple, list)) else "")
    raise SkdError(f"the network returned a {what}: skd needs logits (N, C, h, w), a (logits, features) pair, "
                   "or a dict with 'out' or 'logits'")


def find_module(network: nn.Module, layer: str) -> nn.Module:
    """The module named ``layer`` in ``network``; SkdError with the closest names if there is none."""
    modules = dict(network.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    names = [name for name in modules if name]
    # Names that extend what was written first (a name cut short), then the most similar ones.
    close = [name for name in names if name.startswith(layer)]
    close += [name for name in difflib.get_close_matches(layer, names, n=5, cutoff=0.5) if name not in close]
    close = close[:5]
    shown = close or names[-5:]
    raise SkdError(f"feature layer {layer!r} is not a module of {type(network).__name__}; "
                   f"{'closest names' if close else 'some of its names'}: {', '.join(shown)}")


def _to_grid(x: Tensor | None, grid: tuple[int, int]) -> Tensor | None:
    if x is None or tuple(x.shape[-2:]) == grid:
        return x
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


class AdaptedModel(nn.Module):
    """Any segmentation network as an skd model: ``forward(x) -> SegOutput`` on skd's stride-8 grid.

    ``network(x)`` may return any form :func:`split_network_output` reads. Its logits, aux logits
    and features, at any stride, are resampled bilinearly (align_corners=False) onto the
    ceil(H/8) x ceil(W/8) grid. ``feature_layer`` names the module whose output (or, as
    ``"NAME:input"``, whose input) are the features; without it the network's own features are
    used if it returns any, else ``features`` is None and ``feature_channels`` 0.

    One probe pass (eval mode, no gradients, ``probe_hw`` pixels) measures ``num_classes``,
    ``feature_channels``, ``native_stride`` (input size / the network's own logits size: 8, 16,
    32, or 1 for logits upsampled to the input) and ``feature_stride`` (the same for the features).
    Auxiliary logits are returned in training mode only, as skd's networks do.
    """

    output_stride = OUTPUT_STRIDE

    def __init__(self, network: nn.Module, *, feature_layer: str | None = None,
                 probe_hw: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.network = network
        self.feature_layer = feature_layer
        self._captured: Tensor | None = None
        if feature_layer is not None:
            name, _, where = feature_layer.partition(":")
            if where not in ("", "input", "output"):
                raise SkdError(f"feature layer {feature_layer!r}: write NAME, NAME:output or NAME:input")
            hook = self._capture_input if where == "input" else self._capture_output
            find_module(network, name).register_forward_hook(hook)
        self._probe(probe_hw)

    def _capture_output(self, module: nn.Module, args, output) -> None:
        self._captured = output

    def _capture_input(self, module: nn.Module, args, output) -> None:
        self._captured = args[0]

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        self._captured = None
        logits, aux, features = split_network_output(self.network(x))
        if self.feature_layer is not None:
            features, self._captured = self._captured, None  # never keep a graph alive between passes
            if not isinstance(features, Tensor) or features.dim() != 4:
                what = "was not run" if features is None else f"gave a {type(features).__name__}"
                raise SkdError(f"feature layer {self.feature_layer!r} {what} in the forward pass: name a module "
                               "that runs and returns a (N, C, h, w) tensor")
        if logits.dim() != 4:
            raise SkdError(f"the network's logits have shape {tuple(logits.shape)}; skd needs (N, C, h, w)")
        return logits, aux, features

    @torch.no_grad()
    def _probe(self, probe_hw: tuple[int, int]) -> None:
        was_training = self.network.training
        parameter = next(self.network.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        self.network.eval()
        try:
            logits, _, features = self._run(torch.zeros(1, 3, *probe_hw, device=device))
        finally:
            self.network.train(was_training)
        self.num_classes = int(logits.shape[1])
        self.native_stride = max(1, round(probe_hw[0] / logits.shape[-2]))
        self.feature_channels = int(features.shape[1]) if features is not None else 0
        self.feature_stride = max(1, round(probe_hw[0] / features.shape[-2])) if features is not None else None

    def forward(self, x: Tensor) -> SegOutput:
        grid = (-(-x.shape[-2] // OUTPUT_STRIDE), -(-x.shape[-1] // OUTPUT_STRIDE))  # ceil, as output_size
        logits, aux, features = self._run(x)
        return SegOutput(logits=_to_grid(logits, grid), aux=_to_grid(aux, grid) if self.training else None,
                         features=_to_grid(features, grid))
