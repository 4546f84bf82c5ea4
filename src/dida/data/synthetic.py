"""The synthetic domain-shift benchmark (``dida synth``, ``dida.commands.synth``): GTA5-like source,
Cityscapes-like target.

Both domains draw street scenes from one layout distribution (sky, buildings with walls and fences,
vegetation, terrain, road, sidewalk, poles with traffic lights and signs, cars, trucks, buses, trains,
people, riders, bicycles, motorcycles), built as polygons in painter's order (later objects occlude
earlier ones). What differs is the appearance:

- **source** ("GTA"): saturated, flat synthetic colours, hard edges, clean per-class textures;
- **target** ("Cityscapes"): every class's colour is shifted in a fixed, consistent way (hue rotation,
  saturation and brightness change), plus lower contrast, a warm tint, vignetting, blur, sensor noise
  and per-image exposure. Textures and shapes (the class identity cues) are shared.

A model trained on the source alone therefore misreads the target's colours, while self-training
can re-anchor the shifted colours to the unchanged textures and shapes.

On-disk layouts are exactly those of the real datasets (``../shared/spec/method.md`` section 2.1):

- ``ROOT/gta/images/NNNNN.png`` (RGB) and ``ROOT/gta/labels/NNNNN.png`` (paletted 'P' PNG of
  Cityscapes *label ids*, as GTA5 ships them);
- ``ROOT/cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_<frame>_leftImg8bit.png``,
  ``gtFine/.../<stem>_gtFine_polygons.json`` and ``<stem>_gtFine_labelIds.png``.

Polygons are rasterised with PIL's ``ImageDraw.polygon``, the call ``cityscapesscripts``'
``json2labelImg`` makes, into an instance map from which both the label map and the image are derived:
labels, images and the polygon JSON agree pixel for pixel. Every image has its own generator
``np.random.default_rng([seed, domain, index])``, so the output is identical for any ``--nproc``.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw

from dida.constants import CITYSCAPES_CLASSES, CITYSCAPES_ID_TO_TRAINID, IGNORE_INDEX
from dida.errors import DataError
from dida.io import atomic_open, atomic_path, write_png
from dida.runtime import MAX_PROCESSES, ignore_interrupts

#: Bump when the generator's output changes; the demo regenerates data whose manifest differs.
GENERATOR_VERSION = 1
MANIFEST_NAME = "synth_manifest.json"

TRAIN_CITIES: tuple[str, ...] = ("aachen", "bochum", "bremen")
VAL_CITIES: tuple[str, ...] = ("frankfurt", "lindau", "munster")

# Cityscapes label id of each train id (inverse of CITYSCAPES_ID_TO_TRAINID), plus the two ignored
# labels the generator uses.
TRAINID_TO_LABELID: dict[int, int] = {t: i for i, t in CITYSCAPES_ID_TO_TRAINID.items()}
UNLABELED_ID = 0
EGO_VEHICLE_ID = 1
LABEL_NAMES: dict[int, str] = {TRAINID_TO_LABELID[t]: n for t, n in enumerate(CITYSCAPES_CLASSES)}
LABEL_NAMES[EGO_VEHICLE_ID] = "ego vehicle"

_T = {name: t for t, name in enumerate(CITYSCAPES_CLASSES)}

# Canonical ("source") colour of every train id, RGB in [0, 1]. Chosen to look street-like while
# keeping neighbouring classes apart.
BASE_COLORS: np.ndarray = np.array(
    [
        (0.42, 0.40, 0.44),  # road
        (0.72, 0.62, 0.55),  # sidewalk
        (0.62, 0.52, 0.40),  # building
        (0.78, 0.74, 0.60),  # wall
        (0.55, 0.38, 0.22),  # fence
        (0.80, 0.80, 0.82),  # pole
        (0.15, 0.15, 0.12),  # traffic light
        (0.15, 0.35, 0.85),  # traffic sign
        (0.18, 0.52, 0.16),  # vegetation
        (0.62, 0.70, 0.28),  # terrain
        (0.45, 0.68, 0.95),  # sky
        (0.85, 0.25, 0.25),  # person
        (0.95, 0.60, 0.10),  # rider
        (0.20, 0.25, 0.70),  # car
        (0.55, 0.20, 0.60),  # truck
        (0.95, 0.85, 0.20),  # bus
        (0.20, 0.65, 0.65),  # train
        (0.65, 0.10, 0.30),  # motorcycle
        (0.10, 0.75, 0.45),  # bicycle
    ],
    dtype=np.float32,
)

# Target-domain colour shift of every train id: (hue rotation in degrees, saturation factor,
# brightness factor). Fixed (not drawn from the seed) so every seed shows the same domain gap.
TARGET_CLASS_SHIFT: tuple[tuple[float, float, float], ...] = (
    (30.0, 1.6, 0.80),   # road
    (-35.0, 0.8, 0.85),  # sidewalk
    (40.0, 0.7, 1.15),   # building
    (-45.0, 1.2, 0.85),  # wall
    (35.0, 0.9, 1.25),   # fence
    (60.0, 2.0, 0.80),   # pole
    (0.0, 1.0, 1.6),     # traffic light
    (-50.0, 0.9, 1.05),  # traffic sign
    (35.0, 0.8, 0.85),   # vegetation
    (-40.0, 0.8, 1.05),  # terrain
    (-25.0, 0.5, 0.85),  # sky
    (45.0, 0.8, 0.80),   # person
    (-40.0, 0.9, 0.85),  # rider
    (40.0, 0.7, 1.30),   # car
    (-50.0, 0.9, 1.10),  # truck
    (-40.0, 0.8, 0.85),  # bus
    (50.0, 0.8, 1.10),   # train
    (45.0, 1.0, 1.20),   # motorcycle
    (-50.0, 0.8, 0.90),  # bicycle
)


@dataclass(frozen=True)
class DomainStyle:
    """Global appearance of one domain (all factors act on RGB in [0, 1])."""

    class_shift: bool  # apply TARGET_CLASS_SHIFT
    saturation: float
    contrast: float
    gamma: float
    tint: tuple[float, float, float]
    texture_gain: float
    vignette: float
    blur_sigma: float  # in pixels at 512 px width, scaled with the image width
    noise_std: float
    exposure_jitter: float
    ego_vehicle: bool


SOURCE_STYLE = DomainStyle(
    class_shift=False, saturation=1.2, contrast=1.15, gamma=1.0, tint=(1.0, 1.0, 1.0), texture_gain=1.0,
    vignette=0.0, blur_sigma=0.0, noise_std=0.01, exposure_jitter=0.05, ego_vehicle=False,
)
TARGET_STYLE = DomainStyle(
    class_shift=True, saturation=0.75, contrast=0.7, gamma=1.15, tint=(1.08, 1.0, 0.9), texture_gain=0.8,
    vignette=0.35, blur_sigma=1.0, noise_std=0.035, exposure_jitter=0.15, ego_vehicle=True,
)


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated files (stored in the manifest)."""

    seed: int = 0
    num_source: int = 200
    num_target_train: int = 200
    num_val: int = 50
    width: int = 512
    height: int = 256
    version: int = GENERATOR_VERSION


# ------------------------------------------------------------------------------------- layout


@dataclass
class Obj:
    """One polygon: ``label_id`` (Cityscapes label id), integer ``points`` [[x, y], ...]."""

    label_id: int
    points: list[list[int]]


def _poly(label_id: int, pts: Sequence[tuple[float, float]]) -> Obj:
    return Obj(label_id, [[int(round(x)), int(round(y))] for x, y in pts])


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 12, rng: np.random.Generator | None = None,
             jitter: float = 0.0) -> list[tuple[float, float]]:
    ang = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n) if rng is None or jitter == 0 else 1.0 + jitter * rng.uniform(-1, 1, n)
    return [(cx + rx * rr * math.cos(a), cy + ry * rr * math.sin(a)) for a, rr in zip(ang, r)]


def _lid(name: str) -> int:
    return TRAINID_TO_LABELID[_T[name]]


def sample_layout(
    rng: np.random.Generator, width: int, height: int, ego_vehicle: bool
) -> tuple[list[Obj], dict]:
    """Draw one street scene as polygons in painter's order; returns (objects, scene parameters)."""
    W, H = float(width), float(height)
    yh = H * rng.uniform(0.36, 0.48)  # horizon
    vx = W * rng.uniform(0.38, 0.62)  # vanishing point
    objs: list[Obj] = [_poly(_lid("sky"), [(0, 0), (W - 1, 0), (W - 1, H - 1), (0, H - 1)])]

    # Buildings on both sides, taller towards the image borders (perspective), with gaps of sky.
    for side in (-1, 1):
        x = vx + side * W * rng.uniform(0.02, 0.08)
        edge = 0.0 if side < 0 else W - 1
        while (x - edge) * side < 0:
            w = W * rng.uniform(0.06, 0.2)
            x2 = x + side * w
            if rng.random() < 0.85:
                d1, d2 = abs(x - vx) / W, abs(x2 - vx) / W
                top = rng.uniform(0.4, 1.3)
                y1 = yh - H * top * (0.12 + d1)
                y2 = yh - H * top * (0.12 + d2)
                objs.append(_poly(_lid("building"), [(x, y1), (x2, y2), (x2, yh + 4), (x, yh + 4)]))
            x = x2 + side * W * rng.uniform(0.0, 0.03)

    # Trees: canopy blobs and trunks (trunks are vegetation in Cityscapes).
    for _ in range(rng.integers(0, 5)):
        cx = W * rng.uniform(0.0, 1.0)
        r = H * rng.uniform(0.06, 0.16)
        cy = yh - r * rng.uniform(0.3, 1.2)
        objs.append(_poly(_lid("vegetation"), [(cx - r * 0.08, cy), (cx + r * 0.08, cy),
                                              (cx + r * 0.08, yh + 3), (cx - r * 0.08, yh + 3)]))
        objs.append(_poly(_lid("vegetation"), _ellipse(cx, cy, r * rng.uniform(0.9, 1.4), r, 14, rng, 0.2)))

    # Walls in front of the buildings.
    if rng.random() < 0.45:
        xa, xb = sorted(W * rng.uniform(0.0, 1.0, 2))
        hw = H * rng.uniform(0.04, 0.1)
        objs.append(_poly(_lid("wall"), [(xa, yh - hw), (xb, yh - hw), (xb, yh + 3), (xa, yh + 3)]))

    # Ground: terrain or sidewalk everywhere below the horizon, a sidewalk band, then the road.
    base = "terrain" if rng.random() < 0.55 else "sidewalk"
    objs.append(_poly(_lid(base), [(0, yh), (W - 1, yh), (W - 1, H - 1), (0, H - 1)]))
    road_half = W * rng.uniform(0.45, 0.9)  # half-width of the road at the bottom row
    walk = W * rng.uniform(0.15, 0.45)
    top_half = W * 0.015
    objs.append(_poly(_lid("sidewalk"), [(vx - top_half * 3, yh), (vx + top_half * 3, yh),
                                         (vx + road_half + walk, H - 1), (vx - road_half - walk, H - 1)]))
    objs.append(_poly(_lid("road"), [(vx - top_half, yh), (vx + top_half, yh),
                                     (vx + road_half, H - 1), (vx - road_half, H - 1)]))
    scene = {"horizon": yh, "vanish_x": vx, "road_half": road_half}

    def road_x(t: float, u: float) -> float:
        """x at depth t (0 horizon .. 1 bottom) and lateral position u (-1..1 across the road)."""
        return vx + u * (top_half + t * (road_half - top_half))

    # Terrain verges.
    if base == "sidewalk" and rng.random() < 0.4:
        side = rng.choice([-1, 1])
        t1, t2 = sorted(rng.uniform(0.1, 1.0, 2))
        objs.append(_poly(_lid("terrain"), [(road_x(t1, side * 1.5), yh + t1 * (H - yh)),
                                            (road_x(t2, side * 1.5), yh + t2 * (H - yh)),
                                            (road_x(t2, side * 3.0), yh + t2 * (H - yh)),
                                            (road_x(t1, side * 3.0), yh + t1 * (H - yh))]))
    # Fences along the outer edge of the sidewalk.
    if rng.random() < 0.4:
        side = rng.choice([-1, 1])
        u = side * rng.uniform(1.6, 2.4)
        t1, t2 = 0.02, rng.uniform(0.4, 1.0)
        h1, h2 = H * 0.02, H * 0.02 + t2 * H * 0.25
        y1, y2 = yh + t1 * (H - yh), yh + t2 * (H - yh)
        objs.append(_poly(_lid("fence"), [(road_x(t1, u), y1 - h1), (road_x(t2, u), y2 - h2),
                                          (road_x(t2, u), y2), (road_x(t1, u), y1)]))

    # Depth-sorted things: poles (with lights/signs), vehicles, people.
    things: list[tuple[float, list[Obj]]] = []

    def add(t: float, parts: list[Obj]) -> None:
        things.append((t, parts))

    s_unit = H - yh  # object size at depth t is proportional to t * s_unit
    for _ in range(rng.integers(0, 4)):
        t = rng.uniform(0.15, 0.9)
        side = rng.choice([-1, 1])
        x, yb = road_x(t, side * rng.uniform(1.1, 1.5)), yh + t * s_unit
        ph = t * s_unit * rng.uniform(1.4, 2.2)
        pw = max(1.5, t * W * 0.008)
        parts = [_poly(_lid("pole"), [(x - pw, yb - ph), (x + pw, yb - ph), (x + pw, yb), (x - pw, yb)])]
        r = rng.random()
        if r < 0.45:
            lw, lh = pw * 3.0, pw * 8.0
            parts.append(_poly(_lid("traffic light"), [(x - lw, yb - ph - lh), (x + lw, yb - ph - lh),
                                                       (x + lw, yb - ph), (x - lw, yb - ph)]))
        elif r < 0.85:
            sr = pw * 4.0
            cy = yb - ph - sr * 0.8
            shape = rng.integers(0, 3)
            if shape == 0:
                pts = _ellipse(x, cy, sr, sr, 10)
            elif shape == 1:
                pts = [(x, cy - sr), (x + sr, cy + sr * 0.8), (x - sr, cy + sr * 0.8)]
            else:
                pts = [(x - sr, cy - sr), (x + sr, cy - sr), (x + sr, cy + sr), (x - sr, cy + sr)]
            parts.append(_poly(_lid("traffic sign"), pts))
        add(t, parts)

    def vehicle(name: str, t: float, u: float, length: float, height_: float, kind: str) -> list[Obj]:
        s = t * s_unit
        xc, yb = road_x(t, u), yh + t * s_unit
        w, h = length * s, height_ * s
        x0, x1 = xc - w / 2, xc + w / 2
        if kind == "car":
            pts = [(x0, yb), (x0, yb - 0.5 * h), (x0 + 0.15 * w, yb - 0.58 * h), (x0 + 0.27 * w, yb - h),
                   (x1 - 0.27 * w, yb - h), (x1 - 0.15 * w, yb - 0.58 * h), (x1, yb - 0.5 * h), (x1, yb)]
        elif kind == "truck":
            pts = [(x0, yb), (x0, yb - h), (x0 + 0.7 * w, yb - h), (x0 + 0.7 * w, yb - 0.75 * h),
                   (x1 - 0.05 * w, yb - 0.7 * h), (x1, yb - 0.4 * h), (x1, yb)]
        else:  # bus / train: long boxes with bevelled corners
            b = 0.06 * h
            pts = [(x0, yb), (x0, yb - h + b), (x0 + b, yb - h), (x1 - b, yb - h), (x1, yb - h + b), (x1, yb)]
        return [_poly(_lid(name), pts)]

    counts = {
        "car": rng.integers(0, 6), "truck": int(rng.random() < 0.3), "bus": int(rng.random() < 0.25),
        "train": int(rng.random() < 0.12),
    }
    dims = {"car": (1.1, 0.55, "car"), "truck": (1.4, 1.0, "truck"), "bus": (2.4, 1.05, "bus"),
            "train": (4.0, 1.1, "train")}
    for name, n in counts.items():
        for _ in range(n):
            t = rng.uniform(0.2, 1.0) if name != "train" else rng.uniform(0.25, 0.5)
            u = rng.uniform(-0.75, 0.75)
            length, hh, kind = dims[name]
            add(t, vehicle(name, t, u, length * rng.uniform(0.85, 1.15), hh * rng.uniform(0.9, 1.1), kind))

    def person(t: float, u: float, label: str = "person", bottom: float | None = None) -> list[Obj]:
        s = t * s_unit
        xc = road_x(t, u)
        yb = yh + t * s_unit if bottom is None else bottom
        h = (0.9 if label == "person" else 0.6) * s * rng.uniform(0.9, 1.1)
        w = 0.25 * h
        head = h * 0.13
        body = [(xc - w * 0.35, yb), (xc - w * 0.45, yb - 0.45 * h), (xc - w * 0.5, yb - 0.8 * h),
                (xc + w * 0.5, yb - 0.8 * h), (xc + w * 0.45, yb - 0.45 * h), (xc + w * 0.35, yb),
                (xc + w * 0.05, yb), (xc, yb - 0.4 * h), (xc - w * 0.05, yb)]
        head_pts = _ellipse(xc, yb - 0.8 * h - head, head, head * 1.1, 8)
        return [_poly(_lid(label), body), _poly(_lid(label), head_pts)]

    def two_wheeler(t: float, u: float, name: str) -> list[Obj]:
        s = t * s_unit
        xc, yb = road_x(t, u), yh + t * s_unit
        r = 0.2 * s
        gap = 0.65 * s
        parts = [_poly(_lid(name), _ellipse(xc - gap / 2, yb - r, r, r, 10)),
                 _poly(_lid(name), _ellipse(xc + gap / 2, yb - r, r, r, 10))]
        if name == "bicycle":
            th = max(1.0, 0.03 * s)
            parts.append(_poly(_lid(name), [(xc - gap / 2, yb - r - th), (xc, yb - 2.6 * r),
                                            (xc + gap / 2, yb - r - th), (xc + gap / 2, yb - r + th),
                                            (xc, yb - 2.6 * r + 2 * th), (xc - gap / 2, yb - r + th)]))
        else:
            parts.append(_poly(_lid(name), [(xc - gap * 0.6, yb - 1.2 * r), (xc - gap * 0.3, yb - 2.8 * r),
                                            (xc + gap * 0.5, yb - 2.6 * r), (xc + gap * 0.6, yb - 1.2 * r)]))
        return parts

    for _ in range(rng.integers(0, 5)):
        t = rng.uniform(0.2, 1.0)
        u = rng.choice([-1, 1]) * rng.uniform(1.05, 1.8) if rng.random() < 0.75 else rng.uniform(-0.9, 0.9)
        add(t, person(t, u))
    for name, p in (("bicycle", 0.35), ("motorcycle", 0.25)):
        if rng.random() < p:
            t = rng.uniform(0.3, 1.0)
            u = rng.uniform(-0.9, 0.9)
            parts = two_wheeler(t, u, name)
            if rng.random() < 0.7:  # ridden: the rider sits on top, drawn after the vehicle
                parts += person(t, u, "rider", bottom=yh + t * s_unit - 0.35 * t * s_unit)
            add(t, parts)

    for _, parts in sorted(things, key=lambda item: item[0]):
        objs.extend(parts)

    if ego_vehicle:  # Cityscapes' ego-vehicle hood at the bottom (label id 1, ignored)
        eh = H * rng.uniform(0.05, 0.08)
        objs.append(_poly(EGO_VEHICLE_ID, [(0, H - 1), (0, H - eh * 0.6), (W * 0.3, H - eh),
                                           (W * 0.7, H - eh), (W - 1, H - eh * 0.6), (W - 1, H - 1)]))
    return objs, scene


def rasterize_instances(objs: Sequence[Obj], width: int, height: int) -> np.ndarray:
    """Instance map [H, W] uint8: object k (painter's order) -> k + 1, 0 = nothing drawn.

    Uses the very call ``cityscapesscripts``' ``createLabelImage`` makes (``ImageDraw.polygon`` with
    a fill only), so every region equals what ``json2labelImg`` renders from the polygon JSON.
    """
    if len(objs) > 255:
        raise DataError(f"synthetic scene with {len(objs)} polygons; at most 255 fit an 8-bit instance map.")
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for k, o in enumerate(objs):
        draw.polygon([tuple(p) for p in o.points], fill=k + 1)
    return np.asarray(img, dtype=np.uint8)


def label_ids_from_instances(inst: np.ndarray, objs: Sequence[Obj]) -> np.ndarray:
    """[H, W] uint8 Cityscapes label ids (0 = unlabeled) from the instance map."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[1: len(objs) + 1] = [o.label_id for o in objs]
    return lut[inst]


# ------------------------------------------------------------------------------------ rendering


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-ish noise field [H, W] float32 with features of about ``cell`` pixels."""
    h, w = max(2, height // cell + 2), max(2, width // cell + 2)
    small = rng.standard_normal((h, w)).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _shift_color(rgb: np.ndarray, hue_deg: float, sat: float, val: float) -> np.ndarray:
    h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in rgb])
    h = (h + hue_deg / 360.0) % 1.0
    return np.array(colorsys.hsv_to_rgb(h, min(1.0, s * sat), min(1.0, v * val)), dtype=np.float32)


def _texture(tid: int, xs: np.ndarray, ys: np.ndarray, rel_x: np.ndarray, rel_y: np.ndarray,
             lo: np.ndarray, hi: np.ndarray, scene: dict, unit: float) -> np.ndarray:
    """Multiplicative texture (around 0) of train id ``tid`` at pixels (xs, ys); shared by both domains.

    ``rel_x``/``rel_y`` are positions inside the object's bounding box (0..1); ``lo``/``hi`` are
    low/high-frequency noise sampled at the pixels; ``unit`` = image width / 512 (pattern scale).
    """
    p = lambda period: period * unit
    name = CITYSCAPES_CLASSES[tid]
    if name == "road":
        yh, vx = scene["horizon"], scene["vanish_x"]
        depth = np.clip(ys - yh, 1.0, None)
        centre = np.abs(xs - vx) < 0.012 * depth
        dashes = np.sin(np.sqrt(depth) * 3.0) > 0.0
        return 0.06 * lo + 0.08 * hi + 0.9 * (centre & dashes)
    if name == "sidewalk":
        lines = (np.mod(xs, p(14)) < 1.5 * unit) | (np.mod(ys, p(8)) < 1.2 * unit)
        return -0.3 * lines + 0.05 * hi
    if name == "building":
        windows = (np.mod(xs, p(16)) > p(5)) & (np.mod(xs, p(16)) < p(12)) & (np.mod(ys, p(18)) > p(5)) & (
            np.mod(ys, p(18)) < p(13))
        return -0.45 * windows + 0.08 * lo
    if name == "wall":
        return -0.25 * (np.mod(ys, p(6)) < 1.2 * unit) + 0.08 * hi
    if name == "fence":
        return -0.45 * (np.mod(xs, p(5)) < p(2)) + 0.05 * hi
    if name == "pole":
        return 0.05 * hi
    if name == "traffic light":
        phase = np.mod(rel_y * 3.0, 1.0)
        lamps = (phase > 0.25) & (phase < 0.75) & (np.abs(rel_x - 0.5) < 0.3)
        return 2.5 * lamps
    if name == "traffic sign":
        border = np.maximum(np.abs(rel_x - 0.5), np.abs(rel_y - 0.5)) > 0.38
        return 0.5 * border + 0.03 * hi
    if name == "vegetation":
        return 0.45 * hi + 0.1 * lo
    if name == "terrain":
        return 0.15 * hi + 0.12 * lo + 0.15 * (np.mod(ys, p(3)) < unit)
    if name == "sky":
        return 0.25 * (1.0 - rel_y) + 0.12 * np.maximum(lo, 0.0)
    if name in ("person", "rider"):
        return -0.35 * (rel_y > 0.55) + 0.05 * hi
    if name == "car":
        windows = (rel_y > 0.08) & (rel_y < 0.42) & (rel_x > 0.2) & (rel_x < 0.8)
        return -0.45 * windows - 0.6 * (rel_y > 0.88)
    if name == "truck":
        return -0.4 * ((rel_y > 0.1) & (rel_y < 0.3) & (rel_x > 0.72)) - 0.5 * (rel_y > 0.9) + 0.05 * lo
    if name in ("bus", "train"):
        windows = (rel_y > 0.15) & (rel_y < 0.45) & (np.mod(rel_x * (8 if name == "bus" else 14), 1.0) < 0.7)
        stripe = (rel_y > 0.6) & (rel_y < 0.68)
        return -0.45 * windows + 0.35 * stripe
    if name in ("motorcycle", "bicycle"):
        return -0.4 * (rel_y > 0.6) + 0.05 * hi
    return np.zeros_like(xs, dtype=np.float32)


def render(rng: np.random.Generator, objs: Sequence[Obj], inst: np.ndarray, scene: dict,
           style: DomainStyle) -> np.ndarray:
    """Render the instance map as an RGB uint8 image [H, W, 3] in the given domain style."""
    height, width = inst.shape
    unit = width / 512.0
    lo = _smooth_noise(rng, height, width, max(4, int(24 * unit)))
    hi = _smooth_noise(rng, height, width, max(1, int(2 * unit)))
    img = np.zeros((height, width, 3), dtype=np.float32)

    # Per-instance colour: the class colour (shifted in the target), with mild instance jitter.
    ids = np.arange(1, len(objs) + 1)
    colors = np.zeros((len(objs) + 1, 3), dtype=np.float32)
    tids = np.full(len(objs) + 1, IGNORE_INDEX, dtype=np.int64)
    for k, o in enumerate(objs):
        tid = CITYSCAPES_ID_TO_TRAINID.get(o.label_id, IGNORE_INDEX)
        tids[k + 1] = tid
        if tid == IGNORE_INDEX:  # ego vehicle: dark, slightly reflective
            colors[k + 1] = (0.12, 0.12, 0.14)
            continue
        hue, sat, val = TARGET_CLASS_SHIFT[tid] if style.class_shift else (0.0, 1.0, 1.0)
        hue += rng.uniform(-6.0, 6.0)
        val *= rng.uniform(0.88, 1.12)
        colors[k + 1] = _shift_color(BASE_COLORS[tid], hue, sat * style.saturation, val)

    flat = inst.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(len(objs) + 2))
    ys_all, xs_all = np.divmod(order, width)
    out = img.reshape(-1, 3)
    for k in ids[np.diff(bounds)[1:] > 0]:  # per visible instance (dozens), never per pixel
        sel = order[bounds[k]: bounds[k + 1]]
        xs = xs_all[bounds[k]: bounds[k + 1]].astype(np.float32)
        ys = ys_all[bounds[k]: bounds[k + 1]].astype(np.float32)
        pts = np.asarray(objs[k - 1].points, dtype=np.float32)
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        rel_x = (xs - x0) / max(1.0, x1 - x0)
        rel_y = (ys - y0) / max(1.0, y1 - y0)
        tid = int(tids[k])
        if tid == IGNORE_INDEX:
            tex = 0.4 * (rel_y < 0.15) + 0.03 * hi.reshape(-1)[sel]
        else:
            tex = _texture(tid, xs, ys, rel_x, rel_y, lo.reshape(-1)[sel], hi.reshape(-1)[sel], scene, unit)
        out[sel] = colors[k] * (1.0 + style.texture_gain * tex.astype(np.float32))[:, None]

    # Global lighting: a soft left-right illumination gradient, exposure, contrast, gamma, tint.
    xx = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :, None]
    img *= 1.0 + 0.08 * rng.uniform(-1, 1) * xx
    img *= 1.0 + style.exposure_jitter * rng.uniform(-1, 1)
    img = np.clip(img, 0.0, 1.0)
    img = (img - 0.5) * style.contrast + 0.5
    img = np.clip(img, 0.0, 1.0) ** style.gamma
    img *= np.asarray(style.tint, dtype=np.float32)
    if style.vignette > 0:
        yy = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
        r2 = (xx[..., 0] ** 2 + yy**2) / 2.0
        img *= (1.0 - style.vignette * r2)[..., None]
    if style.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), style.blur_sigma * unit)
    if style.noise_std > 0:
        img += style.noise_std * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------- writing


def _label_palette() -> list[int]:
    from cityscapesscripts.helpers.labels import id2label

    pal = [0] * 768
    for i, lab in id2label.items():
        if 0 <= i < 256:
            pal[3 * i: 3 * i + 3] = list(lab.color)
    return pal


def _write_png_rgb(path: Path, rgb: np.ndarray) -> None:
    write_png(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_png_pil(path: Path, img: Image.Image) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


DOMAIN_CODES = {"source": 0, "target_train": 1, "val": 2}


def cityscapes_stem(split: str, index: int) -> tuple[str, str]:
    """(city, stem) of the ``index``-th image of a split, e.g. ('aachen', 'aachen_000000_000003')."""
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    return city, f"{city}_000000_{index:06d}"


def _generate_one(task: tuple[str, int, int, int, int, str]) -> str:
    """Worker: generate and write one sample. task = (domain, index, seed, width, height, root)."""
    domain, index, seed, width, height, root_s = task
    root = Path(root_s)
    rng = np.random.default_rng([seed, DOMAIN_CODES[domain], index])
    style = SOURCE_STYLE if domain == "source" else TARGET_STYLE
    objs, scene = sample_layout(rng, width, height, ego_vehicle=style.ego_vehicle)
    inst = rasterize_instances(objs, width, height)
    label_ids = label_ids_from_instances(inst, objs)
    rgb = render(rng, objs, inst, scene, style)
    if domain == "source":
        name = f"{index + 1:05d}.png"
        lab = Image.fromarray(label_ids, mode="L").convert("P")
        lab.putpalette(_label_palette())
        _write_png_rgb(root / "gta" / "images" / name, rgb)
        _write_png_pil(root / "gta" / "labels" / name, lab)
        return name
    split = "train" if domain == "target_train" else "val"
    city, stem = cityscapes_stem(split, index)
    img_dir = root / "cityscapes" / "leftImg8bit" / split / city
    gt_dir = root / "cityscapes" / "gtFine" / split / city
    polygons = {
        "imgHeight": height,
        "imgWidth": width,
        "objects": [{"label": LABEL_NAMES[o.label_id], "polygon": o.points} for o in objs],
    }
    with atomic_open(gt_dir / f"{stem}_gtFine_polygons.json", "w") as f:
        json.dump(polygons, f)
    _write_png_pil(gt_dir / f"{stem}_gtFine_labelIds.png", Image.fromarray(label_ids, mode="L"))
    _write_png_rgb(img_dir / f"{stem}_leftImg8bit.png", rgb)
    return stem


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parameters the data under ``root`` was generated with, or None (absent/unreadable)."""
    path = Path(root) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


MAX_SYNTH_SIDE = 4096


def check_params(params: SynthParams, nproc: int = 1) -> None:
    """Raise ``DataError`` for parameters ``generate`` cannot use."""
    if min(params.width, params.height) < 16 or max(params.width, params.height) > MAX_SYNTH_SIDE:
        raise DataError(f"--size: synthetic images of {params.width}x{params.height} px; use sizes from 16 to "
                        f"{MAX_SYNTH_SIDE}.")
    if min(params.num_source, params.num_target_train, params.num_val) < 1:
        raise DataError("--num-source, --num-target-train and --num-val must each be at least 1.")
    if not 1 <= nproc <= MAX_PROCESSES:
        raise DataError(f"--nproc must be in [1, {MAX_PROCESSES}], got {nproc}.")


def generate(
    root: str | os.PathLike[str], params: SynthParams, nproc: int = 2, progress: bool = True
) -> Path:
    """Generate the benchmark under ``root`` (``root/gta``, ``root/cityscapes``); returns ``root``.

    The manifest ``root/synth_manifest.json`` is written last, so its presence means a complete set.
    """
    root = Path(root)
    check_params(params, nproc)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    tasks = [(d, i, params.seed, params.width, params.height, str(root))
             for d, n in (("source", params.num_source), ("target_train", params.num_target_train),
                          ("val", params.num_val))
             for i in range(n)]
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc="dida synth", unit="img", disable=not progress) as bar:
        if nproc <= 1:
            for t in tasks:
                _generate_one(t)
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
            with ctx.Pool(nproc, initializer=ignore_interrupts) as pool:
                for _ in pool.imap_unordered(_generate_one, tasks, chunksize=4):
                    bar.update()
    with atomic_open(root / MANIFEST_NAME, "w") as f:
        json.dump(asdict(params), f, indent=2)
    return root
