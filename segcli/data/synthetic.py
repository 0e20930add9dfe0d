"""A procedural segmentation dataset for tests, demos and CPU smoke training.

Scenes are written to disk in the ``folder`` layout (so the real folder reader is exercised)
and cached: ROOT/synthetic.json records the parameters; a call with other parameters
regenerates, a call with the same ones does nothing. The dataset builder (``type: synthetic``)
uses ``data.root`` or, when that is unset, ``data/synthetic`` relative to the current working
directory, with ``data.synthetic_size / synthetic_train / synthetic_val``.

What a scene holds (8 classes), and why:

* stuff — large regions, told apart by texture and place rather than colour:
  ``sky`` (smooth vertical gradient with soft blotches, above a wavy horizon), ``grass``
  (vertical streaks, below it), ``water`` (horizontal streaks and ripples: a lake at the
  horizon or a pond in the grass), ``wall`` (bricks: mortar lines with per-brick shades);
* things — told apart by shape: ``disk`` (radially shaded), ``box`` (rotated rectangle with a
  dark outline, standing on the ground), ``pole`` (1-3 px lines rising from the ground: thin
  structures), ``triangle`` (tents on the ground or kites in the sky).

Colours are deliberately ambiguous: every region's colour is drawn around its class's mean with
a spread wider than the gaps between means (sky and water overlap most), things take the mean
colour of a random *other* class, and each image gets a colour cast, an illumination ramp, a
slight blur and pixel noise. A per-pixel colour classifier therefore does poorly while a model
that sees texture and shape does well. Stuff covers most pixels and poles very few (class
imbalance). Each image comes from its own generator seeded by (seed, split, index), so changing
the number of images keeps the existing ones.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np

from ..errors import SegcliError
from ..registry import DATASETS
from .datasets import SegDataset, build_folder_at

SYNTHETIC_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "wall", "disk", "box", "pole", "triangle")
SKY, GRASS, WATER, WALL, DISK, BOX, POLE, TRIANGLE = range(len(SYNTHETIC_CLASSES))
SYNTHETIC_PALETTE = np.array(
    [[70, 130, 180], [107, 142, 35], [0, 80, 160], [150, 100, 80], [220, 20, 60], [250, 170, 30],
     [255, 255, 255], [160, 60, 220]],
    dtype=np.uint8,
)
SYNTHETIC_PALETTE.setflags(write=False)
# Mean region colours (RGB). Spread per image (COLOR_SPREAD) is larger than most gaps.
_MEAN_COLORS = np.array(
    [[125, 160, 200], [95, 135, 70], [80, 120, 165], [150, 115, 95], [170, 90, 80], [150, 130, 60],
     [75, 75, 80], [120, 95, 150]],
    dtype=np.float32,
)
COLOR_SPREAD = 28.0
MARKER = "synthetic.json"
GENERATOR_VERSION = 1
DEFAULT_ROOT = "data/synthetic"
_SPLITS = ("train", "val")
_FILE_PATTERN = re.compile(r"^\d{5}\.png$")


# --------------------------------------------------------------------------- textures


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Unit-variance noise with features about size/cells pixels across: [size, size] float32."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _streaks(rng, size: int, length: int, vertical: bool) -> np.ndarray:
    """Noise smeared along one axis (grass blades / water streaks): [size, size], unit std."""
    noise = rng.standard_normal((size, size), dtype=np.float32)
    kernel = (1, length) if vertical else (length, 1)  # cv2 kernel size is (width, height)
    smeared = cv2.blur(noise, kernel)
    return smeared / (smeared.std() + 1e-6)


def _stuff_modulation(rng, size: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full-frame brightness modulation of the four stuff classes, ``[4, size, size]`` float32, and
    the wall's mortar mask ``[size, size]`` bool."""
    unit = size / 128.0
    # sky: brighter towards the horizon, soft blotches
    sky = 40.0 * (yy / size - 0.5) + 10.0 * _smooth_noise(rng, size, 6)
    # grass: vertical blades, darker far away
    grass = 24.0 * _streaks(rng, size, max(3, round(7 * unit)), vertical=True) + 12.0 * (yy / size - 0.5)
    # water: horizontal streaks plus ripples of a few pixels
    period = rng.uniform(4.0, 7.0) * unit
    water = 14.0 * _streaks(rng, size, max(3, round(11 * unit)), vertical=False) + 14.0 * np.sin(
        2 * np.pi * yy / period + rng.uniform(0, 2 * np.pi))
    # wall: bricks with mortar lines and a shade per brick
    brick_h = max(3, round(rng.uniform(5, 9) * unit))
    brick_w = 2 * brick_h
    row = (yy // brick_h).astype(np.int64)
    shifted_x = xx + (row % 2) * (brick_w // 2)
    col = (shifted_x // brick_w).astype(np.int64)
    shades = rng.normal(0.0, 12.0, size=(64, 64)).astype(np.float32)
    wall = shades[row % 64, col % 64]
    mortar = ((yy % brick_h) < 1) | ((shifted_x % brick_w) < 1)
    return np.stack([sky, grass, water, wall]).astype(np.float32), mortar  # [4, S, S], [S, S]


# --------------------------------------------------------------------------- things


def _thing_mask(rng, kind: int, size: int, horizon: np.ndarray) -> np.ndarray:
    """A uint8 [size, size] mask of one object of class ``kind``, placed in context."""
    unit = size / 128.0
    canvas = np.zeros((size, size), dtype=np.uint8)
    x = rng.uniform(0.05, 0.95) * size
    ground = horizon[int(np.clip(x, 0, size - 1))]
    on_ground = ground + rng.uniform(0.05, 0.45) * (size - ground)
    if kind == DISK:
        radius = rng.uniform(5, 16) * unit
        cy = rng.uniform(0.05, 0.95) * size
        cv2.circle(canvas, (round(x), round(cy)), max(2, round(radius)), 1, thickness=-1)
    elif kind == BOX:
        w, h = rng.uniform(10, 28, size=2) * unit
        center = (x, on_ground - h / 2)
        corners = cv2.boxPoints((center, (w, h), rng.uniform(-20, 20)))
        cv2.fillPoly(canvas, [np.round(corners).astype(np.int32)], 1)
    elif kind == POLE:
        height = rng.uniform(0.2, 0.55) * size
        lean = rng.uniform(-0.12, 0.12) * height
        width = int(rng.integers(1, 4))  # pixels: thin at every size
        top = (round(x + lean), round(on_ground - height))
        cv2.line(canvas, (round(x), round(on_ground)), top, 1, thickness=width)
    elif kind == TRIANGLE:
        side = rng.uniform(14, 32) * unit
        cy = on_ground - side / 2 if rng.random() < 0.6 else rng.uniform(0.05, 0.4) * size
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        vertices = np.stack([x + side / np.sqrt(3) * np.cos(angles), cy + side / np.sqrt(3) * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(vertices).astype(np.int32)], 1)
    return canvas.astype(bool)


def _thing_pixels(rng, kind: int, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    """The object's colours at its mask pixels (row-major order): ``[N, 3]`` float32."""
    ys, xs = np.nonzero(mask)
    ys, xs = ys.astype(np.float32), xs.astype(np.float32)
    cy, cx = ys.mean(), xs.mean()
    extent = max(np.ptp(ys), np.ptp(xs), 1.0) / 2.0
    if kind == DISK:  # lit from the top left
        shade = 30.0 - 45.0 * np.hypot(ys - (cy - 0.3 * extent), xs - (cx - 0.3 * extent)) / extent
    elif kind == TRIANGLE:  # gentle linear gradient
        shade = 20.0 * ((ys - cy) * np.sin(rng.uniform(0, 6.3)) + (xs - cx)) / extent
    else:
        shade = np.zeros_like(ys)
    pixels = color + shade[:, None]  # [N, 3]
    if kind == BOX:  # dark outline: mask pixels that the 3x3 erosion removes
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        pixels[~inner[mask]] = color * 0.45
    return pixels


# --------------------------------------------------------------------------- scenes


def render_scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image ``[size, size, 3]`` RGB uint8 and label ``[size, size]`` uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # [S, S] each
    cast = rng.normal(0.0, 12.0, size=3)
    colors = (_MEAN_COLORS + rng.normal(0.0, COLOR_SPREAD, size=_MEAN_COLORS.shape) + cast).astype(np.float32)

    # stuff layout: sky over a wavy horizon, grass below, maybe water and a wall
    columns = np.arange(size, dtype=np.float32)
    horizon = rng.uniform(0.3, 0.6) * size + rng.uniform(0, 0.06) * size * np.sin(
        rng.uniform(0.5, 2.5) * 2 * np.pi * columns / size + rng.uniform(0, 2 * np.pi))  # [S]
    label = np.where(yy < horizon[None, :], SKY, GRASS).astype(np.uint8)
    water_kind = rng.choice(3, p=[0.3, 0.4, 0.3])  # none, lake at the horizon, pond
    if water_kind == 1:
        shore = horizon + rng.uniform(0.1, 0.3) * size + 2.0 * np.sin(columns / rng.uniform(4, 9))
        label[(yy >= horizon[None, :]) & (yy < shore[None, :])] = WATER
    elif water_kind == 2:
        cy = rng.uniform(horizon.max(), size)
        axes = rng.uniform(0.15, 0.35) * size, rng.uniform(0.05, 0.15) * size
        pond = ((xx - rng.uniform(0, size)) / axes[0]) ** 2 + ((yy - cy) / axes[1]) ** 2 < 1
        label[pond & (label == GRASS)] = WATER
    if rng.random() < 0.5:
        left, width = rng.uniform(-0.2, 0.7) * size, rng.uniform(0.25, 0.6) * size
        top, bottom = rng.uniform(0.1, 0.45) * size, horizon.mean() + rng.uniform(0.05, 0.3) * size
        label[(xx >= left) & (xx < left + width) & (yy >= top) & (yy < bottom)] = WALL
    modulation, mortar = _stuff_modulation(rng, size, yy, xx)
    own = np.take_along_axis(modulation, label[None].astype(np.int64), axis=0)[0]  # [S, S]: each pixel's class
    image = colors[label] + own[..., None]  # [S, S, 3]
    image[(label == WALL) & mortar] = colors[WALL] * 0.55

    # things, painted in order (later ones occlude earlier ones)
    for _ in range(int(rng.integers(3, 9))):
        kind = int(rng.choice([DISK, BOX, POLE, TRIANGLE], p=[0.25, 0.25, 0.25, 0.25]))
        mask = _thing_mask(rng, kind, size, horizon)
        if not mask.any():
            continue
        other = rng.choice([c for c in range(len(SYNTHETIC_CLASSES)) if c != kind])
        color = (_MEAN_COLORS[other] + rng.normal(0.0, COLOR_SPREAD, size=3) + cast).astype(np.float32)
        image[mask] = _thing_pixels(rng, kind, mask, color)
        label[mask] = kind

    # camera: illumination ramp, slight blur, noise
    ramp = 1.0 + rng.uniform(-0.25, 0.25) * (xx / size - 0.5) + rng.uniform(-0.25, 0.25) * (yy / size - 0.5)
    image = image * ramp[..., None]
    image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 0.8))
    image = image + rng.uniform(3.0, 9.0) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


# --------------------------------------------------------------------------- files and cache


def _params(n_train: int, n_val: int, size: int, seed: int) -> dict:
    return {"generator": "segcli.synthetic", "version": GENERATOR_VERSION, "n_train": n_train,
            "n_val": n_val, "size": size, "seed": seed, "classes": list(SYNTHETIC_CLASSES)}


def _write_marker(root: Path, params: dict, complete: bool) -> None:
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps({**params, "complete": complete}, indent=1))
    os.replace(tmp, root / MARKER)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_generated(root: Path) -> None:
    """Delete the files an earlier generation wrote (and nothing else)."""
    for kind in ("images", "masks"):
        for split in _SPLITS:
            folder = root / kind / split
            if folder.is_dir():
                for path in folder.iterdir():
                    if _FILE_PATTERN.match(path.name):
                        path.unlink()
    for name in ("classes.txt", "palette.txt"):
        (root / name).unlink(missing_ok=True)


def generate_synthetic(root: str | Path, n_train: int = 96, n_val: int = 24, size: int = 128,
                       seed: int = 0) -> Path:
    """Write (or reuse) the synthetic dataset in the folder layout under ``root``; returns ``root``.

    Reuses the files when ROOT/synthetic.json records the same parameters and a finished run;
    otherwise removes what an earlier generation wrote and generates again. A non-empty folder
    without the marker is never touched (it is someone else's data). Not safe to call from
    several processes at once: under DDP let rank 0 generate, then synchronise.
    """
    if n_train < 1 or n_val < 1:
        raise SegcliError(f"need at least one image per split (got train={n_train}, val={n_val})",
                          "data.synthetic_train/synthetic_val")
    if size < 32:
        raise SegcliError(f"synthetic images must be at least 32 px (got {size})", "data.synthetic_size")
    if seed < 0:
        raise SegcliError(f"the seed must be >= 0 (got {seed})", "data.synthetic_seed")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SegcliError("this is a file, not a folder: the synthetic dataset is a folder", str(root),
                          "choose a new or empty folder")
    params = _params(n_train, n_val, size, seed)
    marker = _read_marker(root)
    if marker is not None and marker == {**params, "complete": True}:
        return root
    if marker is None and root.is_dir() and any(root.iterdir()):
        raise SegcliError(f"folder is not empty and has no {MARKER}; refusing to write synthetic data into it",
                          str(root), "choose an empty or new folder for data.root")
    root.mkdir(parents=True, exist_ok=True)
    _remove_generated(root)
    _write_marker(root, params, complete=False)
    for split_id, (split, count) in enumerate(zip(_SPLITS, (n_train, n_val))):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = render_scene(size, np.random.default_rng([seed, split_id, i]))
            cv2.imwrite(str(root / "images" / split / f"{i:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / "masks" / split / f"{i:05d}.png"), label)
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    (root / "palette.txt").write_text("\n".join(" ".join(map(str, rgb)) for rgb in SYNTHETIC_PALETTE.tolist()) + "\n")
    _write_marker(root, params, complete=True)
    return root


@DATASETS.register("synthetic", classes=SYNTHETIC_CLASSES)
def build_synthetic(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """Generate (once) and read the synthetic dataset; ``data.root`` defaults to ./data/synthetic."""
    root = generate_synthetic(data_cfg.root or DEFAULT_ROOT, data_cfg.synthetic_train, data_cfg.synthetic_val,
                              data_cfg.synthetic_size, data_cfg.synthetic_seed)
    return build_folder_at(root, data_cfg, split, "generated by segcli.data.synthetic", name="synthetic",
                           labelled=labelled)

