"""Colour label maps and save image | ground truth | prediction comparisons as PNG."""

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def colorize(label, palette: list[tuple]) -> np.ndarray:
    """Map an H×W label map to an H×W×3 uint8 image with ``palette[class]``.

    The ignore value 255, and any value without a palette entry, is drawn black.
    """
    lab = _to_numpy(label)
    if lab.ndim != 2:
        raise ValueError(f"colorize expects an H×W label map, got shape {lab.shape}")
    if np.issubdtype(lab.dtype, np.floating):
        raise ValueError("colorize expects integer class indices, got a floating point array")
    pal = np.asarray(palette, dtype=np.int64)
    if pal.ndim != 2 or pal.shape[1] != 3 or (pal.size and (pal.min() < 0 or pal.max() > 255)):
        raise ValueError("palette entries must be (r, g, b) triples of values in 0..255")
    pal = pal.astype(np.uint8)
    lab = lab.astype(np.int64)
    out = np.zeros(lab.shape + (3,), dtype=np.uint8)
    known = (lab >= 0) & (lab < len(pal)) & (lab != 255)
    out[known] = pal[lab[known]]
    return out


def save_comparison(path, image_uint8_3HW, label, pred, palette: list[tuple]) -> None:
    """Write one PNG: the image, the coloured ground truth and the coloured prediction side by side.

    ``image_uint8_3HW`` is a 3×H×W uint8 image; ``label`` and ``pred`` are H×W. The file is
    written to a temporary name in the same folder and then renamed, so readers never see a
    half-written PNG.
    """
    image = _to_numpy(image_uint8_3HW)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a 3×H×W uint8 image, got shape {image.shape} and dtype {image.dtype}")
    image = image.transpose(1, 2, 0)
    gt = colorize(label, palette)
    pr = colorize(pred, palette)
    if gt.shape != image.shape or pr.shape != image.shape:
        raise ValueError(
            f"image {image.shape[:2]}, label {gt.shape[:2]} and prediction {pr.shape[:2]} must have the same size"
        )
    save_png(path, np.concatenate([image, gt, pr], axis=1))


def overlay(image_uint8_3HW, label, palette: list[tuple], alpha: float = 0.5) -> np.ndarray:
    """The coloured label blended over the image (H×W×3 uint8); ignored pixels keep the image."""
    image = _to_numpy(image_uint8_3HW).transpose(1, 2, 0).astype(np.float32)
    colours = colorize(label, palette).astype(np.float32)
    blend = np.where((_to_numpy(label) != 255)[..., None], (1 - alpha) * image + alpha * colours, image)
    return blend.round().clip(0, 255).astype(np.uint8)


def legend_strip(classes, names: list[str], palette: list[tuple], width: int, row: int = 16) -> np.ndarray:
    """An H×``width``×3 uint8 white strip listing ``classes`` (ids, in order) as a colour swatch and
    the class name per row; ``width`` grows to fit the longest name."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    labels = [names[c] if c < len(names) else f"class {c}" for c in classes]
    width = max(width, row + 12 + max((int(font.getlength(t)) for t in labels), default=0))
    canvas = Image.new("RGB", (width, 4 + row * len(labels)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (c, text) in enumerate(zip(classes, labels)):
        y = 2 + k * row
        draw.rectangle([2, y + 1, row - 1, y + row - 2], fill=tuple(int(v) for v in palette[c]))
        draw.text((row + 6, y + row / 2), text, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)


def overlay_with_legend(image_uint8_3HW, label, palette: list[tuple], names: list[str], alpha: float = 0.5) -> np.ndarray:
    """``overlay`` with a legend below it of the classes present in ``label`` (ignored pixels left out)."""
    top = overlay(image_uint8_3HW, label, palette, alpha)
    present = [int(c) for c in np.unique(_to_numpy(label)) if c != 255 and c < len(palette)]
    legend = legend_strip(present, names, palette, top.shape[1])
    canvas = np.full((top.shape[0] + legend.shape[0], legend.shape[1], 3), 255, dtype=np.uint8)
    canvas[: top.shape[0], : top.shape[1]] = top
    canvas[top.shape[0]:] = legend
    return canvas


def save_png(path, array: np.ndarray) -> None:
    """Write an H×W (grey / class indices) or H×W×3 uint8 array as PNG: to a temporary name in the
    same folder, then renamed, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def confusion_image(matrix, class_names: list[str], cell: int = 36) -> np.ndarray:
    """The confusion matrix (rows: true class, columns: predicted) as an RGB image, each row
    normalised to the fraction of that class's pixels: white 0 to dark blue 1, the percentage written
    in each cell of 1 % or more. Rows of classes absent from the labels stay grey."""
    from PIL import ImageDraw, ImageFont

    counts = _to_numpy(matrix).astype(np.float64)
    n = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    font = ImageFont.load_default()
    margin = 8 + max(int(font.getlength(name)) for name in class_names)
    size = margin + n * cell + 8
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    low, high = np.array([255, 255, 255]), np.array([8, 48, 107])
    for t in range(n):
        for p in range(n):
            x, y = margin + p * cell, margin + t * cell
            colour = (200, 200, 200) if totals[t, 0] == 0 else tuple(int(v) for v in (low + share[t, p] * (high - low)).round())
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(230, 230, 230))
            if totals[t, 0] > 0 and share[t, p] >= 0.01:
                text = f"{100 * share[t, p]:.0f}"
                ink = "white" if share[t, p] > 0.5 else "black"
                draw.text((x + cell / 2, y + cell / 2), text, fill=ink, font=font, anchor="mm")
    for k, name in enumerate(class_names):
        draw.text((margin - 4, margin + k * cell + cell / 2), name, fill="black", font=font, anchor="rm")
        label = Image.new("RGB", (margin, cell), "white")  # column names, written rotated
        ImageDraw.Draw(label).text((margin - 4, cell / 2), name, fill="black", font=font, anchor="rm")
        canvas.paste(label.rotate(-90, expand=True), (margin + k * cell, 0))
    draw.text((4, 4), "true \\ predicted", fill=(90, 90, 90), font=font)
    return np.asarray(canvas)
