"""skd plot: curves of several runs' log.jsonl in one PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import SkdError
from pipeline.plot import plot_runs


def write_log(run, records):
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_one_panel_per_term_and_val_miou_last(tmp_path):
    write_log(tmp_path / "baseline", [{"iteration": i, "task": 3.0 / i, "lr": 0.01, "step_s": 0.1, "grad_task": 1.0}
                                      for i in (2, 4, 6)] + [{"iteration": 6, "val_miou": 0.4, "best_val_miou": 0.4}])
    write_log(tmp_path / "kd", [{"iteration": i, "task": 2.0 / i, "pi": 1.0 / i, "d_adv": -0.1} for i in (2, 4, 6)])
    out = tmp_path / "figures" / "curves.png"
    panels = plot_runs([tmp_path / "baseline", tmp_path / "kd"], out)
    assert panels == ["d_adv", "pi", "task", "val_miou"]  # no bookkeeping fields, no gradient norms
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 900  # two rows of three panels
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # something was drawn
    assert not list(out.parent.glob(".*"))  # written, then renamed


def test_a_folder_without_a_log_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkdError, match="empty holds no log.jsonl"):
        plot_runs([tmp_path / "empty"], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_confusion_image_shades_each_row_by_its_share():
    from PIL import ImageFont

    from pipeline.visualize import confusion_image

    names = ["road", "car", "sky"]
    matrix = np.array([[90, 10, 0],    # road: 90 % right, 10 % taken for car
                       [0, 50, 50],   # car: half right
                       [0, 0, 0]])    # sky: absent from the labels
    image = confusion_image(matrix, names, cell=36)
    font = ImageFont.load_default()
    margin = 8 + max(int(font.getlength(n)) for n in names)
    assert image.shape == (margin + 3 * 36 + 8, margin + 3 * 36 + 8, 3)

    def corner(t, p):  # a pixel inside the cell, away from its number
        return tuple(int(v) for v in image[margin + t * 36 + 3, margin + p * 36 + 3])

    white, dark = (255, 255, 255), (8, 48, 107)
    assert corner(1, 0) == white and corner(0, 2) == white
    assert corner(0, 0) == tuple(round(255 + 0.9 * (d - 255)) for d in dark)
    assert corner(1, 1) == corner(1, 2) == tuple(round(255 + 0.5 * (d - 255)) for d in dark)
    assert sum(corner(0, 0)) < sum(corner(1, 1)) < sum(corner(0, 1)) < sum(white)
    assert corner(2, 0) == corner(2, 2) == (200, 200, 200)


def test_one_colour_per_run_in_every_panel_and_one_legend_for_the_figure(tmp_path):
    # The first run has no "pi" curve: matplotlib's per-panel colour cycle would draw the second run
    # in the first run's colour there, and a legend of the first panel would leave the first run out.
    write_log(tmp_path / "baseline", [{"iteration": i, "task": 3.0 / i} for i in (2, 4, 6)])
    write_log(tmp_path / "kd", [{"iteration": i, "task": 2.0 / i, "pi": 1.0 / i} for i in (2, 4, 6)])
    out = tmp_path / "curves.png"
    assert plot_runs([tmp_path / "baseline", tmp_path / "kd"], out) == ["pi", "task"]
    image = np.asarray(Image.open(out).convert("RGB"))
    blue, orange = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1

    def pixels(region, colour):
        return int((region == colour).all(axis=-1).sum())

    legend, panels = image[:40], image[45:]
    left, right = panels[:, : image.shape[1] // 2], panels[:, image.shape[1] // 2:]
    assert pixels(left, orange) > 50 and pixels(left, blue) == 0  # "pi": the kd run alone, in its colour
    assert pixels(right, orange) > 50 and pixels(right, blue) > 50  # "task": both runs
    assert pixels(legend, orange) > 10 and pixels(legend, blue) > 10  # one legend naming both runs, above
