"""The bad inputs catalogue (docs/RELIABILITY.md, "Bad inputs"): one test per way a user can get an
input wrong, run end to end through the command line as the user runs it.

Each checks what the user sees (one line ``error: ...`` naming the file and what is wrong, exit code
2, no traceback) and what is left on disk (no store, no half-made checkpoint, output or temporary
file). The library-level checks of the same inputs live in test_data, test_cache, test_train and
test_models; these add the command line on top. Datasets are tiny ``folder`` datasets built here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner
from PIL import Image

import cli as skd
from pipeline.data import build_dataset
from pipeline.data.io import read_image
from pipeline.errors import SkdError
from pipeline.models import build_model
from pipeline.train.checkpoint import save_checkpoint
from test_cli import assert_user_error, run_main

# zarr warns about the store's numcodecs filters on every array it opens (docs/CACHE.md says why they are used).
pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3 specification")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "road", "car"]
H, W = 32, 48
N = 4  # images per split
STUDENT = {"name": "pspnet_resnet18", "num_classes": 3, "width": 0.125}


# -- tiny inputs ---------------------------------------------------------------------------------------

def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def mask(seed: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.random.default_rng(100 + seed).integers(0, len(CLASSES), (h, w)).astype(np.uint8)
    m[0, :4] = 255  # a few unlabelled pixels: 255 is the folder dataset's ignore value
    return m


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_folder(root: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """``images/<split>/imK.png`` and ``masks/<split>/imK.png`` for K < N, and a 3-class ``classes.yaml``."""
    for s, split in enumerate(splits):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for k in range(N):
            save(root / "images" / split / f"im{k}.png", rgb(10 * s + k))
            save(root / "masks" / split / f"im{k}.png", mask(10 * s + k))
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": CLASSES}))
    return root


def write_config(path: Path, root: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "data": {"dataset": "folder", "root": str(root), "workers": 0},
        "model": {"name": "pspnet_resnet18", "width": 0.125},
        "train": {"iterations": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 1, "device": "cpu"},
        "cache": {"batch_size": 2, "feature_pool": 2},
    }))
    return path


def make_teacher(path: Path, seed: int = 0, **arch) -> Path:
    torch.manual_seed(seed)
    arch = {**STUDENT, **arch}
    save_checkpoint(path, {"arch": arch, "model": build_model(**arch).state_dict()})
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256): what is on disk, to compare before and after."""
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def no_checkpoint(run: Path) -> None:
    names = {p.name for p in run.rglob("*")} if run.exists() else set()
    assert not names & {"last.pt", "model.pt"}, names
    assert not [n for n in names if n.endswith(".tmp")], names


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture
def config(tmp_path, folder) -> Path:
    return write_config(tmp_path / "folder.yaml", folder)


@pytest.fixture
def teacher(tmp_path) -> Path:
    return make_teacher(tmp_path / "teacher.pt")


def cache(monkeypatch, capsys, config: Path, teacher: Path, store: Path, *extra: str) -> Path:
    code, _, err = run_main(monkeypatch, capsys, "cache-teacher", "--config", str(config), "--teacher", str(teacher),
                            "--cache", str(store), *extra)
    assert code == 0, err
    return store


# -- rows 1 to 4: a broken image or label -------------------------------------------------------------------

def truncated_png(root: Path) -> tuple[Path, list[str]]:
    path = truncate(root / "images/train/im1.png")
    return path, [str(path), "truncated"]


def truncated_jpeg(root: Path) -> tuple[Path, list[str]]:
    (root / "images/train/im1.png").unlink()
    path = truncate(save(root / "images/train/im1.jpg", rgb(1), quality=95))
    return path, [str(path), "truncated"]


def label_of_wrong_size(root: Path) -> tuple[Path, list[str]]:
    path = save(root / "masks/train/im1.png", mask(1, H, W - 8))
    return path, [str(path), str(root / "images/train/im1.png"), f"{H}x{W - 8}", f"{H}x{W}"]


def label_out_of_range(root: Path) -> tuple[Path, list[str]]:
    m = mask(1)
    m[5, 5] = len(CLASSES)  # class ids are 0..2: 3 is no class, and not the ignore value 255 either
    path = save(root / "masks/train/im1.png", m)
    return path, [str(path), f"[{len(CLASSES)}]"]


DEFECTS = [truncated_png, truncated_jpeg, label_of_wrong_size, label_out_of_range]
COMMANDS = ["train-teacher", "train-teacher --workers 2", "cache-teacher", "evaluate", "check-data"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("defect", DEFECTS, ids=lambda f: f.__name__)
def test_a_broken_image_or_label_is_named_by_every_command(monkeypatch, capsys, tmp_path, folder, config, teacher,
                                                           defect, command):
    path, fragments = defect(folder)
    run, store, output = tmp_path / "run", tmp_path / "stores" / "train.zarr", tmp_path / "eval.json"
    cfg = ["--config", str(config)]
    args = {
        "train-teacher": ["train-teacher", *cfg, "--out", str(run)],
        "train-teacher --workers 2": ["train-teacher", *cfg, "--out", str(run), "--workers", "2"],
        "cache-teacher": ["cache-teacher", *cfg, "--teacher", str(teacher), "--cache", str(store)],
        "evaluate": ["evaluate", *cfg, "--split", "train", "--checkpoint", str(teacher), "--output", str(output)],
        "check-data": ["check-data", *cfg, "--split", "train"],
    }[command]
    code, out, err = run_main(monkeypatch, capsys, *args)
    if command == "check-data":  # a report of every problem, not an error
        assert code == 1 and "Traceback" not in err
        problems = [line.strip() for line in out.splitlines() if line.startswith("  ") and not line.strip().startswith("pairs:")]
        assert f"folder/train: {N} images, 1 problem(s)" in out and len(problems) == 1, out
        assert all(f in problems[0] for f in fragments), problems
        return
    # Also with DataLoader worker processes: one line, not the worker's traceback.
    line = assert_user_error(code, err, *fragments)
    if defect is label_out_of_range:
        assert "255" not in line.split("not allowed")[0]  # the ignore value is not reported as a bad value
    no_checkpoint(run)
    assert not output.exists()
    # cache-teacher keeps what it wrote in <store>.partial (unusable: train-student and evaluate
    # refuse it); nothing at the store's path, no lock or temporary file.
    assert not store.exists()
    assert {p.name for p in store.parent.glob("*")} <= {"train.zarr.partial"}


def test_the_same_cache_teacher_command_works_once_the_file_is_fixed(monkeypatch, capsys, tmp_path, folder, config,
                                                                     teacher):
    good = (folder / "images/train/im1.png").read_bytes()
    truncated_png(folder)
    store = tmp_path / "stores" / "train.zarr"
    args = ["cache-teacher", "--config", str(config), "--teacher", str(teacher), "--cache", str(store)]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert_user_error(code, err, "im1.png")
    (folder / "images/train/im1.png").write_bytes(good)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert store.is_dir() and not Path(f"{store}.partial").exists()


# -- row 5: RGBA and greyscale images ----------------------------------------------------------------------

def write_png16(path: Path, grey: np.ndarray) -> Path:
    Image.fromarray(grey.astype(np.uint16)).save(path)  # a 16-bit greyscale PNG
    assert Image.open(path).mode == "I;16"
    return path


def test_rgba_and_greyscale_images_read_as_their_rgb_conversion(monkeypatch, capsys, tmp_path, teacher):
    """Converted silently, as image viewers show them: alpha dropped (colours kept), grey copied to R, G
    and B, 16-bit grey to its high byte (as Pillow reads 16-bit colour PNGs), palette to its colours.
    The expected images are computed here with numpy, not by the converter under test."""
    odd, plain = make_folder(tmp_path / "odd", ("train",)), make_folder(tmp_path / "plain", ("train",))
    base = rgb(7)
    alpha = np.random.default_rng(8).integers(0, 256, (H, W), dtype=np.uint8)
    grey = base[..., 0]
    grey16 = np.random.default_rng(9).integers(0, 65536, (H, W)).astype(np.uint16)
    palette = np.random.default_rng(10).integers(0, 256, (256, 3), dtype=np.uint8)
    index = base[..., 1]

    images = odd / "images/train"
    save(images / "im0.png", np.dstack([base, alpha]))  # RGBA
    save(images / "im1.png", grey)  # 8-bit greyscale (L)
    write_png16(images / "im2.png", grey16)
    pal = Image.fromarray(index, mode="P")
    pal.putpalette(palette.flatten().tolist())
    pal.save(images / "im3.png")
    assert [Image.open(images / f"im{k}.png").mode for k in range(4)] == ["RGBA", "L", "I;16", "P"]

    expected = [base, np.dstack([grey] * 3), np.dstack([(grey16 >> 8).astype(np.uint8)] * 3), palette[index]]
    for k, want in enumerate(expected):
        save(plain / "images/train" / f"im{k}.png", want)
        got = read_image(images / f"im{k}.png").permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"im{k}")

    # End to end: the same evaluation as on the RGB files.
    reports = []
    for root in (odd, plain):
        output = tmp_path / f"{root.name}.json"
        code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "folder", "--data-root", str(root),
                                "--split", "train", "--checkpoint", str(teacher), "--device", "cpu",
                                "--output", str(output))
        assert code == 0, err
        reports.append(json.loads(output.read_text()))
    assert reports[0]["per_class_iou"] == reports[1]["per_class_iou"]
    assert reports[0]["pixel_accuracy"] == reports[1]["pixel_accuracy"]


def test_float_and_32_bit_images_are_refused(monkeypatch, capsys, tmp_path, teacher):
    """Float and 32-bit integer images have no fixed range (Pillow's conversion clips them to black
    or white): refused, naming the file."""
    root = make_folder(tmp_path / "data", ("train",))
    path = root / "images/train/im2.tif"
    (root / "images/train/im2.png").unlink()
    Image.fromarray(rgb(2)[..., 0].astype(np.float32) / 255).save(path)
    assert Image.open(path).mode == "F"
    output = tmp_path / "eval.json"
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "folder", "--data-root", str(root),
                            "--split", "train", "--checkpoint", str(teacher), "--output", str(output))
    assert_user_error(code, err, str(path), "mode F")
    assert not output.exists()
    Image.fromarray(rgb(2)[..., 0].astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    with pytest.raises(SkdError, match="mode I"):
        read_image(path)


# -- row 6: an empty split -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train-teacher", "cache-teacher", "evaluate", "check-data"])
def test_an_empty_split_is_refused(monkeypatch, capsys, tmp_path, folder, config, teacher, command):
    for f in [*(folder / "images/train").iterdir(), *(folder / "masks/train").iterdir()]:
        f.unlink()
    run, store, output = tmp_path / "run", tmp_path / "stores" / "train.zarr", tmp_path / "eval.json"
    cfg = ["--config", str(config)]
    args = {"train-teacher": ["train-teacher", *cfg, "--out", str(run)],
            "cache-teacher": ["cache-teacher", *cfg, "--teacher", str(teacher), "--cache", str(store)],
            "evaluate": ["evaluate", *cfg, "--split", "train", "--checkpoint", str(teacher), "--output", str(output)],
            "check-data": ["check-data", *cfg, "--split", "train"]}[command]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert_user_error(code, err, "no images", "'train'", str(folder))
    assert not run.exists() and not store.parent.exists() and not output.exists()


def test_an_empty_synthetic_split_is_refused(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"dataset": "synthetic", "options": {"length": 0}}}))
    code, _, err = run_main(monkeypatch, capsys, "train-teacher", "--config", str(recipe), "--out", str(tmp_path / "run"))
    assert_user_error(code, err, "length", "0")
    assert not (tmp_path / "run").exists()


# -- row 7: two images with the same id -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train-teacher", "cache-teacher", "check-data"])
def test_two_images_with_one_name_are_refused(monkeypatch, capsys, tmp_path, folder, config, teacher, command):
    jpg = save(folder / "images/train/im0.jpg", rgb(0), quality=95)  # next to im0.png: which is im0?
    run, store = tmp_path / "run", tmp_path / "stores" / "train.zarr"
    cfg = ["--config", str(config)]
    args = {"train-teacher": ["train-teacher", *cfg, "--out", str(run)],
            "cache-teacher": ["cache-teacher", *cfg, "--teacher", str(teacher), "--cache", str(store)],
            "check-data": ["check-data", *cfg, "--split", "train"]}[command]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert_user_error(code, err, "'im0'", str(jpg), str(folder / "images/train/im0.png"))
    assert not run.exists() and not store.parent.exists()


# -- row 8: a store from another dataset, teacher or class count --------------------------------------------

def test_a_store_of_other_data_is_refused(monkeypatch, capsys, tmp_path, folder, config, teacher):
    store = cache(monkeypatch, capsys, config, teacher, tmp_path / "train.zarr")
    before = tree(store)
    cfg = ["--config", str(config)]

    # Another split of the same dataset.
    output = tmp_path / "eval.json"
    code, _, err = run_main(monkeypatch, capsys, "evaluate", *cfg, "--cache", str(store), "--split", "val",
                            "--output", str(output))
    assert_user_error(code, err, str(store), "folder/train", "folder/val")
    assert not output.exists()

    # The same names, other files: one image re-saved with other pixels.
    save(folder / "images/train/im2.jpg", rgb(2), quality=90)
    (folder / "images/train/im2.png").unlink()
    run = tmp_path / "student"
    for args in (["train-student", *cfg, "--cache", str(store), "--losses", "pi", "--out", str(run)],
                 ["evaluate", *cfg, "--cache", str(store), "--split", "train", "--output", str(output)]):
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert_user_error(code, err, str(store), "different files", "fingerprint")
    assert not run.exists() and not output.exists()
    assert tree(store) == before


def test_a_store_of_another_teacher_trains_but_is_never_mixed_into(monkeypatch, capsys, tmp_path, config, teacher):
    other = make_teacher(tmp_path / "other.pt", seed=1, width=0.25)
    cfg = ["--config", str(config)]
    # train-student takes any teacher's store of its data: the student learns from whichever it is.
    store = cache(monkeypatch, capsys, config, other, tmp_path / "other.zarr")
    run = tmp_path / "student"
    code, out, err = run_main(monkeypatch, capsys, "train-student", *cfg, "--cache", str(store), "--losses", "pi,pa",
                              "--out", str(run))
    assert code == 0, err
    assert (run / "model.pt").is_file()

    # A partial store of `teacher` (an interrupted run: 2 of 4 images done) is not resumed with `other`.
    target = tmp_path / "train.zarr"
    partial = Path(f"{target}.partial")
    shutil.copytree(cache(monkeypatch, capsys, config, teacher, tmp_path / "done.zarr"), partial)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs["complete"] = False
    group["done"][2:] = False
    before = tree(partial)
    code, _, err = run_main(monkeypatch, capsys, "cache-teacher", *cfg, "--teacher", str(other), "--cache", str(target))
    assert_user_error(code, err, str(partial), "different teacher", "--overwrite")
    assert tree(partial) == before and not target.exists()

    # Nor is a complete store of `teacher` replaced without --overwrite.
    complete = tmp_path / "done.zarr"
    before = tree(complete)
    code, _, err = run_main(monkeypatch, capsys, "cache-teacher", *cfg, "--teacher", str(other), "--cache", str(complete))
    assert_user_error(code, err, str(complete), "already exists", "--overwrite")
    assert tree(complete) == before and not Path(f"{complete}.partial").exists()


def test_a_teacher_or_store_with_another_class_count_is_refused(monkeypatch, capsys, tmp_path, folder, config, teacher):
    eight = make_teacher(tmp_path / "eight.pt", num_classes=8)
    cfg = ["--config", str(config)]
    store, run, output = tmp_path / "eight.zarr", tmp_path / "student", tmp_path / "eval.json"
    for args in (["cache-teacher", *cfg, "--teacher", str(eight), "--cache", str(store)],
                 ["train-student", *cfg, "--teacher", str(eight), "--losses", "pi", "--out", str(run)],
                 ["evaluate", *cfg, "--checkpoint", str(eight), "--output", str(output)]):
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert_user_error(code, err, str(eight), "8 classes", "has 3")
    assert not store.exists() and not Path(f"{store}.partial").exists() and not run.exists() and not output.exists()

    # A 3-class store, after the class list gained a fourth class.
    three = cache(monkeypatch, capsys, config, teacher, tmp_path / "three.zarr")
    (folder / "classes.yaml").write_text(yaml.safe_dump({"names": [*CLASSES, "bicycle"]}))
    assert build_dataset("folder", folder, "train").num_classes == 4
    code, _, err = run_main(monkeypatch, capsys, "train-student", *cfg, "--cache", str(three), "--losses", "pi",
                            "--out", str(run))
    assert_user_error(code, err, str(three))
    assert not run.exists()


# -- row 9: a half-written store ---------------------------------------------------------------------------------

@pytest.fixture
def half_written(monkeypatch, capsys, tmp_path, config, teacher) -> Path:
    """``train.zarr.partial`` as an interrupted cache-teacher leaves it: 2 of 4 images flagged done."""
    store = cache(monkeypatch, capsys, config, teacher, tmp_path / "whole.zarr")
    partial = tmp_path / "train.zarr.partial"
    store.rename(partial)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs["complete"] = False
    group["done"][2:] = False
    return partial


@pytest.mark.parametrize("given", ["store", "partial"])
@pytest.mark.parametrize("command", ["train-student", "evaluate"])
def test_a_half_written_store_is_refused(monkeypatch, capsys, tmp_path, config, half_written, command, given):
    path = tmp_path / "train.zarr" if given == "store" else half_written
    run, output = tmp_path / "student", tmp_path / "eval.json"
    args = (["train-student", "--config", str(config), "--cache", str(path), "--losses", "pi", "--out", str(run)]
            if command == "train-student" else
            ["evaluate", "--config", str(config), "--cache", str(path), "--split", "train", "--output", str(output)])
    before = tree(half_written)
    code, _, err = run_main(monkeypatch, capsys, *args)
    line = assert_user_error(code, err, str(path), "re-run skd cache-teacher")
    assert ("a partial store exists" if given == "store" else "incomplete (2/4 images cached)") in line
    assert not run.exists() and not output.exists() and tree(half_written) == before


def copied_in_part(store: Path, lost: str) -> Path:
    """A complete store whose copy lost files: the ``done`` flags' chunk (the flags read False), or the
    shard of teacher maps (the maps read as the NaN fill value)."""
    files = {"flags": store / "done/c/0", "maps": store / "log_probs/c/0/0/0/0"}
    assert all(f.is_file() for f in files.values()), sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    files[lost].unlink()
    return store


@pytest.mark.parametrize("lost", ["flags", "maps"])
def test_evaluating_a_store_copied_in_part_is_refused(monkeypatch, capsys, tmp_path, config, teacher, lost):
    store = copied_in_part(cache(monkeypatch, capsys, config, teacher, tmp_path / "train.zarr"), lost)
    output = tmp_path / "eval.json"
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--config", str(config), "--cache", str(store),
                            "--split", "train", "--output", str(output))
    line = assert_user_error(code, err, str(store), "cache-verify")
    assert ("0/4 images flagged done" if lost == "flags" else "'im0'") in line
    assert not output.exists()


@pytest.mark.parametrize("lost", ["flags", "maps"])
def test_training_from_a_store_copied_in_part_is_refused(monkeypatch, capsys, tmp_path, config, teacher, lost):
    store = copied_in_part(cache(monkeypatch, capsys, config, teacher, tmp_path / "train.zarr"), lost)
    run = tmp_path / "student"
    code, _, err = run_main(monkeypatch, capsys, "train-student", "--config", str(config), "--cache", str(store),
                            "--losses", "pi", "--out", str(run))
    assert_user_error(code, err, str(store))
    no_checkpoint(run)


# -- row 10: read-only folders and stores --------------------------------------------------------------------

# Runs several commands in one process started without the right to write into read-only folders
# (as root, the capability that overrides file permissions is dropped), and prints the results.
DRIVER = r"""
import contextlib, io, json, logging, sys, traceback
import cli
probe, scenarios = json.loads(sys.argv[1])
try:
    open(probe, "w").close()
    writable = True
except OSError:
    writable = False
results = {"probe_writable": writable}
for name, args in scenarios.items():
    logging.root.handlers.clear()  # each command's log handler writes to that command's stderr
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["skd", "-q", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what `python -m cli` would print: a traceback, exit code 1
            traceback.print_exc()
            code = 1
    results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


def read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)


@pytest.fixture(scope="module")
def read_only_runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("read_only")
    config = write_config(tmp / "folder.yaml", make_folder(tmp / "data", ("train",)))
    teacher = make_teacher(tmp / "teacher.pt")
    ro, rw = tmp / "ro", tmp / "rw"
    result = CliRunner().invoke(skd.cli, ["cache-teacher", "--config", str(config), "--teacher", str(teacher),
                                          "--cache", str(ro / "train.zarr")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rw.mkdir()
    shutil.copytree(ro / "train.zarr", rw / "train.zarr")
    read_only(ro)  # the folder and the store in it
    read_only(rw / "train.zarr")  # the store only: its folder stays writable
    cfg = ["--config", str(config)]
    scenarios = {
        "new store in a read-only folder": ["cache-teacher", *cfg, "--teacher", str(teacher),
                                            "--cache", str(ro / "new.zarr")],
        "new store in a new folder under a read-only one": ["cache-teacher", *cfg, "--teacher", str(teacher),
                                                            "--cache", str(ro / "sub" / "new.zarr")],
        "overwrite a read-only store": ["cache-teacher", *cfg, "--teacher", str(teacher),
                                        "--cache", str(rw / "train.zarr"), "--overwrite"],
        "train from a read-only store": ["train-student", *cfg, "--cache", str(ro / "train.zarr"),
                                         "--losses", "pi,pa,ho", "--workers", "2", "--out", str(rw / "student")],
        "evaluate a read-only store": ["evaluate", *cfg, "--cache", str(ro / "train.zarr"), "--split", "train",
                                       "--output", str(rw / "eval.json")],
    }
    command = [sys.executable, "-c", DRIVER, json.dumps([str(ro / "probe"), scenarios])]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot take away the right to write")
        command = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search", *command]
    before = tree(ro)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if results["probe_writable"]:
        pytest.skip("the read-only folder is writable all the same (a filesystem or user that ignores permissions)")
    yield {"results": results, "ro": ro, "rw": rw, "ro_before": before}
    for p in [tmp, *tmp.rglob("*")]:  # let pytest clean up
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o200)


def test_a_new_store_in_a_read_only_folder_fails_clearly(read_only_runs):
    r = read_only_runs["results"]["new store in a read-only folder"]
    assert_user_error(r["code"], r["stderr"], str(read_only_runs["ro"]), "Permission denied")
    assert tree(read_only_runs["ro"]) == read_only_runs["ro_before"]


def test_a_new_store_in_a_new_folder_under_a_read_only_one_fails_clearly(read_only_runs):
    r = read_only_runs["results"]["new store in a new folder under a read-only one"]
    assert_user_error(r["code"], r["stderr"], str(read_only_runs["ro"] / "sub"), "Permission denied")
    assert tree(read_only_runs["ro"]) == read_only_runs["ro_before"]


def test_overwriting_a_read_only_store_fails_clearly_or_succeeds_cleanly(read_only_runs):
    r = read_only_runs["results"]["overwrite a read-only store"]
    rw = read_only_runs["rw"]
    assert "Traceback" not in r["stderr"], r["stderr"]
    if r["code"] != 0:
        assert_user_error(r["code"], r["stderr"], str(rw / "train.zarr"))
    assert sorted(p.name for p in rw.iterdir() if p.name.startswith("train.zarr")) == ["train.zarr"]


def test_training_and_evaluating_from_a_read_only_store_work(read_only_runs):
    results, rw = read_only_runs["results"], read_only_runs["rw"]
    for name in ("train from a read-only store", "evaluate a read-only store"):
        assert results[name]["code"] == 0, results[name]["stderr"]
    assert (rw / "student" / "model.pt").is_file()
    assert json.loads((rw / "eval.json").read_text())["cache"] == str(read_only_runs["ro"] / "train.zarr")
    assert tree(read_only_runs["ro"]) == read_only_runs["ro_before"]  # nothing written next to or into it


# -- row 11: a checkpoint of another architecture ----------------------------------------------------------------

def test_resuming_with_another_architecture_is_refused(monkeypatch, capsys, tmp_path, config):
    run = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "train-teacher", "--config", str(config), "--out", str(run))
    assert code == 0, err
    before = tree(run)
    code, _, err = run_main(monkeypatch, capsys, "train-teacher", "--config", str(config), "--out", str(run),
                            "--width", "0.25", "--resume")
    assert_user_error(code, err, str(run / "last.pt"), "'width': 0.125", "'width': 0.25")
    assert tree(run) == before


def test_weights_of_another_architecture_are_refused(monkeypatch, capsys, tmp_path, config):
    wider = build_model(**{**STUDENT, "width": 0.25}).state_dict()
    mislabelled = tmp_path / "mislabelled.pt"  # says width 0.125, holds width-0.25 weights
    save_checkpoint(mislabelled, {"arch": STUDENT, "model": wider})
    mobilenet = tmp_path / "mobilenet.pt"  # says pspnet_resnet18, holds a MobileNetV2 PSPNet's weights
    save_checkpoint(mobilenet, {"arch": STUDENT, "model": build_model("pspnet_mobilenetv2", 3).state_dict()})
    plain = tmp_path / "plain.pt"  # weights without the architecture
    torch.save(wider, plain)
    first = next(iter(wider))
    expectations = {mislabelled: [first, str(tuple(wider[first].shape))], mobilenet: ["has shape", "the model expects"],
                    plain: ["does not say which model"]}
    cfg = ["--config", str(config)]
    for path, fragments in expectations.items():
        store, output = tmp_path / "t.zarr", tmp_path / "eval.json"
        for args in (["evaluate", *cfg, "--checkpoint", str(path), "--output", str(output)],
                     ["cache-teacher", *cfg, "--teacher", str(path), "--cache", str(store)]):
            code, _, err = run_main(monkeypatch, capsys, *args)
            assert_user_error(code, err, str(path), *fragments)
        assert not output.exists() and not store.exists() and not Path(f"{store}.partial").exists()


# -- row 12: a checkpoint that carries pickled code ---------------------------------------------------------------

class Payload:
    """An arbitrary object of this module: unpickling it would import this module and build it."""


def payload_function() -> None:
    pass


class Armed:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from a checkpoint ran')",)


@pytest.mark.parametrize("payload", ["armed", "instance", "function"])
def test_a_checkpoint_carrying_pickled_code_is_refused_and_never_run(monkeypatch, capsys, tmp_path, config, payload):
    marker = tmp_path / "MARKER"
    obj = {"armed": Armed(marker), "instance": Payload(), "function": payload_function}[payload]
    name = {"armed": "exec", "instance": "Payload", "function": "payload_function"}[payload]
    path = tmp_path / "model.pt"
    torch.save({"arch": STUDENT, "model": build_model(**STUDENT).state_dict(), "extra": obj}, path)
    if payload == "armed":  # the proof that it is armed: loading it the unsafe way runs its code
        torch.load(path, weights_only=False)
        assert marker.read_text() == "code from a checkpoint ran"
        marker.unlink()

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "last.pt")  # a run folder whose last checkpoint was swapped for this file
    cfg = ["--config", str(config)]
    store, output = tmp_path / "t.zarr", tmp_path / "eval.json"
    for args, named in ((["evaluate", *cfg, "--checkpoint", str(path), "--output", str(output)], path),
                        (["cache-teacher", *cfg, "--teacher", str(path), "--cache", str(store)], path),
                        (["train-student", *cfg, "--teacher", str(path), "--losses", "pi", "--out", str(tmp_path / "s")], path),
                        (["train-teacher", *cfg, "--out", str(run), "--resume"], run / "last.pt"),
                        (["train-teacher", *cfg, "--pretrained-backbone", str(path), "--out", str(tmp_path / "b")], path)):
        code, _, err = run_main(monkeypatch, capsys, *args)
        line = assert_user_error(code, err, str(named), name, "weights_only=True")
        assert "weights_only=False" not in line and "\x1b" not in line  # no advice to load it the unsafe way
    assert not marker.exists()
    assert not output.exists() and not store.exists() and not Path(f"{store}.partial").exists()
    assert not (tmp_path / "s").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]
