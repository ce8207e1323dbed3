"""Segmentation datasets: each yields ``{"image": uint8 3×H×W, "label": int64 H×W (255 = ignore), "id": str}``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from pipeline.data.ade20k import ADE20K
from pipeline.data.base import SegmentationDataset
from pipeline.data.camvid import CamVid
from pipeline.data.check import check_dataset
from pipeline.data.cityscapes import Cityscapes
from pipeline.data.folder import FolderDataset
from pipeline.data.synthetic import SyntheticStreets
from pipeline.errors import SkdError

DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "synthetic": SyntheticStreets,
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "folder": FolderDataset,
}


def build_dataset(name: str, root: str | Path | None, split: str, **options) -> SegmentationDataset:
    """Construct dataset ``name`` for ``split`` from ``root`` (default ``./data/<name>``).

    ``options`` are passed to the dataset's constructor (e.g. ``size``, ``length``, ``seed`` for
    "synthetic"); the synthetic dataset needs no files and ignores ``root``.
    """
    if name not in DATASETS:
        raise SkdError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    constructor = DATASETS[name]
    accepted = set(inspect.signature(constructor).parameters) - {"root", "split"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        hint = f"accepted: {', '.join(sorted(accepted))}" if accepted else "it takes none"
        raise SkdError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r} ({hint})")
    if name == "synthetic":
        return constructor(split=split, **options)
    root = Path("data") / name if root is None else Path(root)
    if not root.is_dir():
        raise SkdError(f"{name} dataset root directory not found: {root}")
    return constructor(root, split=split, **options)


__all__ = [
    "ADE20K", "CamVid", "Cityscapes", "DATASETS", "FolderDataset", "SegmentationDataset",
    "SyntheticStreets", "build_dataset", "check_dataset",
]
