"""Model-card numbers against hand-computed ones."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.models import build_model
from pipeline.profile import format_profile, profile_model
from pipeline.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_parameters_and_flops_of_one_convolution_are_the_hand_counted_ones():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    report = profile_model(conv, (10, 12), torch.device("cpu"), batch_sizes=(1, 2), repeats=2, warmup=1)
    assert report["parameters"] == 8 * 3 * 9 + 8
    # A multiply-add is 2 FLOPs: 2 x (8 outputs x 3 inputs x 9 taps) x 10 x 12 pixels (bias not counted).
    assert report["gflops_per_image"] * 1e9 == pytest.approx(2 * 8 * 3 * 9 * 10 * 12)
    assert set(report["batches"]) == {1, 2}
    assert all(b["latency_ms"] > 0 and b["images_per_s"] > 0 and b["peak_memory_mb"] > 0 for b in report["batches"].values())


def test_skd_profile_on_a_checkpoint(tmp_path):
    arch = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125}
    save_checkpoint(tmp_path / "model.pt", {"arch": arch, "model": build_model(**arch).state_dict()})
    result = subprocess.run([sys.executable, "-m", "cli", "profile", "--checkpoint", str(tmp_path / "model.pt"),
                             "--size", "32x48", "--batch-sizes", "1", "--device", "cpu", "--warmup", "1", "--repeats", "3", "--output",
                             str(tmp_path / "p.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    expected = sum(p.numel() for p in build_model(**arch).parameters())
    assert report["parameters"] == expected and report["gflops_per_image"] > 0
    assert "M parameters" in result.stdout and "GFLOPs" in result.stdout


class Sleeper(torch.nn.Module):
    """A 'model' whose n-th forward pass takes ``durations[n]`` seconds (the first pass is the FLOP count)."""

    def __init__(self, durations: list[float]):
        super().__init__()
        self.durations = list(durations)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        time.sleep(self.durations.pop(0))
        return x


def test_warm_up_runs_are_left_out_and_the_spread_is_reported():
    # One FLOP-counting pass, 2 slow warm-up passes (one-time costs), then 5 timed ones.
    timed = [0.030, 0.010, 0.020, 0.040, 0.015]
    model = Sleeper([0.0, 0.3, 0.3] + timed)
    report = profile_model(model, (4, 4), torch.device("cpu"), batch_sizes=(1,), repeats=5, warmup=2)
    b = report["batches"][1]
    assert report["warmup"] == 2 and report["repeats"] == 5
    # Sleeps last at least as long as asked, plus a little: compare with the known durations.
    assert 20 <= b["latency_ms"] < 28  # the median of 10, 15, 20, 30, 40 ms
    assert 10 <= b["min_ms"] < 18 and 40 <= b["max_ms"] < 100  # the 300 ms warm-ups are not counted
    assert 15 <= b["p25_ms"] < 23 and 30 <= b["p75_ms"] < 38  # quartiles of the five (linear interpolation)
    assert b["images_per_s"] == pytest.approx(1000 / b["latency_ms"])
    text = format_profile("sleeper", report)
    assert "median of 5 timed runs after 2 warm-up runs" in text and "vary widely" in text
