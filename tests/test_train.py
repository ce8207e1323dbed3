"""Training: every ablation runs and logs finite terms, resume is exact, failures stop cleanly,
checkpoints are atomic and validated, the schedule and data order are the documented ones."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_DATA
from pipeline.data.views import view_for_epoch, view_spec
from pipeline.cache.writer import cache_teacher
from pipeline.config import Config, load_config, merge
from pipeline.data import build_dataset
from pipeline.distill.losses import pairwise_loss, pixelwise_loss
from pipeline.errors import SkdError
from pipeline.models import build_model
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.data.samples import EpochBatches
from pipeline.data.transforms import AugmentConfig
from pipeline.schedule import kd_weight, poly_schedule
from pipeline.train.trainer import Trainer, train

TEACHER_ARCH = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.25}
STUDENT_ARCH = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125}
BOOKKEEPING = {"iteration", "lr", "step_s", "elapsed_s"}


def tiny_dataset(seed: int = 0):
    return build_dataset("synthetic", None, "train", **TINY_DATA["options"], seed=seed)


def write_cache(tmp: Path, name: str, dataset, feature_pool: int = 2, **options) -> Path:
    torch.manual_seed(0)
    teacher = build_model(**TEACHER_ARCH)
    return cache_teacher(teacher, dict(TEACHER_ARCH), dataset, tmp / name, batch_size=4, feature_pool=feature_pool,
                         workers=0, progress=False, **options)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A teacher cache of the tiny synthetic train split (the data of ``tiny_config``), its
    features max-pooled by 2."""
    return write_cache(tmp_path_factory.mktemp("cache"), "train.zarr", tiny_dataset())


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory) -> Path:
    """The same with the teacher's features at full resolution (feature_pool 1), as fd needs them."""
    return write_cache(tmp_path_factory.mktemp("cache"), "dense.zarr", tiny_dataset(), feature_pool=1)


def make_config(tiny_config: Path, out: Path, losses=(), cache: Path | None = None, **sections) -> Config:
    """The tiny recipe with a run folder, distillation terms and per-section overrides."""
    cfg = load_config(tiny_config)
    updates = copy.deepcopy(sections)
    updates.setdefault("train", {})["out"] = str(out)
    updates.setdefault("distill", {}).update(losses=list(losses), cache=str(cache) if cache else None)
    return merge(cfg, updates)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def interrupted_run(cfg: Config, stop_after: int, monkeypatch) -> None:
    """Train until ``stop_after`` iterations are done, then interrupt as Ctrl-C would."""
    step = Trainer.step

    def step_or_interrupt(self, batch, **kwargs):
        if self.iteration == stop_after:
            raise KeyboardInterrupt
        return step(self, batch, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "step", step_or_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)


# -- ablations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("losses", [(), ("pi",), ("pi", "pa"), ("pi", "pa", "ho"), ("fd",)], ids=lambda t: "+".join(t) or "none")
def test_every_ablation_trains_with_finite_logged_terms(tiny_config, store, dense_store, tmp_path, losses):
    out = tmp_path / "run"
    cfg = make_config(tiny_config, out, losses, cache=(dense_store if "fd" in losses else store) if losses else None)
    model_path = train(cfg, progress=False)

    terms = {"task", *losses}
    grads = {f"grad_{t}" for t in terms}  # each term's gradient norm on the student's PSP features
    expected = terms | grads | ({"d_adv", "d_gp"} if "ho" in losses else set())
    records = read_log(out)
    assert [r["iteration"] for r in records] == [2, 4]  # log_every 2, 4 iterations
    for record in records:
        assert set(record) == expected | BOOKKEEPING
        assert all(math.isfinite(v) for v in record.values()), record
        assert all(record[g] >= 0 for g in grads)
        # Every term pulls on the features (a zero norm would mean it was cut off the graph).
        assert all(record[g] > 0 for g in grads), record
    # Poly decay from the default lr 0.01 over 4 iterations, logged after the step's update.
    assert records[0]["lr"] == pytest.approx(0.01 * (1 - 2 / 4) ** 0.9, rel=1e-9)
    assert records[1]["lr"] == pytest.approx(0.0, abs=1e-12)

    assert model_path == out / "model.pt"
    model, arch = model_from_checkpoint(model_path)
    assert arch == STUDENT_ARCH
    last = load_checkpoint(out / "last.pt")
    assert last["iteration"] == 4
    assert ("discriminator" in last) == ("ho" in losses)
    assert ("fd_adapter" in last) == ("fd" in losses)  # trained with the student, not part of model.pt
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, last["model"][name]), name
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 32, 48)).logits
    assert logits.shape == (1, 8, 4, 6) and torch.isfinite(logits).all()


# -- resume ------------------------------------------------------------------------------------

def test_resume_is_exact(tiny_config, store, tmp_path, monkeypatch):
    # Augmentation on, so that a resumed run must also replay the same crops, flips and order.
    # Scales up to 1: a stored feature cell (pool 2) stays within the 2x2-pixel pair-wise nodes.
    sections = {"data": {"crop_size": [32, 32], "scale_range": [0.75, 1.0], "flip": True, "workers": 0}}
    terms = ("pi", "pa", "ho")
    one_go = tmp_path / "one_go"
    train(make_config(tiny_config, one_go, terms, store, **sections), progress=False)

    resumed = tmp_path / "resumed"
    interrupted_run(make_config(tiny_config, resumed, terms, store, **sections), stop_after=2, monkeypatch=monkeypatch)
    assert load_checkpoint(resumed / "last.pt")["iteration"] == 2
    assert not (resumed / "model.pt").exists()
    train(make_config(tiny_config, resumed, terms, store, **sections), resume=True, progress=False)

    a, b = load_checkpoint(one_go / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["iteration"] == b["iteration"] == 4
    for part in ("model", "discriminator"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.allclose(a[part][name].float(), b[part][name].float(), rtol=0, atol=1e-6), f"{part}.{name}"
    # The interrupted run logged iteration 2, the resumed one iteration 4, with the same losses.
    log_a, log_b = read_log(one_go), read_log(resumed)
    assert [r["iteration"] for r in log_b] == [2, 4]
    for ra, rb in zip(log_a, log_b):
        for key in {"task", "pi", "pa", "ho", "d_adv", "d_gp"}:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["iteration"], key)


def test_a_compiled_student_trains_as_the_eager_one(tiny_config, store, tmp_path, monkeypatch):
    """--compile wraps the student's training forward in torch.compile; the run logs the same terms
    and ends with the same weights as an eager run, and checkpoints hold the plain module. (The
    aot_eager backend: the same graph capture and autograd as inductor, without its minute of code
    generation.)"""
    compile_ = torch.compile
    compiled = []

    def compile_with_aot_eager(module, **kwargs):
        compiled.append(module)
        return compile_(module, backend="aot_eager")

    # Two steps, each logged: float rounding differs between the two, and training amplifies it.
    terms, steps = ("pi", "pa", "ho"), {"iterations": 2, "log_every": 1}
    train(make_config(tiny_config, tmp_path / "eager", terms, store, train=steps), progress=False)
    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    train(make_config(tiny_config, tmp_path / "compiled", terms, store, train=steps | {"compile": True}), progress=False)

    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)  # the student, once
    for a, b in zip(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled"), strict=True):
        for key in ("task", "pi", "pa", "ho", "d_adv", "d_gp"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["iteration"], key)
    eager, compiled_run = load_checkpoint(tmp_path / "eager" / "last.pt"), load_checkpoint(tmp_path / "compiled" / "last.pt")
    assert eager["model"].keys() == compiled_run["model"].keys()  # no "_orig_mod." prefixes
    for name, tensor in eager["model"].items():
        assert torch.allclose(tensor.float(), compiled_run["model"][name].float(), rtol=1e-3, atol=1e-5), name


def test_a_student_that_cannot_compile_stops_with_a_clear_error(tiny_config, tmp_path, monkeypatch):
    """A compiler that fails (say, no C++ toolchain for inductor) stops the run on its first step with
    an SkdError naming --compile, and leaves no checkpoint."""
    compile_ = torch.compile

    def failing_backend(graph, example_inputs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compile_(module, backend=failing_backend))
    out = tmp_path / "run"
    with pytest.raises(SkdError, match=r"--compile.*OSError: no C\+\+ compiler found.*without --compile"):
        train(make_config(tiny_config, out, train={"compile": True}), progress=False)
    assert not (out / "last.pt").exists() and not (out / "model.pt").exists()


def test_the_logged_gradient_penalty_is_the_last_one_computed(tiny_config, store, tmp_path):
    """With the penalty on every second step (gp_every 2: iterations 1, 3, ...) and a record every
    second step (iterations 2, 4, ...), the record shows the penalty of the step before, as a run
    that logs every step shows it at that step, not the 0 of a step without one."""
    logs = {}
    for every in (1, 2):
        out = tmp_path / f"every{every}"
        train(make_config(tiny_config, out, ("pi", "ho"), store, distill={"gp_every": 2},
                          train={"iterations": 2, "log_every": every}), progress=False)
        logs[every] = read_log(out)
    penalty = logs[1][0]["d_gp"]  # iteration 1: a step with the penalty
    assert penalty > 0
    assert [r["iteration"] for r in logs[2]] == [2]
    assert logs[2][0]["d_gp"] == pytest.approx(penalty, rel=1e-6)
    assert logs[1][1]["d_gp"] == pytest.approx(penalty, rel=1e-6)  # iteration 2 computes none


def test_validation_logs_the_val_miou_and_keeps_the_best_model(tiny_config, tmp_path):
    from pipeline.evaluate import evaluate_model

    out = tmp_path / "run"
    train(make_config(tiny_config, out, train={"val_every": 2, "iterations": 6}), progress=False)
    logged = [r for r in read_log(out) if "val_miou" in r]
    assert [r["iteration"] for r in logged] == [2, 4, 6]
    best = load_checkpoint(out / "best.pt")
    assert best["val_miou"] == max(r["val_miou"] for r in logged)
    assert best["iteration"] == max(logged, key=lambda r: r["val_miou"])["iteration"]
    # An independent evaluation of best.pt (and of model.pt, the last iteration's) gives the logged values.
    val = build_dataset("synthetic", None, "val", **TINY_DATA["options"])
    model, _ = model_from_checkpoint(out / "best.pt")
    assert float(evaluate_model(model, val, progress=False).miou()) == pytest.approx(best["val_miou"], abs=1e-9)
    last, _ = model_from_checkpoint(out / "model.pt")
    assert float(evaluate_model(last, val, progress=False).miou()) == pytest.approx(logged[-1]["val_miou"], abs=1e-9)


def test_tensorboard_events_hold_the_logged_values(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(make_config(tiny_config, out, train={"val_every": 2, "tensorboard": True}), progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = read_log(out)
    task = [(e.step, e.value) for e in events.Scalars("train/task")]
    assert task == [(r["iteration"], pytest.approx(r["task"], rel=1e-6)) for r in logged]
    assert [e.value for e in events.Scalars("val_miou")] == pytest.approx([r["val_miou"] for r in logged], rel=1e-6)


# -- failures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("term", ["pi", "pa"])
def test_nan_stops_with_the_term_named_and_keeps_the_last_checkpoint(tiny_config, store, tmp_path, monkeypatch, term):
    out = tmp_path / "run"
    cfg = make_config(tiny_config, out, ("pi", "pa"), store)
    interrupted_run(cfg, stop_after=2, monkeypatch=monkeypatch)
    before = sha256(out / "last.pt")

    # The resumed run (same settings) meets a non-finite value of one term on its first step.
    loss = {"pi": pixelwise_loss, "pa": pairwise_loss}[term]
    monkeypatch.setattr(f"pipeline.train.trainer.{loss.__name__}", lambda *args, **kwargs: loss(*args, **kwargs) * float("nan"))
    with pytest.raises(SkdError) as info:
        train(cfg, resume=True, progress=False)
    message = str(info.value)
    assert f"'{term}'" in message and "iteration 3" in message and "intact" in message
    assert "\n" not in message
    assert sha256(out / "last.pt") == before
    assert load_checkpoint(out / "last.pt")["iteration"] == 2
    assert not (out / "model.pt").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_config, store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_config(tiny_config, out, ("pi", "pa", "ho"), cache=store)
    calls = []

    def nan_on_third_step(*args, **kwargs):
        calls.append(1)
        loss = pixelwise_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr("pipeline.train.trainer.pixelwise_loss", nan_on_third_step)
    with pytest.raises(SkdError, match=r"loss term 'pi' became nan at iteration 3.*last\.pt is intact"):
        train(cfg, progress=False)
    assert load_checkpoint(out / "last.pt")["iteration"] == 2  # checkpoint_every 2: the state before
    assert not (out / "model.pt").exists()


def test_a_wall_clock_budget_stops_the_run_with_the_schedule_spent(tiny_config, store, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(tiny_config, out, ("pi", "ho"), cache=store,
                      train={"budget_minutes": 0.05, "iterations": 10**6, "log_every": 1})
    train(cfg, progress=False)
    records = read_log(out)
    elapsed = [r["elapsed_s"] for r in records]
    assert 1 < len(records) < 10**6 and elapsed == sorted(elapsed)
    assert elapsed[-1] >= 3.0 and elapsed[-2] < 3.0  # stopped at the first step past the 3 s budget
    # The poly schedule runs over the budget: each step's lr is (1 - elapsed before it / budget)^0.9.
    for before, record in zip(elapsed, records[1:]):
        assert record["lr"] == pytest.approx(0.01 * (1 - before / 3.0) ** 0.9, rel=1e-6)
    last = load_checkpoint(out / "last.pt")
    assert last["iteration"] == len(records) and last["elapsed_s"] == pytest.approx(elapsed[-1])


def test_resume_without_a_checkpoint_is_refused(tiny_config, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SkdError, match="--resume: no checkpoint"):
        Trainer(make_config(tiny_config, out), resume=True, progress=False)
    assert not out.exists()


def test_an_existing_run_is_not_overwritten(tiny_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(tiny_config, out, train={"iterations": 1}), progress=False)
    before = sha256(out / "last.pt")
    with pytest.raises(SkdError, match="--resume"):
        Trainer(make_config(tiny_config, out), progress=False)
    assert sha256(out / "last.pt") == before


def test_resume_with_another_architecture_is_refused(tiny_config, tmp_path):
    out = tmp_path / "run"
    train(make_config(tiny_config, out, train={"iterations": 1}), progress=False)
    with pytest.raises(SkdError, match="last.pt"):
        Trainer(make_config(tiny_config, out, model={"width": 0.25}), resume=True, progress=False)


def test_feature_distillation_from_pooled_features_is_refused(tiny_config, store, dense_store, tmp_path):
    """fd regresses each output pixel on the teacher's feature at that pixel: features stored
    max-pooled (feature_pool 2) and upsampled are not that, with views or without (an online
    teacher gives the dense ones). Pair-wise nodes of 2x2 pixels may use them."""
    views = write_cache(tmp_path, "views.zarr", tiny_dataset(), view_bank=view_spec(AugmentConfig((32, 32)), 2))
    for cache, data in ((store, {}), (views, {"crop_size": [32, 32]})):
        with pytest.raises(SkdError, match=r"max-pooled by 2.*--feature-pool 1.*--feature-projection"):
            Trainer(make_config(tiny_config, tmp_path / "run", ("pi", "fd"), cache, data=data), progress=False)
    assert Trainer(make_config(tiny_config, tmp_path / "run", ("pi", "pa"), store), progress=False).store.feature_pool == 2
    assert Trainer(make_config(tiny_config, tmp_path / "run", ("fd",), dense_store), progress=False).adapter is not None
    assert not (tmp_path / "run").exists()


def test_a_store_of_other_data_is_refused(tiny_config, tmp_path):
    foreign = write_cache(tmp_path, "seed1.zarr", tiny_dataset(seed=1))
    with pytest.raises(SkdError, match="fingerprint"):
        Trainer(make_config(tiny_config, tmp_path / "run", ("pi",), foreign), progress=False)
    with pytest.raises(SkdError, match="no teacher cache"):
        Trainer(make_config(tiny_config, tmp_path / "run", ("pi",), tmp_path / "missing.zarr"), progress=False)
    assert not (tmp_path / "run").exists()


# -- schedule and data order -----------------------------------------------------------------------

def test_poly_schedule_matches_the_formula():
    lr0, n = 0.01, 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    scheduler = poly_schedule(optimizer, n, 0.9)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(n):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    for k in (0, 1, 3, 5, 9, 10):
        assert lrs[k] == pytest.approx(lr0 * (1 - k / n) ** 0.9, rel=1e-12, abs=1e-15)
    assert lrs[5] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert lrs[10] == 0.0


def test_epoch_batches_run_on_across_epochs_and_restart_anywhere():
    n, batch = 12, 3

    def first(k: int, start: int = 0, n: int = n, batch: int = batch, seed: int = 7) -> list[list[tuple[int, int]]]:
        return list(itertools.islice(EpochBatches(n, batch, seed=seed, start=start), k))

    full = first(12)  # three epochs of four batches
    assert all(len(b) == batch for b in full)
    for epoch in range(3):
        pairs = [pair for b in full[4 * epoch : 4 * epoch + 4] for pair in b]
        assert {e for e, _ in pairs} == {epoch}
        assert sorted(i for _, i in pairs) == list(range(n))  # each epoch is a permutation
    assert [i for _, i in full[0] + full[1]] != [i for _, i in full[4] + full[5]]  # and a new one
    for start in (1, 4, 6):  # a resumed run continues exactly, across epoch boundaries too
        assert first(12 - start, start) == full[start:]
    assert first(12) == full  # deterministic


def test_epoch_batches_show_every_image_once_per_epoch_when_the_batch_does_not_divide_them():
    """10 images in batches of 4: an epoch's last batch is completed from the next epoch, so that
    over K epochs' worth of batches every image is seen K times, once in each epoch, and with a
    bank of K views every view of it once (the view of an (epoch, image) pair is view_for_epoch's)."""
    n, batch, k, seed = 10, 4, 6, 3
    batches = list(itertools.islice(EpochBatches(n, batch, seed), k * n // batch))
    assert all(len(b) == batch for b in batches)
    stream = [pair for b in batches for pair in b]
    for image in range(n):
        epochs = [e for e, i in stream if i == image]
        assert epochs == list(range(k)), image  # once per epoch, in order
        assert sorted(view_for_epoch(k, seed, image, e) for e in epochs) == list(range(k)), image
    assert [e for e, _ in stream] == sorted(e for e, _ in stream)  # epochs follow one another
    assert {e for e, _ in batches[2]} == {0, 1}  # epoch 0's last two images, epoch 1's first two
    for start in (1, 2, 3, 7):  # a resumed run continues exactly, mid-epoch batches too
        assert list(itertools.islice(EpochBatches(n, batch, seed, start), len(batches) - start)) == batches[start:]
    # Two ranks take halves of the same global batches.
    for b, (r0, r1) in enumerate(zip(*(EpochBatches(n, batch, seed, rank=r, world_size=2) for r in (0, 1)))):
        if b == len(batches):
            break
        assert r0 + r1 == batches[b]


# -- checkpoints -------------------------------------------------------------------------------------

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"iteration": 1, "w": torch.arange(4)})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    save_checkpoint(path, {"iteration": 2, "w": torch.arange(4)})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["iteration"] == 2
    before = path.read_bytes()

    def crash_mid_write(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError):
        save_checkpoint(path, {"iteration": 3})
    assert path.read_bytes() == before  # the previous checkpoint survives a failed save


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    model = build_model(**STUDENT_ARCH)
    save_checkpoint(path, {"arch": STUDENT_ARCH, "model": model.state_dict()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for load in (load_checkpoint, model_from_checkpoint):
        with pytest.raises(SkdError) as info:
            load(path)
        assert_one_line_naming(info, path)
    path.write_bytes(b"")
    for load in (load_checkpoint, model_from_checkpoint):
        with pytest.raises(SkdError) as info:
            load(path)
        assert_one_line_naming(info, path)
    with pytest.raises(SkdError) as info:
        model_from_checkpoint(tmp_path / "absent.pt")
    assert_one_line_naming(info, tmp_path / "absent.pt")


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    weights = build_model(**STUDENT_ARCH).state_dict()
    other_net = tmp_path / "other_net.pt"
    save_checkpoint(other_net, {"arch": {"name": "pspnet_mobilenetv2", "num_classes": 8}, "model": weights})
    other_classes = tmp_path / "other_classes.pt"
    save_checkpoint(other_classes, {"arch": {**STUDENT_ARCH, "num_classes": 5}, "model": weights})
    other_width = tmp_path / "other_width.pt"
    save_checkpoint(other_width, {"arch": {**STUDENT_ARCH, "width": 0.25}, "model": weights})
    plain = tmp_path / "plain.pt"
    torch.save(weights, plain)
    for path in (other_net, other_classes, other_width, plain):
        with pytest.raises(SkdError) as info:
            model_from_checkpoint(path)
        assert_one_line_naming(info, path)
    model, arch = model_from_checkpoint(plain, arch=dict(STUDENT_ARCH))  # a plain state_dict with its arch
    assert arch == STUDENT_ARCH and not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


# -- configuration ---------------------------------------------------------------------------------

def write_yaml(tmp_path: Path, content) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def test_config_layers_defaults_yaml_options(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"train": {"lr": 0.05, "iterations": 100},
                                            "distill": {"losses": ["pi", "pa"]}}))
    assert cfg.train.lr == 0.05 and cfg.train.iterations == 100 and cfg.distill.losses == ["pi", "pa"]
    # Untouched fields keep the paper's recipe.
    assert cfg.train.batch_size == 8 and cfg.train.momentum == 0.9 and cfg.train.weight_decay == 5e-4
    assert cfg.train.poly_power == 0.9 and cfg.distill.lambda_pa == 0.5 and cfg.distill.lambda_ho == 0.1
    # Command-line options override the YAML; an option left out (None) keeps the YAML's value.
    merge(cfg, {"train": {"lr": 0.002, "iterations": None}, "model": {"width": 0.5}})
    assert cfg.train.lr == 0.002 and cfg.train.iterations == 100 and cfg.model.width == 0.5
    assert load_config(None).train.iterations == 40000


@pytest.mark.parametrize("content, match", [
    ({"train": {"learning_rate": 0.1}}, "train.learning_rate"),
    ({"optimizer": {"lr": 0.1}}, "unknown section 'optimizer'"),
    ({"distill": {"losses": ["pi", "xx"]}}, "xx"),
    ({"data": {"crop_size": [512, 512, 3]}}, "crop_size"),
    ({"data": {"scale_range": [2.0, 0.5]}}, "scale_range"),
    ({"train": {"iterations": 0}}, "iterations"),
    ("train: [unclosed", "not valid YAML"),
    (["train", "lr"], "expected a mapping"),
])
def test_bad_config_is_refused(tmp_path, content, match):
    with pytest.raises(SkdError, match=match):
        load_config(write_yaml(tmp_path, content))


def test_bad_options_are_refused():
    with pytest.raises(SkdError, match="xx"):
        merge(Config(), {"distill": {"losses": ["xx"]}})
    with pytest.raises(SkdError, match="crop_size"):
        merge(Config(), {"data": {"crop_size": [1, 2, 3]}})
    with pytest.raises(SkdError, match="config file not found"):
        load_config("/nonexistent/recipe.yaml")


def test_pseudo_labels_are_the_teacher_argmax_where_it_has_a_target():
    from pipeline.train.trainer import pseudo_labels

    # One image, 2 classes on a 1x2 output grid, labels at 2x4: cell 0 says class 1, cell 1 class 0,
    # and cell 1 is padding (no teacher target) so its pixels are ignored.
    log_probs = torch.log(torch.tensor([[[[0.2, 0.9]], [[0.8, 0.1]]]]))
    valid = torch.tensor([[[True, False]]])
    labels = pseudo_labels(log_probs, valid, (2, 4))
    assert labels.tolist() == [[[1, 1, 255, 255], [1, 1, 255, 255]]]


def test_kd_weight_ramps_linearly():
    assert [kd_weight(i, 0) for i in (0, 5)] == [1.0, 1.0]
    assert [kd_weight(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
