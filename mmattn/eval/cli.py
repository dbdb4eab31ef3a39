"""The ``mmattn eval`` command group.

Each evaluation area keeps its subcommands in its own module, exposing ``register(eval_subparsers)``;
this module only creates the group and asks each module in :data:`EVAL_COMMAND_MODULES` to add its commands.
A module that does not exist yet is skipped, so areas can land independently (the generation runs,
``mmattn eval chair`` / ``mmattn eval pope``, are to come from ``mmattn.eval.harness``).
"""

from __future__ import annotations

import argparse
import importlib

# Scoring only (chair-score, pope-score), then the generation harness (chair, pope).
EVAL_COMMAND_MODULES = ("mmattn.eval.score_cli", "mmattn.eval.harness", "mmattn.eval.video_cli", "mmattn.eval.customization_cli")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mmattn eval ...`` to the top-level CLI (called by :func:`mmattn.cli.build_parser`)."""
    group = subparsers.add_parser(
        "eval",
        help="hallucination benchmarks: score CHAIR captions and POPE answers, run generation",
        description="Evaluate LVLM object hallucination (CHAIR, POPE).",
    )
    commands = group.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    def show_help(_args: argparse.Namespace) -> int:
        group.print_help()
        return 0

    group.set_defaults(func=show_help)
    for module_name in EVAL_COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # that area is not built yet
            raise
        module.register(commands)
