"""The dataset interface every part of skd uses, and the shared code for datasets stored as files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data import io
from pipeline.errors import SkdError


class SegmentationDataset(Dataset):
    """Images with per-pixel class labels.

    Attributes:
        name: dataset kind ("synthetic", "camvid", ...).
        split: split name ("train", "val", ...).
        num_classes: number of classes; labels hold 0..num_classes-1 or ``ignore_index``.
        class_names: one name per class.
        palette: one RGB colour per class, for colouring predictions.
        ignore_index: label value of pixels excluded from losses and metrics (always 255).
        ids: stable, unique, ordered id per image (the cache keys its entries by these).
        fingerprint: sha256 hex identifying the exact data (file list and sizes, or generator).

    ``dataset[i]`` is ``{"image": uint8 3×H×W RGB, "label": int64 H×W, "id": str}``.
    """

    name: str
    split: str
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = 255
    ids: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of image ``index``, without decoding it where the format allows."""
        raise NotImplementedError

    def check_item(self, index: int) -> list[str]:
        """All problems with item ``index`` as messages (empty when it is fine)."""
        try:
            item = self[index]
        except SkdError as e:
            return [str(e)]
        return check_sample(item, self.num_classes, self.ignore_index, self.ids[index])

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} {self.split} with {len(self)} images")
        return index % len(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, images={len(self)}, classes={self.num_classes})"


def check_sample(item: dict, num_classes: int, ignore_index: int, item_id: str) -> list[str]:
    """Problems with an already-loaded sample (types, shapes, label values)."""
    image, label = item["image"], item["label"]
    problems = []
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        problems.append(f"{item_id}: image must be uint8 3xHxW, got {image.dtype} {tuple(image.shape)}")
    if label.dtype != torch.int64 or label.ndim != 2:
        problems.append(f"{item_id}: label must be int64 HxW, got {label.dtype} {tuple(label.shape)}")
    elif image.ndim == 3 and tuple(label.shape) != tuple(image.shape[1:]):
        problems.append(f"{item_id}: label is {tuple(label.shape)} but image is {tuple(image.shape[1:])}")
    bad = label[((label < 0) | (label >= num_classes)) & (label != ignore_index)]
    if bad.numel():
        problems.append(f"{item_id}: label has values {sorted(set(bad.unique().tolist()))} outside 0..{num_classes - 1} and {ignore_index}")
    return problems


class FileSegmentationDataset(SegmentationDataset):
    """A dataset of (image file, label file) pairs whose raw label values map through a lookup table.

    Subclasses find the files and set ``image_paths``, ``label_paths``, ``ids`` (same order), and
    per item a lookup table (``_luts[_lut_of[i]]``) plus a description of its allowed values.
    """

    root: Path
    image_paths: list[Path]
    label_paths: list[Path]

    def _finish_pairs(self, root: Path, pairs: list[tuple[str, Path, Path]], luts: list[tuple[np.ndarray, str]],
                      extra_files: tuple[Path, ...] = ()) -> None:
        """``_finish`` for (id, image, label) triples as ``io.pair_by_stem`` returns them."""
        self._finish(root, ids=[key for key, _, _ in pairs], image_paths=[image for _, image, _ in pairs],
                     label_paths=[label for _, _, label in pairs], luts=luts, extra_files=extra_files)

    def _finish(self, root: Path, ids: list[str], image_paths: list[Path], label_paths: list[Path],
                luts: list[tuple[np.ndarray, str]], lut_of: list[int] | None = None,
                extra_files: tuple[Path, ...] = ()) -> None:
        """Store the file lists and compute the fingerprint; called at the end of ``__init__``.

        ``extra_files`` (e.g. a class list) are fingerprinted along with the images and labels.
        """
        if not image_paths:
            raise SkdError(f"no images found for {self.name} split {self.split!r} under {root}")
        if len(set(ids)) != len(ids):
            raise SkdError(f"duplicate image ids in {self.name} split {self.split!r} under {root}")
        self.root = root
        self.ids = ids
        self.image_paths = image_paths
        self.label_paths = label_paths
        self._luts = luts
        self._lut_of = lut_of if lut_of is not None else [0] * len(ids)
        self.fingerprint = io.files_fingerprint(root, image_paths + label_paths + list(extra_files))

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image = io.read_image(image_path)
        raw = io.read_label(label_path)
        io.check_same_size(image_path, tuple(image.shape[1:]), label_path, raw.shape)
        lut, allowed = self._luts[self._lut_of[index]]
        label = io.map_label(raw, lut, label_path, allowed)
        return {"image": image, "label": torch.from_numpy(label), "id": self.ids[index]}

    def image_size(self, index: int) -> tuple[int, int]:
        return io.image_size(self.image_paths[self._check_index(index)])

    def check_item(self, index: int) -> list[str]:
        """Check image and label separately so that both problems are reported when both are bad."""
        index = self._check_index(index)
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        problems = []
        image_hw = raw = None
        try:
            image_hw = tuple(io.read_image(image_path).shape[1:])
        except SkdError as e:
            problems.append(str(e))
        try:
            raw = io.read_label(label_path)
        except SkdError as e:
            problems.append(str(e))
        if raw is not None:
            if image_hw is not None:
                try:
                    io.check_same_size(image_path, image_hw, label_path, raw.shape)
                except SkdError as e:
                    problems.append(str(e))
            lut, allowed = self._luts[self._lut_of[index]]
            try:
                io.map_label(raw, lut, label_path, allowed)
            except SkdError as e:
                problems.append(str(e))
        return problems
