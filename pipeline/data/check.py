"""Scan a whole dataset and report every problem at once, instead of failing on the first one."""

from __future__ import annotations

from pipeline.data import io
from pipeline.data.base import SegmentationDataset
from pipeline.errors import SkdError


def check_dataset(dataset: SegmentationDataset) -> list[str]:
    """Read every item of ``dataset`` and return one human-readable message per problem found.

    Reports unreadable or truncated images and labels, JPEG images whose compressed data is damaged
    (which the decoder conceals: see ``io.check_jpeg_data``), missing label files, label/image size
    mismatches and label values outside the class range; an empty list means the dataset is clean.
    """
    problems = []
    if len(set(dataset.ids)) != len(dataset.ids):
        seen, duplicates = set(), []
        for item_id in dataset.ids:
            if item_id in seen:
                duplicates.append(item_id)
            seen.add(item_id)
        problems.append(f"duplicate image ids: {', '.join(sorted(set(duplicates))[:10])}")
    image_paths = getattr(dataset, "image_paths", None)  # datasets stored as files
    for index in range(len(dataset)):
        found = dataset.check_item(index)
        if image_paths is not None and not any(str(image_paths[index]) in p for p in found):
            try:
                io.check_jpeg_data(image_paths[index])
            except SkdError as e:
                found.append(str(e))
        problems.extend(found)
    return problems


def describe_pairing(dataset: SegmentationDataset) -> str | None:
    """What a dataset that pairs files by name (the folder dataset) paired with what: the two name
    patterns (``X`` is the part an image and its mask share) and the first pair's id; None for others."""
    pairing = getattr(dataset, "pairing", None)
    if pairing is None or not len(dataset):
        return None
    return f"pairs: {pairing}; first: {dataset.ids[0]}"
