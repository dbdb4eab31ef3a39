"""The ``mmattn`` command.

Subcommands are registered by the subpackages that own them (``register_cli(subparsers)`` functions), so the
CLI module stays small and each area keeps its own arguments next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

# Modules that add subcommands; each exposes register_cli(subparsers). Missing optional extras only hide
# their commands' functionality, never the whole CLI.
COMMAND_MODULES = ("mmattn.eval.cli", "mmattn.demos.cli", "mmattn.diffusion.attencraft.cli")


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exit status 2."""


def _info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import mmattn
    from mmattn.kernels import triton_available

    facts: dict[str, object] = {
        "mmattn": mmattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("triton", "diffusers", "open_clip", "pycocotools", "nltk", "gradio", "accelerate"):
        try:
            module = importlib.import_module(name)
            facts[name] = getattr(module, "__version__", "installed")
        except Exception:  # an optional extra that is absent or broken: report, never fail
            facts[name] = None
    facts["cuda"] = torch.cuda.is_available()
    facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    ok, why = triton_available()
    facts["triton_kernels"] = {"usable": ok, "detail": why}
    facts["kernel_override"] = os.environ.get("MMATTN_KERNEL") or None
    facts["methods"] = sorted(mmattn.METHODS)
    facts["offline_data"] = _offline_data()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        elif value is None:
            value = "not installed" if key not in ("kernel_override",) else "-"
        print(f"{key:<{width}}  {value}")
    return 0


def _offline_data() -> dict[str, object]:
    """What offline data was found (None when absent): the shipped worlds, NLTK data, the shared POPE files."""
    found: dict[str, object] = {}
    try:
        from mmattn.eval import world

        model_ok = (world.model_dir() / "config.json").is_file()
        images = len(list(world.val_image_dir().glob("*.png"))) if world.val_image_dir().is_dir() else 0
        found["world"] = f"{world.default_root()} (model: {'yes' if model_ok else 'missing'}, val images: {images})"
    except Exception:  # the eval extra or the world may be absent: report, never fail
        found["world"] = None
    try:
        from mmattn.diffusion import world as video_world

        folder = video_world.pipeline_dir()
        found["video_world"] = f"{folder} (pipeline: {'yes' if video_world.has_pipeline() else 'missing'})"
    except Exception:
        found["video_world"] = None
    try:
        from mmattn.eval.paths import nltk_data_dir, pope_coco_dir

        found["NLTK_DATA"] = str(nltk_data_dir()) if nltk_data_dir().is_dir() else None
        found["pope_coco"] = str(pope_coco_dir()) if pope_coco_dir().is_dir() else None
    except Exception:
        found["NLTK_DATA"] = found["pope_coco"] = None
    return found


def build_parser() -> argparse.ArgumentParser:
    import mmattn

    parser = argparse.ArgumentParser(
        prog="mmattn",
        description="Training-free attention interventions for LVLMs and diffusion models: patch, evaluate, demo.",
    )
    parser.add_argument("--version", action="version", version=f"mmattn {mmattn.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, GPU, whether the Triton kernels are usable, offline data found")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("mmattn"):
                continue  # that area is not built yet
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as error:
        print(f"mmattn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m mmattn.cli` loads this file as __main__: run the package module's main so that its CLIError is
    # the one subcommands raise.
    from mmattn.cli import main as package_main

    sys.exit(package_main())
