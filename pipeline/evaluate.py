"""Stage three: mIoU of a model (student or teacher) or of the cached teacher itself.

Single scale, whole image, no flip by default (the paper's protocol); multi-scale and flip are
options. Logits are bilinearly upsampled to the label size before the argmax.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.cache.readcache import read_ahead
from pipeline.cache.store import TeacherStore
from pipeline.inference import predict
from pipeline.data.transforms import normalize
from pipeline.metrics import ConfusionMatrix
from pipeline.visualize import save_comparison


def _evaluate(dataset, predictions: Iterable[tuple[int, dict, torch.Tensor]], progress: bool,
              save_dir: Path | None, save_images: int, desc: str) -> ConfusionMatrix:
    """Accumulate (index, item, log-probabilities (C, h, w) on any grid) into a confusion matrix:
    the maps are upsampled to the label's size before the argmax."""
    cm = ConfusionMatrix(dataset.num_classes, ignore_index=dataset.ignore_index)
    for i, item, log_probs in tqdm(predictions, total=len(dataset), desc=desc, unit="img", disable=not progress):
        label = item["label"]
        log_probs = F.interpolate(log_probs[None].float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        pred = log_probs[0].argmax(0).cpu()
        cm.update(pred, label)
        if save_dir is not None and i < save_images:
            name = str(item["id"]).replace("/", "_")
            save_comparison(save_dir / f"{name}.png", item["image"], label, pred, dataset.palette)
    return cm


class _Numbered(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return i, self.dataset[i]


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, device: torch.device | str = "cpu", scales: Sequence[float] = (1.0,),
                   flip: bool = False, window: tuple[int, int] | None = None, progress: bool = True, save_dir: Path | None = None,
                   save_images: int = 0, batch_size: int = 8, workers: int = 0, precision: str = "fp32") -> ConfusionMatrix:
    """mIoU of ``model`` on ``dataset``: batches of ``batch_size`` images (one at a time when their
    sizes differ) read by ``workers`` loader processes, through the same ``predict`` as the cache
    writer and the online teacher; ``precision`` "bf16" runs the model under bfloat16 autocast."""
    model = model.to(device).eval()
    same_size = len({tuple(dataset.image_size(i)) for i in range(len(dataset))}) == 1
    loader = DataLoader(_Numbered(dataset), batch_size=batch_size if same_size else 1, num_workers=workers,
                        collate_fn=list)

    def predictions() -> Iterator[tuple[int, dict, torch.Tensor]]:
        for items in loader:
            images = normalize(torch.stack([item["image"] for _, item in items]).to(device))
            log_probs = predict(model, images, scales=scales, flip=flip, window=window, precision=precision)[0]
            for (i, item), maps in zip(items, log_probs):
                yield i, item, maps

    return _evaluate(dataset, predictions(), progress, save_dir, save_images, "evaluate")


def evaluate_cache(store: TeacherStore, dataset, progress: bool = True, save_dir: Path | None = None,
                   save_images: int = 0) -> ConfusionMatrix:
    """mIoU of the stored teacher maps themselves (after checking they belong to ``dataset``; a
    store copied in part is refused by the check and by the reads)."""
    store.check_matches(dataset)

    def read(i: int) -> tuple[int, dict, torch.Tensor]:
        return i, dataset[i], torch.from_numpy(store.read_log_probs(i))

    # Several images in flight at once: from object storage each read waits on requests.
    predictions = read_ahead(read, range(len(dataset)))
    return _evaluate(dataset, predictions, progress, save_dir, save_images, "evaluate cache")
