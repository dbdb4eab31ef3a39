"""Seeded generator of the offline video world: short clips of one coloured shape that moves, turns or bounces.

Every clip is ``FRAMES`` frames of ``SIZE`` x ``SIZE`` RGB (16 x 64 x 64: 16 frames is what the BroadWay presets
assume, ``tau = 7`` needs ``F >= 16``; 64 px keeps training on one GPU to minutes). It shows one shape of
:data:`COLOURS` and :data:`SHAPES` on a dark, slightly tinted background, doing one of :data:`MOTIONS`:
translating at a constant speed (left, right, up, down), turning in place, or bouncing on the floor under gravity.
Its prompt says exactly that (``"a red square moving left"``), so a colour / shape statistic on a generated clip
can check the prompt (:mod:`mmattn.diffusion.world.statistics`).

Shapes are drawn with analytic anti-aliasing (coverage from a signed distance, no supersampling), all frames of a
clip at once with numpy, about a millisecond per clip. Everything is a pure function of ``(seed, index)``:
numpy's PCG64 streams are stable across numpy versions, so a clip is bit-identical wherever it is regenerated.

    python -m mmattn.diffusion.world.generate --seed 0 --num 8 --out clips.png   # a contact sheet to look at
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FRAMES",
    "SIZE",
    "COLOURS",
    "SHAPES",
    "MOTIONS",
    "TRANSLATIONS",
    "BACKGROUND",
    "Clip",
    "prompt_for",
    "parse_prompt",
    "all_prompts",
    "generate_clip",
    "generate_clips",
    "clip_for_prompt",
    "render",
]

FRAMES = 16
SIZE = 64

# Saturated colours far apart in RGB, so a nearest-colour rule tells them apart on generated frames too.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.96, 0.88, 0.12),
    "purple": (0.65, 0.20, 0.90),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("square", "circle", "triangle", "cross")
# unit direction (x right, y down) per translation word
TRANSLATIONS: dict[str, tuple[int, int]] = {
    "moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1),
}
MOTIONS = (*TRANSLATIONS, "turning", "bouncing")
BACKGROUND = (0.15, 0.15, 0.15)  # the mean background; each clip draws its own dark tint around it


@dataclass
class Clip:
    """One clip and its ground truth: ``frames`` uint8 ``[F, H, W, 3]``, the object's centre ``[F, 2]`` (x, y
    pixels) and angle ``[F]`` (radians) per frame, its half-size in pixels."""

    frames: np.ndarray
    prompt: str
    colour: str
    shape: str
    motion: str
    centres: np.ndarray
    angles: np.ndarray
    half_size: float


def prompt_for(colour: str, shape: str, motion: str) -> str:
    return f"a {colour} {shape} {motion}"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """``(colour, shape, motion)`` of a world prompt; ``ValueError`` for anything else (the statistic needs them)."""
    words = prompt.strip().lower().split()
    if len(words) >= 4 and words[0] in ("a", "an") and words[1] in COLOURS and words[2] in SHAPES:
        motion = " ".join(words[3:])
        if motion in MOTIONS:
            return words[1], words[2], motion
    raise ValueError(
        f"not a video-world prompt: {prompt!r}; expected 'a <colour> <shape> <motion>' with colour in "
        f"{list(COLOURS)}, shape in {list(SHAPES)}, motion in {list(MOTIONS)}"
    )


def _allowed(shape: str, motion: str) -> bool:
    return not (shape == "circle" and motion == "turning")  # a turning circle looks static


def all_prompts() -> list[str]:
    """Every prompt the world can produce (a turning circle is left out: it would look static)."""
    return [prompt_for(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS if _allowed(s, m)]


def _trajectory(rng: np.random.Generator, motion: str, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``[F, 2]`` and angles ``[F]`` that keep the whole shape inside the frame."""
    t = np.arange(FRAMES, dtype=np.float64)
    margin = half * 1.45 + 1  # the rotated cross / square reaches sqrt(2) * half
    low, high = margin, SIZE - margin
    angle0 = rng.uniform(0, 2 * math.pi)
    if motion in TRANSLATIONS:
        dx, dy = TRANSLATIONS[motion]
        speed = rng.uniform(1.6, min(2.6, (high - low) / (FRAMES - 1)))
        travel = speed * (FRAMES - 1)
        start_along = rng.uniform(low, high - travel)  # where the object starts on its axis
        across = rng.uniform(low, high)
        along = start_along + speed * t
        if dx:
            x = along if dx > 0 else SIZE - along
            centres = np.stack([x, np.full(FRAMES, across)], 1)
        else:
            y = along if dy > 0 else SIZE - along
            centres = np.stack([np.full(FRAMES, across), y], 1)
        return centres, np.full(FRAMES, angle0)
    if motion == "turning":
        speed = rng.uniform(0.12, 0.2) * rng.choice([-1.0, 1.0])  # radians per frame (7-11 degrees)
        centre = rng.uniform(low, high, size=2)
        return np.tile(centre, (FRAMES, 1)), angle0 + speed * t
    if motion == "bouncing":
        # a ball dropped from rest, bouncing elastically on the floor at y = high: |y - floor| follows |cos|
        drop = rng.uniform(0.55, 0.9) * (high - low)
        period = rng.uniform(9.0, 14.0)  # frames between two floor contacts
        phase = rng.uniform(0, period)
        y = high - drop * np.abs(np.cos(math.pi * (t + phase) / period))
        x = np.full(FRAMES, rng.uniform(low, high))
        return np.stack([x, y], 1), np.full(FRAMES, angle0)
    raise ValueError(f"unknown motion {motion!r}; motions: {list(MOTIONS)}")


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray, half: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of the shape in its own rotated coordinates ``u, v``."""
    if shape == "circle":
        return np.hypot(u, v) - half
    if shape == "square":
        side = half * 0.85  # same area as the circle, roughly
        return np.maximum(np.abs(u), np.abs(v)) - side
    if shape == "triangle":
        # equilateral, circumradius 1.25 * half, pointing up in its own frame: max of three edge distances
        inradius = 0.625 * half
        normals = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
        return np.max([u * nx + v * ny for nx, ny in normals], axis=0) - inradius
    if shape == "cross":
        arm, width = half * 1.05, half * 0.38
        bar_h = np.maximum(np.abs(u) - arm, np.abs(v) - width)
        bar_v = np.maximum(np.abs(u) - width, np.abs(v) - arm)
        return np.minimum(bar_h, bar_v)
    raise ValueError(f"unknown shape {shape!r}; shapes: {list(SHAPES)}")


def render(shape: str, colour: tuple[float, float, float], background: np.ndarray, centres: np.ndarray,
           angles: np.ndarray, half: float) -> np.ndarray:
    """uint8 frames ``[F, SIZE, SIZE, 3]`` of one shape over a flat background, anti-aliased by coverage."""
    pixel = np.arange(SIZE, dtype=np.float64) + 0.5
    x = pixel[None, None, :] - centres[:, 0, None, None]
    y = pixel[None, :, None] - centres[:, 1, None, None]
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    u, v = cos * x + sin * y, -sin * x + cos * y
    coverage = np.clip(0.5 - _signed_distance(shape, u, v, half), 0.0, 1.0)[..., None]
    frames = background * (1 - coverage) + np.asarray(colour) * coverage
    return np.round(frames * 255).astype(np.uint8)


def generate_clip(seed: int, index: int) -> Clip:
    """Clip ``index`` of the world with ``seed``: colour, shape and motion uniform, then its parameters."""
    rng = np.random.default_rng([seed, 11, index])
    while True:  # rejection keeps the distribution uniform over the allowed (shape, motion) pairs
        shape, motion = SHAPES[rng.integers(len(SHAPES))], MOTIONS[rng.integers(len(MOTIONS))]
        if _allowed(shape, motion):
            break
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    half = rng.uniform(7.0, 10.0)
    centres, angles = _trajectory(rng, motion, half)
    background = np.clip(np.asarray(BACKGROUND) + rng.uniform(-0.07, 0.07) + rng.uniform(-0.03, 0.03, 3), 0, 1)
    frames = render(shape, COLOURS[colour], background, centres, angles, half)
    return Clip(frames, prompt_for(colour, shape, motion), colour, shape, motion, centres, angles, half)


def clip_for_prompt(prompt: str, seed: int, index: int) -> Clip:
    """A clip of exactly ``prompt`` (size, path and background drawn from ``(seed, index)``): the references that
    generated clips of a prompt are compared with."""
    colour, shape, motion = parse_prompt(prompt)
    rng = np.random.default_rng([seed, 13, index])
    half = rng.uniform(7.0, 10.0)
    centres, angles = _trajectory(rng, motion, half)
    background = np.clip(np.asarray(BACKGROUND) + rng.uniform(-0.07, 0.07) + rng.uniform(-0.03, 0.03, 3), 0, 1)
    frames = render(shape, COLOURS[colour], background, centres, angles, half)
    return Clip(frames, prompt_for(colour, shape, motion), colour, shape, motion, centres, angles, half)


def generate_clips(seed: int, start: int, num: int) -> tuple[np.ndarray, list[str]]:
    """uint8 ``[num, F, H, W, 3]`` and prompts of clips ``start .. start + num - 1`` (order-independent)."""
    clips = [generate_clip(seed, i) for i in range(start, start + num)]
    return np.stack([c.frames for c in clips]), [c.prompt for c in clips]


def main(argv: list[str] | None = None) -> None:
    from PIL import Image

    parser = argparse.ArgumentParser(description="Write a contact sheet (one clip per row) of the video world.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)
    frames, prompts = generate_clips(args.seed, 0, args.num)
    sheet = frames.transpose(0, 2, 1, 3, 4).reshape(args.num * SIZE, FRAMES * SIZE, 3)
    Image.fromarray(sheet).save(args.out)
    print("\n".join(prompts))


if __name__ == "__main__":
    main()
