"""Stage three: mIoU of a model (student or teacher) or of the cached teacher itself.

Single scale, whole image, no flip by default (the paper's protocol); multi-scale and flip are
options. Logits are bilinearly upsampled to the label size before the argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.cache.store import TeacherStore
from pipeline.inference import predict
from pipeline.data.transforms import normalize
from pipeline.metrics import ConfusionMatrix
from pipeline.visualize import save_comparison


def _evaluate(dataset, predict_image: Callable[[int, dict], torch.Tensor], progress: bool,
              save_dir: Path | None, save_images: int, desc: str) -> ConfusionMatrix:
    cm = ConfusionMatrix(dataset.num_classes, ignore_index=dataset.ignore_index)
    for i in tqdm(range(len(dataset)), desc=desc, unit="img", disable=not progress):
        item = dataset[i]
        label = item["label"]
        log_probs = predict_image(i, item)  # (C, h, w) on any grid
        log_probs = F.interpolate(log_probs[None].float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        pred = log_probs[0].argmax(0).cpu()
        cm.update(pred, label)
        if save_dir is not None and i < save_images:
            name = str(item["id"]).replace("/", "_")
            save_comparison(save_dir / f"{name}.png", item["image"], label, pred, dataset.palette)
    return cm


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, device: torch.device | str = "cpu", scales: Sequence[float] = (1.0,),
                   flip: bool = False, window: tuple[int, int] | None = None, progress: bool = True, save_dir: Path | None = None,
                   save_images: int = 0) -> ConfusionMatrix:
    model = model.to(device).eval()

    def predict_image(_: int, item: dict) -> torch.Tensor:
        image = normalize(item["image"].to(device))[None]
        return predict(model, image, scales=scales, flip=flip, window=window)[0][0]

    return _evaluate(dataset, predict_image, progress, save_dir, save_images, "evaluate")


def evaluate_cache(store: TeacherStore, dataset, progress: bool = True, save_dir: Path | None = None,
                   save_images: int = 0) -> ConfusionMatrix:
    """mIoU of the stored teacher maps themselves (after checking they belong to ``dataset``; a
    store copied in part is refused by the check and by the reads)."""
    store.check_matches(dataset)
    return _evaluate(dataset, lambda i, _: torch.from_numpy(store.read_log_probs(i)), progress, save_dir, save_images,
                     "evaluate cache")
