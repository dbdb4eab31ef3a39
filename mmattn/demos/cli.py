"""``mmattn demo lvlm`` and ``mmattn demo video``: the Gradio demos from the command line.

Gradio is imported only when a demo starts, so ``mmattn --help`` works without the ``demo`` extra. The demos
listen on 127.0.0.1 and make no share link unless ``--share`` is given.
"""

from __future__ import annotations

import argparse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: bf16/fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off by default: anyone with the link can use it)")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mmattn demo ...`` to the top-level CLI (called by :func:`mmattn.cli.build_parser`)."""
    group = subparsers.add_parser("demo", help="web demos (Gradio): LVLM answers side by side, video before/after",
                                  description="Interactive Gradio demos of the methods.")
    demos = group.add_subparsers(dest="demo_command", metavar="DEMO")

    def show_help(_args: argparse.Namespace) -> int:
        group.print_help()
        return 0

    group.set_defaults(func=show_help)

    lvlm = demos.add_parser(
        "lvlm", help="baseline vs patched LVLM answers, hallucinated objects and attention heatmaps",
        description="Compare a LLaVA-family model's answers with and without attention methods.",
    )
    lvlm.add_argument("--model", default=None,
                      help="checkpoint folder or hub id of a LLaVA / LLaVA-NeXT model (default: the offline world model)")
    lvlm.add_argument("--max-new-tokens", type=int, default=None, help="default answer length shown in the app")
    _common(lvlm)
    lvlm.set_defaults(func=_run_lvlm)

    video = demos.add_parser(
        "video", help="text-to-video with and without BroadWay",
        description="Render one prompt and seed with a local diffusers text-to-video pipeline, without and with BroadWay.",
    )
    video.add_argument("--model", default=None, help="local diffusers pipeline folder (save_pretrained output; "
                       "default: the offline video world's pipeline)")
    _common(video)
    video.set_defaults(func=_run_video)


def _needs_gradio():
    from mmattn.cli import CLIError

    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise CLIError("the demos need gradio: pip install 'mmattn[demo]'") from None


def _run_lvlm(args: argparse.Namespace) -> int:
    from mmattn.cli import CLIError
    from mmattn.eval.io import EvalInputError

    _needs_gradio()
    from .lvlm import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS, LVLMDemo, launch

    tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if not 1 <= tokens <= MAX_NEW_TOKENS:
        raise CLIError(f"--max-new-tokens must lie in [1, {MAX_NEW_TOKENS}]")
    try:
        demo = LVLMDemo.from_pretrained(args.model, device=args.device, dtype=args.dtype, default_max_new_tokens=tokens)
    except EvalInputError as error:
        raise CLIError(str(error)) from None
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


def _run_video(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmattn.cli import CLIError

    _needs_gradio()
    from .video import VideoDemo, launch

    if args.model is not None and not (Path(args.model) / "model_index.json").is_file():
        raise CLIError(f"--model {args.model}: not a local diffusers pipeline folder (no model_index.json)")
    launch(VideoDemo(args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port,
           share=args.share)
    return 0
