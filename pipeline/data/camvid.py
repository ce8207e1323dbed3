"""CamVid, 11-class version used by SegNet: ``<root>/{split}/*`` images and ``<root>/{split}annot/*.png``."""

from __future__ import annotations

from pathlib import Path

from pipeline.data import io
from pipeline.data.base import FileSegmentationDataset
from pipeline.errors import SkdError

CLASS_NAMES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]

# SegNet's display colours (RGB), in class id order.
PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]

VOID_ID = 11

# 0..10 are classes, 11 is void (ignored); any other value means the file is not a SegNet label map.
LABEL_LUT = io.make_lut({**{i: i for i in range(11)}, VOID_ID: 255})

SPLITS = ("train", "val", "test")


class CamVid(FileSegmentationDataset):
    """CamVid in the SegNet layout; labels 0..10 kept, 11 (void) becomes 255."""

    name = "camvid"
    num_classes = 11

    def __init__(self, root: str | Path, split: str = "train"):
        self.class_names = list(CLASS_NAMES)
        self.palette = list(PALETTE)
        if split not in SPLITS:
            raise SkdError(f"unknown CamVid split {split!r}; expected one of {', '.join(SPLITS)}")
        self.split = split
        root = io.require_dir(Path(root), "CamVid root")
        image_dir = io.require_dir(root / split, f"CamVid {split} image")
        label_dir = io.require_dir(root / f"{split}annot", f"CamVid {split} label")
        images = io.list_images(image_dir, (".png", ".jpg", ".jpeg"))
        labels = io.list_images(label_dir, (".png",))
        pairs = io.pair_by_stem(images, labels, image_dir, label_dir)
        self._finish_pairs(root, pairs, luts=[(LABEL_LUT, "0..10 are classes, 11 is void")])
