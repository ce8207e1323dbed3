"""Confusion matrix, reports and visualisation checked against hand-computed values."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.metrics import ConfusionMatrix, evaluation_report, format_table
from pipeline.visualize import colorize, save_comparison

# Target / prediction pair worked out by hand (one ignored pixel):
#   target [[0, 0, 1], [2, 255, 1]]
#   pred   [[0, 1, 1], [2,   0, 0]]
# Counted pixels (gt -> pred): 0->0, 0->1, 1->1, 2->2, 1->0.
#   class 0: TP 1, FP 1 (gt 1 -> 0), FN 1 (gt 0 -> 1): IoU 1/3
#   class 1: TP 1, FP 1 (gt 0 -> 1), FN 1 (gt 1 -> 0): IoU 1/3
#   class 2: TP 1, FP 0, FN 0: IoU 1
#   pixel accuracy 3/5, mIoU (1/3 + 1/3 + 1)/3 = 5/9
TARGET = torch.tensor([[0, 0, 1], [2, 255, 1]])
PRED = torch.tensor([[0, 1, 1], [2, 0, 0]])


def test_confusion_matrix_hand_values():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    iou = cm.iou()
    assert iou.dtype == torch.float64
    assert iou.tolist() == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert cm.miou() == pytest.approx(5 / 9)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_left_out_of_miou():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    iou = cm.iou()
    assert math.isnan(iou[3].item())
    assert iou[:3].tolist() == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert cm.miou() == pytest.approx(5 / 9)


def test_class_only_predicted_has_zero_iou():
    # Class 3 predicted once but never in the ground truth: TP 0, FP 1 -> IoU 0 (not NaN).
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([3, 0]), torch.tensor([0, 0]))
    assert cm.iou()[3].item() == 0.0
    # class 0: TP 1, FN 1 -> 1/2; classes 1, 2 absent.
    assert cm.miou() == pytest.approx((0.5 + 0.0) / 2)


def test_empty_matrix():
    cm = ConfusionMatrix(2)
    assert math.isnan(cm.miou())
    assert math.isnan(cm.pixel_accuracy())
    cm.update(torch.tensor([0]), torch.tensor([255]))
    assert cm.matrix.sum().item() == 0


def test_merge_equals_one_shot_update():
    torch.manual_seed(0)
    target = torch.randint(0, 5, (4, 6, 7))
    target[target == 4] = 255
    pred = torch.randint(0, 4, (4, 6, 7))
    one_shot = ConfusionMatrix(4)
    one_shot.update(pred, target)

    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(pred[:1], target[:1])
    b.update(pred[1:], target[1:])
    a += b
    assert torch.equal(a.matrix, one_shot.matrix)
    c = ConfusionMatrix(4)
    c.merge(a)
    assert torch.equal(c.matrix, one_shot.matrix)
    # Updating twice accumulates.
    a.update(pred, target)
    assert torch.equal(a.matrix, 2 * one_shot.matrix)
    a.reset()
    assert a.matrix.sum().item() == 0
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(5))


def test_uint8_and_any_shape_inputs():
    cm = ConfusionMatrix(3)
    cm.update(PRED.flatten().to(torch.uint8), TARGET.flatten().to(torch.uint8))
    assert cm.matrix.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_out_of_range_target_raises():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="3"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, -1]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    # Nothing was counted by the failed updates.
    assert cm.matrix.sum().item() == 0


def test_other_ignore_index():
    cm = ConfusionMatrix(3, ignore_index=-1)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, -1, 2]))
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_evaluation_report_is_json_with_none_for_nan():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    report = evaluation_report(cm, ["road", "car", "sky", "boat"])
    text = json.dumps(report, allow_nan=False)
    back = json.loads(text)
    assert back["miou"] == pytest.approx(5 / 9)
    assert back["pixel_accuracy"] == pytest.approx(3 / 5)
    assert back["per_class_iou"]["road"] == pytest.approx(1 / 3)
    assert back["per_class_iou"]["sky"] == pytest.approx(1.0)
    assert back["per_class_iou"]["boat"] is None
    with pytest.raises(ValueError):
        evaluation_report(cm, ["road"])


def test_format_table_layout():
    rows = [
        {"class": "road", "iou": 0.5},
        {"class": "traffic sign", "iou": float("nan")},
        {"class": "sky", "iou": 1.0},
    ]
    text = format_table(rows, ["class", "iou"])
    lines = text.splitlines()
    assert len(lines) == 5  # header, rule, three rows
    assert lines[0].split() == ["class", "iou"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["road", "0.5000"]
    assert lines[3].endswith("n/a")
    assert lines[4].split() == ["sky", "1.0000"]
    # Fixed width: the numeric column is right-aligned, so every row ends at the same column.
    assert len({len(line) for line in lines[2:]}) == 1
    assert lines[2].index("0.5000") == lines[4].index("1.0000")


PALETTE = [(128, 64, 128), (70, 70, 70), (0, 0, 142)]


def test_colorize_palette_and_ignore():
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = colorize(label, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [128, 64, 128]
    assert out[0, 1].tolist() == [70, 70, 70]
    assert out[1, 0].tolist() == [0, 0, 142]
    assert out[1, 1].tolist() == [0, 0, 0]
    # Tensors work the same way.
    assert np.array_equal(colorize(torch.from_numpy(label).long(), PALETTE), out)


def test_save_comparison_writes_three_panels(tmp_path):
    h, w = 3, 4
    image = np.zeros((3, h, w), dtype=np.uint8)
    image[0] = 200  # a red image
    label = np.zeros((h, w), dtype=np.int64)
    label[0, 0] = 255
    pred = np.full((h, w), 2, dtype=np.int64)
    path = tmp_path / "sub" / "cmp.png"
    save_comparison(path, torch.from_numpy(image), label, pred, PALETTE)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cmp.png"]  # no temp file left
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape == (h, 3 * w, 3)
    assert arr[1, 1].tolist() == [200, 0, 0]  # image panel
    assert arr[1, w + 1].tolist() == list(PALETTE[0])  # ground truth panel
    assert arr[0, w].tolist() == [0, 0, 0]  # ignored pixel drawn black
    assert arr[1, 2 * w + 1].tolist() == list(PALETTE[2])  # prediction panel
    with pytest.raises(ValueError):
        save_comparison(tmp_path / "bad.png", image, label[:2], pred, PALETTE)
