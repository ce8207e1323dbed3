"""A channel projection (PCA) of the teacher's features, so that dense features fit in a store.

Full stride-8 teacher features are large (512 channels of a PSP head: ~33 MB per Cityscapes image in
float16). The store can instead keep their coordinates on the top ``k`` principal directions of the
teacher's own features on the cached split: ``z = (x - mean) @ components`` per pixel, and a reader
gets ``x ~= mean + components @ z`` back; training maps the coordinates back too, so that feature
distillation regresses the teacher's features (up to the directions left out), as online. The fit
streams the features (running sums in float64), so memory stays at a C x C matrix whatever the
number of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.data.transforms import normalize
from pipeline.inference import predict


@dataclass
class Projection:
    mean: np.ndarray  # (C,) float32: the teacher features' mean over the fitted pixels
    components: np.ndarray  # (C, k) float32: orthonormal principal directions, by decreasing variance
    explained: np.ndarray  # (k,) the fraction of the features' variance each direction explains

    @property
    def channels(self) -> int:
        return self.components.shape[1]


def fit_projection(teacher: nn.Module, dataset, channels: int, *, feature_pool: int = 1, images: int = 256,
                   device: torch.device | str = "cpu", precision: str = "fp32", progress: bool = True) -> Projection:
    """PCA of ``teacher``'s PSP features (max-pooled by ``feature_pool``, as the store keeps them) over
    the pixels of up to ``images`` images of ``dataset``, spread evenly over it."""
    count = min(images, len(dataset))
    picks = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    total = outer = None
    pixels = 0
    teacher = teacher.to(device).eval()
    for i in tqdm(picks, desc="fitting the feature projection", unit="img", disable=not progress):
        image = normalize(dataset[int(i)]["image"].to(device))[None]
        features = predict(teacher, image, precision=precision)[1]
        if feature_pool > 1:
            features = F.max_pool2d(features, feature_pool, feature_pool, ceil_mode=True)
        x = features[0].flatten(1).T.double().cpu()  # pixels x C
        total = x.sum(0) if total is None else total + x.sum(0)
        outer = x.T @ x if outer is None else outer + x.T @ x
        pixels += len(x)
    if channels > len(total):
        raise ValueError(f"a projection to {channels} channels needs a teacher with at least that many; it has {len(total)}")
    mean = total / pixels
    covariance = outer / pixels - torch.outer(mean, mean)
    variance, directions = torch.linalg.eigh(covariance)  # ascending
    variance, directions = variance.flip(0).clamp(min=0), directions.flip(1)
    explained = variance / variance.sum().clamp(min=1e-30)
    return Projection(mean.float().numpy(), directions[:, :channels].float().numpy(),
                      explained[:channels].float().numpy())


def project(features: torch.Tensor, projection: Projection) -> torch.Tensor:
    """(B, C, h, w) teacher features -> (B, k, h, w) coordinates on the projection's directions."""
    mean = torch.as_tensor(projection.mean, device=features.device, dtype=features.dtype)
    components = torch.as_tensor(projection.components, device=features.device, dtype=features.dtype)
    return torch.einsum("bchw,ck->bkhw", features - mean[:, None, None], components)


def unproject(coordinates: torch.Tensor, projection: Projection) -> torch.Tensor:
    """(B, k, h, w) coordinates -> (B, C, h, w) features, the teacher's up to the discarded directions."""
    mean = torch.as_tensor(projection.mean, device=coordinates.device, dtype=coordinates.dtype)
    components = torch.as_tensor(projection.components, device=coordinates.device, dtype=coordinates.dtype)
    return torch.einsum("bkhw,ck->bchw", coordinates, components) + mean[:, None, None]
