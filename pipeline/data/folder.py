"""A custom dataset in plain folders: ``<root>/images/<split>/**`` images, ``<root>/masks/<split>/**.png``
single-channel masks of class ids, paired by their path relative to the split folder without the
extension (sub-folders allowed, so names may repeat across sequences), and ``<root>/classes.yaml``
(or ``classes.json``) describing the classes::

    names: [background, road, car]      # class ids 0, 1, 2 in the masks
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional, RGB per class
    ignore_index: 255                    # optional, mask value meaning "not labelled"

Datasets whose files carry a role suffix (``0001_image.jpg`` / ``0001_label.png``) pair them with
the options ``image_suffix: _image`` and ``label_suffix: _label`` (``data.options`` in a config); a
suffix may include the extension (``_gtFine_labelIds.png``). With a suffix, only the files that carry
it are read, so a folder may hold other files too (Cityscapes' ``_gtFine_color.png``, or the images
beside their masks). The options ``images`` and ``masks`` name the two folders under the root, with
``{split}`` where the split's name goes (default ``images/{split}`` and ``masks/{split}``). A
Cityscapes-style root, for example::

    options: {images: "leftImg8bit/{split}", masks: "gtFine/{split}",
              image_suffix: _leftImg8bit.png, label_suffix: _gtFine_labelIds.png}
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


def split_folder(root: Path, pattern: str, split: str, option: str) -> Path:
    """``root / pattern`` with ``{split}`` replaced; the folder must lie under the root (the dataset's
    fingerprint is taken over paths relative to it) and differ from split to split."""
    if not isinstance(pattern, str) or "{split}" not in pattern:
        raise SkdError(f"folder dataset option {option}: {pattern!r} must contain {{split}} where the split's name "
                       f"goes, e.g. {option}: \"{'leftImg8bit' if option == 'images' else 'gtFine'}/{{split}}\"")
    relative = Path(pattern.replace("{split}", split))
    if relative.is_absolute() or ".." in relative.parts:
        raise SkdError(f"folder dataset option {option}: {pattern!r} must be a folder under the dataset root {root}")
    return root / relative


def split_suffix(suffix: str) -> tuple[str, str]:
    """A role suffix as (the part before the extension, the extension in lower case, or "")."""
    extension = "." + suffix.rsplit(".", 1)[1].lower() if "." in suffix else ""
    return (suffix[: -len(extension)], extension) if extension in io.IMAGE_EXTENSIONS else (suffix, "")


def with_suffix_only(files: list[Path], suffix: str) -> tuple[list[Path], str]:
    """The files whose name ends with ``suffix`` and the suffix without its extension (what
    ``io.pair_by_stem`` strips from the stem). A suffix with an extension (``_gtFine_labelIds.png``)
    matches the whole name, one without (``_label``) the name before the extension."""
    if not suffix:
        return files, ""
    stem, extension = split_suffix(suffix)
    return [f for f in files if f.stem.endswith(stem) and extension in ("", f.suffix.lower())], stem


class FolderDataset(FileSegmentationDataset):
    """Images and single-channel masks in ``images/<split>/`` and ``masks/<split>/`` (subfolders
    allowed), or the folders that the options ``images`` and ``masks`` name."""

    name = "folder"

    def __init__(self, root: str | Path, split: str = "train", image_suffix: str = "", label_suffix: str = "",
                 images: str = "images/{split}", masks: str = "masks/{split}"):
        root = io.require_dir(Path(root), "dataset root")
        self.class_names, self.palette, ignore, classes_file = load_classes(root)
        self.num_classes = len(self.class_names)
        self.split = split
        image_dir, mask_dir = split_folder(root, images, split, "images"), split_folder(root, masks, split, "masks")
        if not image_dir.is_dir() or not mask_dir.is_dir():
            missing = image_dir if not image_dir.is_dir() else mask_dir
            raise SkdError(
                f"split folder not found: {missing} (a folder dataset needs {images.replace('{split}', '<split>')}/ "
                f"and {masks.replace('{split}', '<split>')}/ under its root; the options images and masks name others)"
            )
        if image_dir == mask_dir and (not image_suffix or not label_suffix or image_suffix == label_suffix):
            raise SkdError(f"images and masks are both in {image_dir}: give the options image_suffix and label_suffix "
                           "(e.g. _image and _label) that tell them apart")
        image_files, image_stem = with_suffix_only(io.list_images(image_dir, recursive=True), image_suffix)
        mask_files, mask_stem = with_suffix_only(io.list_images(mask_dir, (".png",), recursive=True), label_suffix)
        if image_dir == mask_dir:  # a mask is a PNG too: it is no image even when its name also ends in image_suffix
            mask_set = set(mask_files)
            image_files = [f for f in image_files if f not in mask_set]
        for files, folder, suffix, what in ((image_files, image_dir, image_suffix, "image"),
                                            (mask_files, mask_dir, label_suffix, "mask")):
            if not files and suffix:
                raise SkdError(f"no {what} files ending in {suffix!r} under {folder} (the option "
                               f"{'image_suffix' if what == 'image' else 'label_suffix'})")
        pairs = io.pair_by_stem(image_files, mask_files, image_dir, mask_dir, image_stem, mask_stem)
        # What check-data says was paired with what: X stands for the part the two names share.
        image_name = f"X{image_suffix}" if split_suffix(image_suffix)[1] else f"X{image_suffix}.*"
        mask_name = f"X{label_suffix}" if split_suffix(label_suffix)[1] else f"X{label_suffix}.png"
        self.pairing = f"{image_dir}/**/{image_name} ↔ {mask_dir}/**/{mask_name}"

        lut = io.make_lut({**{i: i for i in range(self.num_classes)}, ignore: 255}, size=max(256, ignore + 1))
        allowed = f"0..{self.num_classes - 1} are classes, {ignore} is ignore"
        # The class list changes what the mask values mean, so it is part of the fingerprint.
        self._finish_pairs(root, pairs, luts=[(lut, allowed)], extra_files=(classes_file,))
