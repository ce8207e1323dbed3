"""Segmentation metrics: a confusion matrix with IoU / mIoU / pixel accuracy, and report helpers."""

import math

import torch
from torch import Tensor


class ConfusionMatrix:
    """Accumulates a num_classes × num_classes confusion matrix (rows = ground truth, cols = prediction).

    The matrix lives on the CPU as int64, whatever device the updates come from, so partial
    results (per batch, per process) can be merged with :meth:`merge` or ``+=``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a prediction/ground-truth pair (integer tensors of the same, any, shape).

        Pixels whose target is ``ignore_index`` are dropped. Any other target (or prediction)
        outside [0, num_classes) is an error: it means the label mapping is wrong.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer tensors (class indices), not floating point")
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long().to(target.device)
        keep = target != self.ignore_index
        target = target[keep]
        pred = pred[keep]
        n = self.num_classes
        if target.numel() > 0:
            # One small device->host sync per update; cheap next to the forward pass.
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= n:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"target value {bad} is outside [0, {n}) and is not the ignore index {self.ignore_index}"
                )
            plo, phi = int(pred.min()), int(pred.max())
            if plo < 0 or phi >= n:
                bad = plo if plo < 0 else phi
                raise ValueError(f"prediction value {bad} is outside [0, {n})")
        counts = torch.bincount(target * n + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n).cpu()

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts into this one (same classes and ignore index); returns self."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class matrix (ignore {self.ignore_index})"
            )
        self.matrix += other.matrix
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def reset(self) -> None:
        self.matrix.zero_()

    def iou(self) -> Tensor:
        """Per-class IoU = TP / (TP + FP + FN) as float64; NaN for a class absent from both."""
        m = self.matrix.double()
        tp = m.diagonal()
        fp = m.sum(dim=0) - tp
        fn = m.sum(dim=1) - tp
        # 0 / 0 = NaN marks classes that never occur in prediction or ground truth.
        return tp / (tp + fp + fn)

    def miou(self) -> float:
        """Mean IoU over classes with a defined IoU (NaN if none)."""
        iou = self.iou()
        iou = iou[~iou.isnan()]
        if iou.numel() == 0:
            return float("nan")
        return float(iou.mean())

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels (NaN before any pixel was counted)."""
        total = int(self.matrix.sum())
        if total == 0:
            return float("nan")
        return int(self.matrix.diagonal().sum()) / total


def _format_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table: a header, a rule, one line per row.

    Floats are printed with 4 decimals, None/NaN as "n/a", missing keys as empty cells; numbers
    are right-aligned, text left-aligned.
    """
    cells = [[_format_cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(col), (int, float)) or row.get(col) is None for row in rows) and len(rows) > 0
        for col in columns
    ]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def evaluation_report(cm: ConfusionMatrix, class_names: list[str]) -> dict:
    """A JSON-able summary: mIoU, pixel accuracy and per-class IoU (None where undefined)."""
    if len(class_names) != cm.num_classes:
        raise ValueError(f"got {len(class_names)} class names for a {cm.num_classes}-class confusion matrix")
    iou = cm.iou().tolist()
    return {
        "miou": _json_float(cm.miou()),
        "pixel_accuracy": _json_float(cm.pixel_accuracy()),
        "per_class_iou": {name: _json_float(v) for name, v in zip(class_names, iou)},
    }
