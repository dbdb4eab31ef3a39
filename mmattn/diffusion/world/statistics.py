"""A colour / shape statistic written for the video world: does a clip show the prompted colour, and does it move?

No learned weights: every pixel is labelled with the nearest of the world's colours (:data:`generate.COLOURS`)
or the dark background, and a pixel counts as the prompted colour when that colour is nearest and closer than
``MAX_COLOUR_DISTANCE``. From that per-frame mask ``M_t`` (a clip is ``[T, 3, H, W]`` in [0, 1]):

* ``colour_presence``: fraction of frames where ``M_t`` covers at least ``MIN_AREA`` of the frame (the world's
  smallest shape covers about 3.5 %).
* ``dominant_colour_correct``: 1 when the prompted colour has the most object pixels of all world colours over the
  clip.
* ``shape_correct``: 1 when the shape that best explains ``M_t`` (the world's own shape renderer, fitted to the
  mask's centroid and area over rotations, scored by IoU: :func:`best_shape`) is the prompted one in more of the
  frames that show the colour than any other shape (a tie counts as wrong).
* ``centroid_speed``: mean distance (pixels per frame) between the centroids of ``M_t`` and ``M_{t+1}`` over pairs
  where both frames show the colour. Translation and bouncing move it; turning does not.
* ``mask_change``: mean ``1 - IoU(M_t, M_{t+1})``: moves with translation and with turning; 0 for a still clip.
* ``direction_correct`` (translations only): 1 when the net centroid displacement along the prompted axis points the
  prompted way by at least ``MIN_TRAVEL`` pixels.
* ``frame_difference``: mean absolute change between consecutive frames (all pixels, [0, 1]); model-free motion.
* ``adjacent_similarity``: ``1 - frame_difference`` (VBench's temporal flickering, not rounded to uint8).
* ``area_consistency``: ``1 - std / mean`` of the mask area over the frames that show the colour (clipped at 0):
  the object should keep its size; melting, splitting or flickering objects lower it.

A still clip scores 0 on the three motion measures exactly (:func:`static_clip` builds one for the reference).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Sequence

import numpy as np
import torch

from . import generate as gen

__all__ = ["MAX_COLOUR_DISTANCE", "MIN_AREA", "MIN_TRAVEL", "colour_masks", "clip_statistics", "static_clip",
           "to_video_tensor", "mean_statistics", "MOTION_KEYS", "CONSISTENCY_KEYS", "PROMPT_KEYS"]

MAX_COLOUR_DISTANCE = 0.35  # RGB distance in [0, 1] units; the world's colours are >= 0.5 apart
MIN_AREA = 0.01  # of the frame (41 pixels at 64 x 64)
MIN_TRAVEL = 4.0  # pixels: a translation must move the object at least this far the prompted way
PROMPT_KEYS = ("colour_presence", "dominant_colour_correct", "shape_correct", "direction_correct")
# area of each shape at half-size 1 (generate._signed_distance): the fitted half-size is sqrt(area / this)
_UNIT_AREA = {"circle": math.pi, "square": 1.7 ** 2, "triangle": 3 * math.sqrt(3) * 0.625 ** 2,
              "cross": 2 * (2.1 * 0.76) - 0.76 ** 2}
_SYMMETRY = {"circle": 0.0, "square": math.pi / 2, "triangle": 2 * math.pi / 3, "cross": math.pi / 2}
_ANGLES = 18
MOTION_KEYS = ("centroid_speed", "mask_change", "frame_difference")
CONSISTENCY_KEYS = ("adjacent_similarity", "area_consistency")


def to_video_tensor(frames: Any) -> torch.Tensor:
    """``[T, 3, H, W]`` float in [0, 1] from that, or from uint8 ``[T, H, W, 3]`` (the generator's clips)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.dtype == torch.uint8:
        return frames.permute(0, 3, 1, 2).float() / 255.0
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected a video [T, 3, H, W] in [0, 1] or uint8 [T, H, W, 3], got {tuple(frames.shape)}")
    return frames.float().clamp(0, 1)


def colour_masks(frames: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Per-pixel label ``[T, H, W]``: index into the returned names (the world's colours, then "background"), or
    -1 where no reference colour is within ``MAX_COLOUR_DISTANCE``."""
    names = [*gen.COLOURS, "background"]
    palette = torch.tensor([*gen.COLOURS.values(), gen.BACKGROUND], dtype=torch.float32)
    pixels = frames.permute(0, 2, 3, 1)  # [T, H, W, 3]
    distance = torch.cdist(pixels.reshape(-1, 3), palette).reshape(*pixels.shape[:-1], len(names))
    nearest = distance.argmin(-1)
    near_enough = distance.min(-1).values <= MAX_COLOUR_DISTANCE
    background = len(names) - 1
    return torch.where(near_enough | (nearest == background), nearest, torch.full_like(nearest, -1)), names


def clip_statistics(frames: Any, prompt: str) -> dict[str, float | None]:
    """The statistics of one clip for one world prompt (``ValueError`` for a prompt outside the world)."""
    colour, shape, motion = gen.parse_prompt(prompt)
    video = to_video_tensor(frames)
    if video.shape[0] < 2:
        raise ValueError("the statistics need at least two frames")
    labels, names = colour_masks(video)
    mask = labels == names.index(colour)  # [T, H, W]
    frames_count, height, width = mask.shape
    area = mask.flatten(1).float().sum(1)
    present = area >= MIN_AREA * height * width
    object_pixels = torch.stack([(labels == i).sum() for i in range(len(gen.COLOURS))])
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    safe = area.clamp_min(1)
    centres = torch.stack([(mask.float().sum(1) * xs).sum(1) / safe, (mask.float().sum(2) * ys).sum(1) / safe], 1)
    both = present[1:] & present[:-1]
    steps = (centres[1:] - centres[:-1]).norm(dim=1)
    inter = (mask[1:] & mask[:-1]).flatten(1).sum(1).float()
    union = (mask[1:] | mask[:-1]).flatten(1).sum(1).float()
    difference = float((video[1:] - video[:-1]).abs().mean())
    stats: dict[str, float | None] = {
        "colour_presence": float(present.float().mean()),
        "dominant_colour_correct": float(int(object_pixels.argmax()) == names.index(colour) and object_pixels.max() > 0),
        "centroid_speed": float(steps[both].mean()) if both.any() else None,
        "mask_change": float((1 - inter[both] / union[both]).mean()) if both.any() else None,
        "frame_difference": difference,
        "adjacent_similarity": 1.0 - difference,
        "area_consistency": None,
        "shape_correct": None,
        "direction_correct": None,
    }
    if bool(present.any()):
        shapes = [best_shape(mask[t].numpy()) for t in present.nonzero().flatten().tolist()]
        stats["shape_correct"] = float(is_strict_mode(shapes, shape))
    else:
        stats["shape_correct"] = 0.0
    if int(present.sum()) >= 2:
        shown = area[present]
        stats["area_consistency"] = max(0.0, 1.0 - float(shown.std() / shown.mean()))
    if motion in gen.TRANSLATIONS:
        first, last = present.nonzero().flatten()[[0, -1]] if present.sum() >= 2 else (None, None)
        if first is not None:
            direction = torch.tensor(gen.TRANSLATIONS[motion], dtype=torch.float32)
            travel = float((centres[last] - centres[first]) @ direction)
            stats["direction_correct"] = float(travel >= MIN_TRAVEL)
        else:
            stats["direction_correct"] = 0.0
    return stats


def is_strict_mode(values: list, wanted) -> bool:
    """Whether ``wanted`` occurs in ``values`` more often than any other value. Ties are False, so the answer
    never depends on iteration order (``max(set(...))`` did: set order follows per-process string hashing)."""
    counts = collections.Counter(values)
    return counts[wanted] > 0 and all(counts[wanted] > n for value, n in counts.items() if value != wanted)


def best_shape(mask: np.ndarray) -> str | None:
    """The world shape whose rendering, centred on ``mask``'s centroid with the same area and the best of
    ``_ANGLES`` rotations over its symmetry period, overlaps the boolean ``[H, W]`` mask most (IoU); None for an
    empty mask."""
    area = float(mask.sum())
    if area == 0:
        return None
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    x = np.arange(width, dtype=np.float64)[None, None, :] + 0.5 - cx
    y = np.arange(height, dtype=np.float64)[None, :, None] + 0.5 - cy
    best, best_iou = None, -1.0
    for shape in gen.SHAPES:
        period = _SYMMETRY[shape]
        angles = np.arange(_ANGLES) * period / _ANGLES if period else np.zeros(1)
        cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
        u, v = cos * x + sin * y, -sin * x + cos * y
        templates = gen._signed_distance(shape, u, v, math.sqrt(area / _UNIT_AREA[shape])) < 0
        inter = (templates & mask).sum((1, 2))
        union = (templates | mask).sum((1, 2))
        iou = float((inter / np.maximum(union, 1)).max())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def static_clip(frames: Any) -> torch.Tensor:
    """The first frame repeated: the reference a moving clip's motion measures are compared with."""
    video = to_video_tensor(frames)
    return video[:1].expand_as(video).clone()


def mean_statistics(records: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each statistic over clips, skipping clips where it is undefined (None)."""
    keys = [k for k in records[0]] if records else []
    out: dict[str, float | None] = {}
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None and not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else None
    return out
