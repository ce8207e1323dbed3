"""Training augmentation: a crop computed alone equals the crop of the whole resized image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CAMVID
from pipeline.data.transforms import IGNORE_INDEX, CropParams, apply_jitter, apply_params


def resize_then_crop(image: torch.Tensor, label: torch.Tensor, params: CropParams, crop: tuple[int, int]):
    """The obvious way: resize the whole image (torch's antialiased bilinear / nearest), pad, crop, flip."""
    image = F.interpolate(image[None].float(), size=params.scaled_hw, mode="bilinear", align_corners=False,
                          antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
    label = F.interpolate(label[None, None].float(), size=params.scaled_hw, mode="nearest")[0, 0].long()
    pad_h = max(params.top + crop[0] - image.shape[-2], 0)
    pad_w = max(params.left + crop[1] - image.shape[-1], 0)
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
    label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    image = image[:, params.top : params.top + crop[0], params.left : params.left + crop[1]]
    label = label[params.top : params.top + crop[0], params.left : params.left + crop[1]]
    return (image.flip(-1), label.flip(-1)) if params.flip else (image, label)


def test_cropping_before_resizing_gives_the_resized_images_crop():
    rng = np.random.default_rng(0)
    differing = []
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(16, 200, size=2))
        image = torch.from_numpy(rng.integers(0, 256, size=(3, h, w)).astype(np.uint8))
        label = torch.from_numpy(rng.integers(0, 19, size=(h, w)))
        scale = rng.uniform(0.3, 2.5)  # down- and upscaling, aspect ratio slightly changed
        scaled = (max(1, round(h * scale)), max(1, round(w * scale * rng.uniform(0.9, 1.1))))
        crop = tuple(int(v) for v in rng.integers(8, 160, size=2))  # may reach beyond the image: padding
        params = CropParams(scaled, int(rng.integers(0, max(scaled[0] - crop[0], 0) + 1)),
                            int(rng.integers(0, max(scaled[1] - crop[1], 0) + 1)), bool(rng.random() < 0.5))
        got_image, got_label = apply_params(image, label, params, crop)
        want_image, want_label = resize_then_crop(image, label, params, crop)
        assert torch.equal(got_label, want_label)
        assert got_image.shape == want_image.shape == (3, *crop)
        diff = (got_image.int() - want_image.int()).abs()
        assert diff.max() <= 1  # float rounding of a sum at .5 boundaries, nothing more
        differing.append(float((diff > 0).float().mean()))
    assert np.mean(differing) < 1e-3


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_a_real_camvid_image_crops_as_when_resized_whole():
    from pipeline.data import build_dataset

    item = build_dataset("camvid", CAMVID, "train")[0]
    for scaled, top, left in (((720, 960), 200, 300), ((180, 240), 0, 10), ((540, 720), 100, 200)):
        params = CropParams(scaled, top, left, True)
        got = apply_params(item["image"], item["label"], params, (360, 480))
        want = resize_then_crop(item["image"], item["label"], params, (360, 480))
        assert torch.equal(got[1], want[1])
        assert (got[0].int() - want[0].int()).abs().max() <= 1


def test_jitter_of_ones_is_the_identity_and_brightness_scales():
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    assert apply_jitter(image, (1.0, 1.0, 1.0)) is image
    assert (apply_jitter(image, (1.5, 1.0, 1.0)) == 150).all()  # a grey image: contrast and saturation keep it
