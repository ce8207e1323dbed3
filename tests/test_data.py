"""Datasets: on-disk layouts read back against hand-known values, label mappings against the official
tables, the synthetic generator's determinism, fingerprints and error messages."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.data import DATASETS, build_dataset, check_dataset
from pipeline.data.ade20k import ADE20K
from pipeline.data.camvid import CamVid
from pipeline.data.cityscapes import LABEL_ID_LUT, LABEL_ID_TO_TRAIN_ID, Cityscapes
from pipeline.data.folder import FolderDataset
from pipeline.data.io import read_image, read_label
from pipeline.data.synthetic import SyntheticStreets
from pipeline.errors import SkdError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAMVID = SHARED / "data" / "camvid"


# ----------------------------------------------------------------------------- helpers

def noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def label_map(h: int, w: int, fill: int, pixels: dict[tuple[int, int], int] | None = None) -> np.ndarray:
    out = np.full((h, w), fill, dtype=np.uint8)
    for (y, x), v in (pixels or {}).items():
        out[y, x] = v
    return out


def make_camvid(root: Path, split: str = "train", n: int = 3, h: int = 12, w: int = 16) -> Path:
    for i in range(n):
        save(root / split / f"img{i}.png", noise_rgb(h, w, i))
        save(root / f"{split}annot" / f"img{i}.png", label_map(h, w, i % 11))
    return root


# ----------------------------------------------------------------------------- Cityscapes

# The official cityscapesScripts labels.py table (name, id, trainId), written out independently.
OFFICIAL_CITYSCAPES = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
]


def test_cityscapes_table_matches_official():
    assert LABEL_ID_TO_TRAIN_ID == {label_id: train_id for _, label_id, train_id in OFFICIAL_CITYSCAPES}
    for _, label_id, train_id in OFFICIAL_CITYSCAPES:
        assert LABEL_ID_LUT[label_id] == train_id
    assert len(LABEL_ID_LUT) == 256
    assert (LABEL_ID_LUT[34:] == 255).all()


def test_cityscapes_names_and_palette_follow_train_ids(tmp_path):
    root = tmp_path / "cs"
    save(root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png", noise_rgb(4, 6))
    save(root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", label_map(4, 6, 7))
    ds = Cityscapes(root, "val")
    trained = [name for name, _, train_id in sorted(OFFICIAL_CITYSCAPES, key=lambda t: t[2]) if train_id != 255]
    assert ds.class_names == trained
    assert ds.num_classes == 19
    assert ds.palette[0] == (128, 64, 128) and ds.palette[13] == (0, 0, 142) and ds.palette[10] == (70, 130, 180)


def make_cityscapes(root: Path) -> Path:
    # Two cities, images 6x8; the label of the second image has hand-placed label ids.
    save(root / "leftImg8bit/train/frankfurt/frankfurt_000000_000294_leftImg8bit.png", noise_rgb(6, 8, 1))
    save(root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", noise_rgb(6, 8, 2))
    save(root / "gtFine/train/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png",
         label_map(6, 8, 7, {(0, 0): 26, (1, 1): 0, (2, 2): 24, (3, 3): 33, (4, 4): 9, (5, 5): 23}))
    save(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", label_map(6, 8, 21))
    # Files that the official package also ships and that must not be mistaken for labels.
    save(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_color.png", noise_rgb(6, 8, 3))
    save(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png", label_map(6, 8, 5))
    return root


def test_cityscapes_label_ids_are_mapped(tmp_path):
    ds = Cityscapes(make_cityscapes(tmp_path / "cs"), "train")
    assert ds.ids == ["aachen/aachen_000000_000019", "frankfurt/frankfurt_000000_000294"]
    item = ds[1]
    assert item["id"] == "frankfurt/frankfurt_000000_000294"
    label = item["label"]
    assert label.dtype == torch.int64 and label.shape == (6, 8)
    assert label[0, 0] == 13  # car
    assert label[1, 1] == 255  # unlabeled
    assert label[2, 2] == 11  # person
    assert label[3, 3] == 18  # bicycle
    assert label[4, 4] == 255  # parking is not a train class
    assert label[5, 5] == 10  # sky
    assert label[0, 7] == 0  # road everywhere else
    assert (ds[0]["label"] == 8).all()  # vegetation
    assert torch.equal(item["image"], torch.from_numpy(noise_rgb(6, 8, 1)).permute(2, 0, 1))


def test_cityscapes_prefers_train_ids(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    # Train ids 13 where the label ids say 7 (road -> 0): the result tells which file was read.
    save(root / "gtFine/train/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png",
         label_map(6, 8, 13, {(0, 0): 255, (1, 1): 18}))
    label = Cityscapes(root, "train")[1]["label"]
    assert label[0, 0] == 255 and label[1, 1] == 18 and label[2, 3] == 13


def test_cityscapes_bad_train_id_names_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    name = "frankfurt_000000_000294_gtFine_labelTrainIds.png"
    save(root / "gtFine/train/frankfurt" / name, label_map(6, 8, 3, {(2, 2): 19}))
    with pytest.raises(SkdError, match=name) as info:
        Cityscapes(root, "train")[1]
    assert "19" in str(info.value)


def test_cityscapes_missing_label_names_image(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    (root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(SkdError, match="aachen_000000_000019_leftImg8bit.png"):
        Cityscapes(root, "train")


# ----------------------------------------------------------------------------- ADE20K

def make_ade(root: Path) -> Path:
    save(root / "images/training/ADE_train_00000001.jpg", noise_rgb(6, 9, 1), quality=95)
    save(root / "images/training/ADE_train_00000002.jpg", noise_rgb(11, 7, 2), quality=95)
    save(root / "annotations/training/ADE_train_00000001.png", label_map(6, 9, 1, {(0, 0): 0, (5, 8): 150}))
    save(root / "annotations/training/ADE_train_00000002.png", label_map(11, 7, 3))
    save(root / "images/validation/ADE_val_00000001.jpg", noise_rgb(5, 5, 3))
    save(root / "annotations/validation/ADE_val_00000001.png", label_map(5, 5, 0))
    return root


def test_ade20k_layout_and_mapping(tmp_path):
    ds = ADE20K(make_ade(tmp_path / "ade"), "train")
    assert ds.ids == ["ADE_train_00000001", "ADE_train_00000002"]
    assert ds.num_classes == 150 and len(ds.class_names) == 150 and ds.class_names[:3] == ["wall", "building", "sky"]
    assert len(set(ds.palette)) == 150
    assert ds.image_size(0) == (6, 9) and ds.image_size(1) == (11, 7)
    first, second = ds[0], ds[1]
    assert first["image"].shape == (3, 6, 9) and second["image"].shape == (3, 11, 7)
    assert first["label"][0, 0] == 255  # 0 = "other"
    assert first["label"][5, 8] == 149  # 150 = flag
    assert first["label"][2, 2] == 0  # 1 = wall
    assert (second["label"] == 2).all()
    val = ADE20K(tmp_path / "ade", "val")
    assert val.ids == ["ADE_val_00000001"] and (val[0]["label"] == 255).all()


def test_ade20k_value_above_150_names_file(tmp_path):
    root = make_ade(tmp_path / "ade")
    save(root / "annotations/training/ADE_train_00000002.png", label_map(11, 7, 3, {(4, 4): 151}))
    with pytest.raises(SkdError, match="ADE_train_00000002.png") as info:
        ADE20K(root, "train")[1]
    assert "151" in str(info.value)


# ----------------------------------------------------------------------------- folder

def make_folder(root: Path, spec: dict | None = None, as_json: bool = False) -> Path:
    spec = spec or {"names": ["background", "road", "car"], "palette": [[0, 0, 0], [128, 64, 128], [0, 0, 142]],
                    "ignore_index": 7}
    root.mkdir(parents=True, exist_ok=True)
    if as_json:
        (root / "classes.json").write_text(json.dumps(spec))
    else:
        (root / "classes.yaml").write_text(yaml.safe_dump(spec))
    save(root / "images/train/a.jpg", noise_rgb(5, 6, 1))
    save(root / "masks/train/a.png", label_map(5, 6, 1, {(0, 0): 0, (1, 1): 2, (2, 2): 7}))
    save(root / "images/train/street/b.png", noise_rgb(4, 4, 2))
    save(root / "masks/train/street/b.png", label_map(4, 4, 2))
    save(root / "images/val/c.png", noise_rgb(3, 3, 3))
    save(root / "masks/val/c.png", label_map(3, 3, 0))
    return root


@pytest.mark.parametrize("as_json", [False, True])
def test_folder_dataset(tmp_path, as_json):
    ds = FolderDataset(make_folder(tmp_path / "f", as_json=as_json), "train")
    assert ds.class_names == ["background", "road", "car"] and ds.num_classes == 3
    assert ds.palette == [(0, 0, 0), (128, 64, 128), (0, 0, 142)]
    assert ds.ids == ["a", "street/b"]
    label = ds[0]["label"]
    assert label[0, 0] == 0 and label[1, 1] == 2 and label[2, 2] == 255 and label[4, 5] == 1
    assert (ds[1]["label"] == 2).all()
    assert len(FolderDataset(tmp_path / "f", "val")) == 1


def test_folder_nested_sequences_with_role_suffixes(tmp_path):
    """IDD-like layout: sequences in sub-folders, the same frame names in each, `_image`/`_label` suffixes."""
    root = tmp_path / "idd"
    root.mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": ["road", "car", "sky"]}))
    frames = {}
    for seq, seed in (("seq1", 1), ("seq2", 2)):
        image, label = noise_rgb(6, 8, seed), label_map(6, 8, seed % 3)
        save(root / f"images/train/{seq}/0001_image.jpg", image)
        save(root / f"masks/train/{seq}/0001_label.png", label)
        frames[f"{seq}/0001"] = label
    ds = FolderDataset(root, "train", image_suffix="_image", label_suffix="_label")
    assert ds.ids == ["seq1/0001", "seq2/0001"]  # one frame name in two sequences: two images
    for i, key in enumerate(ds.ids):
        assert torch.equal(ds[i]["label"], torch.from_numpy(np.asarray(frames[key])).long())
    # Without the suffixes nothing pairs, and the message names the label file it looked for.
    with pytest.raises(SkdError, match=r"has no label file: looked for .*seq1/0001_image\.png"):
        FolderDataset(root, "train")
    (root / "masks/train/seq2/0001_label.png").unlink()
    with pytest.raises(SkdError, match=r"images/train/seq2/0001_image\.jpg has no label file: looked for "
                                       r".*masks/train/seq2/0001_label\.png"):
        FolderDataset(root, "train", image_suffix="_image", label_suffix="_label")


def test_folder_default_palette_and_ignore(tmp_path):
    root = make_folder(tmp_path / "f", {"names": ["a", "b", "c"]})
    save(root / "masks/train/a.png", label_map(5, 6, 1, {(0, 0): 255}))
    ds = FolderDataset(root, "train")
    assert len(ds.palette) == 3 and len(set(ds.palette)) == 3
    assert ds[0]["label"][0, 0] == 255


def test_folder_out_of_range_mask(tmp_path):
    root = make_folder(tmp_path / "f")
    save(root / "masks/train/a.png", label_map(5, 6, 1, {(3, 3): 3, (4, 4): 255}))
    with pytest.raises(SkdError, match="a.png") as info:
        FolderDataset(root, "train")[0]
    assert "3" in str(info.value) and "255" in str(info.value)


def test_folder_requires_split_folders_and_classes(tmp_path):
    root = make_folder(tmp_path / "f")
    with pytest.raises(SkdError, match="images/<split>"):
        FolderDataset(root, "test")
    (root / "classes.yaml").unlink()
    with pytest.raises(SkdError, match="classes.yaml"):
        FolderDataset(root, "train")


def test_folder_bad_class_list(tmp_path):
    short_palette = make_folder(tmp_path / "a", {"names": ["x", "y"], "palette": [[0, 0, 0]]})
    with pytest.raises(SkdError, match="palette"):
        FolderDataset(short_palette)
    ignore_is_class = make_folder(tmp_path / "b", {"names": ["x", "y"], "ignore_index": 1})
    with pytest.raises(SkdError, match="ignore_index"):
        FolderDataset(ignore_is_class)


# ----------------------------------------------------------------------------- CamVid

@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid copy not found at {CAMVID}")
def test_camvid_real_copy():
    train = build_dataset("camvid", CAMVID, "train")
    val = build_dataset("camvid", CAMVID, "val")
    assert len(train) == 367 and len(val) == 101
    assert train.num_classes == 11 and train.class_names[0] == "Sky" and train.class_names[10] == "Bicyclist"
    assert train.palette[3] == (128, 64, 128)  # Road
    assert len(set(train.ids)) == 367 and not set(train.ids) & set(val.ids)
    for ds, index in ((train, 0), (train, 200), (val, 50)):
        item = ds[index]
        assert item["image"].shape == (3, 360, 480) and item["image"].dtype == torch.uint8
        label = item["label"]
        assert label.shape == (360, 480) and label.dtype == torch.int64
        values = set(label.unique().tolist())
        assert values <= set(range(11)) | {255}
        # Against the raw file: 11 (void) became 255, everything else is unchanged.
        raw = np.array(Image.open(CAMVID / f"{ds.split}annot" / f"{item['id']}.png")).astype(np.int64)
        expected = np.where(raw == 11, 255, raw)
        assert np.array_equal(label.numpy(), expected)
    assert train.image_size(5) == (360, 480)


def test_camvid_jpg_images_and_bad_value(tmp_path):
    root = make_camvid(tmp_path / "cv")
    save(root / "train/img3.jpg", noise_rgb(12, 16, 3))
    save(root / "trainannot/img3.png", label_map(12, 16, 11, {(0, 0): 4}))
    ds = CamVid(root, "train")
    assert ds.ids == ["img0", "img1", "img2", "img3"]
    label = ds[3]["label"]
    assert label[0, 0] == 4 and label[5, 5] == 255
    save(root / "trainannot/img1.png", label_map(12, 16, 1, {(2, 2): 12}))
    with pytest.raises(SkdError, match="img1.png") as info:
        ds[1]
    assert "12" in str(info.value)


def test_camvid_unpaired_files(tmp_path):
    root = make_camvid(tmp_path / "cv")
    save(root / "train/lonely.png", noise_rgb(12, 16))
    with pytest.raises(SkdError, match="lonely.png"):
        CamVid(root, "train")
    (root / "train/lonely.png").unlink()
    save(root / "trainannot/orphan.png", label_map(12, 16, 0))
    with pytest.raises(SkdError, match="orphan.png"):
        CamVid(root, "train")


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_determinism_and_variety():
    ds = SyntheticStreets("train", size=(48, 64), length=10, seed=3)
    a, b = ds[4], SyntheticStreets("train", size=(48, 64), length=10, seed=3)[4]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert torch.equal(ds[4]["image"], a["image"])  # the same index twice
    other_seed = SyntheticStreets("train", size=(48, 64), length=10, seed=4)[4]
    other_split = SyntheticStreets("val", size=(48, 64), length=10, seed=3)[4]
    assert not torch.equal(a["image"], other_seed["image"])
    assert not torch.equal(a["image"], other_split["image"])
    assert not torch.equal(a["image"], ds[5]["image"])
    assert a["id"] == "synthetic/train/000004"


def test_synthetic_shapes_and_classes():
    ds = SyntheticStreets("val", size=(40, 56))
    assert len(ds) == 64 and len(SyntheticStreets("train")) == 512 and len(SyntheticStreets("test")) == 64
    assert ds.num_classes == 8 and len(ds.class_names) == 8 and len(ds.palette) == 8
    seen = set()
    for i in range(8):
        item = ds[i]
        assert item["image"].shape == (3, 40, 56) and item["image"].dtype == torch.uint8
        assert item["label"].shape == (40, 56) and item["label"].dtype == torch.int64
        values = set(item["label"].unique().tolist())
        assert values <= set(range(8)) | {255}
        seen |= values
    assert set(range(8)) <= seen
    assert ds.image_size(0) == (40, 56)


def test_synthetic_not_separable_by_colour():
    # Road and sidewalk, building and vehicle overlap in colour: their mean colours per image vary
    # more across images than they differ from each other.
    ds = SyntheticStreets("train", size=(64, 80), length=24)
    means = {c: [] for c in (1, 2, 3, 5)}
    for i in range(24):
        item = ds[i]
        image, label = item["image"].float(), item["label"]
        for c in means:
            if (label == c).sum() > 20:
                means[c].append(image[:, label == c].mean(1))
    road, walk = torch.stack(means[1]), torch.stack(means[2])
    building, vehicle = torch.stack(means[3]), torch.stack(means[5])
    assert (road.mean(0) - walk.mean(0)).norm() < road.std(0).norm() + walk.std(0).norm()
    assert (building.mean(0) - vehicle.mean(0)).norm() < building.std(0).norm() + vehicle.std(0).norm()


def test_synthetic_fingerprint_and_options():
    base = SyntheticStreets("train", size=(48, 64), seed=1).fingerprint
    assert base == SyntheticStreets("train", size=(48, 64), seed=1).fingerprint
    assert len({base, SyntheticStreets("train", size=(48, 64), seed=2).fingerprint,
                SyntheticStreets("val", size=(48, 64), seed=1).fingerprint,
                SyntheticStreets("train", size=(64, 64), seed=1).fingerprint,
                SyntheticStreets("train", size=(48, 64), seed=1, length=5).fingerprint}) == 5
    ds = build_dataset("synthetic", None, "train", size=(32, 32), length=3)
    assert len(ds) == 3 and ds[0]["image"].shape == (3, 32, 32)
    with pytest.raises(SkdError, match="32"):
        SyntheticStreets(size=(16, 64))
    with pytest.raises(SkdError, match="bogus"):
        build_dataset("synthetic", None, "train", bogus=1)


# ----------------------------------------------------------------------------- fingerprints

def test_file_fingerprint(tmp_path):
    root = make_camvid(tmp_path / "cv")
    before = CamVid(root, "train").fingerprint
    assert len(before) == 64 and int(before, 16) >= 0
    # A copy elsewhere is the same data.
    shutil.copytree(root, tmp_path / "copy")
    assert CamVid(tmp_path / "copy", "train").fingerprint == before
    # A file whose size changed.
    with open(root / "trainannot/img1.png", "ab") as f:
        f.write(b"\0")
    changed_size = CamVid(root, "train").fingerprint
    assert changed_size != before
    # An added pair.
    make_camvid(tmp_path / "copy", n=4)
    assert CamVid(tmp_path / "copy", "train").fingerprint not in (before, changed_size)


# ----------------------------------------------------------------------------- errors

def test_unknown_dataset_lists_names():
    with pytest.raises(SkdError) as info:
        build_dataset("pascal", None, "train")
    for name in ("synthetic", "camvid", "cityscapes", "ade20k", "folder"):
        assert name in str(info.value)
    assert set(DATASETS) == {"synthetic", "camvid", "cityscapes", "ade20k", "folder"}


def test_missing_root(tmp_path, monkeypatch):
    with pytest.raises(SkdError, match="nowhere"):
        build_dataset("cityscapes", tmp_path / "nowhere", "train")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SkdError, match="data/camvid"):
        build_dataset("camvid", None, "train")
    make_camvid(tmp_path / "data" / "camvid")
    assert len(build_dataset("camvid", None, "train")) == 3
    with pytest.raises(SkdError, match="valannot|val"):
        build_dataset("camvid", None, "val")


def test_truncated_png(tmp_path):
    root = make_camvid(tmp_path / "cv", h=64, w=64)
    path = root / "train/img2.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = CamVid(root, "train")
    with pytest.raises(SkdError, match="img2.png"):
        ds[2]
    with pytest.raises(SkdError, match="img2.png"):
        read_image(path)
    path.write_bytes(b"not an image at all")
    with pytest.raises(SkdError, match="img2.png"):
        read_image(path)
    with pytest.raises(SkdError, match="missing.png"):
        read_label(root / "missing.png")


def test_label_of_wrong_size(tmp_path):
    root = make_camvid(tmp_path / "cv")
    save(root / "trainannot/img0.png", label_map(12, 15, 1))
    with pytest.raises(SkdError) as info:
        CamVid(root, "train")[0]
    message = str(info.value)
    assert "trainannot/img0.png" in message and "train/img0.png" in message
    assert "12x15" in message and "12x16" in message


def test_read_image_converts_modes(tmp_path):
    gray = save(tmp_path / "g.png", np.full((2, 3), 77, np.uint8))
    assert read_image(gray).shape == (3, 2, 3) and (read_image(gray) == 77).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 255
    assert read_image(save(tmp_path / "a.png", rgba))[:, 0, 0].tolist() == [10, 20, 30]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    pal.putpalette([200, 0, 0, 0, 150, 0] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[:, 0, 1].tolist() == [0, 150, 0]
    # As a label, a palette PNG gives its indices, not its colours.
    assert read_label(tmp_path / "p.png").tolist() == [[0, 1]]
    with pytest.raises(SkdError, match="single-channel"):
        read_label(save(tmp_path / "rgb.png", noise_rgb(2, 2)))


def test_check_dataset_reports_every_problem(tmp_path):
    root = make_camvid(tmp_path / "cv", n=6, h=32, w=32)
    ds = CamVid(root, "train")
    assert check_dataset(ds) == []

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    truncate(root / "train/img0.png")  # truncated image
    save(root / "trainannot/img1.png", label_map(30, 32, 1))  # wrong size
    save(root / "trainannot/img2.png", label_map(32, 32, 1, {(0, 0): 40}))  # value out of range
    (root / "trainannot/img3.png").unlink()  # label gone after the dataset was built
    truncate(root / "train/img4.png")  # two problems in one item: truncated image and bad label
    save(root / "trainannot/img4.png", label_map(32, 32, 1, {(0, 0): 200}))
    problems = check_dataset(ds)
    expected = ("train/img0.png", "trainannot/img1.png", "trainannot/img2.png", "trainannot/img3.png",
                "train/img4.png", "trainannot/img4.png")
    assert len(problems) == len(expected)
    for name, problem in zip(expected, problems):
        assert name in problem
    assert "40" in problems[2] and "not found" in problems[3] and "200" in problems[5]


def test_dataset_pickles_for_worker_processes(tmp_path):
    ds = CamVid(make_camvid(tmp_path / "cv"), "train")
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["label"], ds[1]["label"]) and clone.fingerprint == ds.fingerprint
