"""Procedural street scenes: a dataset that needs no files, deterministic per (seed, split, index).

Each scene is a street in one-point perspective: sky, a road and sidewalks converging to a vanishing
point on a random horizon, building facades with perspective window grids on both sides, far
buildings or tree lines, and objects standing on the ground (trees, poles with signs or lamps,
people, vehicles) drawn far to near so that near objects occlude far ones. Sizes follow the ground
row: with the camera at 1.5 m, an object whose foot is ``d`` rows below the horizon is ``d`` pixels
tall per 1.5 m of height, so a person is about ``1.1 d`` pixels tall and a car about ``d``.

Colours alone do not separate the classes: road and sidewalk share grey ranges, buildings, vehicles
and poles share greys, overcast skies are building-grey, windows can reflect the sky, and a lighting
gradient, a cast shadow, a colour cast and pixel noise are applied over everything. What separates
them is texture (asphalt grain and lane marks, sidewalk tiles and curbs, window grids, leafy noise,
smooth sky) and context (position relative to the horizon and the road edges, shapes). So a model
with more capacity and a larger receptive field does clearly better than a tiny one. Measured at
96x128 after 400 Adam steps of batch 8 (mIoU on 64 val images): per-pixel MLP on RGB 0.23, two 3x3
conv layers 0.33, six conv layers with stride 4 and dilations 0.67.

In about one image in five the bottom of the frame shows the car's own bonnet, labelled ignore (255),
as in Cityscapes' "ego vehicle".
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib

import numpy as np
import torch

from pipeline.data.base import SegmentationDataset
from pipeline.errors import SkdError

# Bump whenever the generator's output changes: it is part of the fingerprint, so a cache built
# from an older generator is refused instead of silently mismatching.
GENERATOR_VERSION = 1

SKY, ROAD, SIDEWALK, BUILDING, VEGETATION, VEHICLE, POLE, PERSON = range(8)
IGNORE = 255

CLASS_NAMES = ["sky", "road", "sidewalk", "building", "vegetation", "vehicle", "pole", "person"]
# Cityscapes colours of the corresponding classes (pole/sign uses "pole").
PALETTE = [
    (70, 130, 180), (128, 64, 128), (244, 35, 232), (70, 70, 70),
    (107, 142, 35), (0, 0, 142), (153, 153, 153), (220, 20, 60),
]

DEFAULT_LENGTHS = {"train": 512, "val": 64, "test": 64}


class SyntheticStreets(SegmentationDataset):
    """Procedural street scenes with 8 classes, generated on the fly.

    Args:
        split: "train", "val" or "test" (different scenes for each).
        size: (H, W) of every image, each at least 32.
        length: number of images (default 512 train, 64 val, 64 test).
        seed: dataset seed; image ``i`` depends only on (seed, split, i).
    """

    name = "synthetic"
    num_classes = 8

    def __init__(self, split: str = "train", size: tuple[int, int] = (96, 128), length: int | None = None, seed: int = 0):
        if split not in DEFAULT_LENGTHS:
            raise SkdError(f"unknown synthetic split {split!r}; expected one of {', '.join(DEFAULT_LENGTHS)}")
        try:
            height, width = (int(v) for v in size)
        except (TypeError, ValueError):
            raise SkdError(f"synthetic size must be (height, width), got {size!r}") from None
        if height < 32 or width < 32:
            raise SkdError(f"synthetic size must be at least 32x32, got {height}x{width}")
        length = DEFAULT_LENGTHS[split] if length is None else length
        if not isinstance(length, int) or length < 1:
            raise SkdError(f"synthetic length must be a positive integer, got {length!r}")
        if not isinstance(seed, int) or seed < 0:
            raise SkdError(f"synthetic seed must be a non-negative integer, got {seed!r}")

        self.split = split
        self.size = (height, width)
        self.seed = seed
        self.class_names = list(CLASS_NAMES)
        self.palette = list(PALETTE)
        self.ids = [f"synthetic/{split}/{i:06d}" for i in range(length)]
        params = {
            "generator": "SyntheticStreets", "version": GENERATOR_VERSION,
            "seed": seed, "split": split, "size": [height, width], "length": length,
        }
        self.fingerprint = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        # crc32 of the split name rather than hash(): hash() of str changes between processes.
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), index])
        image, label = generate_scene(rng, *self.size)
        return {
            # numpy does the HWC -> CHW copy: torch's copy kernels start threads, slow in loader workers.
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "id": self.ids[index],
        }

    def image_size(self, index: int) -> tuple[int, int]:
        self._check_index(index)
        return self.size


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Low-frequency noise (about unit variance): a random coarse grid, bilinearly upsampled."""
    g = rng.standard_normal((cells_y + 1, cells_x + 1), dtype=np.float32)
    ys = np.linspace(0, cells_y, h, dtype=np.float32)
    xs = np.linspace(0, cells_x, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), cells_y - 1)
    x0 = np.minimum(xs.astype(np.int64), cells_x - 1)
    fy = (ys - y0)[:, None]
    fx = xs - x0
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    bottom = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _grey_or_colour(rng: np.random.Generator, p_grey: float, grey: tuple[float, float]) -> np.ndarray:
    """An RGB colour: a slightly tinted grey with probability p_grey, else a random saturated colour."""
    if rng.random() < p_grey:
        return rng.uniform(*grey) * rng.uniform(0.92, 1.08, 3)
    return rng.uniform(20, 230, 3)


def generate_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 H×W×3 RGB image, uint8 H×W label with 255 = ignore)."""
    yy, xx = _grid(h, w)

    # Camera: horizon row and vanishing point; the ground is everything below the horizon.
    horizon = rng.uniform(0.30, 0.55) * h
    vx = rng.uniform(0.25, 0.75) * w
    d = yy - horizon  # rows below the horizon (negative above)
    u = xx - vx  # columns right of the vanishing point
    ground = d > 0
    dpos = np.maximum(d, 0.5)

    # Road and sidewalk edges are lines through the vanishing point: |u| = k * d.
    k_road_l, k_road_r = rng.uniform(0.9, 2.0, 2)
    k_walk_l = k_road_l * rng.uniform(1.3, 1.9)
    k_walk_r = k_road_r * rng.uniform(1.3, 1.9)
    on_road = ground & (u >= -k_road_l * d) & (u <= k_road_r * d)
    on_walk = ground & ~on_road & (u >= -k_walk_l * d) & (u <= k_walk_r * d)

    # Facades: columns split into segments, each a building (own roof slope, colour) or a gap.
    n_seg = int(rng.integers(3, 8))
    bounds = np.sort(rng.uniform(0, w, n_seg - 1))
    seg = np.searchsorted(bounds, xx[0])  # segment of each column
    has_building = rng.random(n_seg) < 0.8
    slope = horizon * rng.uniform(0.5, 1.6, n_seg) / (0.5 * w)
    a = np.abs(u)  # distance from the vanishing point column
    roof = horizon - a * slope[seg]
    facade = has_building[seg] & (yy > roof) & ~on_road & ~on_walk & (a > 1)

    # Far layer just above the horizon: distant buildings or a tree line, varying per segment.
    far_height = rng.uniform(0.0, 0.25, n_seg) * horizon
    far_type = np.where(rng.random(n_seg) < 0.6, BUILDING, VEGETATION)
    far = (~ground) & (yy > horizon - far_height[seg]) & ~facade

    label = np.full((h, w), SKY, dtype=np.uint8)
    label[far] = far_type[seg][np.nonzero(far)[1]]
    label[ground] = VEGETATION  # grass verge where no facade reaches the ground
    label[facade] = BUILDING
    label[on_walk] = SIDEWALK
    label[on_road] = ROAD

    # Base colours per class; road and sidewalk greys overlap, as do building, vehicle and pole greys.
    overcast = rng.random() < 0.35
    sky_colour = rng.uniform(150, 215) * rng.uniform(0.95, 1.05, 3) if overcast else \
        np.array([rng.uniform(60, 140), rng.uniform(110, 180), rng.uniform(190, 250)])
    road_grey = rng.uniform(55, 135)
    road_colour = road_grey * rng.uniform(0.94, 1.06, 3)
    if rng.random() < 0.6:
        walk_colour = np.clip(road_grey + rng.uniform(-15, 40), 40, 200) * rng.uniform(0.92, 1.08, 3)
    else:  # brick or sandstone pavements
        walk_colour = np.array([rng.uniform(120, 190), rng.uniform(90, 150), rng.uniform(70, 130)])
    grass_colour = np.array([rng.uniform(50, 120), rng.uniform(90, 160), rng.uniform(30, 80)])
    seg_colours = np.stack([_grey_or_colour(rng, 0.6, (70, 200)) * np.array([1.0, 0.95, 0.88])
                            for _ in range(n_seg)]).astype(np.float32)

    class_colour = np.zeros((256, 3), dtype=np.float32)
    class_colour[SKY], class_colour[ROAD], class_colour[SIDEWALK] = sky_colour, road_colour, walk_colour
    class_colour[VEGETATION] = grass_colour
    img = class_colour[label]
    building_colour = seg_colours[seg][None, :, :]
    img = np.where((label == BUILDING)[..., None], building_colour, img)

    # Per-pixel brightness of the background's structure (sky gradient, windows, tiles, curbs).
    shade = np.ones((h, w), dtype=np.float32)
    shade[(label == VEGETATION) & ~ground] = 0.6  # distant trees are darker than the grass
    sky = label == SKY
    shade[sky] = 0.8 + 0.3 * np.clip(yy[sky] / horizon, 0, 1)  # sky brightens towards the horizon

    # Windows: rows of constant (horizon - y) / a and columns of constant 1 / a are the facade's grid
    # lines in one-point perspective, so the grid shrinks towards the vanishing point.
    a1 = np.maximum(a, 1)
    rows = rng.uniform(3, 6) / max(float(slope.mean()), 1e-3)
    cols = rng.uniform(1.5, 4.0) * w
    window = facade & (_frac((horizon - yy) / a1 * rows + rng.random()) < 0.5) & (_frac(cols / a1 + rng.random()) < 0.55)
    reflective = rng.random() < 0.4
    if not reflective:
        shade[window] = 0.45  # dark glass

    # Sidewalk tiles (lines across at constant depth, lines along through the vanishing point) and curbs.
    tile_across = _frac(rng.uniform(15, 30) / dpos) < 0.12
    tile_along = _frac(u / dpos * rng.uniform(1.5, 3.0)) < 0.1
    shade[on_walk & (tile_across | tile_along)] = 0.78
    curb = on_walk & ((np.abs(u + k_road_l * d) < 0.6 + 0.03 * d) | (np.abs(u - k_road_r * d) < 0.6 + 0.03 * d))
    shade[curb] = 1.4

    # Lane marks: dashes along a line through the vanishing point, dashes at constant depth spacing.
    k_lane = rng.uniform(-0.4, 0.4) * min(k_road_l, k_road_r)
    lane = on_road & (np.abs(u - k_lane * d) < 0.3 + 0.025 * d) & (_frac(rng.uniform(10, 25) / dpos + rng.random()) < 0.5)
    shade[lane] = rng.uniform(190, 240) / road_grey

    img *= shade[..., None]
    if reflective:  # glass reflecting the sky
        img = np.where(window[..., None], 0.5 * img + 0.5 * sky_colour.astype(np.float32), img)

    # Per-pixel texture strength (fine grain, blotches), applied after all objects are drawn.
    amp_fine = np.zeros(256, np.float32)
    amp_blotch = np.zeros(256, np.float32)
    amp_fine[:8] = [0.01, 0.07, 0.04, 0.04, 0.20, 0.02, 0.03, 0.03]
    amp_blotch[:8] = [0.10, 0.07, 0.05, 0.04, 0.18, 0.01, 0.02, 0.03]
    tex_fine = amp_fine[label]
    tex_blotch = amp_blotch[label]

    # Objects standing on the ground, drawn far to near so that near ones occlude far ones.
    depth_rows = h - horizon
    objects = []
    # (kind, how many, nearest ground row as a fraction of the rows below the horizon; farthest 0.09)
    for kind, count, near in ((VEGETATION, rng.integers(0, 4), 1.0), (POLE, rng.integers(1, 4), 1.0),
                              (PERSON, rng.integers(1, 5), 0.95), (VEHICLE, rng.integers(1, 5), 0.8)):
        for _ in range(int(count)):
            objects.append((depth_rows * rng.uniform(0.3, near ** 0.5) ** 2, kind))
    objects.sort(key=lambda item: item[0])

    for db, kind in objects:
        yb = horizon + db
        if kind == VEHICLE:
            cx = vx + db * rng.uniform(-0.85 * k_road_l, 0.85 * k_road_r)
            _draw_vehicle(rng, img, label, tex_fine, tex_blotch, yb, cx, db)
        else:
            side = -1 if rng.random() < 0.5 else 1
            k_in, k_out = (k_road_l, k_walk_l) if side < 0 else (k_road_r, k_walk_r)
            if kind == PERSON and rng.random() < 0.2:  # someone crossing the road
                cx = vx + db * rng.uniform(-k_road_l, k_road_r)
            elif kind == POLE:  # poles stand near the curb
                cx = vx + side * db * (k_in + rng.uniform(0.05, 0.35) * (k_out - k_in))
            else:
                cx = vx + side * db * rng.uniform(k_in + 0.1 * (k_out - k_in), k_out * 1.15)
            draw = {VEGETATION: _draw_tree, POLE: _draw_pole, PERSON: _draw_person}[kind]
            draw(rng, img, label, tex_fine, tex_blotch, yb, cx, db)

    # The car's own bonnet at the bottom of the frame: ignored, as in Cityscapes.
    if rng.random() < 0.2:
        hood = ((xx - w / 2) / (0.7 * w)) ** 2 + ((yy - 1.1 * h) / rng.uniform(0.15, 0.25) / h) ** 2 < 1
        label[hood] = IGNORE
        img[hood] = rng.uniform(20, 60) * rng.uniform(0.9, 1.1, 3)
        tex_fine[hood], tex_blotch[hood] = 0.03, 0.05

    # Texture, then global photometric effects that no class colour survives unchanged.
    fine = rng.standard_normal((h, w), dtype=np.float32)
    blotch = _smooth_noise(rng, h, w, 6, 8)
    img *= (1 + tex_fine * fine + tex_blotch * blotch)[..., None]

    light = 1 + rng.uniform(-0.45, 0.45) * (xx / w - 0.5) + rng.uniform(-0.45, 0.45) * (yy / h - 0.5)
    angle = rng.uniform(0, 2 * np.pi)
    x0, y0 = rng.uniform(0, w), rng.uniform(horizon, h)
    # A shadow cast over the ground (road, sidewalks, verges); objects standing there darken with it.
    shadow = (ground & ~facade) & ((xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle) > 0)
    if rng.random() < 0.6:
        light = np.where(shadow, light * rng.uniform(0.45, 0.75), light)
    img *= light[..., None]
    img *= rng.uniform(0.85, 1.15, 3).astype(np.float32)
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(2, 9)
    return np.clip(img, 0, 255).astype(np.uint8), label


def _box(h: int, w: int, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice] | None:
    """Integer slices of the pixel box [y0, y1) × [x0, x1), clipped to the image; None if empty."""
    ys, ye = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), h)
    xs, xe = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), w)
    if ys >= ye or xs >= xe:
        return None
    return slice(ys, ye), slice(xs, xe)


def _paint(img, label, tex_fine, tex_blotch, box, mask, cls, colour, fine, blotch) -> None:
    """Set class, colour and texture strength of the masked pixels inside ``box``."""
    sub = label[box]
    sub[mask] = cls
    img[box][mask] = colour if np.ndim(colour) == 1 else colour[mask]
    tex_fine[box][mask] = fine
    tex_blotch[box][mask] = blotch


def _draw_vehicle(rng, img, label, tex_fine, tex_blotch, yb, cx, db) -> None:
    h, w = label.shape
    width = db * rng.uniform(1.0, 1.5)
    height = db * rng.uniform(0.75, 1.2)
    box = _box(h, w, yb - height, yb, cx - width / 2, cx + width / 2)
    if box is None:
        return
    yy, xx = _grid(h, w)
    ty = (yy[box] - (yb - height)) / height  # 0 at the roof, 1 at the ground
    tx = np.abs(xx[box] - cx) / (width / 2)  # 0 at the centre, 1 at the sides
    cabin = ty < 0.45
    inset = 0.35 * (0.45 - ty) / 0.45 + 0.1  # the cabin narrows towards the roof
    body = np.where(cabin, tx < 1 - inset, tx < 1)
    colour = _grey_or_colour(rng, 0.5, (35, 210))
    shade = (1.15 - 0.35 * ty)[..., None]
    glass = cabin & (ty > 0.08) & (tx < 0.85 - inset)
    pixels = np.where(glass[..., None], np.array([40, 50, 65]) * rng.uniform(0.7, 1.6), colour * shade)
    _paint(img, label, tex_fine, tex_blotch, box, body, VEHICLE, pixels, 0.02, 0.01)
    # Wheels: dark ellipses at the bottom corners (still "vehicle").
    wheel = (ty > 0.75) & (np.abs(tx - 0.68) < 0.2)
    _paint(img, label, tex_fine, tex_blotch, box, wheel & body, VEHICLE, np.array([25.0, 25.0, 28.0]), 0.05, 0.0)


def _draw_person(rng, img, label, tex_fine, tex_blotch, yb, cx, db) -> None:
    h, w = label.shape
    height = db * rng.uniform(1.0, 1.3)
    width = height * rng.uniform(0.28, 0.38)
    box = _box(h, w, yb - height, yb, cx - width / 2, cx + width / 2)
    if box is None:
        return
    yy, xx = _grid(h, w)
    ty = (yy[box] - (yb - height)) / height
    tx = (xx[box] - cx) / (width / 2)
    head = (tx / 0.45) ** 2 + ((ty - 0.08) / 0.08) ** 2 < 1
    torso = (ty >= 0.15) & (ty < 0.58) & (np.abs(tx) < 0.95 - 0.3 * (ty - 0.15))
    legs = (ty >= 0.55) & (np.abs(np.abs(tx) - 0.35) < 0.22)
    shirt = _grey_or_colour(rng, 0.3, (30, 220))
    trousers = rng.uniform(20, 120) * rng.uniform(0.8, 1.2, 3)
    skin = np.array([rng.uniform(90, 230), 0, 0])
    skin[1:] = skin[0] * np.array([0.75, 0.6])
    _paint(img, label, tex_fine, tex_blotch, box, torso, PERSON, shirt, 0.04, 0.03)
    _paint(img, label, tex_fine, tex_blotch, box, legs, PERSON, trousers, 0.04, 0.03)
    _paint(img, label, tex_fine, tex_blotch, box, head, PERSON, skin, 0.03, 0.02)


def _draw_pole(rng, img, label, tex_fine, tex_blotch, yb, cx, db) -> None:
    h, w = label.shape
    height = db * rng.uniform(2.5, 4.0)
    width = max(1.0, db * rng.uniform(0.04, 0.08))
    grey = rng.uniform(50, 170) * rng.uniform(0.95, 1.05, 3)
    box = _box(h, w, yb - height, yb, cx - width / 2, cx + width / 2)
    if box is not None:
        _paint(img, label, tex_fine, tex_blotch, box, np.ones(label[box].shape, bool), POLE, grey, 0.03, 0.02)
    top = yb - height
    if rng.random() < 0.55:  # a sign: disk or plate near the top
        size = max(2.0, db * rng.uniform(0.25, 0.45))
        sy = top + size * rng.uniform(0.5, 1.5)
        box = _box(h, w, sy - size / 2, sy + size / 2, cx - size / 2, cx + size / 2)
        if box is None:
            return
        yy, xx = _grid(h, w)
        if rng.random() < 0.5:
            mask = ((yy[box] - sy) ** 2 + (xx[box] - cx) ** 2) < (size / 2) ** 2
        else:
            mask = np.ones(label[box].shape, bool)
        colour = [np.array([200, 30, 30]), np.array([30, 70, 190]), np.array([230, 200, 40]),
                  np.array([225, 225, 225])][int(rng.integers(4))] * rng.uniform(0.8, 1.1)
        _paint(img, label, tex_fine, tex_blotch, box, mask, POLE, colour, 0.02, 0.02)
    else:  # a street lamp: an arm reaching over the road
        reach = db * rng.uniform(0.4, 0.9) * (1 if cx < img.shape[1] / 2 else -1)
        arm = max(1.0, width * 0.8)
        box = _box(h, w, top, top + arm, min(cx, cx + reach), max(cx, cx + reach))
        if box is not None:
            _paint(img, label, tex_fine, tex_blotch, box, np.ones(label[box].shape, bool), POLE, grey, 0.03, 0.02)


def _draw_tree(rng, img, label, tex_fine, tex_blotch, yb, cx, db) -> None:
    h, w = label.shape
    trunk_h = db * rng.uniform(0.8, 1.8)
    trunk_w = max(1.0, db * rng.uniform(0.08, 0.15))
    radius = db * rng.uniform(0.7, 1.5)
    box = _box(h, w, yb - trunk_h, yb, cx - trunk_w / 2, cx + trunk_w / 2)
    if box is not None:
        bark = np.array([rng.uniform(60, 110), rng.uniform(45, 80), rng.uniform(30, 55)])
        _paint(img, label, tex_fine, tex_blotch, box, np.ones(label[box].shape, bool), VEGETATION, bark, 0.12, 0.05)
    cy = yb - trunk_h - 0.6 * radius
    squash = rng.uniform(0.8, 1.3)
    box = _box(h, w, cy - 1.3 * radius * squash, cy + 1.3 * radius * squash, cx - 1.3 * radius, cx + 1.3 * radius)
    if box is None:
        return
    yy, xx = _grid(h, w)
    dy, dx = (yy[box] - cy) / squash, xx[box] - cx
    angle = np.arctan2(dy, dx)
    # A lumpy outline: the radius wobbles with a few random harmonics of the angle.
    wobble = 1 + sum(rng.uniform(0.05, 0.15) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7))
    crown = dx * dx + dy * dy < (radius * wobble) ** 2
    leaves = np.array([rng.uniform(30, 120), rng.uniform(70, 150), rng.uniform(20, 70)])
    _paint(img, label, tex_fine, tex_blotch, box, crown, VEGETATION, leaves, 0.25, 0.2)
