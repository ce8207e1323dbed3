"""Cityscapes fine annotations: ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` with
``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png`` (used as is) or ``*_gtFine_labelIds.png``
(mapped from the 34 label ids to the 19 train ids)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data import io
from pipeline.data.base import FileSegmentationDataset
from pipeline.errors import SkdError

# The official cityscapesScripts table (labels.py): label id -> train id, 255 = ignored in evaluation.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    0: 255,   # unlabeled
    1: 255,   # ego vehicle
    2: 255,   # rectification border
    3: 255,   # out of roi
    4: 255,   # static
    5: 255,   # dynamic
    6: 255,   # ground
    7: 0,     # road
    8: 1,     # sidewalk
    9: 255,   # parking
    10: 255,  # rail track
    11: 2,    # building
    12: 3,    # wall
    13: 4,    # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,    # pole
    18: 255,  # polegroup
    19: 6,    # traffic light
    20: 7,    # traffic sign
    21: 8,    # vegetation
    22: 9,    # terrain
    23: 10,   # sky
    24: 11,   # person
    25: 12,   # rider
    26: 13,   # car
    27: 14,   # truck
    28: 15,   # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,   # train
    32: 17,   # motorcycle
    33: 18,   # bicycle
}

# 256-entry table for labelIds images; values outside 0..33 are not label ids and are ignored too.
LABEL_ID_LUT = io.make_lut(LABEL_ID_TO_TRAIN_ID, default=255)

# labelTrainIds images already hold 0..18 or 255.
TRAIN_ID_LUT = io.make_lut({**{i: i for i in range(19)}, 255: 255})

CLASS_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]

# Official colours (RGB) in train id order.
PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"


class Cityscapes(FileSegmentationDataset):
    """Cityscapes with 19 train classes; ids look like ``frankfurt/frankfurt_000000_000294``."""

    name = "cityscapes"
    num_classes = 19

    def __init__(self, root: str | Path, split: str = "train"):
        self.class_names = list(CLASS_NAMES)
        self.palette = list(PALETTE)
        if split not in SPLITS:
            raise SkdError(f"unknown Cityscapes split {split!r}; expected one of {', '.join(SPLITS)}")
        self.split = split
        root = io.require_dir(Path(root), "Cityscapes root")
        image_dir = io.require_dir(root / "leftImg8bit" / split, f"Cityscapes {split} image")
        label_dir = io.require_dir(root / "gtFine" / split, f"Cityscapes {split} label")

        ids, images, labels, lut_of = [], [], [], []
        for image in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            city = image.parent.name
            stem = image.name[: -len(IMAGE_SUFFIX)]
            # Prefer train ids when the official preparation script has produced them.
            train_ids = label_dir / city / f"{stem}_gtFine_labelTrainIds.png"
            label_ids = label_dir / city / f"{stem}_gtFine_labelIds.png"
            if train_ids.is_file():
                labels.append(train_ids)
                lut_of.append(1)
            elif label_ids.is_file():
                labels.append(label_ids)
                lut_of.append(0)
            else:
                raise SkdError(f"image file {image} has no label file: expected {label_ids} or {train_ids}")
            ids.append(f"{city}/{stem}")
            images.append(image)
        self._finish(
            root, ids, images, labels,
            luts=[(LABEL_ID_LUT, "label ids"), (TRAIN_ID_LUT, "train ids 0..18 and 255")],
            lut_of=lut_of,
        )
