"""ADE20K SceneParsing (ADEChallengeData2016): ``images/{training,validation}/*.jpg`` with
``annotations/{training,validation}/*.png``; 0 ("other") is ignored, 1..150 become 0..149."""

from __future__ import annotations

from pathlib import Path

from pipeline.data import io
from pipeline.data.base import FileSegmentationDataset
from pipeline.errors import SkdError

# objectInfo150 order (first name of each entry).
CLASS_NAMES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]

PALETTE = io.voc_colormap(len(CLASS_NAMES))

LABEL_LUT = io.make_lut({0: 255, **{i: i - 1 for i in range(1, 151)}})

# Users say train/val; the dataset's folders say training/validation. Both are accepted.
SPLIT_FOLDERS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


class ADE20K(FileSegmentationDataset):
    """ADE20K with 150 classes; images have varying sizes. Ids are file stems (``ADE_train_00000001``)."""

    name = "ade20k"
    num_classes = 150

    def __init__(self, root: str | Path, split: str = "train"):
        self.class_names = list(CLASS_NAMES)
        self.palette = list(PALETTE)
        if split not in SPLIT_FOLDERS:
            raise SkdError(f"unknown ADE20K split {split!r}; expected train or val")
        folder = SPLIT_FOLDERS[split]
        self.split = "train" if folder == "training" else "val"
        root = io.require_dir(Path(root), "ADE20K root")
        image_dir = io.require_dir(root / "images" / folder, f"ADE20K {split} image")
        label_dir = io.require_dir(root / "annotations" / folder, f"ADE20K {split} label")
        images = io.list_images(image_dir, (".jpg", ".jpeg", ".png"))
        labels = io.list_images(label_dir, (".png",))
        pairs = io.pair_by_stem(images, labels, image_dir, label_dir)
        self._finish_pairs(root, pairs, luts=[(LABEL_LUT, "0 is 'other', 1..150 are classes")])
