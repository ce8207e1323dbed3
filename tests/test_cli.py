"""The command line: help texts, the whole pipeline end to end, and one-line user errors.

The pipeline runs as real processes (``python -m cli``) from the project root; user errors run
through the same ``main()`` in-process (one of them also as a process), which is where an SkdError
becomes ``error: <message>`` and exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import cli as skd
from conftest import CAMVID, TINY_DATA, run_main
from pipeline.cache.store import TeacherStore
from pipeline.errors import SkdError
from pipeline.train.checkpoint import model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CLASSES = ["sky", "road", "sidewalk", "building", "vegetation", "vehicle", "pole", "person"]


def run_process(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.one_thread
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def run_ok(*args: str) -> str:
    result = run_process(*args)
    assert result.returncode == 0, f"skd {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def assert_user_error(code: int, err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == 2
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- help ------------------------------------------------------------------------------------------

def test_help_lists_the_commands_and_their_key_options():
    runner = CliRunner()
    top = runner.invoke(skd.cli, ["--help"])
    assert top.exit_code == 0
    for command in ("train-teacher", "cache-teacher", "train-student", "evaluate", "check-data", "cache-info"):
        assert command in top.output

    expected = {
        "train-teacher": ["--dataset", "--data-root", "--config", "--out", "--resume", "--iterations"],
        "cache-teacher": ["--dataset", "--data-root", "--teacher", "--split", "--cache", "./data/<dataset>.zarr"],
        "train-student": ["--dataset", "--data-root", "--cache", "./data/<dataset>.zarr", "--losses", "--teacher",
                          "--lambda-pi", "--lambda-pa", "--lambda-ho", "--resume"],
        "evaluate": ["--dataset", "--data-root", "--checkpoint", "--cache", "--split", "--output"],
        "check-data": ["--dataset", "--data-root", "--split"],
    }
    for command, options in expected.items():
        result = runner.invoke(skd.cli, [command, "--help"])
        assert result.exit_code == 0, result.output
        for option in options:
            assert option in result.output, f"{command} --help lacks {option}"


# -- end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> dict:
    """teacher -> cache (train and val) -> distilled student -> evaluations, as a user runs them."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tmp / "tiny.yaml"  # tiny_config's recipe, for the whole module (that fixture is per test)
    config.write_text(yaml.safe_dump({
        "data": TINY_DATA, "model": {"name": "pspnet_resnet18", "width": 0.125},
        "train": {"iterations": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "device": "cpu"},
        "cache": {"batch_size": 4, "feature_pool": 2},
    }))
    cfg = ["--config", str(config)]
    teacher, student = tmp / "teacher", tmp / "student"
    stores, results = tmp / "stores", tmp / "results"
    run = {"config": config, "teacher": teacher, "student": student,
           "train_store": stores / "train.zarr", "val_store": stores / "val.zarr"}

    run["train_teacher"] = run_ok("train-teacher", *cfg, "--out", str(teacher))
    # The train store in sliding windows with a second level; the val store on whole images.
    run["cache_train"] = run_ok("cache-teacher", *cfg, "--teacher", str(teacher / "model.pt"),
                                "--cache", str(run["train_store"]), "--teacher-window", "16x24", "--levels", "1,2")
    run["train_student"] = run_ok("train-student", *cfg, "--cache", str(run["train_store"]), "--losses", "pi,pa,ho",
                                  "--out", str(student))
    run["evaluate_student"] = run_ok("evaluate", *cfg, "--checkpoint", str(student / "model.pt"), "--device", "cpu",
                                     "--output", str(results / "student.json"))
    run["cache_val"] = run_ok("cache-teacher", *cfg, "--teacher", str(teacher / "model.pt"), "--split", "val",
                              "--cache", str(run["val_store"]), "--teacher-window", "whole")
    run["evaluate_cache"] = run_ok("evaluate", *cfg, "--cache", str(run["val_store"]),
                                   "--output", str(results / "cache.json"))
    run["cache_info"] = run_ok("cache-info", str(run["val_store"]))
    run["student_json"] = json.loads((results / "student.json").read_text())
    run["cache_json"] = json.loads((results / "cache.json").read_text())
    return run


def test_pipeline_trains_teacher_and_student(pipeline_run):
    teacher, student = pipeline_run["teacher"], pipeline_run["student"]
    assert str(teacher / "model.pt") in pipeline_run["train_teacher"]
    assert str(student / "model.pt") in pipeline_run["train_student"]
    teacher_log = [json.loads(line) for line in (teacher / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in teacher_log] == [1, 2]
    assert {"task", "grad_task"} == set(teacher_log[0]) - {"iteration", "lr", "step_s", "elapsed_s"}
    student_log = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in student_log] == [1, 2]
    terms = {"task", "pi", "pa", "ho"}
    assert set(student_log[-1]) - {"iteration", "lr", "step_s", "elapsed_s"} == terms | {"d_adv", "d_gp"} | {f"grad_{t}" for t in terms}
    assert json.loads((student / "config.json").read_text())["distill"]["cache"] == str(pipeline_run["train_store"])
    for store in (pipeline_run["train_store"], pipeline_run["val_store"]):
        assert store.is_dir() and not Path(f"{store}.partial").exists()
    train_pre = TeacherStore(pipeline_run["train_store"]).attrs["preprocessing"]
    assert train_pre["teacher_window"] == [16, 24] and train_pre["levels"] == [1.0, 2.0]
    assert TeacherStore(pipeline_run["val_store"]).attrs["preprocessing"]["teacher_window"] is None


def check_report(report: dict) -> None:
    assert list(report["per_class_iou"]) == SYNTHETIC_CLASSES
    assert 0.0 <= report["pixel_accuracy"] <= 1.0
    ious = [v for v in report["per_class_iou"].values() if v is not None]
    assert ious and all(0.0 <= v <= 1.0 for v in ious)
    assert report["miou"] == pytest.approx(sum(ious) / len(ious), abs=1e-9)


def test_pipeline_evaluates_the_student(pipeline_run):
    report = pipeline_run["student_json"]
    check_report(report)
    assert report["split"] == "val"
    table = pipeline_run["evaluate_student"]
    assert "mIoU" in table and all(name in table for name in SYNTHETIC_CLASSES)
    # The model's cost next to its mIoU, as the paper's tables give it.
    model, _ = model_from_checkpoint(report["checkpoint"])
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["gflops_per_image"] > 0 and "GFLOPs per" in table


def test_cached_teacher_scores_like_the_live_teacher(pipeline_run):
    from pipeline.data import build_dataset
    from pipeline.evaluate import evaluate_model
    from pipeline.metrics import evaluation_report
    from pipeline.train.checkpoint import model_from_checkpoint

    report = pipeline_run["cache_json"]
    check_report(report)
    assert "mIoU" in pipeline_run["evaluate_cache"]
    # The store holds the teacher's own maps (in float16): the same scores up to rounding at near-ties.
    dataset = build_dataset("synthetic", None, "val", **TINY_DATA["options"])
    model, _ = model_from_checkpoint(pipeline_run["teacher"] / "model.pt")
    live = evaluation_report(evaluate_model(model, dataset, "cpu", progress=False), dataset.class_names)
    assert report["pixel_accuracy"] == pytest.approx(live["pixel_accuracy"], abs=0.01)
    assert report["miou"] == pytest.approx(live["miou"], abs=0.02)


def test_cache_info_prints_provenance(pipeline_run):
    text = pipeline_run["cache_info"].strip()
    provenance_text, rest = text.split("\n}\n", 1)
    provenance = json.loads(provenance_text + "\n}")
    table, progress = rest.rsplit("\n", 1)
    # One line per array with its shape, chunks, shards and codecs.
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert {"log_probs", "features", "feature_scale", "image_hw", "done"} <= set(rows)
    assert "(16, 8, 4, 6)" in rows["log_probs"] and "FixedScaleOffset" in rows["log_probs"]
    weights = (pipeline_run["teacher"] / "model.pt").read_bytes()
    assert provenance["teacher"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert provenance["teacher"]["name"] == "pspnet_resnet18" and provenance["teacher"]["num_classes"] == 8
    assert provenance["dataset"]["name"] == "synthetic" and provenance["dataset"]["split"] == "val"
    assert provenance["dataset"]["num_images"] == 16 and provenance["dataset"]["class_names"] == SYNTHETIC_CLASSES
    assert "ids" not in provenance["dataset"]  # the id list is left out of the printout
    assert provenance["complete"] is True and provenance["feature_pool"] == 2
    assert progress.startswith("16/16 images cached")


# -- user errors -------------------------------------------------------------------------------------

@pytest.fixture
def garbage_checkpoint(tmp_path) -> Path:
    path = tmp_path / "garbage.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def test_user_error_in_a_real_process(tiny_config, garbage_checkpoint, tmp_path):
    output = tmp_path / "eval.json"
    result = run_process("evaluate", "--config", str(tiny_config), "--checkpoint", str(garbage_checkpoint),
                         "--device", "cpu", "--output", str(output))
    assert_user_error(result.returncode, result.stderr, str(garbage_checkpoint))
    assert not output.exists()


def test_missing_data_root(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "train-teacher", "--dataset", "camvid", "--data-root", "/nonexistent",
                            "--out", str(out))
    assert_user_error(code, err, "/nonexistent")
    assert not out.exists()


def test_unknown_dataset(monkeypatch, capsys, garbage_checkpoint):
    code, _, err = run_main(monkeypatch, capsys, "evaluate", "--dataset", "nosuchset", "--checkpoint", str(garbage_checkpoint))
    assert_user_error(code, err, "nosuchset", "synthetic")


def test_corrupt_checkpoint(monkeypatch, capsys, tiny_config, garbage_checkpoint, tmp_path):
    cfg = ["--config", str(tiny_config)]
    store = tmp_path / "store.zarr"
    code, _, err = run_main(monkeypatch, capsys, "cache-teacher", *cfg, "--teacher", str(garbage_checkpoint),
                            "--cache", str(store))
    assert_user_error(code, err, str(garbage_checkpoint))
    assert not store.exists() and not Path(f"{store}.partial").exists()

    output = tmp_path / "eval.json"
    code, _, err = run_main(monkeypatch, capsys, "evaluate", *cfg, "--checkpoint", str(garbage_checkpoint),
                            "--output", str(output))
    assert_user_error(code, err, str(garbage_checkpoint))
    assert not output.exists()


def test_foreign_store_for_train_student(monkeypatch, capsys, pipeline_run, tmp_path):
    out = tmp_path / "student"
    code, _, err = run_main(monkeypatch, capsys, "train-student", "--config", str(pipeline_run["config"]),
                            "--cache", str(pipeline_run["val_store"]), "--losses", "pi", "--out", str(out))
    assert_user_error(code, err, str(pipeline_run["val_store"]), "synthetic/val")
    assert not out.exists()


def test_missing_store_for_train_student(monkeypatch, capsys, tiny_config, tmp_path):
    out, store = tmp_path / "student", tmp_path / "absent.zarr"
    # No --losses, and the recipe names none: train-student distils with all three terms by default.
    args = ["train-student", "--config", str(tiny_config), "--cache", str(store), "--out", str(out)]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert "cache-teacher" not in assert_user_error(code, err, str(store))

    Path(f"{store}.partial").mkdir()  # an interrupted cache-teacher run
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert_user_error(code, err, str(store), "re-run skd cache-teacher")
    assert not out.exists()


def test_unknown_distillation_term(monkeypatch, capsys, tiny_config, tmp_path):
    out = tmp_path / "student"
    code, _, err = run_main(monkeypatch, capsys, "train-student", "--config", str(tiny_config),
                            "--cache", str(tmp_path / "store.zarr"), "--losses", "pi,xx", "--out", str(out))
    assert_user_error(code, err, "xx")
    assert not out.exists()


# -- check-data ------------------------------------------------------------------------------------------

def test_check_data_on_camvid_val(monkeypatch, capsys):
    if not (CAMVID / "val").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (../shared/data/camvid)")
    code, out, _ = run_main(monkeypatch, capsys, "check-data", "--dataset", "camvid", "--data-root", str(CAMVID),
                            "--split", "val")
    assert code == 0
    assert "camvid/val: 101 images, 0 problem(s)" in out  # SegNet's CamVid val split has 101 images


def test_check_data_reports_a_broken_image(monkeypatch, capsys, tmp_path):
    root = tmp_path / "folder"
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": ["background", "road", "car"]}))
    rng = np.random.default_rng(0)
    for name in ("good", "broken"):
        Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(root / "images" / "train" / f"{name}.png")
        Image.fromarray(rng.integers(0, 3, (8, 10), dtype=np.uint8)).save(root / "masks" / "train" / f"{name}.png")
    broken = root / "images" / "train" / "broken.png"
    broken.write_bytes(broken.read_bytes()[:40])  # cut off mid-header

    code, out, _ = run_main(monkeypatch, capsys, "check-data", "--dataset", "folder", "--data-root", str(root),
                            "--split", "train")
    assert code == 1
    assert "folder/train: 2 images, 1 problem(s)" in out
    problems = [line for line in out.splitlines() if line.startswith("  ") and not line.strip().startswith("pairs:")]
    assert len(problems) == 1 and "broken.png" in problems[0] and "good" not in problems[0]


def test_train_student_help_shows_the_measured_defaults():
    # The defaults come from the recipe sweep in docs/RESULTS.md: λ_pi = 10 on the per-pixel mean KL at
    # T = 1, ramped up over the first third of training (the reference-equivalent 80 stays available
    # as an option, not the default).
    result = CliRunner().invoke(skd.cli, ["train-student", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "per-pixel mean KL" in text and "[default: 10]" in text.split("--lambda-pi", 1)[1].split("--temperature")[0]
    assert "[default: 0.33]" in text.split("--kd-warmup", 1)[1].split("--pseudo-labels")[0]
    assert "80" in text.split("--lambda-pi", 1)[1].split("--temperature")[0]
    assert "[default: 1]" in text.split("--temperature", 1)[1].split("--lambda-pa")[0]
    assert "[default: 0.5]" in text.split("--lambda-pa", 1)[1].split("--lambda-ho")[0]
    assert "[default: pi,pa,ho]" in text.split("--losses", 1)[1].split("--lambda-pi")[0]


def test_the_run_folder_comes_from_out_then_the_config_then_the_command(tmp_path, monkeypatch):
    import pipeline.train.trainer as trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: seen.append(cfg.train.out) or Path(cfg.train.out) / "model.pt")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"out": "runs/from-config"}}))
    runner = CliRunner()
    for args, want in ((["train-teacher"], "runs/teacher"), (["train-teacher", "--config", str(config)], "runs/from-config"),
                       (["train-teacher", "--config", str(config), "--out", "runs/train"], "runs/train")):
        result = runner.invoke(skd.cli, args)
        assert result.exit_code == 0, result.output
        assert seen[-1] == want


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise SkdError(f"store s.zarr: log_probs of image 'im{i}' (#{i}) cannot be read")


def test_an_error_raised_in_a_loader_worker_keeps_its_one_line():
    """PyTorch re-raises a worker's exception with the worker's traceback as its message; skd's keeps one line."""
    loader = torch.utils.data.DataLoader(_Broken(), num_workers=1)
    with pytest.raises(SkdError) as caught:
        next(iter(loader))
    assert str(caught.value) == "store s.zarr: log_probs of image 'im0' (#0) cannot be read"
