"""The training dataset: augmented samples, with the cached teacher targets under each, and the
order in which a run reads them.

:class:`TrainingSamples` is what the loader's workers run: one augmented sample per ``(epoch,
index)`` key, with the windows of the store's maps under its crop (replayed onto the student's grid
on the device, ``pipeline.cache.replay``) or, from a store with a bank of views, one of the stored
views. :func:`collate` batches them; :class:`EpochBatches` is the run's endless, resumable order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.transforms import (AugmentConfig, apply_jitter, apply_params, cache_window, crop_box, sample_jitter,
                                      sample_params, valid_mask)
from pipeline.data.views import crop_params, view_for_epoch
from pipeline.inference import OUTPUT_STRIDE, output_size, scaled_size


class TrainingSamples(torch.utils.data.Dataset):
    """Augmented samples of ``dataset`` with, when a store is given, the cached teacher maps under them.

    ``store`` is a ``pipeline.cache.store.TeacherStore`` (read through its methods only; the
    data floor does not import the cache's). Items: ``image`` uint8 3×h×w, ``label`` int64 h×w, ``valid`` bool mask on the output grid, and
    with a store ``teacher_log_probs`` / ``teacher_features`` (float32 windows of the cache) with their
    boxes ``logit_box`` / ``feature_box`` in window coordinates and ``flip``, whether replay must
    mirror them. ``features=False`` skips reading the features (nothing needs them without
    pair-wise distillation). ``use_view_bank=True`` takes each sample among the store's bank of views (which
    must exist) instead of augmenting afresh.
    """

    def __init__(self, dataset, augment: AugmentConfig, store: "TeacherStore | None" = None, seed: int = 0,
                 features: bool = True, use_view_bank: bool = False):
        if use_view_bank and not (store is not None and store.views):
            raise ValueError("use_view_bank=True needs a store with a bank of views")
        self.dataset = dataset
        self.augment = augment
        self.store = store
        self.features = features
        self.use_view_bank = use_view_bank
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Sample ``index`` of epoch ``epoch`` for a key ``(epoch, index)``; a plain index uses ``self.epoch``."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        item = self.dataset[index]
        image_hw = tuple(item["image"].shape[-2:])
        if self.use_view_bank:
            view = view_for_epoch(self.store.views["count"], self.seed, index, epoch)
            params, jitter = crop_params(self.store.view_crops[index, view]), tuple(self.store.view_jitter[index, view])
        else:
            rng = np.random.default_rng([self.seed, epoch, index])
            params = sample_params(self.augment, image_hw, rng)
            jitter = sample_jitter(self.augment.color_jitter, rng)
        image, label = apply_params(item["image"], item["label"], params, self.augment.crop_size)
        image = apply_jitter(image, jitter)
        out_hw = output_size(tuple(image.shape[-2:]))
        box = crop_box(params, image_hw, (out_hw[0] * OUTPUT_STRIDE, out_hw[1] * OUTPUT_STRIDE))
        valid = valid_mask(box, image_hw, out_hw)
        sample = {"image": image, "label": label, "flip": params.flip, "valid": valid.flip(-1) if params.flip else valid}
        if self.use_view_bank:
            sample |= self._view_targets(index, view, out_hw)
        elif self.store is not None:
            sample |= self._cached_targets(index, image_hw, box, params.scaled_hw[0] / image_hw[0])
        return sample

    def _view_targets(self, index: int, view: int, out_hw: tuple[int, int]) -> dict:
        """The teacher's maps on this very view: already the student's grid, already flipped."""
        log_probs, features = self.store.read_view(index, view, self.features)
        targets = {"teacher_log_probs": torch.from_numpy(log_probs), "flip": False,
                   "logit_box": torch.tensor([0.0, 0.0, out_hw[1], out_hw[0]], dtype=torch.float64)}
        if self.features:
            pool = self.store.feature_pool
            targets["teacher_features"] = torch.from_numpy(features)
            targets["feature_box"] = targets["logit_box"] / pool
        return targets

    def _cached_targets(self, index: int, image_hw: tuple[int, int], box: torch.Tensor, scale: float) -> dict:
        """Windows of the cached maps under ``box`` (original pixels), with the box in window cells.

        Log-probabilities come from the stored level nearest the sample's scale, so a crop that
        zooms in by 2 reads a map computed at that resolution instead of an upsampled one.
        """
        level = self.store.nearest_level(scale)
        # Original pixels -> cells of the level's grid (its image was resized to a rounded size).
        level_h, level_w = scaled_size(image_hw, level)
        to_cells = torch.tensor([level_w / image_hw[1], level_h / image_hw[0]] * 2, dtype=torch.float64) / OUTPUT_STRIDE
        cells = box * to_cells
        rows, cols = cache_window(cells, output_size((level_h, level_w)))
        offset = torch.tensor([cols.start, rows.start, cols.start, rows.start], dtype=torch.float64)
        targets = {"teacher_log_probs": torch.from_numpy(self.store.read_log_probs(index, level, (rows, cols))),
                   "logit_box": cells - offset}
        if self.features:
            pool = self.store.feature_pool
            rows, cols = cache_window(box / OUTPUT_STRIDE, output_size(image_hw), pool)
            offset = torch.tensor([cols.start, rows.start, cols.start, rows.start], dtype=torch.float64)
            targets["teacher_features"] = torch.from_numpy(self.store.read_features(index, (rows, cols)))
            targets["feature_box"] = (box / OUTPUT_STRIDE - offset) / pool
        return targets


def collate(samples: list[dict]) -> dict:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "flip": torch.tensor([s["flip"] for s in samples]),
        "valid": torch.stack([s["valid"] for s in samples]),
    }
    for key, box in (("teacher_log_probs", "logit_box"), ("teacher_features", "feature_box")):
        if key in samples[0]:
            batch[key] = _pad_stack([s[key] for s in samples])
            batch[box] = torch.stack([s[box] for s in samples]).float()
    return batch


def _pad_stack(windows: list[torch.Tensor]) -> torch.Tensor:
    # Replicate padding: roi_align clamps at a map's border, and so must the padded copy.
    h = max(w.shape[-2] for w in windows)
    w_ = max(w.shape[-1] for w in windows)
    return torch.stack([
        F.pad(w[None].float(), (0, w_ - w.shape[-1], 0, h - w.shape[-2]), mode="replicate")[0].to(w.dtype)
        if w.shape[-2:] != (h, w_) else w for w in windows
    ])


class EpochBatches(torch.utils.data.Sampler):
    """Endless batches of (epoch, index) pairs: each epoch a seeded permutation of the ``n`` samples,
    starting ``start`` batches in (so a resumed run sees the same data as an uninterrupted one).
    The epoch travels with each index, so one loader (and its workers) serves the whole run.

    The epochs follow one another as one stream, batch b its samples b·B to (b+1)·B: when B does
    not divide ``n``, an epoch's last batch is completed from the next epoch (instead of dropping
    the remainder), so every sample is seen once per epoch, and every stored view of it once per
    as many epochs as there are views.

    With several processes, ``batch_size`` is the global batch and each rank takes its slice of it:
    together they see what one process would, at any world size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start * self.batch_size, self.n)
        order, share = self._order(epoch), self.batch_size // self.world_size
        while True:
            batch = []
            while len(batch) < self.batch_size:
                taken = order[offset : offset + self.batch_size - len(batch)]
                batch += [(epoch, i) for i in taken]
                offset += len(taken)
                if offset == self.n:
                    epoch, offset = epoch + 1, 0
                    order = self._order(epoch)
            yield batch[self.rank * share : (self.rank + 1) * share]
