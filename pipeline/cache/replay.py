"""Augmentation-consistent replay of cached teacher maps.

The cache holds the teacher's output on the whole, unaugmented image. For each training sample the
loader knows the crop box in original-image coordinates and the flip (``pipeline.data.transforms``).
Here the worker reads only the part of the cached maps under that box (one image per read, at the
cache's low resolution), and the training device resamples it onto the student's output grid with
``roi_align(aligned=True)``, flips it when the image was flipped, and marks with a validity mask the
output pixels that fall outside the image (padding), which carry no teacher signal.

A store with a bank of training views (``pipeline.cache.views``) replays nothing: the sample is one
of the stored views, and its targets are the teacher's maps on exactly that input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipeline.cache.store import TeacherStore, logit_size
from pipeline.cache.views import crop_params, view_for_epoch
from pipeline.data.transforms import AugmentConfig, apply_jitter, apply_params, crop_box, sample_jitter, sample_params
from pipeline.inference import OUTPUT_STRIDE, output_size, scaled_size


def valid_mask(box: torch.Tensor, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """True where an output pixel's centre lies inside the original image (box in image pixels)."""
    x0, y0, x1, y1 = box.tolist()
    ys = y0 + (torch.arange(out_hw[0], dtype=torch.float64) + 0.5) * (y1 - y0) / out_hw[0]
    xs = x0 + (torch.arange(out_hw[1], dtype=torch.float64) + 0.5) * (x1 - x0) / out_hw[1]
    return ((ys >= 0) & (ys < image_hw[0]))[:, None] & ((xs >= 0) & (xs < image_hw[1]))[None, :]


def cache_window(box: torch.Tensor, map_hw: tuple[int, int], pool: int = 1) -> tuple[slice, slice]:
    """Rows/cols of a cache grid under ``box`` (in that grid's cells) plus a one-cell margin for
    interpolation, widened to the feature pooling grid so that features cut at the same place."""
    x0, y0, x1, y1 = box.tolist()

    def span(lo: float, hi: float, size: int) -> slice:
        start = max(math.floor(lo) - 1, 0) // pool * pool
        stop = min(math.ceil(hi) + 1, size)
        stop = min(math.ceil(stop / pool) * pool, size)
        return slice(start, max(stop, start + 1))

    return span(y0, y1, map_hw[0]), span(x0, x1, map_hw[1])


class TrainingSamples(torch.utils.data.Dataset):
    """Augmented samples of ``dataset`` with, when a store is given, the cached teacher maps under them.

    Items: ``image`` uint8 3×h×w, ``label`` int64 h×w, ``valid`` bool mask on the output grid, and
    with a store ``teacher_logits`` / ``teacher_features`` (float32 windows of the cache) with their
    boxes ``logit_box`` / ``feature_box`` in window coordinates and ``flip``, whether replay must
    mirror them. ``features=False`` skips reading the features (nothing needs them without
    pair-wise distillation). ``views=True`` takes each sample among the store's bank of views (which
    must exist) instead of augmenting afresh.
    """

    def __init__(self, dataset, augment: AugmentConfig, store: TeacherStore | None = None, seed: int = 0,
                 features: bool = True, views: bool = False):
        if views and not (store is not None and store.views):
            raise ValueError("views=True needs a store with a bank of views")
        self.dataset = dataset
        self.augment = augment
        self.store = store
        self.features = features
        self.views = views
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Sample ``index`` of epoch ``epoch`` for a key ``(epoch, index)``; a plain index uses ``self.epoch``."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        item = self.dataset[index]
        image_hw = tuple(item["image"].shape[-2:])
        if self.views:
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
        if self.views:
            sample |= self._view_targets(index, view, out_hw)
        elif self.store is not None:
            sample |= self._cached_targets(index, image_hw, box, params.scaled_hw[0] / image_hw[0])
        return sample

    def _view_targets(self, index: int, view: int, out_hw: tuple[int, int]) -> dict:
        """The teacher's maps on this very view: already the student's grid, already flipped."""
        log_probs, features = self.store.read_view(index, view, self.features)
        targets = {"teacher_logits": torch.from_numpy(log_probs), "flip": False,
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
        rows, cols = cache_window(cells, logit_size(image_hw, level))
        offset = torch.tensor([cols.start, rows.start, cols.start, rows.start], dtype=torch.float64)
        targets = {"teacher_logits": torch.from_numpy(self.store.read_log_probs(index, level, (rows, cols))),
                   "logit_box": cells - offset}
        if self.features:
            pool = self.store.feature_pool
            rows, cols = cache_window(box / OUTPUT_STRIDE, logit_size(image_hw), pool)
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
    for key, box in (("teacher_logits", "logit_box"), ("teacher_features", "feature_box")):
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


def replay(maps: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], flip: torch.Tensor) -> torch.Tensor:
    """Resample each map's box onto an ``out_hw`` grid (bins average their area), then flip as the image was."""
    rois = torch.cat([torch.arange(len(maps), device=maps.device, dtype=torch.float32)[:, None],
                      boxes.to(maps.device, torch.float32)], dim=1)
    out = roi_align(maps.float(), rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = flip.to(out.device).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


def replay_targets(batch: dict, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher (logits, features) for a collated batch whose cache windows are already on the device;
    features are None when the batch carries none."""
    logits = replay(batch["teacher_logits"], batch["logit_box"], out_hw, batch["flip"])
    if "teacher_features" not in batch:
        return logits, None
    return logits, replay(batch["teacher_features"], batch["feature_box"], out_hw, batch["flip"])
