"""A custom dataset in plain folders: ``<root>/images/<split>/**`` images, ``<root>/masks/<split>/**.png``
single-channel masks of class ids, paired by their path relative to the split folder without the
extension (sub-folders allowed, so names may repeat across sequences), and ``<root>/classes.yaml``
(or ``classes.json``) describing the classes::

    names: [background, road, car]      # class ids 0, 1, 2 in the masks
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional, RGB per class
    ignore_index: 255                    # optional, mask value meaning "not labelled"

Datasets whose files carry a role suffix (``0001_image.jpg`` / ``0001_label.png``) pair them with
the options ``image_suffix: _image`` and ``label_suffix: _label`` (``data.options`` in a config).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.data import io
from pipeline.data.base import FileSegmentationDataset
from pipeline.errors import SkdError


def load_classes(root: Path) -> tuple[list[str], list[tuple[int, int, int]], int, Path]:
    """Read and validate ``classes.yaml``/``classes.json``: (names, palette, raw ignore value, its path)."""
    for candidate in ("classes.yaml", "classes.yml", "classes.json"):
        path = root / candidate
        if path.is_file():
            break
    else:
        raise SkdError(f"class list not found: expected {root / 'classes.yaml'} (or classes.json) with 'names: [...]'")
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise SkdError(f"cannot parse class list {path}: {e}") from None
    if not isinstance(spec, dict) or "names" not in spec:
        raise SkdError(f"class list {path} must be a mapping with a 'names' list")

    names = spec["names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SkdError(f"class list {path}: 'names' must be a non-empty list of strings")
    if len(names) > 255:
        raise SkdError(f"class list {path} has {len(names)} classes; at most 255 are supported (255 means ignore)")

    palette = spec.get("palette")
    if palette is None:
        palette = io.voc_colormap(len(names))
    else:
        ok = (
            isinstance(palette, list) and len(palette) == len(names)
            and all(isinstance(c, (list, tuple)) and len(c) == 3
                    and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette)
        )
        if not ok:
            raise SkdError(f"class list {path}: 'palette' must hold {len(names)} [r, g, b] triples of integers 0..255")
        palette = [tuple(c) for c in palette]

    ignore = spec.get("ignore_index", 255)
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 65535:
        raise SkdError(f"class list {path}: 'ignore_index' must be an integer 0..65535, got {ignore!r}")
    if ignore < len(names):
        raise SkdError(f"class list {path}: 'ignore_index' {ignore} is also a class id (0..{len(names) - 1})")
    return list(names), palette, ignore, path


class FolderDataset(FileSegmentationDataset):
    """Images and single-channel masks in ``images/<split>/`` and ``masks/<split>/`` (subfolders allowed)."""

    name = "folder"

    def __init__(self, root: str | Path, split: str = "train", image_suffix: str = "", label_suffix: str = ""):
        root = io.require_dir(Path(root), "dataset root")
        self.class_names, self.palette, ignore, classes_file = load_classes(root)
        self.num_classes = len(self.class_names)
        self.split = split
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
        if not image_dir.is_dir() or not mask_dir.is_dir():
            missing = image_dir if not image_dir.is_dir() else mask_dir
            raise SkdError(
                f"split folder not found: {missing} (a folder dataset needs images/<split>/ and masks/<split>/, "
                "e.g. images/train and masks/train)"
            )
        images = io.list_images(image_dir, recursive=True)
        masks = io.list_images(mask_dir, (".png",), recursive=True)
        pairs = io.pair_by_stem(images, masks, image_dir, mask_dir, image_suffix, label_suffix)

        lut = io.make_lut({**{i: i for i in range(self.num_classes)}, ignore: 255}, size=max(256, ignore + 1))
        allowed = f"0..{self.num_classes - 1} are classes, {ignore} is ignore"
        # The class list changes what the mask values mean, so it is part of the fingerprint.
        self._finish_pairs(root, pairs, luts=[(lut, allowed)], extra_files=(classes_file,))
