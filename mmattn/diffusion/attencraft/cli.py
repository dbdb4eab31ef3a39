"""``mmattn attencraft train | masks | generate``.

    mmattn attencraft train --model SD_DIR --image pair.png --concepts cat,dog --out runs/cat_dog
    mmattn attencraft train ... --out runs/cat_dog --resume latest          # continue after an interruption
    mmattn attencraft masks --model SD_DIR --image pair.png --prompt "a photo of a cat and a dog" \\
        --concepts cat,dog --out masks.png
    mmattn attencraft generate --model SD_DIR --concepts-dir runs/cat_dog \\
        --prompt "a photo of <new1> and <new2> at the beach" --out images/

``--model`` is a local diffusers Stable Diffusion directory (SD2.1-base in the paper); nothing is downloaded.
``generate`` writes ``index.jsonl`` records ``{"image", "prompt", "seed"}``, the input format of
``mmattn eval customization --generated``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["register_cli"]


def _cli_error(message: str) -> Exception:
    from mmattn.cli import CLIError

    return CLIError(message)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _open_image(path: str):
    from PIL import Image

    if not os.path.isfile(path):
        raise _cli_error(f"--image {path}: no such file")
    try:
        return Image.open(path).convert("RGB")
    except Exception as error:  # PIL raises several types for unreadable files
        raise _cli_error(f"--image {path}: not a readable image ({error})") from None


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    image.save(temporary)
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------ train


def _config_from_args(args):
    from . import AttenCraftConfig

    overrides = {
        "max_steps": args.steps, "learning_rate": args.lr, "resolution": args.resolution, "seed": args.seed,
        "checkpoint_every": args.checkpoint_every, "refresh_every": args.refresh_every,
        "attention_threshold": args.attention_threshold, "ssim_threshold": args.ssim_threshold,
        "attention_loss_weight": args.attention_loss_weight, "prior_loss_weight": args.prior_loss_weight,
        "cross_level": args.cross_level, "self_level": args.self_level, "concept_sampling": args.concept_sampling,
        "class_prompt": args.class_prompt, "num_class_images": args.num_class_images,
    }
    config = AttenCraftConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.no_scale_lr:
        config.scale_lr = False
    if args.no_prior:
        config.with_prior_preservation = False
    if args.no_train_kv:
        config.train_kv = False
    return config


def _train(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from .masks import AttenCraftError
    from .pipeline import load_stable_diffusion
    from .training import AttenCraftTrainer, ensure_class_images, latest_checkpoint

    concepts = _split(args.concepts)
    if not concepts:
        raise _cli_error("--concepts needs at least one initializer word, e.g. --concepts cat,dog")
    placeholders = _split(args.placeholders) or None
    try:
        config = _config_from_args(args)
        image = _open_image(args.image)
        out = Path(args.out)
        resume = None
        if args.resume:
            resume = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
            if resume is None:
                print(f"mmattn attencraft: no checkpoint under {out / 'checkpoints'}; starting fresh", file=sys.stderr)
            elif not resume.is_dir():
                raise _cli_error(f"--resume {args.resume}: no such checkpoint directory")
        device = _device(args.device)
        pipe = load_stable_diffusion(args.model, device=device)
        pipe.set_progress_bar_config(disable=args.no_progress)
        class_images = []
        if config.with_prior_preservation:
            class_dir = Path(args.class_data_dir) if args.class_data_dir else out / "class_images"
            paths = ensure_class_images(pipe, class_dir, config.class_prompt, config.num_class_images,
                                        steps=args.class_inference_steps, seed=config.seed,
                                        progress=not args.no_progress)
            class_images = [_open_image(str(p)) for p in paths]
        scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler", local_files_only=True)
        trainer = AttenCraftTrainer(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet,
            noise_scheduler=scheduler, image=image, concepts=concepts, placeholders=placeholders, config=config,
            class_images=class_images, mixed_precision=args.mixed_precision, output_dir=out, device=device,
        )
        if resume is not None:
            trainer.load_checkpoint(resume)
            print(f"mmattn attencraft: resumed from {resume} at step {trainer.step}", file=sys.stderr)
        else:
            masks = trainer.initialize_masks()
            print(f"mmattn attencraft: initial masks {json.dumps(masks.areas())}", file=sys.stderr)
        trainer.train(progress=not args.no_progress)
        trainer.close()
    except AttenCraftError as error:
        raise _cli_error(str(error)) from None
    accepted = sum(1 for r in trainer.history if r.get("accepted"))
    refreshes = sum(1 for r in trainer.history if r.get("refresh"))
    print(json.dumps({"out": str(out), "step": trainer.step, "placeholders": trainer.placeholders,
                      "mask_refreshes_accepted": f"{accepted}/{refreshes}",
                      "prompt": trainer.prompt_for(range(len(concepts)))}))
    return 0


# ------------------------------------------------------------------------------------------ masks


def _masks(args: argparse.Namespace) -> int:
    import torch

    from . import AttenCraftConfig
    from .masks import AttenCraftError, extract_concept_masks, mask_preview
    from .pipeline import load_stable_diffusion, save_safetensors_atomic

    concepts = _split(args.concepts)
    if not concepts:
        raise _cli_error("--concepts needs the concept words as they appear in --prompt, e.g. --concepts cat,dog")
    try:
        overrides = {k: v for k, v in {"seed": args.seed, "attention_threshold": args.attention_threshold,
                                       "cross_level": args.cross_level, "self_level": args.self_level}.items()
                     if v is not None}
        config = AttenCraftConfig(**overrides)
        image = _open_image(args.image)
        pipe = load_stable_diffusion(args.model, device=_device(args.device))
        result, overlay = extract_concept_masks(pipe, image, args.prompt, concepts, config, timestep=args.timestep,
                                                generator=torch.Generator().manual_seed(config.seed), size=args.size)
    except AttenCraftError as error:
        raise _cli_error(str(error)) from None
    out = Path(args.out)
    _save_png(overlay, out)
    _save_png(mask_preview(image, result), out.with_name(out.stem + "_maps.png"))
    save_safetensors_atomic({"masks": result.masks.to(torch.uint8), "propagated": result.propagated.float()},
                            out.with_suffix(".safetensors"), metadata={"names": json.dumps(result.names)})
    print(json.dumps(result.to_dict()))
    return 0


# ------------------------------------------------------------------------------------------ generate


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .masks import AttenCraftError
    from .pipeline import generate, load_learned_concepts, load_stable_diffusion

    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise _cli_error(f"--prompts-file {args.prompts_file}: no such file")
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise _cli_error("give --prompt (repeatable) or --prompts-file")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        pipe = load_stable_diffusion(args.model, torch_dtype=dtype, device=_device(args.device))
        tokens = load_learned_concepts(pipe, args.concepts_dir)
    except AttenCraftError as error:
        raise _cli_error(str(error)) from None
    pipe.set_progress_bar_config(disable=args.no_progress)
    out = Path(args.out)
    records = []
    extra = {"height": args.size, "width": args.size} if args.size else {}
    for prompt, seed, index, image in generate(pipe, prompts, num_images=args.num_images, steps=args.steps,
                                               guidance=args.guidance, seeds=args.seeds, **extra):
        path = out / f"{prompts.index(prompt):03d}_seed{seed}_{index:02d}.png"
        _save_png(image, path)
        records.append({"image": path.name, "prompt": prompt, "seed": seed})
    from mmattn.eval.io import write_text_atomic

    write_text_atomic(out / "index.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"out": str(out), "images": len(records), "tokens": tokens}))
    return 0


# ------------------------------------------------------------------------------------------ registration


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mmattn attencraft ...`` (called by :func:`mmattn.cli.build_parser`)."""
    group = subparsers.add_parser(
        "attencraft", help="AttenCraft: attention-derived concept masks and multi-concept customization (diffusers)",
        description="AttenCraft (arXiv 2405.17965) for local diffusers Stable Diffusion models.",
    )
    commands = group.add_subparsers(dest="attencraft_command", metavar="ATTENCRAFT_COMMAND")

    def show_help(_args: argparse.Namespace) -> int:
        group.print_help()
        return 0

    group.set_defaults(func=show_help)

    def model_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="local diffusers Stable Diffusion directory (SD2.1-base)")
        parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")

    def level_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cross-level", type=int, help="cross maps at latent/2**level (default 2: 16x16 at 512)")
        parser.add_argument("--self-level", type=int, help="self maps and masks at latent/2**level (default 1: 32x32)")
        parser.add_argument("--attention-threshold", type=float, help="mask margin θ (default 0.1)")

    train = commands.add_parser("train", help="fine-tune one new token per concept (+ cross-attention K/V)")
    model_args(train)
    train.add_argument("--image", required=True, help="the image holding the concepts")
    train.add_argument("--concepts", required=True, help="comma-separated single-token initializer words: cat,dog")
    train.add_argument("--placeholders", help="comma-separated new tokens (default <new1>,<new2>,...)")
    train.add_argument("--out", required=True, help="output directory (weights, checkpoints/, previews/)")
    train.add_argument("--steps", type=int, help="total training steps (default 500)")
    train.add_argument("--lr", type=float, help="learning rate before --scale-lr scaling (default 5e-5)")
    train.add_argument("--no-scale-lr", action="store_true", help="do not multiply the lr by batch x 2 (prior)")
    train.add_argument("--resolution", type=int, help="training resolution (default 512)")
    train.add_argument("--seed", type=int, help="seed of every random draw (default 42)")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    train.add_argument("--no-prior", action="store_true", help="turn prior preservation off")
    train.add_argument("--class-prompt", help="prior-preservation prompt (default 'a photo at the beach')")
    train.add_argument("--class-data-dir", help="class images (missing ones are generated; default OUT/class_images)")
    train.add_argument("--num-class-images", type=int, help="class images needed (default 200)")
    train.add_argument("--class-inference-steps", type=int, default=50, help="steps when generating class images")
    train.add_argument("--checkpoint-every", type=int, help="checkpoint period in steps (default 100)")
    train.add_argument("--refresh-every", type=int, help="mask refresh period in steps (default 20)")
    train.add_argument("--ssim-threshold", type=float, help="refresh gate (default 0.8)")
    train.add_argument("--attention-loss-weight", type=float, help="JSD attention loss weight (default 1)")
    train.add_argument("--prior-loss-weight", type=float, help="prior loss weight (default 1)")
    train.add_argument("--concept-sampling", choices=("subsets", "full"), help="prompt sampling (default subsets)")
    train.add_argument("--no-train-kv", action="store_true", help="train the tokens only (no K/V copies)")
    train.add_argument("--resume", help="checkpoint directory, or 'latest' (newest under OUT/checkpoints)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    level_args(train)
    train.set_defaults(func=_train)

    masks = commands.add_parser("masks", help="concept masks of one image from one low-noise forward")
    model_args(masks)
    masks.add_argument("--image", required=True)
    masks.add_argument("--prompt", required=True, help="a prompt naming every concept, e.g. 'a photo of cat and dog'")
    masks.add_argument("--concepts", required=True, help="comma-separated concept words as they appear in the prompt")
    masks.add_argument("--out", required=True, help="overlay PNG (also writes <out>_maps.png and <out>.safetensors)")
    masks.add_argument("--seed", type=int)
    masks.add_argument("--timestep", type=int, help="noise level (default: random below 300)")
    masks.add_argument("--size", type=int, help="processing resolution (default: the model's)")
    level_args(masks)
    masks.set_defaults(func=_masks)

    gen = commands.add_parser("generate", help="images with the learned tokens (50 steps, CFG 7.5 as the reference)")
    model_args(gen)
    gen.add_argument("--concepts-dir", required=True, help="output directory of 'attencraft train' or a checkpoint")
    gen.add_argument("--prompt", action="append", help="prompt using the placeholders (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--out", required=True)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--num-images", type=int, default=10, help="images per prompt and seed")
    gen.add_argument("--seeds", type=int, nargs="+", default=[42])
    gen.add_argument("--size", type=int, help="image side (default: the model's)")
    gen.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=_generate)
