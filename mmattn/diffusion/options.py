"""BroadWay's command-line options, shared by ``mmattn eval video`` and the video world's evaluator.

Kept free of diffusers imports so that building the CLI does not need the optional ``diffusion`` extra."""

from __future__ import annotations

import argparse
from typing import Any

PRESET_NAMES = ("animatediff", "videocrafter2")  # the keys of broadway._PRESETS (a test keeps them equal)


def add_broadway_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """The options that pick a BroadWay configuration (on an argparse parser or argument group)."""
    parser.add_argument("--preset", choices=PRESET_NAMES, default="animatediff",
                        help="paper preset (default: animatediff: tau 7, alpha 0.6, beta 1.5)")
    parser.add_argument("--alpha", type=float, help="override the preset's TSG strength")
    parser.add_argument("--beta", type=float, help="override the preset's minimum FME gain")
    parser.add_argument("--tau", help="override the preset's band half-width (int or all_but_dc)")
    parser.add_argument("--stop", type=float, help="override the active fraction of steps (default 0.2)")


def broadway_config_from_arguments(args: argparse.Namespace):
    """The :class:`~mmattn.diffusion.broadway.BroadWayConfig` those options describe."""
    from .broadway import BroadWayConfig

    overrides = {k: getattr(args, k) for k in ("alpha", "beta", "stop") if getattr(args, k) is not None}
    if args.tau is not None:
        overrides["tau"] = args.tau if args.tau == "all_but_dc" else int(args.tau)
    return BroadWayConfig.from_preset(args.preset, **overrides)
