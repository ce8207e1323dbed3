"""Distributed training and caching under torchrun, on the CPU with gloo (2 processes).

Each test starts real ``torchrun`` processes (``python -m torch.distributed.run``) running the CLI,
and compares with a one-process run of the same global batch: the facts checked are that the
two-process run computes what one process with the whole batch computes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
import zarr

from conftest import TINY_DATA
from pipeline import parallel
from pipeline.config import DistillConfig
from pipeline.distill.holistic import HolisticTerm
from pipeline.parallel import AllReduceBatchNorm2d
from pipeline.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_ranks(worker, *args) -> dict:
    """``worker(rank, port, *args, results)`` in two processes (gloo on one port); their results.
    Forked rather than spawned: a spawned process imports torch anew, seconds per test."""
    results = mp.Manager().dict()
    context = mp.start_processes(worker, args=(free_port(), *args, results), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("two processes did not finish within 120 s")
    return results


def skd_command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "cli", "--quiet", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "cli", "--quiet", *args]


def run(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(skd_command(nproc, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"skd {' '.join(args)} ({nproc} processes) failed:\n{result.stderr[-3000:]}"
    return result


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# -- BatchNorm over the global batch ------------------------------------------------------------------

def _batchnorm_worker(rank: int, port: int, x: torch.Tensor, grad_out: torch.Tensor, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        bn = AllReduceBatchNorm2d.like(torch.nn.BatchNorm2d(3))
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
        half = slice(rank * 2, rank * 2 + 2)
        xi = x[half].clone().requires_grad_(True)
        y = bn(xi)
        y.backward(grad_out[half])
        weight_grad, bias_grad = bn.weight.grad.clone(), bn.bias.grad.clone()
        dist.all_reduce(weight_grad)  # what DDP does with the parameters' gradients (summed here)
        dist.all_reduce(bias_grad)
        results[rank] = (y.detach(), xi.grad, weight_grad, bias_grad, bn.running_mean.clone(), bn.running_var.clone())
    finally:
        dist.destroy_process_group()


def test_allreduce_batchnorm_equals_batchnorm_over_the_whole_batch():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 6) * torch.tensor([1.0, 3.0, 0.2])[None, :, None, None] + 2
    grad_out = torch.randn(4, 3, 5, 6)
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        reference.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    xr = x.clone().requires_grad_(True)
    y = reference(xr)
    y.backward(grad_out)

    results = on_two_ranks(_batchnorm_worker, x, grad_out)
    got_y = torch.cat([results[0][0], results[1][0]])
    got_x_grad = torch.cat([results[0][1], results[1][1]])
    torch.testing.assert_close(got_y, y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x_grad, xr.grad, rtol=1e-4, atol=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][2], reference.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[rank][3], reference.bias.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[rank][4], reference.running_mean)
        torch.testing.assert_close(results[rank][5], reference.running_var)


def _bf16_batchnorm_worker(rank: int, port: int, x: torch.Tensor, grad_out: torch.Tensor, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bn = AllReduceBatchNorm2d.like(torch.nn.BatchNorm2d(3))
        half = slice(rank * 2, rank * 2 + 2)
        xi = x[half].clone().requires_grad_(True)
        y = bn(xi)
        y.backward(grad_out[half])
        results[rank] = (y.detach(), xi.grad, bn.running_mean.clone(), bn.running_var.clone())
    finally:
        dist.destroy_process_group()


def test_allreduce_batchnorm_of_bfloat16_input_counts_and_sums_in_float32():
    """A bfloat16 batch (as under autocast) of 4 x 30 x 45 = 5400 pixels per channel, 2 images per
    process: the statistics are those of the same values in float32 (5400 is not a bfloat16 number:
    counted in bfloat16 it would be 5408), the output comes back in bfloat16."""
    torch.manual_seed(2)
    x = (torch.randn(4, 3, 30, 45) * torch.tensor([1.0, 3.0, 0.2])[None, :, None, None] + 2).bfloat16()
    grad_out = torch.randn(4, 3, 30, 45).bfloat16()
    results = on_two_ranks(_bf16_batchnorm_worker, x, grad_out)

    values = x.float()
    mean = values.sum(dim=(0, 2, 3), dtype=torch.float64) / 5400
    var = ((values.double() - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][2], (0.1 * mean).float(), rtol=1e-5, atol=1e-6)  # momentum 0.1, from 0
        torch.testing.assert_close(results[rank][3], (0.9 + 0.1 * var / 5399).float(), rtol=1e-5, atol=1e-6)
    reference = torch.nn.BatchNorm2d(3)
    xr = values.clone().requires_grad_(True)
    y = reference(xr)
    y.backward(grad_out.float())
    got_y = torch.cat([results[0][0], results[1][0]])
    got_grad = torch.cat([results[0][1], results[1][1]])
    assert got_y.dtype == got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_y.float(), y.detach(), rtol=0, atol=2e-2)  # bfloat16 rounding of values ~|4|
    torch.testing.assert_close(got_grad.float(), xr.grad, rtol=2e-2, atol=2e-3)


def _holistic_worker(rank: int, port: int, student: torch.Tensor, teacher: torch.Tensor, images: torch.Tensor,
                     results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = holistic_step(student, teacher, images, slice(rank * 2, rank * 2 + 2))
    finally:
        dist.destroy_process_group()


def holistic_step(student: torch.Tensor, teacher: torch.Tensor, images: torch.Tensor, part: slice) -> tuple:
    """One step of the holistic term (logits conditioning: D's input BatchNorm) on ``part`` of the batch."""
    torch.manual_seed(0)  # the same D
    term = HolisticTerm(4, DistillConfig(lambda_ho=0.5, d_conditioning="logits", d_lr=1e-2), iterations=10, poly_power=0.9,
                        device=torch.device("cpu"))
    s = student[part].clone().requires_grad_(True)
    torch.manual_seed(3)  # the same penalty interpolation (drawn for the global batch)
    backprop, logged = term.losses(s, teacher[part], images[part], torch.ones(s.shape[0], *s.shape[2:], dtype=torch.bool))
    backprop.backward()
    term.update()
    values = parallel.all_mean(torch.stack([logged[k] for k in ("ho", "d_adv", "d_gp")]))
    return values, s.grad, {k: v.clone() for k, v in term.discriminator.state_dict().items()}


def test_the_discriminator_batchnorm_sees_the_global_batch():
    """With logits conditioning D normalises its input with BatchNorm: two processes with two
    images each score, penalise and update D as one process with all four."""
    torch.manual_seed(1)
    teacher = torch.log_softmax(3 * torch.randn(4, 4, 8, 8), dim=1)
    student = teacher + torch.randn(4, 4, 8, 8)
    images = torch.randn(4, 3, 8, 8)
    want_values, want_grad, want_d = holistic_step(student, teacher, images, slice(0, 4))
    results = on_two_ranks(_holistic_worker, student, teacher, images)
    for rank in (0, 1):
        values, grad, d = results[rank]
        torch.testing.assert_close(values, want_values, rtol=1e-4, atol=1e-6)
        # Each process's loss is the mean over its half: twice its share of the global mean's gradient.
        torch.testing.assert_close(grad / 2, want_grad[rank * 2 : rank * 2 + 2], rtol=1e-4, atol=1e-7)
        for name, tensor in want_d.items():
            torch.testing.assert_close(d[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


# -- training -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny recipe (global batch 4), a teacher and its store."""
    tmp = tmp_path_factory.mktemp("distributed")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        # Images without ignored pixels: each process averages its loss over its own pixels (as DDP
        # does), which equals the mean over the global batch when every sample counts the same pixels.
        "data": {**TINY_DATA, "options": {"size": [32, 48], "length": 8, "seed": 3}},
        # No dropout: its masks are drawn per process, so they could not match one process's.
        "model": {"name": "pspnet_resnet18", "width": 0.125, "dropout": 0.0},
        "train": {"iterations": ITERATIONS, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "device": "cpu",
                  # A small step: at 0.01, 0.002 and (with some teacher targets) 0.0005 this tiny net amplifies float
                  # rounding (a max-pool's argmax flips) ten-fold per step, into 0.2-1 % differences within six steps,
                  # which says nothing about the distribution; at 0.0002 they stay at 1e-6.
                  "lr": 0.0002},
        "distill": {"kd_warmup": 0.0},
        "cache": {"batch_size": 4, "feature_pool": 1},
    }))
    run(1, "train-teacher", "--config", str(config), "--width", "0.25", "--iterations", "2", "--out", str(tmp / "teacher"))
    teacher = tmp / "teacher" / "model.pt"
    store = tmp / "train.zarr"
    run(1, "cache-teacher", "--config", str(config), "--teacher", str(teacher), "--cache", str(store))
    # Caching: 48 images, three shards of 16.
    shards = tmp / "shards.yaml"
    recipe = yaml.safe_load(config.read_text())
    recipe["data"]["options"] = {"size": [32, 48], "length": 48}
    shards.write_text(yaml.safe_dump(recipe))
    return {"tmp": tmp, "config": config, "teacher": teacher, "store": store, "shards_config": shards}


def train_student(setup: dict, nproc: int, out: Path, *extra: str) -> Path:
    run(nproc, "train-student", "--config", str(setup["config"]), "--cache", str(setup["store"]), "--losses", "pi,pa,ho",
        "--out", str(out), *extra)
    return out


def assert_same_curve(got: list[dict], want: list[dict], terms=("task", "pi", "pa", "ho", "d_adv", "d_gp")) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        for term in terms:
            assert g[term] == pytest.approx(w[term], rel=1e-3, abs=1e-6), (g["iteration"], term, g[term], w[term])


@pytest.fixture(scope="module")
def one_process_run(setup) -> Path:
    return train_student(setup, 1, setup["tmp"] / "one")


@pytest.fixture(scope="module")
def two_process_run(setup) -> Path:
    return train_student(setup, 2, setup["tmp"] / "two")


def test_two_processes_train_like_one_with_the_whole_batch(one_process_run, two_process_run):
    one, two = one_process_run, two_process_run
    assert_same_curve(log_records(two), log_records(one))
    a, b = load_checkpoint(one / "model.pt")["model"], load_checkpoint(two / "model.pt")["model"]
    assert a.keys() == b.keys()  # the unwrapped student: no "module." prefixes, plain BatchNorm keys
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    # Rank 0 alone writes: one log line per iteration.
    assert len(log_records(two)) == ITERATIONS


def test_logged_gradient_norms_are_those_of_the_global_batch(one_process_run, two_process_run):
    """grad_<term>: the norm of the gradient of the global batch's mean loss on the student's
    features, whatever the number of processes (not each process's own, averaged)."""
    terms = ("grad_task", "grad_pi", "grad_pa", "grad_ho")
    assert_same_curve(log_records(two_process_run), log_records(one_process_run), terms)


def test_a_two_process_run_resumes_in_one_process(setup, one_process_run):
    reference = log_records(one_process_run)
    out = setup["tmp"] / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = skd_command(2, "train-student", "--config", str(setup["config"]), "--cache", str(setup["store"]),
                      "--losses", "pi,pa,ho", "--out", str(out))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not (out / "last.pt").exists():
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once
        proc.wait()
    saved = load_checkpoint(out / "last.pt")["iteration"]
    assert 0 < saved < ITERATIONS, f"could not interrupt the run part-way (checkpoint at {saved})"
    assert not (out / "model.pt").exists()

    run(1, "train-student", "--config", str(setup["config"]), "--cache", str(setup["store"]), "--losses", "pi,pa,ho",
        "--out", str(out), "--resume")
    resumed = [r for r in log_records(out) if r["iteration"] > saved]
    assert_same_curve(resumed[-(ITERATIONS - saved):], reference[saved:])


def test_a_batch_that_does_not_split_over_the_processes_is_refused(setup):
    result = subprocess.run(skd_command(2, "train-teacher", "--config", str(setup["config"]), "--batch-size", "3",
                                        "--out", str(setup["tmp"] / "odd")),
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "batch size 3" in result.stderr and "2 processes" in result.stderr


# -- caching --------------------------------------------------------------------------------------

def arrays_and_attrs(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    attrs.pop("created", None)
    attrs.pop("teacher_miou", None)  # scored only by a run that wrote every image (a resumed one does not)
    return {name: array[:] for name, array in group.arrays()}, attrs


def assert_same_store(got: Path, want: Path) -> None:
    (got_arrays, got_attrs), (want_arrays, want_attrs) = arrays_and_attrs(got), arrays_and_attrs(want)
    assert got_attrs == want_attrs
    assert got_arrays.keys() == want_arrays.keys()
    for name in want_arrays:
        np.testing.assert_array_equal(got_arrays[name], want_arrays[name], err_msg=name)


def test_two_processes_write_the_store_one_process_writes(setup):
    one, two = setup["tmp"] / "one.zarr", setup["tmp"] / "two.zarr"
    args = ["cache-teacher", "--config", str(setup["shards_config"]), "--teacher", str(setup["teacher"]), "--views", "2",
            "--crop-size", "24x32", "--scale-range", "0.75,1.25", "--flip"]
    run(1, *args, "--cache", str(one))
    run(2, *args, "--cache", str(two))
    assert not two.with_name("two.zarr.partial").exists()
    assert_same_store(two, one)
    run(1, "cache-verify", str(two))


def test_a_killed_rank_leaves_a_store_that_resumes_at_another_world_size(setup, tmp_path):
    config = tmp_path / "more.yaml"  # more shards, so that the run is still going after the first one
    recipe = yaml.safe_load(setup["shards_config"].read_text())
    recipe["data"]["options"] = {"size": [64, 96], "length": 160}
    recipe["cache"]["batch_size"] = 2
    config.write_text(yaml.safe_dump(recipe))
    out, partial = tmp_path / "s.zarr", tmp_path / "s.zarr.partial"
    args = ["cache-teacher", "--config", str(config), "--teacher", str(setup["teacher"]), "--cache", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(skd_command(2, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done_before_kill = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done_before_kill = int(zarr.open_group(str(partial), mode="r")["done"][:].sum())
            except Exception:  # still being created
                done_before_kill = 0
            if done_before_kill:
                break
            time.sleep(0.02)
        ranks = _worker_ranks(proc.pid)
        assert 1 in ranks, f"no rank 1 among torchrun's workers {ranks}"
        os.kill(ranks[1], signal.SIGKILL)  # one rank dies; torchrun stops the other
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not out.exists() and partial.is_dir()
    done = zarr.open_group(str(partial), mode="r")["done"][:]
    assert 0 < done.sum() < len(done), f"could not interrupt the run part-way ({done.sum()}/{len(done)} done)"

    run(1, *args)  # resumed by one process
    assert out.is_dir() and not partial.exists()
    run(1, "cache-verify", str(out))
    run(1, "cache-teacher", "--config", str(config), "--teacher", str(setup["teacher"]), "--cache", str(tmp_path / "ref.zarr"))
    assert_same_store(out, tmp_path / "ref.zarr")


def _worker_ranks(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun started (its child processes carry RANK in their environment)."""
    ranks = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(ranks) < 2:
        for pid in _descendants(torchrun_pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):  # the rank's own process comes before its loader workers
                    ranks.setdefault(int(item[5:]), pid)
        time.sleep(0.05)
    return ranks


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children + [d for c in children for d in _descendants(c)]
