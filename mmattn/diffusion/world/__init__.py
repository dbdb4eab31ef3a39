"""The offline video world: seeded clips of coloured shapes that move, turn and bounce, and a tiny
``AnimateDiffPipeline`` trained on them, so video commands, tests and demos run without downloads.

- :mod:`.generate`: the clips and their prompts (``"a red square moving left"``), a pure function of
  ``(seed, index)``.
- :mod:`.tokenizer`, :mod:`.model`: the pipeline's parts (a ``CLIPTokenizer`` built from the prompt words, a
  ``CLIPTextModel``, an ``AutoencoderKL``, a ``UNetMotionModel`` = ``UNet2DConditionModel`` + ``MotionAdapter``, DDIM).
- :mod:`.train`: trains it from scratch and saves it with ``save_pretrained``.
- :mod:`.statistics`: a weight-free colour / shape statistic (prompted colour present, motion, consistency).
- :mod:`.evaluate`: clips of :data:`EVAL_PROMPTS` with and without BroadWay, scored with that statistic.
- ``pipeline/``: the shipped pipeline (``AnimateDiffPipeline.from_pretrained(pipeline_dir())``).

    from mmattn.diffusion.world import load_pipeline
    pipe = load_pipeline(device="cpu")
    frames = pipe("a red square moving left", num_frames=16, num_inference_steps=25).frames

Data, model, training command and measured numbers: README.md in this directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["EVAL_PROMPTS", "pipeline_dir", "has_pipeline", "load_pipeline", "MissingPipelineError"]

# One prompt per motion, colours and shapes spread over them, plus two more translations: the evaluation set.
EVAL_PROMPTS = (
    "a red square moving left",
    "a blue circle moving right",
    "a yellow triangle moving up",
    "a green cross moving down",
    "a purple square turning",
    "a cyan circle bouncing",
    "a green triangle bouncing",
    "a yellow cross turning",
)


class MissingPipelineError(FileNotFoundError):
    """The shipped pipeline folder is absent (a checkout before it was trained, or a stripped install)."""


def pipeline_dir() -> Path:
    """Where the shipped pipeline lives (inside the package)."""
    return Path(__file__).resolve().parent / "pipeline"


def has_pipeline(path: str | os.PathLike | None = None) -> bool:
    return (Path(path or pipeline_dir()) / "model_index.json").is_file()


def load_pipeline(device: str = "cpu", dtype=None, path: str | os.PathLike | None = None):
    """The shipped ``AnimateDiffPipeline`` (or the one at ``path``), via ``from_pretrained``, progress bar off."""
    import torch
    from diffusers import AnimateDiffPipeline

    path = Path(path or pipeline_dir())
    if not has_pipeline(path):
        raise MissingPipelineError(
            f"no video-world pipeline at {path} (no model_index.json); train one with "
            f"`python -m mmattn.diffusion.world.train --out {path} --device cuda`"
        )
    pipe = AnimateDiffPipeline.from_pretrained(str(path), dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
