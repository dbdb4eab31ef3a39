"""``mmattn eval video``: generate each prompt and seed with and without BroadWay, save the videos and a grid,
score both with the video metrics of :mod:`mmattn.eval.video`, print the summary as one JSON object.

Without ``--model`` it runs the offline video world (:mod:`mmattn.diffusion.world`): the shipped tiny AnimateDiff
pipeline, its evaluation prompts (unless prompts are given) and the metrics that need no weights (temporal
flickering, Lucas-Kanade motion and the world's colour / shape statistic), so it works with no downloads at all.
Other models load from local directories or the Hugging Face cache only (``local_files_only``) and default to the
spec's metrics, whose CLIP / DINO / RAFT weights must be local (checked before anything is generated);
``--model tiny-animatediff`` and ``--model tiny-t2v`` build random config-sized pipelines for smoke runs, and
``--random-backbones`` scores with randomly initialised metric backbones (plumbing checks only).
"""

from __future__ import annotations

import argparse
import json
import sys

from .io import EvalInputError

TINY_MODELS = ("tiny-animatediff", "tiny-t2v")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``video`` to the ``mmattn eval`` group."""
    from ..diffusion.options import add_broadway_arguments
    from .video import DEFAULT_METRICS, FLOW_ESTIMATORS, METRICS, OFFLINE_METRICS

    video = commands.add_parser(
        "video",
        help="text-to-video with and without BroadWay: videos, grids, CLIP/DINO/flicker/motion metrics",
        description="For every prompt and seed, generate a video without and with BroadWay (same seed), save both "
        "(MP4 with PyAV, else GIF) and a side-by-side grid PNG, and score CLIP text alignment, CLIP frame "
        "consistency, subject consistency (DINO), temporal flickering and optical-flow motion (dynamic degree). "
        "Writes config.json, samples.jsonl and summary.json under --out (atomically; reruns resume).",
    )
    video.add_argument("--model", default=None,
                       help="diffusers pipeline directory or cached hub id (AnimateDiff or TextToVideoSD), or "
                       f"{' / '.join(TINY_MODELS)} for a random tiny pipeline (default: the offline video world's "
                       "pipeline, its prompts and weight-free metrics)")
    video.add_argument("--motion-adapter", metavar="DIR_OR_ID",
                       help="MotionAdapter to build an AnimateDiffPipeline from an SD1.5 --model")
    video.add_argument("--prompts", metavar="FILE", help="prompt file, one per line")
    video.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    video.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    video.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_broadway_arguments(video.add_argument_group("BroadWay"))
    gen = video.add_argument_group("generation")
    gen.add_argument("--frames", type=int, default=16)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--fps", type=float, default=8.0, help="frame rate of saved videos and of VBench's sampling")
    gen.add_argument("--device", help="torch device (default: cuda if available)")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="pipeline dtype "
                     "(default: float16 on CUDA, else float32)")
    metrics = video.add_argument_group("metrics")
    metrics.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                         help=f"default: {' '.join(DEFAULT_METRICS)} (need weights); without --model: "
                         f"{' '.join(OFFLINE_METRICS)} (weight-free)")
    metrics.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name (default ViT-L-14)")
    metrics.add_argument("--clip-weights", default="openai", help="open_clip pretrained tag or local file")
    metrics.add_argument("--dino-model", default="vit_base_patch16_224.dino", help="timm DINO model name")
    metrics.add_argument("--dino-weights", default="hub", help="'hub' (cache) or a local file")
    metrics.add_argument("--flow", choices=FLOW_ESTIMATORS, default=None,
                         help="optical flow of the motion metric (default: raft_large; lucas_kanade without --model)")
    metrics.add_argument("--raft-weights", default="hub", help="'hub' (torch hub cache) or a local file")
    metrics.add_argument("--random-backbones", action="store_true",
                         help="random metric backbones (smoke runs and tests; the scores are meaningless)")
    video.set_defaults(func=_video)


def _user_error(error: Exception):
    from mmattn.cli import CLIError

    return CLIError(str(error).replace("\n", " "))


def _load_pipeline(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.model is None:
        from mmattn.diffusion.world import MissingPipelineError, load_pipeline

        try:
            return load_pipeline(device=device, dtype=dtype)
        except MissingPipelineError as error:
            raise EvalInputError(str(error)) from None
    if args.model in TINY_MODELS:
        from mmattn.diffusion.testing import tiny_animatediff_pipeline, tiny_text_to_video_pipeline

        pipe = tiny_animatediff_pipeline() if args.model == "tiny-animatediff" else tiny_text_to_video_pipeline()
        return pipe.to(device=device, dtype=dtype)
    from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter

    try:
        if args.motion_adapter:
            adapter = MotionAdapter.from_pretrained(args.motion_adapter, torch_dtype=dtype, local_files_only=True)
            pipe = AnimateDiffPipeline.from_pretrained(args.model, motion_adapter=adapter, torch_dtype=dtype,
                                                       local_files_only=True)
        else:
            pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as error:
        raise EvalInputError(
            f"cannot load the pipeline {args.model!r} from a local directory or the Hugging Face cache "
            f"(no downloads): {error}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _video(args: argparse.Namespace) -> int:
    from mmattn.diffusion.broadway import broadway

    from .video import (
        DEFAULT_METRICS, OFFLINE_METRICS, WEIGHT_FREE_HINT, VideoMetricsConfig, VideoMetricsError, VideoScorer,
        evaluate_videos, read_prompts,
    )

    offline = args.model is None
    try:
        if offline:
            from mmattn.diffusion.world import has_pipeline, pipeline_dir

            if args.motion_adapter:
                raise EvalInputError("--motion-adapter needs --model (an SD 1.5 pipeline to build AnimateDiff from)")
            if not has_pipeline():
                raise EvalInputError(f"no --model given and the offline video world's pipeline is missing "
                                     f"({pipeline_dir()}); train it with python -m mmattn.diffusion.world.train")
        prompts = (read_prompts(args.prompts) if args.prompts else []) + list(args.prompt)
        if not prompts and offline:
            from mmattn.diffusion.world import EVAL_PROMPTS

            prompts = list(EVAL_PROMPTS)
        if not prompts:
            raise EvalInputError("give --prompts FILE or at least one --prompt")
        metrics = args.metrics or list(OFFLINE_METRICS if offline else DEFAULT_METRICS)
        flow = args.flow or ("lucas_kanade" if offline else "raft_large")
        if "world" in metrics:
            # The world statistic only scores world prompts: check them all now, not after generating (a failure
            # mid-run would also leave a config.json that refuses the corrected prompts in the same --out).
            from mmattn.diffusion.world.generate import parse_prompt

            for prompt in prompts:
                try:
                    parse_prompt(prompt)
                except ValueError as error:
                    raise EvalInputError(f"the world metric scores video-world prompts only: {error}; drop 'world' "
                                         "from --metrics to score other prompts") from None
        from mmattn.diffusion.options import broadway_config_from_arguments

        config = broadway_config_from_arguments(args)
        random_backbones = args.random_backbones
        scorer = VideoScorer(VideoMetricsConfig(
            clip_model=args.clip_model, clip_weights=None if random_backbones else args.clip_weights,
            dino_model=args.dino_model, dino_weights=None if random_backbones else args.dino_weights, flow=flow,
            raft_weights=None if random_backbones else args.raft_weights, fps=args.fps, metrics=tuple(metrics),
            device=args.device,
        ))
        try:
            scorer.load_backbones()
        except VideoMetricsError as error:
            raise VideoMetricsError(f"{error} ({WEIGHT_FREE_HINT})") from None
        generation = {"num_frames": args.frames, "num_inference_steps": args.steps, "guidance_scale": args.guidance}
        generation.update({k: getattr(args, k) for k in ("height", "width") if getattr(args, k)})
        summary = evaluate_videos(
            lambda: _load_pipeline(args), prompts, args.seeds, args.out, treatments={"broadway": lambda p: broadway(p, config)},
            scorer=scorer, generation=generation, fps=args.fps,
            settings={"model": args.model or "offline video world", "motion_adapter": args.motion_adapter, "broadway": config.to_dict(),
                      "random_backbones": random_backbones},
            log=lambda line: print(line, file=sys.stderr),
        )
    except (EvalInputError, OSError, ValueError) as error:
        raise _user_error(error) from None
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0
