"""Predict segmentation maps for image files: raw label PNGs, coloured masks and overlays."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.data.io import read_image
from pipeline.data.transforms import normalize
from pipeline.errors import SkdError
from pipeline.inference import predict
from pipeline.visualize import colorize, overlay_with_legend, save_png

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns, in the order given; each input
    must match at least one image, and two images may not share a name (their outputs would)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise SkdError(f"{item}: no image file, folder of images or matching pattern")
        paths += found
    stems = [p.stem for p in paths]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise SkdError(f"several inputs are named {', '.join(clashes)}: their predictions would overwrite each other")
    return paths


def predict_files(model: nn.Module, paths: Sequence[Path], out: Path, palette: list[tuple], device: torch.device,
                  scales: Sequence[float] = (1.0,), flip: bool = False, window: tuple[int, int] | None = None,
                  progress: bool = True, names: Sequence[str] = ()) -> list[Path]:
    """For each image write OUT/<name>_label.png (class indices, 255 nowhere), OUT/<name>_color.png
    and OUT/<name>_overlay.png (with a legend below of the classes present, named by ``names``);
    returns the label files."""
    model = model.to(device).eval()
    written = []
    for path in tqdm(paths, desc="predict", unit="img", disable=not progress):
        image = read_image(path)  # names the file if it is missing or corrupt
        log_probs, _ = predict(model, normalize(image[None].to(device)), scales=scales, flip=flip, window=window)
        log_probs = F.interpolate(log_probs, size=image.shape[-2:], mode="bilinear", align_corners=False)
        label = log_probs.argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = out / path.stem
        save_png(f"{stem}_label.png", label)
        save_png(f"{stem}_color.png", colorize(label, palette))
        save_png(f"{stem}_overlay.png", overlay_with_legend(image, label, palette, list(names)))
        written.append(Path(f"{stem}_label.png"))
    return written


def palette_for(dataset: str | None, num_classes: int) -> list[tuple]:
    """The named dataset's palette when it has ``num_classes`` colours, else a VOC-style one."""
    from pipeline.data import ade20k, camvid, cityscapes, io, synthetic

    known = {"camvid": camvid.PALETTE, "cityscapes": cityscapes.PALETTE, "ade20k": ade20k.PALETTE,
             "synthetic": synthetic.PALETTE}
    palette = known.get(dataset or "")
    return list(palette) if palette is not None and len(palette) == num_classes else io.voc_colormap(num_classes)


def classes_for(dataset: str | None, num_classes: int, root: str | Path | None = None) -> tuple[list[str], list[tuple]]:
    """Class names and palette to colour a ``num_classes`` model's predictions with: a folder
    dataset's from its ``classes.yaml`` (under ``root``, which it needs), a known dataset's when the
    class counts agree, else ``class <i>`` and a VOC-style palette."""
    if dataset == "folder":
        from pipeline.data.folder import load_classes

        if root is None:
            raise SkdError("--dataset folder needs --data-root (or a --config with data.root): the folder holding "
                           "classes.yaml, whose names and palette colour the predictions")
        names, palette, _, path = load_classes(Path(root))
        if len(names) != num_classes:
            raise SkdError(f"{path} lists {len(names)} classes but the model predicts {num_classes}")
        return names, palette
    from pipeline.data import DATASETS, ade20k, camvid, cityscapes, synthetic

    if dataset is not None and dataset not in DATASETS:
        raise SkdError(f"unknown dataset {dataset!r} for colours (known: {', '.join(sorted(DATASETS))})")
    known = {"camvid": camvid, "cityscapes": cityscapes, "ade20k": ade20k, "synthetic": synthetic}
    module = known.get(dataset or "")
    if module is not None and len(module.CLASS_NAMES) == num_classes:
        return list(module.CLASS_NAMES), list(module.PALETTE)
    return [f"class {i}" for i in range(num_classes)], palette_for(None, num_classes)


__all__ = ["classes_for", "expand_inputs", "palette_for", "predict_files"]
