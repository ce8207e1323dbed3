"""A new user's first hour on a folder dataset of their own (issue 27): the version check at start-up,
check-data's order and its full decode of JPEGs, cache-stats with a config, predict with a folder
dataset's classes, and the message of a store made from other files. Tiny data, on the CPU."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cli as skd
from conftest import run_main
from pipeline.cache.writer import cache_teacher
from pipeline.data import build_dataset
from pipeline.models import build_model
from pipeline.train.checkpoint import save_checkpoint

NAMES = ["road", "car", "sky"]
PALETTE = [[128, 64, 128], [0, 0, 142], [70, 130, 180]]
ARCH = {"name": "pspnet_resnet18", "num_classes": 3, "width": 0.125}


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def make_folder(root: Path, counts: dict[str, int], seed: int = 0, size: tuple[int, int] = (32, 48)) -> Path:
    """A folder dataset with role suffixes (``<seq>/<frame>_image.png`` / ``_label.png``): it needs
    the options image_suffix and label_suffix to pair its files."""
    rng = np.random.default_rng(seed)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": NAMES, "palette": PALETTE}))
    for split, count in counts.items():
        for k in range(count):
            image = root / "images" / split / "seq1" / f"{k:04d}_image.png"
            label = root / "masks" / split / "seq1" / f"{k:04d}_label.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(image)
            Image.fromarray(rng.integers(0, 3, size, dtype=np.uint8)).save(label)
    return root


def write_config(path: Path, root: Path) -> Path:
    path.write_text(yaml.safe_dump({"data": {"dataset": "folder", "root": str(root),
                                             "options": {"image_suffix": "_image", "label_suffix": "_label"}}}))
    return path


def cache_split(root: Path, split: str, out: Path) -> Path:
    dataset = build_dataset("folder", root, split, image_suffix="_image", label_suffix="_label")
    torch.manual_seed(0)
    model = build_model(**ARCH)
    info = {**ARCH, "checkpoint": "teacher.pt", "weights_sha256": "0" * 64}
    return cache_teacher(model, info, dataset, out, batch_size=4, feature_pool=2, workers=0, progress=False)


# -- 1: torch and torchvision must match ----------------------------------------------------------------

@pytest.mark.parametrize("torch_version, torchvision_version, match", [
    # PyTorch's published pairs: torchvision 0.(N + 15) is built for torch 2.N.
    ("2.14.1", "0.29.1", True), ("2.4.0", "0.19.0", True), ("2.0.1", "0.15.2", True),
    ("2.14.1+cpu", "0.29.1+cpu", True),
    ("2.14.1", "0.28.0", False), ("2.13.0", "0.29.1", False),
    ("2.14.1+cpu", "0.29.1", False),  # a CPU torch with a CUDA torchvision: its operators do not load
])
def test_version_pairs(torch_version, torchvision_version, match):
    assert skd.torch_torchvision_match(torch_version, torchvision_version) is match


def test_installed_pair_passes_and_a_mismatch_is_one_line_naming_both_and_the_fix(monkeypatch, capsys):
    import torchvision  # noqa: F401  (loads the compiled operators when the builds match)

    assert hasattr(torch.ops.torchvision, "nms")  # this environment's pair works ...
    skd.check_torch_torchvision()  # ... and passes

    versions = {"torch": "2.14.1+cpu", "torchvision": "0.28.0"}
    monkeypatch.setattr(skd, "installed_version", versions.get)
    monkeypatch.setattr(skd, "torchvision_ops_load", lambda: False)
    code, out, err = run_main(monkeypatch, capsys, "cache-info", "/nonexistent")
    line = one_error_line(code, err)
    assert "torch 2.14.1+cpu" in line and "torchvision 0.28.0" in line
    assert "pip install torch==2.14.1 torchvision==0.29.1" in line and "/nonexistent" not in line
    # Versions that look unusual but whose operators load are let through.
    monkeypatch.setattr(skd, "torchvision_ops_load", lambda: True)
    code, _, err = run_main(monkeypatch, capsys, "cache-info", "/nonexistent")
    assert "no teacher cache at /nonexistent" in one_error_line(code, err)


# -- 12: check-data: problems under their split, and every JPEG decoded in full -------------------------

def corrupt_middle(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = np.random.default_rng(seed).integers(0, 256, 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def street_jpeg(path: Path) -> None:
    """A real JPEG (libjpeg, quality 90) of a synthetic street scene: smooth regions and edges."""
    image = build_dataset("synthetic", None, "val", size=[120, 160], length=1)[0]["image"]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.numpy().transpose(1, 2, 0)).save(path, format="JPEG", quality=90)


def test_check_data_finds_random_bytes_in_the_middle_of_a_jpeg(monkeypatch, capsys, tmp_path):
    root = make_folder(tmp_path / "folder", {"train": 2, "val": 1}, size=(120, 160))
    for split in ("train", "val"):
        for png in (root / "images" / split / "seq1").glob("*.png"):
            street_jpeg(png.with_suffix(".jpg"))
            png.unlink()
    config = write_config(tmp_path / "folder.yaml", root)
    code, out, _ = run_main(monkeypatch, capsys, "check-data", "--config", str(config))
    assert code == 0 and "0 problem(s)" in out  # clean JPEGs pass

    broken = root / "images" / "train" / "seq1" / "0001_image.jpg"
    corrupt_middle(broken, seed=0)
    with Image.open(broken) as img:
        img.load()  # Pillow decodes it without a word: libjpeg conceals the damage
    code, out, _ = run_main(monkeypatch, capsys, "check-data", "--config", str(config))
    assert code == 1
    lines = [line for line in out.splitlines() if not line.startswith("  pairs: ")]
    assert lines[0] == "folder/train: 2 images, 1 problem(s)"
    assert lines[1].startswith("  ") and str(broken) in lines[1] and "corrupt" in lines[1]
    assert lines[2] == "folder/val: 1 images, 0 problem(s)"  # the problem sits under its own split
    assert len(lines) == 3


def test_jpeg_check_passes_the_usual_encodings(tmp_path):
    from pipeline.data.io import check_jpeg_data

    image = build_dataset("synthetic", None, "val", size=[96, 128], length=1)[0]["image"].numpy().transpose(1, 2, 0)
    for k, options in enumerate([{"quality": 95, "subsampling": 0}, {"quality": 75, "progressive": True},
                                 {"quality": 30, "optimize": True}, {"quality": 80, "restart_marker_blocks": 4}]):
        path = tmp_path / f"{k}.jpg"
        Image.fromarray(image).save(path, format="JPEG", **options)
        check_jpeg_data(path)
    grey = tmp_path / "grey.jpg"
    Image.fromarray(image[..., 0]).save(grey, format="JPEG")
    grey.write_bytes(grey.read_bytes() + b"bytes some cameras append after the image")
    check_jpeg_data(grey)


# -- 9: cache-stats --labels with a config; a bad --labels fails first --------------------------------

def test_cache_stats_labels_take_the_config_and_fail_before_the_statistics(monkeypatch, capsys, tmp_path):
    root = make_folder(tmp_path / "folder", {"val": 4})
    store = cache_split(root, "val", tmp_path / "val.zarr")
    config = write_config(tmp_path / "folder.yaml", root)
    output = tmp_path / "stats.json"

    code, out, err = run_main(monkeypatch, capsys, "cache-stats", str(store), "--labels", "folder/val",
                              "--config", str(config), "--output", str(output))
    assert code == 0, err
    stats = json.loads(output.read_text())
    assert 0 <= stats["miou"] <= 1 and "cached teacher on folder/val: mIoU" in out

    output.unlink()
    code, out, err = run_main(monkeypatch, capsys, "cache-stats", str(store), "--labels", "folder/test",
                              "--config", str(config), "--output", str(output))
    assert "images/test" in one_error_line(code, err)
    assert out == "" and not output.exists()  # nothing computed, nothing printed, nothing written

    # Damage found only while scoring (a label file's bytes, not its size): the statistics are kept.
    label = root / "masks" / "val" / "seq1" / "0002_label.png"
    data = bytearray(label.read_bytes())
    data[40:60] = bytes(20)
    label.write_bytes(bytes(data))
    code, out, err = run_main(monkeypatch, capsys, "cache-stats", str(store), "--labels", "folder/val",
                              "--config", str(config), "--output", str(output))
    line = one_error_line(code, err)
    assert str(label) in line and str(output) in line
    stats = json.loads(output.read_text())
    assert "miou" not in stats and stats["images"] == 4


# -- 13: the wrong-store message says how many images and which root --------------------------------

def test_a_store_of_other_files_names_counts_roots_and_the_first_other_id(monkeypatch, capsys, tmp_path):
    store = cache_split(make_folder(tmp_path / "mine", {"val": 4}), "val", tmp_path / "val.zarr")
    other = make_folder(tmp_path / "other", {"val": 3}, seed=1)
    (other / "images" / "val" / "seq1" / "0001_image.png").rename(other / "images" / "val" / "seq1" / "0009_image.png")
    (other / "masks" / "val" / "seq1" / "0001_label.png").rename(other / "masks" / "val" / "seq1" / "0009_label.png")
    config = write_config(tmp_path / "other.yaml", other)
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--config", str(config), "--split", "val",
                            "--cache", str(store))
    line = one_error_line(code, err)
    assert "4 images" in line and "3 images" in line and str(other) in line
    assert "root" in line and "not recorded" in line  # the store does not keep its dataset's root
    assert "'seq1/0001'" in line and "'seq1/0009'" in line  # the first id that differs, on each side


# -- 11: predict colours with a folder dataset's classes, and draws their legend -----------------------

def test_predict_with_a_folder_datasets_classes_and_a_legend(monkeypatch, capsys, tmp_path):
    root = make_folder(tmp_path / "folder", {"val": 1})
    config = write_config(tmp_path / "folder.yaml", root)
    # A model that predicts "car" (class 1) everywhere: a bias on the classifier, no weights.
    model = build_model(**ARCH).eval()
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    save_checkpoint(tmp_path / "model.pt", {"arch": ARCH, "model": model.state_dict()})
    image = root / "images" / "val" / "seq1" / "0000_image.png"
    out = tmp_path / "out"
    args = ["predict", str(image), "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out), "--device", "cpu"]

    code, _, err = run_main(monkeypatch, capsys, *args, "--dataset", "folder")
    assert "--data-root" in one_error_line(code, err) and not out.exists()

    code, _, err = run_main(monkeypatch, capsys, *args, "--config", str(config))
    assert code == 0, err
    colour = np.asarray(Image.open(out / "0000_image_color.png"))
    assert (colour == PALETTE[1]).all()  # classes.yaml's colour of "car"
    overlay = np.asarray(Image.open(out / "0000_image_overlay.png").convert("RGB"))
    assert overlay.shape[0] > 32 and overlay.shape[1] >= 48  # the image, and a legend below it
    blended = (np.asarray(Image.open(image)).astype(int) + np.array(PALETTE[1])) / 2
    assert np.abs(overlay[:32, :48].astype(int) - blended).max() <= 1
    legend = overlay[32:]
    assert (legend == PALETTE[1]).all(axis=-1).sum() >= 50  # a swatch in car's colour ...
    assert not (legend == PALETTE[0]).all(axis=-1).any()  # ... and none of the classes not present

    code, _, err = run_main(monkeypatch, capsys, *args, "--dataset", "folder", "--data-root", str(root))
    assert code == 0, err


# -- 2: Cityscapes-style roots, and what check-data paired ---------------------------------------------

def make_cityscapes_style(root: Path) -> dict[str, np.ndarray]:
    """``leftImg8bit/<split>/<city>/<frame>_leftImg8bit.png`` with ``gtFine/<split>/<city>/`` holding each
    frame's ``_gtFine_labelIds.png`` beside a colour image and an instance map that must not be read.
    Returns each frame's label array by id."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": NAMES}))
    labels = {}
    for split, frames in {"train": ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                                    "bochum/bochum_000000_000313"], "val": ["lindau/lindau_000000_000019"]}.items():
        for frame in frames:
            image = root / "leftImg8bit" / split / f"{frame}_leftImg8bit.png"
            gt = root / "gtFine" / split / frame
            image.parent.mkdir(parents=True, exist_ok=True)
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(image)
            labels[frame] = rng.integers(0, 3, (16, 24), dtype=np.uint8)
            Image.fromarray(labels[frame]).save(f"{gt}_gtFine_labelIds.png")
            Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(f"{gt}_gtFine_color.png")
            Image.fromarray(np.full((16, 24), 200, dtype=np.uint8)).save(f"{gt}_gtFine_instanceIds.png")
    return labels


CITYSCAPES_STYLE = {"images": "leftImg8bit/{split}", "masks": "gtFine/{split}",
                    "image_suffix": "_leftImg8bit.png", "label_suffix": "_gtFine_labelIds.png"}


def test_a_cityscapes_style_root_pairs_its_per_sequence_folders_and_check_data_says_what(monkeypatch, capsys,
                                                                                          tmp_path):
    root = tmp_path / "streets"
    labels = make_cityscapes_style(root)
    dataset = build_dataset("folder", root, "train", **CITYSCAPES_STYLE)
    assert dataset.ids == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000313"]
    for i, frame in enumerate(dataset.ids):  # each image with its own labelIds file, not the colour or instance map
        assert dataset.image_paths[i] == root / "leftImg8bit" / "train" / f"{frame}_leftImg8bit.png"
        np.testing.assert_array_equal(dataset[i]["label"].numpy(), labels[frame])

    config = tmp_path / "streets.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "folder", "root": str(root), "options": CITYSCAPES_STYLE}}))
    code, out, _ = run_main(monkeypatch, capsys, "check-data", "--config", str(config))
    assert code == 0, out
    assert out.splitlines() == [
        "folder/train: 3 images, 0 problem(s)",
        f"  pairs: {root}/leftImg8bit/train/**/X_leftImg8bit.png ↔ {root}/gtFine/train/**/X_gtFine_labelIds.png; "
        "first: aachen/aachen_000000_000019",
        "folder/val: 1 images, 0 problem(s)",
        f"  pairs: {root}/leftImg8bit/val/**/X_leftImg8bit.png ↔ {root}/gtFine/val/**/X_gtFine_labelIds.png; "
        "first: lindau/lindau_000000_000019",
    ]


def test_images_beside_their_masks_pair_by_role_suffix(tmp_path):
    """One folder per sequence with ``<frame>_image.jpg`` next to ``<frame>_label.png``: no symlinks."""
    rng = np.random.default_rng(4)
    root = tmp_path / "frames"
    (root / "train" / "seq1").mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": NAMES}))
    labels = {}
    for frame in ("seq1/0001", "seq1/0002"):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / "train" / f"{frame}_image.jpg")
        labels[frame] = rng.integers(0, 3, (16, 24), dtype=np.uint8)
        Image.fromarray(labels[frame]).save(root / "train" / f"{frame}_label.png")
    dataset = build_dataset("folder", root, "train", images="{split}", masks="{split}", image_suffix="_image",
                            label_suffix="_label")
    assert dataset.ids == ["seq1/0001", "seq1/0002"]
    for i, frame in enumerate(dataset.ids):
        np.testing.assert_array_equal(dataset[i]["label"].numpy(), labels[frame])
    assert dataset.pairing == f"{root}/train/**/X_image.* ↔ {root}/train/**/X_label.png"


@pytest.mark.parametrize("options, message", [
    ({"images": "leftImg8bit", "masks": "gtFine/{split}"}, "option images: 'leftImg8bit' must contain {split}"),
    ({"images": "../elsewhere/{split}", "masks": "gtFine/{split}"}, "must be a folder under the dataset root"),
    ({"images": "gtFine/{split}", "masks": "gtFine/{split}"}, "give the options image_suffix and label_suffix"),
    ({**CITYSCAPES_STYLE, "label_suffix": "_gtFine_labelTrainIds.png"},
     "no mask files ending in '_gtFine_labelTrainIds.png' under"),
])
def test_layout_options_that_cannot_work_are_one_line(monkeypatch, capsys, tmp_path, options, message):
    root = tmp_path / "streets"
    make_cityscapes_style(root)
    config = tmp_path / "streets.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "folder", "root": str(root), "options": options}}))
    code, _, err = run_main(monkeypatch, capsys, "check-data", "--config", str(config))
    assert message in one_error_line(code, err)


# -- 3: the teacher's own model settings in a recipe -----------------------------------------------------

def test_a_recipe_trains_a_pretrained_teacher_at_width_1_and_narrow_students(monkeypatch, capsys, tmp_path):
    import torchvision

    backbone = tmp_path / "resnet18-imagenet.pth"  # an ImageNet checkpoint's layout (random weights: no download)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), backbone)
    recipe = {
        "data": {"dataset": "synthetic", "options": {"size": [32, 48], "length": 8}, "workers": 0},
        "teacher_model": {"width": 1.0, "pretrained_backbone": str(backbone)},
        "model": {"name": "pspnet_resnet18", "width": 0.5},
        "train": {"iterations": 1, "batch_size": 4, "device": "cpu"},
    }
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(recipe))

    code, _, err = run_main(monkeypatch, capsys, "train-teacher", "--config", str(config), "--out", str(tmp_path / "t"))
    assert code == 0, err
    teacher = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert teacher["arch"]["width"] == 1.0 and teacher["arch"]["name"] == "pspnet_resnet18"
    # The backbone was loaded: one SGD step after it, the first convolution is still the file's (the
    # cosine of two independent random initialisations is about 0).
    loaded = torch.load(backbone, weights_only=True)["conv1.weight"]
    assert torch.cosine_similarity(teacher["model"]["conv1.weight"].flatten(), loaded.flatten(), dim=0) > 0.8

    code, _, err = run_main(monkeypatch, capsys, "train-student", "--config", str(config), "--losses", "none",
                            "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert torch.load(tmp_path / "s" / "model.pt", weights_only=True)["arch"]["width"] == 0.5

    # A width on the command line wins over the section, and the shape error then says what to do.
    code, _, err = run_main(monkeypatch, capsys, "train-teacher", "--config", str(config), "--width", "0.5",
                            "--out", str(tmp_path / "t2"))
    line = one_error_line(code, err)
    assert "shape" in line and "--width 1" in line and "teacher_model" in line


# -- 5, 6, 7: levels against the training scales, the teacher's mIoU, progress without a terminal ------

def test_cache_teacher_scores_its_teacher_and_training_compares_warns_and_reports_progress(
        monkeypatch, capsys, caplog, tiny_config, tiny_teacher, tmp_path):
    import logging

    import zarr

    from pipeline.cache.store import TeacherStore
    from pipeline.evaluate import evaluate_cache

    monkeypatch.setenv("SKD_PROGRESS_EVERY", "0")  # a progress line at every update (30 s apart by default)
    caplog.set_level(logging.INFO)
    store = tmp_path / "teacher.zarr"
    code, _, err = run_main(monkeypatch, capsys, "cache-teacher", "--config", str(tiny_config), "--teacher",
                            str(tiny_teacher), "--cache", str(store), "--levels", "1,1.5", "--workers", "0")
    assert code == 0, err
    # 6: the mIoU of the maps just written is the one evaluate --cache reads back from the store.
    recorded = zarr.open_group(str(store), mode="r").attrs["teacher_miou"]
    dataset = build_dataset("synthetic", None, "train", size=[32, 48], length=16)
    assert recorded["miou"] == pytest.approx(evaluate_cache(TeacherStore(store), dataset, progress=False).miou(), abs=1e-12)
    assert (recorded["dataset"], recorded["split"], recorded["images"]) == ("synthetic", "train", 16)
    assert f"teacher mIoU on synthetic/train (its maps as stored, 16 images): {100 * recorded['miou']:.2f}" in caplog.text
    # 7: no terminal, so lines of progress instead of a bar (batches of 4 of the 16 images).
    assert "cache-teacher: 4/16 img (25%), " in caplog.text and "cache-teacher: 16/16 img (100%), " in caplog.text
    assert "ETA" in caplog.text

    def train(name: str, scales: str, teacher_miou: float) -> list[str]:
        group = zarr.open_group(str(store), mode="r+")
        group.attrs["teacher_miou"] = {**recorded, "miou": teacher_miou}
        caplog.clear()
        code, _, err = run_main(monkeypatch, capsys, "train-student", "--config", str(tiny_config), "--cache",
                                str(store), "--losses", "pi", "--scale-range", scales, "--crop-size", "24x24",
                                "--iterations", "2", "--val-every", "2", "--workers", "0", "--out", str(tmp_path / name))
        assert code == 0, err
        assert f"the store's teacher: mIoU {100 * teacher_miou:.2f} on synthetic/train (16 images" in caplog.text
        assert "train: 1/2 it (50%), " in caplog.text and "train: 2/2 it (100%), " in caplog.text  # 7
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    # 5: crops zoom in to 2, the store's finest map is at 1.5: one warning, naming the fix.
    # 6: the teacher's recorded mIoU at 0 is beaten by any student that gets a pixel right.
    warnings = train("zoom-in", "0.5,2", teacher_miou=0.0)
    assert len(warnings) == 2, warnings
    assert [w for w in warnings if w.startswith("training scales up to 2 but the store") and w.endswith(
        "has maps at levels [1, 1.5]: crops that zoom in beyond 1.5 are replayed from a coarser map; "
        "cache with --levels 1,1.5,2")]
    assert [w for w in warnings if w.startswith("this run's val mIoU ") and "beats its teacher's 0.00 on synthetic/train" in w]
    # Scales within the store's levels and a teacher no run can beat: neither warning.
    assert train("within", "0.5,1.5", teacher_miou=1.0) == []


def test_a_resumed_cache_does_not_pass_off_a_part_of_the_split_as_the_teachers_miou(tmp_path, caplog):
    import logging
    import shutil

    import zarr

    caplog.set_level(logging.INFO)
    root = make_folder(tmp_path / "folder", {"train": 8})
    dataset = build_dataset("folder", root, "train", image_suffix="_image", label_suffix="_label")
    torch.manual_seed(0)
    model = build_model(**ARCH)
    info = {**ARCH, "checkpoint": "teacher.pt", "weights_sha256": "0" * 64}
    store = tmp_path / "store.zarr"

    def cache() -> None:
        cache_teacher(model, info, dataset, store, batch_size=4, feature_pool=2, shard_images=4, workers=0,
                      progress=False)

    cache()
    assert zarr.open_group(str(store), mode="r").attrs["teacher_miou"]["images"] == 8
    # As a run stopped after its first shard leaves it: a partial store, half done, never scored.
    partial = tmp_path / "store.zarr.partial"
    shutil.move(store, partial)
    group = zarr.open_group(str(partial), mode="r+")
    group["done"][4:] = False
    group.attrs.update({"complete": False})
    del group.attrs["teacher_miou"]
    caplog.clear()
    cache()  # resumes: the teacher runs on the second shard alone
    assert "teacher_miou" not in zarr.open_group(str(store), mode="r").attrs
    assert "teacher mIoU not computed: an earlier run cached part of this split" in caplog.text
