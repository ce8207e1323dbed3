"""Scan a whole dataset and report every problem at once, instead of failing on the first one."""

from __future__ import annotations

from pipeline.data.base import SegmentationDataset


def check_dataset(dataset: SegmentationDataset) -> list[str]:
    """Read every item of ``dataset`` and return one human-readable message per problem found.

    Reports unreadable or truncated images and labels, missing label files, label/image size
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
    for index in range(len(dataset)):
        problems.extend(dataset.check_item(index))
    return problems
