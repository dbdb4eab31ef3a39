"""Seeded generator of the offline world: a small COCO-format dataset of procedural scenes.

Every image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB (64 px: the tiny model's CLIP tower reads it at this size with
8-px patches, 64 image tokens; small images keep training on a CPU under an hour). It shows 1-5 objects of
distinct categories drawn from :data:`CATEGORIES` (34 real COCO categories, real ids, names and supercategories),
each a distinct procedural appearance (shape, colour, texture), on a scene background (kitchen, street, snow,
living room, field, beach) with noise and lighting changes.

Objects are sampled from the scene's weights times pairwise affinities that follow real COCO co-occurrence
(fork-knife-dining table, person-skis, tv-remote, dog-frisbee, ...), so a model trained on the captions learns
co-occurrence priors; look-alike categories (the cutlery, sheep/cow, skis/snowboard), small sizes, occlusion and
dim lighting make some objects hard to see, which is where a small model falls back on those priors and
hallucinates, as large LVLMs do.

Outputs (``write_split``): ``instances_{split}.json`` (images, annotations with bbox [x, y, w, h] of the visible
pixels, area = visible pixel count, segmentation = bbox polygon, iscrowd 0; categories with supercategory),
``captions_{split}.json`` (5 captions per image: one detailed caption that names every object, four shorter
COCO-style ones; only COCO names and CHAIR synonyms are used as object words), PNG images under ``images/``
and POPE question files (``pope_{random,popular,adversarial}.json``, JSONL like RUCAIBox's). Everything is a pure function of ``(seed, split, index)``: numpy's PCG64 streams are stable across
numpy versions, so a split is bit-identical wherever it is regenerated.

    python -m mmattn.eval.world.generate --out DIR --split val --num 500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "CATEGORIES",
    "SCENES",
    "AFFINITY",
    "SPLIT_CODES",
    "Sample",
    "generate_sample",
    "generate_split",
    "write_split",
    "coco_dicts",
    "cooccurrence",
]

IMAGE_SIZE = 64
_SS = 2  # supersampling factor: drawn at 128 px, box-filtered down to 64
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
IMAGE_ID_BASE = {"train": 1_000_000, "val": 1, "test": 2_000_000}

# (id, name, supercategory, caption words: COCO name first, then CHAIR synonyms used in captions)
CATEGORIES: list[dict] = [
    dict(id=1, name="person", supercategory="person", words=["person", "man", "woman", "boy", "girl", "lady"]),
    dict(id=3, name="car", supercategory="vehicle", words=["car", "car", "taxi"]),
    dict(id=6, name="bus", supercategory="vehicle", words=["bus"]),
    dict(id=10, name="traffic light", supercategory="outdoor", words=["traffic light", "traffic light", "stoplight"]),
    dict(id=13, name="stop sign", supercategory="outdoor", words=["stop sign"]),
    dict(id=16, name="bird", supercategory="animal", words=["bird", "bird", "seagull", "pigeon"]),
    dict(id=17, name="cat", supercategory="animal", words=["cat", "cat", "kitten"]),
    dict(id=18, name="dog", supercategory="animal", words=["dog", "dog", "puppy"]),
    dict(id=19, name="horse", supercategory="animal", words=["horse", "horse", "pony"]),
    dict(id=20, name="sheep", supercategory="animal", words=["sheep", "sheep", "lamb"]),
    dict(id=21, name="cow", supercategory="animal", words=["cow", "cow", "calf"]),
    dict(id=28, name="umbrella", supercategory="accessory", words=["umbrella"]),
    dict(id=34, name="frisbee", supercategory="sports", words=["frisbee"]),
    dict(id=35, name="skis", supercategory="sports", words=["skis"]),
    dict(id=36, name="snowboard", supercategory="sports", words=["snowboard"]),
    dict(id=38, name="kite", supercategory="sports", words=["kite"]),
    dict(id=42, name="surfboard", supercategory="sports", words=["surfboard"]),
    dict(id=44, name="bottle", supercategory="kitchen", words=["bottle"]),
    dict(id=46, name="wine glass", supercategory="kitchen", words=["wine glass"]),
    dict(id=47, name="cup", supercategory="kitchen", words=["cup"]),
    dict(id=48, name="fork", supercategory="kitchen", words=["fork"]),
    dict(id=49, name="knife", supercategory="kitchen", words=["knife"]),
    dict(id=50, name="spoon", supercategory="kitchen", words=["spoon"]),
    dict(id=51, name="bowl", supercategory="kitchen", words=["bowl"]),
    dict(id=59, name="pizza", supercategory="food", words=["pizza"]),
    dict(id=61, name="cake", supercategory="food", words=["cake"]),
    dict(id=62, name="chair", supercategory="furniture", words=["chair"]),
    dict(id=63, name="couch", supercategory="furniture", words=["couch", "couch", "sofa"]),
    dict(id=64, name="potted plant", supercategory="furniture", words=["potted plant", "houseplant"]),
    dict(id=67, name="dining table", supercategory="furniture", words=["table", "dining table"]),
    dict(id=72, name="tv", supercategory="electronic", words=["tv", "television"]),
    dict(id=73, name="laptop", supercategory="electronic", words=["laptop", "laptop", "computer"]),
    dict(id=75, name="remote", supercategory="electronic", words=["remote"]),
    dict(id=84, name="book", supercategory="indoor", words=["book"]),
]
_BY_NAME = {c["name"]: c for c in CATEGORIES}

# Scene -> (caption phrases, object weights). Weights are relative sampling rates before affinities.
SCENES: dict[str, dict] = {
    "kitchen": dict(
        phrases=["kitchen", "dining room"],
        objects={"dining table": 7, "cup": 4, "fork": 3, "knife": 3, "spoon": 2, "bowl": 3, "wine glass": 2,
                 "bottle": 2, "pizza": 2, "cake": 2, "chair": 2, "person": 1.5, "potted plant": 0.5, "book": 0.3}),
    "street": dict(
        phrases=["street", "city street", "road"],
        objects={"person": 5, "car": 5, "bus": 3, "traffic light": 3, "stop sign": 2, "umbrella": 1, "dog": 0.5,
                 "bird": 0.5}),
    "snow": dict(
        phrases=["snowy hill", "snowy mountain", "snow field"],
        objects={"person": 6, "skis": 6, "snowboard": 3, "dog": 0.3}),
    "living room": dict(
        phrases=["living room", "room"],
        objects={"couch": 5, "tv": 4, "remote": 3, "laptop": 2, "book": 2, "potted plant": 2, "chair": 2, "cat": 2,
                 "dog": 1.5, "cup": 1.5, "person": 2}),
    "field": dict(
        phrases=["grassy field", "park", "meadow"],
        objects={"dog": 3, "frisbee": 2.5, "sheep": 3, "cow": 3, "horse": 3, "bird": 2, "person": 3, "kite": 1.5}),
    "beach": dict(
        phrases=["beach", "sandy beach", "shore"],
        objects={"surfboard": 4, "umbrella": 3, "kite": 2.5, "person": 5, "bird": 1.5, "bottle": 0.5, "dog": 0.5}),
}
SCENE_NAMES = list(SCENES)

# Symmetric pairwise multipliers applied to a candidate's weight when the other object is already in the image,
# following the strongest COCO co-occurrences.
AFFINITY: dict[tuple[str, str], float] = {
    ("fork", "knife"): 8.0, ("fork", "spoon"): 2.5, ("knife", "spoon"): 2.5, ("fork", "dining table"): 2.5,
    ("knife", "dining table"): 2.5, ("spoon", "dining table"): 2.0, ("cup", "dining table"): 3.0,
    ("wine glass", "bottle"): 4.0, ("wine glass", "dining table"): 2.5, ("pizza", "dining table"): 3.0,
    ("cake", "fork"): 2.5, ("cake", "dining table"): 2.0, ("bowl", "spoon"): 3.0, ("bowl", "dining table"): 2.0,
    ("chair", "dining table"): 3.0, ("person", "skis"): 8.0, ("person", "snowboard"): 4.0,
    ("tv", "remote"): 6.0, ("couch", "tv"): 2.5, ("couch", "remote"): 2.5, ("laptop", "book"): 2.0,
    ("cat", "couch"): 2.5, ("dog", "frisbee"): 6.0, ("person", "frisbee"): 3.0, ("person", "umbrella"): 3.0,
    ("person", "surfboard"): 4.0, ("car", "traffic light"): 3.0, ("bus", "car"): 2.5, ("car", "stop sign"): 2.0,
    ("bus", "traffic light"): 2.0, ("sheep", "cow"): 1.5, ("horse", "person"): 2.0, ("person", "kite"): 3.0,
    ("umbrella", "surfboard"): 1.5,
}
_AFF: dict[str, dict[str, float]] = {}
for (_a, _b), _m in AFFINITY.items():
    _AFF.setdefault(_a, {})[_b] = _m
    _AFF.setdefault(_b, {})[_a] = _m

NUM_OBJECTS_P = np.array([0.08, 0.2, 0.3, 0.26, 0.16])  # P(1..5 objects)
OUT_OF_CONTEXT_P = 0.05  # an object drawn from all categories uniformly
OTHER_BACKGROUND_P = 0.1  # scene drawn on another scene's background


# ----------------------------------------------------------------------------------------------------------------
# Drawing primitives on a local (u, v) grid in [0, 1]^2 covering the object's box (u right, v down).

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _rect(u0, v0, u1, v1) -> Mask:
    return lambda u, v: (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _ellipse(cu, cv, ru, rv) -> Mask:
    return lambda u, v: ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _ring(cu, cv, ru, rv, inner) -> Mask:
    def m(u, v):
        d = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
        return (d <= 1.0) & (d >= inner**2)
    return m


def _poly(points) -> Mask:
    pts = np.asarray(points, dtype=np.float64)
    area2 = np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
    sign = 1.0 if area2 > 0 else -1.0

    def m(u, v):
        out = np.ones(u.shape, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
            out &= sign * ((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)) >= 0
        return out
    return m


def _segment(u0, v0, u1, v1, half_width) -> Mask:
    def m(u, v):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0.0, 1.0)
        return (u - u0 - t * du) ** 2 + (v - v0 - t * dv) ** 2 <= half_width**2
    return m


def _union(*masks: Mask) -> Mask:
    def m(u, v):
        out = masks[0](u, v)
        for other in masks[1:]:
            out = out | other(u, v)
        return out
    return m


def _solid(c):
    c = np.asarray(c, dtype=np.float32)
    return lambda u, v, px, py: np.broadcast_to(c, u.shape + (3,))


def _pattern(kind: str, c1, c2, period: float):
    """Texture in canvas pixels (px, py), so stripes keep their pitch whatever the object's size."""
    c1 = np.asarray(c1, dtype=np.float32)
    c2 = np.asarray(c2, dtype=np.float32)

    def tex(u, v, px, py):
        if kind == "hstripes":
            sel = (py // period) % 2 == 0
        elif kind == "vstripes":
            sel = (px // period) % 2 == 0
        elif kind == "checker":
            sel = ((px // period) + (py // period)) % 2 == 0
        elif kind == "dots":
            sel = ((px % period) - period / 2) ** 2 + ((py % period) - period / 2) ** 2 > (period * 0.3) ** 2
        elif kind == "diag":
            sel = ((px + py) // period) % 2 == 0
        else:
            raise ValueError(kind)
        return np.where(sel[..., None], c1, c2)
    return tex


def _jitter(rng, c, amount=18.0):
    return np.clip(np.asarray(c, dtype=np.float32) + rng.normal(0.0, amount, 3), 0, 255)


# ----------------------------------------------------------------------------------------------------------------
# Category appearances: name -> (aspect w/h, size range as a fraction of the image's side (longest side),
# parts(rng) -> list of (mask, texture)). Parts are painted in order.

def _person(rng):
    shirt = [(40, 70, 200), (40, 70, 200), (30, 110, 210)][rng.integers(3)]
    return [
        (_rect(0.3, 0.35, 0.7, 0.72), _solid(_jitter(rng, shirt, 15))),
        (_rect(0.32, 0.72, 0.46, 1.0), _solid(_jitter(rng, (45, 45, 60), 8))),
        (_rect(0.54, 0.72, 0.68, 1.0), _solid(_jitter(rng, (45, 45, 60), 8))),
        (_rect(0.12, 0.37, 0.3, 0.6), _solid(_jitter(rng, shirt, 15))),
        (_rect(0.7, 0.37, 0.88, 0.6), _solid(_jitter(rng, shirt, 15))),
        (_ellipse(0.5, 0.18, 0.17, 0.17), _solid(_jitter(rng, (235, 190, 150), 12))),
    ]


def _car(rng):
    body = _jitter(rng, (210, 30, 30), 15)
    return [
        (_rect(0.0, 0.4, 1.0, 0.8), _solid(body)),
        (_poly([(0.2, 0.4), (0.32, 0.12), (0.7, 0.12), (0.82, 0.4)]), _solid(body)),
        (_poly([(0.28, 0.4), (0.36, 0.2), (0.66, 0.2), (0.74, 0.4)]), _solid((170, 210, 235))),
        (_ellipse(0.22, 0.82, 0.11, 0.17), _solid((20, 20, 20))),
        (_ellipse(0.78, 0.82, 0.11, 0.17), _solid((20, 20, 20))),
    ]


def _bus(rng):
    body = _jitter(rng, (240, 200, 30), 12)
    parts = [(_rect(0.0, 0.0, 1.0, 0.85), _solid(body))]
    for i in range(5):
        u0 = 0.05 + i * 0.19
        parts.append((_rect(u0, 0.12, u0 + 0.14, 0.45), _solid((120, 180, 230))))
    parts += [(_ellipse(0.18, 0.88, 0.07, 0.12), _solid((20, 20, 20))),
              (_ellipse(0.82, 0.88, 0.07, 0.12), _solid((20, 20, 20)))]
    return parts


def _traffic_light(rng):
    return [
        (_rect(0.15, 0.0, 0.85, 0.78), _solid(_jitter(rng, (30, 30, 30), 6))),
        (_rect(0.42, 0.78, 0.58, 1.0), _solid((80, 80, 80))),
        (_ellipse(0.5, 0.14, 0.25, 0.09), _solid((230, 30, 30))),
        (_ellipse(0.5, 0.39, 0.25, 0.09), _solid((240, 200, 20))),
        (_ellipse(0.5, 0.63, 0.25, 0.09), _solid((30, 200, 60))),
    ]


def _stop_sign(rng):
    a, b = 0.29, 0.71
    octagon = [(a, 0), (b, 0), (1, a), (1, b), (b, 1), (a, 1), (0, b), (0, a)]
    inner = [(0.5 + 0.78 * (x - 0.5), 0.5 + 0.78 * (y - 0.5)) for x, y in octagon]
    return [
        (_poly(octagon), _solid((245, 245, 245))),
        (_poly(inner), _solid(_jitter(rng, (200, 20, 30), 10))),
        (_rect(0.25, 0.45, 0.75, 0.55), _solid((245, 245, 245))),
    ]


def _bird(rng):
    c = _jitter(rng, (70, 140, 220), 15)
    return [
        (_ellipse(0.45, 0.55, 0.4, 0.28), _solid(c)),
        (_ellipse(0.8, 0.35, 0.17, 0.2), _solid(c)),
        (_poly([(0.95, 0.3), (1.0, 0.4), (0.9, 0.42)]), _solid((240, 190, 40))),
        (_poly([(0.2, 0.45), (0.6, 0.45), (0.35, 0.1)]), _solid(c * 0.6)),
    ]


def _cat(rng):
    c = _jitter(rng, (140, 140, 140), 12)
    return [
        (_ellipse(0.5, 0.65, 0.45, 0.33), _pattern("vstripes", c, c * 0.6, 3)),
        (_ellipse(0.5, 0.35, 0.22, 0.2), _solid(c)),
        (_poly([(0.3, 0.3), (0.36, 0.0), (0.45, 0.2)]), _solid(c)),
        (_poly([(0.55, 0.2), (0.64, 0.0), (0.7, 0.3)]), _solid(c)),
    ]


def _dog(rng):
    c = _jitter(rng, (150, 95, 45), 15)
    return [
        (_rect(0.2, 0.35, 0.85, 0.7), _solid(c)),
        (_rect(0.25, 0.7, 0.35, 1.0), _solid(c)),
        (_rect(0.7, 0.7, 0.8, 1.0), _solid(c)),
        (_ellipse(0.2, 0.3, 0.2, 0.2), _solid(c)),
        (_ellipse(0.08, 0.38, 0.08, 0.15), _solid(c * 0.5)),
        (_segment(0.85, 0.4, 1.0, 0.2, 0.04), _solid(c)),
    ]


def _horse(rng):
    c = _jitter(rng, (100, 60, 30), 12)
    parts = [(_rect(0.15, 0.3, 0.8, 0.65), _solid(c))]
    for u in (0.2, 0.32, 0.63, 0.75):
        parts.append((_rect(u, 0.6, u + 0.06, 1.0), _solid(c * 0.8)))
    parts += [(_poly([(0.7, 0.35), (0.8, 0.3), (0.95, 0.0), (1.0, 0.12), (0.9, 0.45)]), _solid(c)),
              (_rect(0.72, 0.05, 0.8, 0.35), _solid((30, 20, 10)))]
    return parts


def _sheep(rng):
    return [
        (_ellipse(0.45, 0.5, 0.42, 0.35), _pattern("dots", (240, 240, 235), (200, 200, 195), 4)),
        (_ellipse(0.88, 0.4, 0.12, 0.15), _solid((30, 30, 30))),
        (_rect(0.25, 0.8, 0.33, 1.0), _solid((30, 30, 30))),
        (_rect(0.58, 0.8, 0.66, 1.0), _solid((30, 30, 30))),
    ]


def _cow(rng):
    parts = [(_rect(0.1, 0.3, 0.85, 0.7), _pattern("checker", (245, 245, 245), (25, 25, 25), 5))]
    for u in (0.15, 0.72):
        parts.append((_rect(u, 0.65, u + 0.08, 1.0), _solid((240, 240, 240))))
    parts += [(_rect(0.82, 0.2, 1.0, 0.45), _solid((230, 180, 170)))]
    return parts


def _umbrella(rng):
    c = _jitter(rng, (220, 40, 170), 15)
    dome = lambda u, v: (((u - 0.5) / 0.5) ** 2 + ((v - 0.45) / 0.45) ** 2 <= 1.0) & (v <= 0.45)
    return [(dome, _pattern("vstripes", c, (250, 250, 250), 5)),
            (_rect(0.47, 0.45, 0.53, 0.95), _solid((60, 60, 60))),
            (_rect(0.47, 0.9, 0.65, 1.0), _solid((60, 60, 60)))]


def _frisbee(rng):
    c = _jitter(rng, (60, 230, 60), 15)
    return [(_ellipse(0.5, 0.5, 0.5, 0.5), _solid(c)), (_ellipse(0.5, 0.5, 0.25, 0.25), _solid(c * 0.7))]


def _skis(rng):
    c = _jitter(rng, (230, 40, 40), 15)
    return [(_segment(0.1, 0.05, 0.55, 0.95, 0.07), _solid(c)), (_segment(0.45, 0.05, 0.9, 0.95, 0.07), _solid(c))]


def _snowboard(rng):
    c = _jitter(rng, (120, 40, 180), 15)
    return [(_segment(0.2, 0.1, 0.8, 0.9, 0.2), _pattern("diag", c, c * 0.6 + 90, 4))]


def _kite(rng):
    return [(_poly([(0.5, 0.0), (1.0, 0.35), (0.5, 0.8), (0.0, 0.35)]),
             _pattern("checker", _jitter(rng, (250, 220, 30)), _jitter(rng, (230, 40, 40)), 4)),
            (_segment(0.5, 0.8, 0.4, 1.0, 0.03), _solid((50, 50, 50)))]


def _surfboard(rng):
    c = _jitter(rng, (30, 190, 190), 15)
    return [(_ellipse(0.5, 0.5, 0.45, 0.5), _solid(c)), (_rect(0.45, 0.05, 0.55, 0.95), _solid((250, 250, 250)))]


def _bottle(rng):
    c = _jitter(rng, (30, 140, 50), 15)
    return [(_rect(0.15, 0.4, 0.85, 1.0), _solid(c)), (_rect(0.35, 0.0, 0.65, 0.42), _solid(c)),
            (_rect(0.15, 0.55, 0.85, 0.75), _solid((240, 230, 200)))]


def _wine_glass(rng):
    c = (200, 225, 240)
    return [(_poly([(0.0, 0.0), (1.0, 0.0), (0.6, 0.5), (0.4, 0.5)]), _solid(c)),
            (_poly([(0.15, 0.12), (0.85, 0.12), (0.58, 0.42), (0.42, 0.42)]), _solid(_jitter(rng, (150, 20, 50), 10))),
            (_rect(0.44, 0.5, 0.56, 0.9), _solid(c)), (_rect(0.15, 0.9, 0.85, 1.0), _solid(c))]


def _cup(rng):
    c = _jitter(rng, (250, 250, 250), 6)
    return [(_ring(0.78, 0.5, 0.22, 0.25, 0.55), _solid(c)), (_rect(0.0, 0.1, 0.72, 1.0), _solid(c)),
            (_rect(0.0, 0.1, 0.72, 0.25), _solid((110, 70, 40)))]


_STEEL = (175, 178, 185)


def _fork(rng):
    c = _jitter(rng, _STEEL, 8)
    return [(_rect(0.35, 0.35, 0.65, 1.0), _solid(c)), (_rect(0.0, 0.22, 1.0, 0.38), _solid(c)),
            (_rect(0.0, 0.0, 0.2, 0.3), _solid(c)), (_rect(0.4, 0.0, 0.6, 0.3), _solid(c)),
            (_rect(0.8, 0.0, 1.0, 0.3), _solid(c))]


def _knife(rng):
    c = _jitter(rng, _STEEL, 8)
    return [(_rect(0.3, 0.5, 0.7, 1.0), _solid((60, 50, 45))),
            (_poly([(0.1, 0.5), (0.1, 0.05), (0.5, 0.0), (0.9, 0.2), (0.9, 0.5)]), _solid(c * 1.1))]


def _spoon(rng):
    c = _jitter(rng, _STEEL, 8)
    return [(_rect(0.38, 0.3, 0.62, 1.0), _solid(c)), (_ellipse(0.5, 0.2, 0.5, 0.2), _solid(c))]


def _bowl(rng):
    c = _jitter(rng, (240, 225, 180), 12)
    half = lambda u, v: (((u - 0.5) / 0.5) ** 2 + ((v - 0.15) / 0.85) ** 2 <= 1.0) & (v >= 0.15)
    return [(half, _pattern("hstripes", c, c * 0.8, 3)), (_rect(0.0, 0.05, 1.0, 0.2), _solid(c * 0.7))]


def _pizza(rng):
    return [(_ellipse(0.5, 0.5, 0.5, 0.5), _solid((215, 160, 70))),
            (_ellipse(0.5, 0.5, 0.42, 0.42), _pattern("dots", (245, 210, 100), (180, 30, 25), 5))]


def _cake(rng):
    c = _jitter(rng, (240, 140, 180), 12)
    return [(_rect(0.0, 0.25, 1.0, 1.0), _pattern("hstripes", c, (250, 245, 240), 4)),
            (_rect(0.45, 0.0, 0.55, 0.25), _solid((250, 240, 120)))]


def _chair(rng):
    c = _jitter(rng, (120, 70, 30), 12)
    return [(_rect(0.1, 0.0, 0.3, 0.6), _solid(c)), (_rect(0.1, 0.5, 0.9, 0.62), _solid(c)),
            (_rect(0.1, 0.6, 0.2, 1.0), _solid(c)), (_rect(0.8, 0.6, 0.9, 1.0), _solid(c))]


def _couch(rng):
    c = _jitter(rng, (150, 40, 50), 15)
    return [(_rect(0.0, 0.2, 1.0, 0.85), _pattern("vstripes", c, c * 0.8, 6)),
            (_rect(0.0, 0.35, 0.12, 1.0), _solid(c * 0.7)), (_rect(0.88, 0.35, 1.0, 1.0), _solid(c * 0.7))]


def _potted_plant(rng):
    return [(_rect(0.25, 0.6, 0.75, 1.0), _solid(_jitter(rng, (170, 80, 40), 10))),
            (_ellipse(0.5, 0.35, 0.5, 0.35), _pattern("dots", _jitter(rng, (40, 150, 40), 10), (20, 90, 20), 4))]


def _dining_table(rng):
    c = _jitter(rng, (200, 150, 90), 10)
    return [(_rect(0.0, 0.0, 1.0, 0.72), _pattern("hstripes", c, c * 0.9, 5)),
            (_rect(0.0, 0.62, 1.0, 0.72), _solid(c * 0.6)),
            (_rect(0.04, 0.72, 0.12, 1.0), _solid(c * 0.6)), (_rect(0.88, 0.72, 0.96, 1.0), _solid(c * 0.6))]


def _tv(rng):
    return [(_rect(0.0, 0.0, 1.0, 0.82), _solid((25, 25, 25))),
            (_rect(0.06, 0.07, 0.94, 0.75), _solid(_jitter(rng, (60, 110, 230), 20))),
            (_rect(0.4, 0.82, 0.6, 0.92), _solid((40, 40, 40))), (_rect(0.25, 0.92, 0.75, 1.0), _solid((40, 40, 40)))]


def _laptop(rng):
    return [(_rect(0.1, 0.0, 0.9, 0.55), _solid((50, 50, 55))),
            (_rect(0.15, 0.05, 0.85, 0.5), _solid(_jitter(rng, (200, 220, 240), 10))),
            (_poly([(0.1, 0.55), (0.9, 0.55), (1.0, 1.0), (0.0, 1.0)]),
             _pattern("checker", (150, 150, 155), (90, 90, 95), 3))]


def _remote(rng):
    return [(_rect(0.0, 0.0, 1.0, 1.0), _solid(_jitter(rng, (35, 35, 40), 6))),
            (_ellipse(0.5, 0.15, 0.25, 0.06), _solid((230, 40, 40))),
            (_rect(0.2, 0.35, 0.8, 0.85), _pattern("checker", (160, 160, 160), (35, 35, 40), 2))]


def _book(rng):
    c = _jitter(rng, [(30, 60, 160), (160, 30, 40), (30, 120, 60)][rng.integers(3)], 12)
    return [(_rect(0.0, 0.0, 1.0, 1.0), _solid(c)), (_rect(0.82, 0.04, 1.0, 0.96), _pattern("hstripes", (245, 240, 225), (200, 195, 180), 2)),
            (_rect(0.2, 0.2, 0.65, 0.3), _solid((240, 220, 120)))]


# name -> (aspect w/h, (min, max) size as a fraction of the image side, drawer, layer: 0 drawn first)
APPEARANCE: dict[str, tuple[float, tuple[float, float], Callable, int]] = {
    "person": (0.55, (0.28, 0.45), _person, 1),
    "car": (1.7, (0.28, 0.42), _car, 1),
    "bus": (2.0, (0.4, 0.6), _bus, 0),
    "traffic light": (0.4, (0.22, 0.35), _traffic_light, 1),
    "stop sign": (1.0, (0.16, 0.26), _stop_sign, 1),
    "bird": (1.4, (0.14, 0.24), _bird, 2),
    "cat": (1.0, (0.2, 0.3), _cat, 1),
    "dog": (1.3, (0.22, 0.34), _dog, 1),
    "horse": (1.2, (0.3, 0.45), _horse, 1),
    "sheep": (1.3, (0.22, 0.34), _sheep, 1),
    "cow": (1.4, (0.26, 0.4), _cow, 1),
    "umbrella": (1.1, (0.26, 0.4), _umbrella, 1),
    "frisbee": (1.6, (0.12, 0.18), _frisbee, 2),
    "skis": (0.8, (0.22, 0.36), _skis, 2),
    "snowboard": (0.8, (0.22, 0.34), _snowboard, 2),
    "kite": (0.8, (0.18, 0.3), _kite, 2),
    "surfboard": (0.35, (0.3, 0.45), _surfboard, 1),
    "bottle": (0.4, (0.2, 0.3), _bottle, 2),
    "wine glass": (0.55, (0.18, 0.26), _wine_glass, 2),
    "cup": (1.0, (0.13, 0.2), _cup, 2),
    "fork": (0.3, (0.18, 0.28), _fork, 2),
    "knife": (0.25, (0.2, 0.3), _knife, 2),
    "spoon": (0.3, (0.18, 0.28), _spoon, 2),
    "bowl": (1.6, (0.16, 0.26), _bowl, 2),
    "pizza": (1.0, (0.2, 0.3), _pizza, 2),
    "cake": (1.1, (0.18, 0.28), _cake, 2),
    "chair": (0.8, (0.24, 0.36), _chair, 1),
    "couch": (2.0, (0.45, 0.65), _couch, 0),
    "potted plant": (0.8, (0.2, 0.32), _potted_plant, 1),
    "dining table": (1.6, (0.55, 0.8), _dining_table, 0),
    "tv": (1.4, (0.3, 0.45), _tv, 0),
    "laptop": (1.3, (0.22, 0.32), _laptop, 2),
    "remote": (0.35, (0.14, 0.22), _remote, 2),
    "book": (0.75, (0.15, 0.24), _book, 2),
}


# ----------------------------------------------------------------------------------------------------------------
# Backgrounds (full canvas at supersampled resolution).

def _background(rng, scene: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.empty((size, size, 3), dtype=np.float32)
    if scene == "kitchen":
        base = _jitter(rng, (185, 160, 120), 15)
        img[:] = base
        period = rng.uniform(8, 16)
        img *= (0.85 + 0.1 * np.sin(yy / period * np.pi + rng.uniform(0, 6)))[..., None]
    elif scene == "street":
        img[:] = _jitter(rng, (110, 110, 115), 10)
        lane = np.abs(yy - size * rng.uniform(0.45, 0.65)) < size * 0.015
        lane &= (xx // (size / 8)) % 2 == 0
        img[lane] = (235, 220, 120)
        img[: int(size * rng.uniform(0.1, 0.25))] = _jitter(rng, (160, 160, 165), 10)  # sidewalk
    elif scene == "snow":
        img[:] = _jitter(rng, (235, 240, 250), 6)
        horizon = int(size * rng.uniform(0.1, 0.3))
        img[:horizon] = _jitter(rng, (140, 180, 230), 12)
    elif scene == "living room":
        c = _jitter(rng, (215, 200, 170), 12)
        period = int(rng.integers(6, 12))
        img[:] = np.where((((xx // period) + (yy // period)) % 2 == 0)[..., None], c, c * 0.93)
        img[: int(size * rng.uniform(0.3, 0.45))] = _jitter(rng, (235, 225, 200), 10)  # wall
    elif scene == "field":
        img[:] = _jitter(rng, (90, 160, 70), 12)
        horizon = int(size * rng.uniform(0.1, 0.3))
        img[:horizon] = _jitter(rng, (150, 200, 240), 10)
    elif scene == "beach":
        img[:] = _jitter(rng, (225, 205, 150), 10)
        sea = int(size * rng.uniform(0.25, 0.45))
        img[:sea] = _jitter(rng, (40, 120, 190), 12)
        img[: int(sea * rng.uniform(0.3, 0.6))] = _jitter(rng, (160, 205, 240), 10)
    else:
        raise ValueError(scene)
    # low-frequency blotches
    coarse = rng.normal(0.0, 10.0, (5, 5, 3)).astype(np.float32)
    idx = (np.arange(size) * 5 // size)
    img += coarse[idx][:, idx]
    return img


# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    image: np.ndarray  # uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]
    scene: str
    objects: list[dict] = field(default_factory=list)  # {name, category_id, bbox, area}, in drawing order
    captions: list[str] = field(default_factory=list)


def _sample_categories(rng, scene: str) -> list[str]:
    n = int(rng.choice(5, p=NUM_OBJECTS_P)) + 1
    weights = SCENES[scene]["objects"]
    all_names = [c["name"] for c in CATEGORIES]
    chosen: list[str] = []
    for _ in range(n):
        if rng.random() < OUT_OF_CONTEXT_P:
            pool = [c for c in all_names if c not in chosen]
            chosen.append(pool[int(rng.integers(len(pool)))])
            continue
        names = [c for c in weights if c not in chosen]
        if not names:
            break
        w = np.array([weights[c] * np.prod([_AFF.get(c, {}).get(o, 1.0) for o in chosen]) for c in names])
        chosen.append(names[int(rng.choice(len(names), p=w / w.sum()))])
    return chosen


def _place(rng, name: str, canvas: int) -> tuple[int, int, int, int]:
    aspect, (lo, hi), _, _ = APPEARANCE[name]
    side = rng.uniform(lo, hi) * canvas
    aspect *= np.exp(rng.uniform(-0.15, 0.15))
    w, h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    w, h = max(int(round(w)), 4), max(int(round(h)), 4)
    x0 = int(rng.integers(0, canvas - w + 1))
    y0 = int(rng.integers(0, canvas - h + 1))
    return x0, y0, w, h


def generate_sample(seed: int, split: str, index: int) -> Sample:
    """The ``index``-th image of ``split``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    scene = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))]
    bg_scene = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))] if rng.random() < OTHER_BACKGROUND_P else scene
    names = _sample_categories(rng, scene)
    size = IMAGE_SIZE * _SS
    canvas = _background(rng, bg_scene, size)
    owner = np.full((size, size), -1, dtype=np.int32)
    order = sorted(range(len(names)), key=lambda i: (APPEARANCE[names[i]][3], i))
    objects: list[dict] = []
    for i in order:
        name = names[i]
        _, _, drawer, _ = APPEARANCE[name]
        for _attempt in range(20):
            x0, y0, w, h = _place(rng, name, size)
            # keep earlier objects at least 40% visible (large background furniture 24%)
            region = owner[y0:y0 + h, x0:x0 + w]
            ok = True
            for j, obj in enumerate(objects):
                total = obj["_pixels"]
                covered = np.count_nonzero(region == j)
                if (total - covered) < 0.4 * total * (1.0 if APPEARANCE[obj["name"]][3] > 0 else 0.6):
                    ok = False
                    break
            if ok:
                break
        parts = drawer(rng)
        py, px = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32)
        u = (px - x0 + 0.5) / w
        v = (py - y0 + 0.5) / h
        mask_all = np.zeros((h, w), dtype=bool)
        patch = canvas[y0:y0 + h, x0:x0 + w]
        for mask_fn, tex in parts:
            m = mask_fn(u, v)
            if m.any():
                patch[m] = np.asarray(tex(u, v, px, py), dtype=np.float32)[m]
                mask_all |= m
        owner[y0:y0 + h, x0:x0 + w][mask_all] = len(objects)
        objects.append({"name": name, "_pixels": int(mask_all.sum())})
    # lighting, noise, downsample
    gain = rng.uniform(0.55, 1.15)
    canvas = canvas * gain + rng.normal(0.0, 7.0, canvas.shape).astype(np.float32)
    img = canvas.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS, 3).mean(axis=(1, 3))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    small_owner = owner.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).transpose(0, 2, 1, 3).reshape(IMAGE_SIZE, IMAGE_SIZE, -1)
    out_objects = []
    for j, obj in enumerate(objects):
        vis = (small_owner == j).sum(axis=-1) >= (_SS * _SS) / 2
        ys, xs = np.nonzero(vis)
        if len(xs) == 0:  # fully hidden: not annotated, not captioned
            continue
        x, y = int(xs.min()), int(ys.min())
        out_objects.append({
            "name": obj["name"], "category_id": _BY_NAME[obj["name"]]["id"],
            "bbox": [float(x), float(y), float(xs.max() - x + 1), float(ys.max() - y + 1)],
            "area": float(vis.sum()),
        })
    sample = Sample(image=img, scene=scene, objects=out_objects)
    sample.captions = _captions(rng, scene, out_objects)
    return sample


# ----------------------------------------------------------------------------------------------------------------
# Captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(rng, name: str, canonical: bool = False) -> str:
    words = _BY_NAME[name]["words"]
    w = words[0] if canonical else words[int(rng.integers(len(words)))]
    if w == "skis":
        return "a pair of skis"
    return f"{_article(w)} {w}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def detailed_caption(rng, scene: str, objects: list[dict]) -> str:
    """Names every object, largest first (the description target)."""
    names = [o["name"] for o in sorted(objects, key=lambda o: -o["area"])]
    place = SCENES[scene]["phrases"][int(rng.integers(len(SCENES[scene]["phrases"])))]
    items = _join([_np(rng, n) for n in names])
    form = int(rng.integers(3))
    if form == 0:
        return f"the image shows {items} in {_article(place)} {place}."
    if form == 1:
        return f"a photo of {_article(place)} {place} with {items}."
    return f"in this {place} there is {items}."


def _captions(rng, scene: str, objects: list[dict]) -> list[str]:
    caps = [detailed_caption(rng, scene, objects)]
    names = [o["name"] for o in sorted(objects, key=lambda o: -o["area"])]
    place = SCENES[scene]["phrases"][int(rng.integers(len(SCENES[scene]["phrases"])))]
    for k in range(4):
        if not names:
            caps.append(f"an empty {place}.")
            continue
        keep = names[: int(rng.integers(1, len(names) + 1))]
        items = _join([_np(rng, n) for n in keep])
        form = (k + int(rng.integers(4))) % 4
        if form == 0:
            caps.append(f"{items} in {_article(place)} {place}.")
        elif form == 1:
            caps.append(f"there is {items} in this picture.")
        elif form == 2:
            caps.append(f"a view of {_article(place)} {place} with {items}.")
        else:
            caps.append(f"{items} can be seen here.")
    return caps


# ----------------------------------------------------------------------------------------------------------------
# Splits and COCO files

def generate_split(seed: int, split: str, num: int, start: int = 0) -> list[Sample]:
    return [generate_sample(seed, split, i) for i in range(start, start + num)]


def file_name(split: str, index: int) -> str:
    return f"{split}_{IMAGE_ID_BASE[split] + index:08d}.png"


def coco_dicts(samples: list[Sample], split: str, start: int = 0) -> tuple[dict, dict]:
    """(instances, captions) COCO dictionaries for samples ``start, start+1, ...`` of ``split``."""
    info = {"description": "mmattn offline world (synthetic, procedural)", "version": "1.0", "year": 2025}
    cats = [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]} for c in CATEGORIES]
    images, anns, caps = [], [], []
    ann_id, cap_id = 1, 1
    for k, s in enumerate(samples):
        index = start + k
        image_id = IMAGE_ID_BASE[split] + index
        images.append({"id": image_id, "file_name": file_name(split, index), "width": IMAGE_SIZE,
                       "height": IMAGE_SIZE, "scene": s.scene})
        for o in s.objects:
            x, y, w, h = o["bbox"]
            anns.append({"id": ann_id, "image_id": image_id,
                         "category_id": o["category_id"], "bbox": o["bbox"], "area": o["area"], "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            ann_id += 1
        for c in s.captions:
            caps.append({"id": cap_id, "image_id": image_id, "caption": c})
            cap_id += 1
    instances = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": cats}
    captions = {"info": info, "licenses": [], "images": images, "annotations": caps}
    return instances, captions


def write_split(out: str, seed: int, split: str, num: int, pope: bool = True) -> tuple[str, str]:
    """Write ``{out}/images/*.png``, ``{out}/instances_{split}.json``, ``{out}/captions_{split}.json`` and, with
    ``pope``, ``{out}/pope_{random,popular,adversarial}.json`` (JSONL, RUCAIBox layout, built with seed 0)."""
    from PIL import Image

    samples = generate_split(seed, split, num)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for i, s in enumerate(samples):
        Image.fromarray(s.image).save(os.path.join(out, "images", file_name(split, i)), optimize=True)
    instances, captions = coco_dicts(samples, split)
    paths = (os.path.join(out, f"instances_{split}.json"), os.path.join(out, f"captions_{split}.json"))
    for path, obj in zip(paths, (instances, captions)):
        with open(path, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.write("\n")
    if pope:
        for kind, questions in pope_splits(instances).items():
            with open(os.path.join(out, f"pope_{kind}.json"), "w") as f:
                f.writelines(json.dumps(q.to_record()) + "\n" for q in questions)
    return paths


def pope_splits(instances: dict, seed: int = 0) -> dict:
    """POPE random / popular / adversarial questions for a split, built by the project's builder
    (:func:`mmattn.eval.pope.build_questions`, RUCAIBox's algorithm, seeded) over every image with at least 3
    objects; objects in annotation order."""
    from ..pope import SPLITS, build_questions

    names = {c["id"]: c["name"] for c in instances["categories"]}
    per_image: dict[int, list[str]] = {im["id"]: [] for im in instances["images"]}
    for a in instances["annotations"]:
        if names[a["category_id"]] not in per_image[a["image_id"]]:
            per_image[a["image_id"]].append(names[a["category_id"]])
    images = [(im["file_name"], per_image[im["id"]]) for im in sorted(instances["images"], key=lambda im: im["id"])]
    n = sum(len(objs) >= 3 for _, objs in images)
    return {kind: build_questions(images, kind, seed=seed, num_images=n) for kind in SPLITS}


def cooccurrence(samples: list[Sample]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(image count per category, image count per unordered category pair)."""
    single: dict[str, int] = {}
    pair: dict[tuple[str, str], int] = {}
    for s in samples:
        names = sorted({o["name"] for o in s.objects})
        for a in names:
            single[a] = single.get(a, 0) + 1
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pair[(a, b)] = pair.get((a, b), 0) + 1
    return single, pair


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="val", choices=list(SPLIT_CODES))
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(*write_split(a.out, a.seed, a.split, a.num))


if __name__ == "__main__":
    main()
