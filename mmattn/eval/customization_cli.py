"""``mmattn eval customization``: CLIP-I, CLIP-T and DINO of generated images (spec ``evaluators.md`` §4.4).

    mmattn eval customization --generated images/ --references data/cat_dog/global --out scores.json \\
        --replace "<new1>=cat" --replace "<new2>=dog"
    mmattn eval customization --generated images/ --references data/cat_dog/subject1 \\
        --reference-masks masks/subject1 --generated-masks gen_masks/ --mask-mode crop

``--generated`` is a directory of images (prompts from its ``index.jsonl``, as ``mmattn attencraft generate``
writes it, or ``--prompt`` for all), or a JSON Lines file of ``{"image": path, "prompt": text, "mask": path?}``
(paths relative to the file). ``--references`` is a directory of images or one image. Masks are found by image stem
in ``--generated-masks`` / ``--reference-masks`` (non-zero pixels = the concept). ``--random-backbones`` scores with
random weights (plumbing checks only: the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``customization`` to the ``mmattn eval`` group."""
    from .customization import MASK_MODES, METRICS

    parser = commands.add_parser(
        "customization",
        help="subject customization: CLIP-I, CLIP-T (open_clip ViT-B/32) and DINO (ViT-S/16), optionally masked",
        description="Mean CLIP image similarity and DINO similarity over every (generated, reference) pair, and "
        "CLIP image-text similarity of each generated image with its prompt (raw cosines, ImagenHub/DreamBooth).",
    )
    parser.add_argument("--generated", required=True, help="directory of images, or a JSONL of {image, prompt, mask}")
    parser.add_argument("--references", help="directory of reference images, or one image (needed for clip_i/dino)")
    parser.add_argument("--prompt", help="prompt of every generated image (when --generated has no prompts)")
    parser.add_argument("--generated-masks", metavar="DIR", help="masks of the generated images, by file stem")
    parser.add_argument("--reference-masks", metavar="DIR_OR_FILE", help="masks of the references, by file stem")
    parser.add_argument("--mask-mode", choices=MASK_MODES, default="crop",
                        help="blank: fill outside the mask; crop: also crop to its square bounding box (default)")
    parser.add_argument("--mask-fill", type=int, nargs=3, default=(0, 0, 0), metavar=("R", "G", "B"))
    parser.add_argument("--replace", action="append", default=[], metavar="TOKEN=WORD",
                        help="replace a placeholder in the prompts before CLIP-T (repeatable): '<new1>=cat'")
    parser.add_argument("--drop-placeholders", action="store_true", help="remove leftover <...> tokens for CLIP-T")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    parser.add_argument("--clip-weights", default="openai", help="local checkpoint file, or 'openai' (cache lookup)")
    parser.add_argument("--dino-model", default="vit_small_patch16_224.dino", help="timm DINO model name")
    parser.add_argument("--dino-weights", default="hub", help="local checkpoint file, or 'hub' (cache lookup)")
    parser.add_argument("--random-backbones", action="store_true",
                        help="random CLIP/DINO weights (smoke runs and tests; the scores are meaningless)")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write the full result (summary, config, per-image scores) as JSON")
    parser.set_defaults(func=_customization)


def _user_error(message: str):
    from mmattn.cli import CLIError

    return CLIError(message)


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))


def _open(path: Path, what: str):
    from PIL import Image

    if not path.is_file():
        raise _user_error(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises several types for unreadable files
        raise _user_error(f"{what} {path}: not a readable image ({error})") from None


def _mask_for(directory: str | None, image: Path, what: str):
    from PIL import Image

    if directory is None:
        return None
    root = Path(directory)
    if root.is_file():
        return Image.open(root).convert("L")
    candidates = [p for p in (root.glob(image.stem + ".*")) if p.suffix.lower() in _IMAGE_SUFFIXES]
    if not candidates:
        raise _user_error(f"no mask for {what} image {image.name} in {root} (expected {image.stem}.png)")
    return Image.open(candidates[0]).convert("L")


def _generated(args) -> tuple[list[Path], list[str | None], list]:
    from .io import EvalInputError, read_jsonl

    source = Path(args.generated)
    masks: list = []
    if source.is_dir():
        index = source / "index.jsonl"
        if index.is_file():
            records = read_jsonl(index)
            paths = [source / r["image"] for r in records]
            prompts = [r.get("prompt", args.prompt) for r in records]
        else:
            paths = _images_in(source)
            prompts = [args.prompt] * len(paths)
        masks = [None] * len(paths)
    elif source.is_file():
        try:
            records = read_jsonl(source)
        except EvalInputError as error:
            raise _user_error(str(error)) from None
        for line, record in enumerate(records, start=1):
            if "image" not in record:
                raise _user_error(f"{source}:{line}: a record needs an 'image' path")
        paths = [source.parent / r["image"] for r in records]
        prompts = [r.get("prompt", args.prompt) for r in records]
        masks = [(source.parent / r["mask"]) if r.get("mask") else None for r in records]
    else:
        raise _user_error(f"--generated {source}: no such directory or JSONL file")
    if not paths:
        raise _user_error(f"--generated {source}: no images found")
    return paths, prompts, masks


def _customization(args: argparse.Namespace) -> int:
    from PIL import Image

    from .customization import CustomizationConfig, CustomizationError, CustomizationScorer
    from .io import write_json_atomic

    replacements = {}
    for item in args.replace:
        token, sep, word = item.partition("=")
        if not sep or not token:
            raise _user_error(f"--replace {item!r}: expected TOKEN=WORD, e.g. '<new1>=cat'")
        replacements[token] = word
    try:
        config = CustomizationConfig(
            clip_model=args.clip_model, clip_weights=None if args.random_backbones else args.clip_weights,
            dino_model=args.dino_model, dino_weights=None if args.random_backbones else args.dino_weights,
            metrics=tuple(args.metrics), mask_mode=args.mask_mode, mask_fill=tuple(args.mask_fill),
            text_replacements=replacements, drop_placeholders=args.drop_placeholders, device=args.device,
            batch_size=args.batch_size,
        )
    except CustomizationError as error:
        raise _user_error(str(error)) from None

    paths, prompts, mask_paths = _generated(args)
    if "clip_t" in config.metrics and any(p is None for p in prompts):
        raise _user_error("clip_t needs prompts: give --prompt, an index.jsonl next to the images, or 'prompt' fields")
    generated = [_open(p, "generated image") for p in paths]
    generated_masks = None
    if args.generated_masks or any(m is not None for m in mask_paths):
        generated_masks = [Image.open(m).convert("L") if m is not None else _mask_for(args.generated_masks, p, "generated")
                           for p, m in zip(paths, mask_paths)]
    references, reference_masks, reference_paths = None, None, []
    if args.references:
        root = Path(args.references)
        if not root.exists():
            raise _user_error(f"--references {root}: no such file or directory")
        reference_paths = _images_in(root) if root.is_dir() else [root]
        if not reference_paths:
            raise _user_error(f"--references {root}: no images found")
        references = [_open(p, "reference image") for p in reference_paths]
        if args.reference_masks:
            reference_masks = [_mask_for(args.reference_masks, p, "reference") for p in reference_paths]

    scorer = CustomizationScorer(config)
    try:
        result = scorer.score(generated, references, prompts if "clip_t" in config.metrics else None,
                              generated_masks=generated_masks, reference_masks=reference_masks)
    except CustomizationError as error:
        raise _user_error(str(error)) from None
    for record, path, prompt in zip(result["per_image"], paths, prompts):
        record["image"] = str(path)
        if prompt is not None:
            record["prompt"] = prompt
    summary = {
        "metrics": result["metrics"],
        "counts": result["counts"],
        "masked": {"generated": generated_masks is not None, "references": reference_masks is not None,
                   "mode": config.mask_mode if (generated_masks or reference_masks) else None},
        "backbones": {"clip": f"{config.clip_model} ({'random' if config.clip_weights is None else config.clip_weights})",
                      "dino": f"{config.dino_model} ({'random' if config.dino_weights is None else config.dino_weights})"},
    }
    if args.out:
        write_json_atomic(args.out, {**summary, "config": scorer.describe(),
                                     "references": [str(p) for p in reference_paths], "per_image": result["per_image"]})
    print(json.dumps(summary))
    return 0
