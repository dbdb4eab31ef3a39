"""Batched, resumable, data-parallel generation for CHAIR and POPE: ``mmattn eval chair`` / ``mmattn eval pope``.

- Items are split into fixed batches (``batch k = items[k*B:(k+1)*B]``) whatever the number of processes, so a
  sample's padding neighbours and hence its greedy output do not depend on resumption or on the GPU count.
- Each process appends its finished samples to ``samples.rank{r}.jsonl`` a batch at a time (flushed and
  fsynced); a rerun of the same command skips finished ids and recomputes partially written batches.
- Under ``accelerate launch --num_processes N`` process ``r`` takes batches ``k % N == r``; rank 0 merges the
  shards into ``samples.jsonl`` in item order and writes ``summary.json`` and ``config.json`` atomically. The
  summary exists only when every item has an answer.

The harness knows nothing about methods: it builds them by name from the registry and hands them to
``mmattn.patch``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .io import EvalInputError, write_json_atomic, write_jsonl_atomic

CHAIR_PROMPT = "Please describe this image in detail."
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's POPE prompt
DEFAULT_WORLD_CHAIR_N = 100  # offline default subsets: each command finishes well inside 3 minutes on a 2-core CPU
DEFAULT_WORLD_POPE_N = 500  # questions per split (of 2,142): 1,500 questions at ~20/s on 2 CPU cores


@dataclass
class Item:
    """One generation request: ``key`` is unique within a run and orders the merged output."""

    key: str
    image_path: Path
    prompt: str
    record: dict[str, Any]


@dataclass
class RunSettings:
    model: str | None
    methods: list[str]
    batch_size: int
    max_new_tokens: int
    seed: int
    device: str | None
    dtype: str | None
    out: Path
    deterministic: bool = False


# ---------------------------------------------------------------------------------------------- model


def resolve_model_path(model: str | None) -> str:
    if model:
        return model
    from . import world

    path = world.model_dir()
    if not (path / "config.json").is_file():
        raise EvalInputError(f"the offline world model is missing at {path}; pass --model PATH_OR_ID")
    return str(path)


def load_model_and_processor(model: str | None, device: str | None, dtype: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = resolve_model_path(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise EvalInputError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise EvalInputError(f"cannot load model {path!r}: {error}") from None
    from ..lvlm.patch import SUPPORTED_MODELS

    architectures = getattr(config, "architectures", None) or []
    if architectures and not set(architectures) & set(SUPPORTED_MODELS):
        raise EvalInputError(f"model {path!r} is a {architectures[0]}; supported: {', '.join(SUPPORTED_MODELS)}")
    model_obj = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    if model_obj.generation_config.pad_token_id is None:
        model_obj.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model_obj, processor, path


def build_prompt(processor, text: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <image>\n{text} ASSISTANT:"


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise EvalInputError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise EvalInputError(f"cannot read image {path}: {error}") from None


# ------------------------------------------------------------------------------------------ resumable runs


def read_finished(path: Path) -> dict[str, dict[str, Any]]:
    """Records already written to a shard; a torn last line (a killed run) is cut off the file."""
    if not path.exists():
        return {}
    finished: dict[str, dict[str, Any]] = {}
    good_bytes = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break
            finished[record["key"]] = record
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(good_bytes)
    return finished


FINGERPRINT_DEFAULTS = {"deterministic": False}  # what a run.json written before each key existed implies


def check_same_run(settings: RunSettings, items: Sequence[Item], model_path: str, rank: int, state) -> None:
    """Refuse to resume into a folder that holds a different run: its samples would be mixed into this one's."""
    import hashlib

    fingerprint = {
        "model": model_path,
        "methods": list(settings.methods),
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "deterministic": settings.deterministic,
        "items": hashlib.sha256("\n".join(f"{i.key}|{i.image_path.name}|{i.prompt}" for i in items).encode()).hexdigest(),
    }
    path = settings.out / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        # Keys added to the fingerprint later are absent from older runs; those runs used the key's old behaviour.
        previous = {**FINGERPRINT_DEFAULTS, **previous}
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        if changed:
            raise EvalInputError(
                f"{settings.out} holds a different run (changed: {', '.join(changed)}); "
                "use a new --out folder, or rerun with the same arguments to resume"
            )
    elif rank == 0:
        write_json_atomic(path, fingerprint)
    if state is not None:
        state.wait_for_everyone()


def process_state():
    """(rank, world size, accelerate state or None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_PROCESS_INDEX") is not None:
        import torch
        from accelerate import PartialState

        # Without CUDA, accelerate needs cpu=True to join the process group (gloo) rather than run alone.
        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state
    return 0, 1, None


def run_generation(
    items: Sequence[Item],
    settings: RunSettings,
    answer_key: str,
    progress_label: str,
) -> tuple[list[dict[str, Any]] | None, Any, dict[str, Any]]:
    """Generate answers for ``items``; returns (records in item order on rank 0 else None, processor, run info)."""
    import torch

    import mmattn
    from tqdm.auto import tqdm

    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise EvalInputError("duplicate item ids in the input")
    missing_images = sorted({str(item.image_path) for item in items if not item.image_path.is_file()})
    if missing_images:  # before the (slow) model load
        more = f" and {len(missing_images) - 1} more" if len(missing_images) > 1 else ""
        raise EvalInputError(f"image not found: {missing_images[0]}{more}")
    if settings.deterministic:
        use_deterministic_kernels()
    rank, world_size, state = process_state()
    device = settings.device
    if state is not None and device is None:
        device = str(state.device)
    model, processor, model_path = load_model_and_processor(settings.model, device, settings.dtype)
    methods = [mmattn.parse_method_spec(spec) for spec in settings.methods]
    settings.out.mkdir(parents=True, exist_ok=True)
    check_same_run(settings, items, model_path, rank, state)
    shard = settings.out / f"samples.rank{rank}.jsonl"
    finished = read_finished(shard)
    batches = [items[i : i + settings.batch_size] for i in range(0, len(items), settings.batch_size)]
    mine = [batch for k, batch in enumerate(batches) if k % world_size == rank]
    todo = [batch for batch in mine if any(item.key not in finished for item in batch)]
    total = sum(len(b) for b in mine)
    bar = tqdm(total=total, initial=total - sum(len(b) for b in todo), desc=progress_label, unit="sample",
               disable=rank != 0 or not sys.stderr.isatty() and os.environ.get("MMATTN_PROGRESS") != "1")
    started = time.perf_counter()
    generated_tokens = 0
    torch.manual_seed(settings.seed)
    context = mmattn.patch(model, *methods, processor=processor) if methods else nullcontext()
    with context, open(shard, "a", encoding="utf-8") as out:
        for batch in todo:
            images = [load_image(item.image_path) for item in batch]
            prompts = [build_prompt(processor, item.prompt) for item in batch]
            inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
            pad = model.generation_config.pad_token_id
            generated_tokens += int((new_tokens != pad).sum()) if pad is not None else new_tokens.numel()
            lines = []
            for item, text in zip(batch, texts):
                if item.key in finished:
                    continue
                record = {"key": item.key, **item.record, answer_key: text.strip()}
                finished[item.key] = record
                lines.append(json.dumps(record) + "\n")
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - started
    info = {
        "model": model_path,
        "methods": [repr(m) for m in methods],
        "method_specs": list(settings.methods),
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "dtype": str(model.dtype),
        "processes": world_size,
        "generation_seconds_this_run": round(elapsed, 3),
        "generated_tokens_this_run": generated_tokens,
    }
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None, processor, info
    merged: dict[str, dict[str, Any]] = {}
    for r in range(world_size):
        merged.update(read_finished(settings.out / f"samples.rank{r}.jsonl"))
    missing = [key for key in keys if key not in merged]
    if missing:
        raise EvalInputError(f"{len(missing)} items have no answer (first: {missing[0]}); rerun the same command")
    records = [merged[key] for key in keys]
    write_jsonl_atomic(settings.out / "samples.jsonl", records)
    return records, processor, info


# --------------------------------------------------------------------------------------------- commands


def _settings(args: argparse.Namespace) -> RunSettings:
    if args.batch_size < 1:
        raise EvalInputError("--batch-size must be at least 1")
    return RunSettings(
        model=args.model, methods=list(args.method or []), batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device, dtype=args.dtype, out=Path(args.out),
        deterministic=args.deterministic,
    )


def use_deterministic_kernels() -> None:
    """Bit-reproducible GPU runs: deterministic algorithms everywhere (cuBLAS with a fixed workspace, no cuDNN
    autotuning) and no cuDNN attention, at some cost in speed. Must run before the first cuBLAS call."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns, not fails
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_cudnn_sdp(False)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import mmattn

    return {"mmattn": mmattn.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _finish(out: Path, summary: dict[str, Any], config: dict[str, Any], table: str) -> None:
    write_json_atomic(out / "config.json", config)
    write_json_atomic(out / "summary.json", summary)
    print(table)
    print(f"results: {out / 'summary.json'}")


def chair_items(annotations: Path, images: Path, n: int | None, seed: int, prompt: str) -> list[Item]:
    from .io import read_json

    instances = sorted(annotations.glob("instances_*.json"))
    if not instances:
        raise EvalInputError(f"{annotations}: no instances_*.json (a COCO annotations directory is expected)")
    data = read_json(instances[0])
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise EvalInputError(f"{instances[0]}: not a COCO instances file (no 'images' list)")
    files = {}
    for entry in data["images"]:
        try:
            files[int(entry["id"])] = entry["file_name"]
        except (KeyError, TypeError, ValueError):
            raise EvalInputError(f"{instances[0]}: malformed image entry {entry!r}") from None
    ids = sorted(files)
    if n is not None:
        if n > len(ids):
            raise EvalInputError(f"--n {n} is more than the {len(ids)} images in {instances[0]}")
        ids = sorted(random.Random(seed).sample(ids, n))
    return [Item(key=str(i), image_path=images / files[i], prompt=prompt, record={"image_id": i}) for i in ids]


def _eval_chair(args: argparse.Namespace) -> int:
    from .chair import evaluate_chair

    world_default = args.model is None and args.annotations is None
    if world_default:
        from . import world

        annotations, images = world.val_dir(), world.val_image_dir()
        n = args.n if args.n is not None else DEFAULT_WORLD_CHAIR_N
    else:
        if args.annotations is None or args.images is None:
            raise EvalInputError("--annotations DIR and --images DIR are required with --model (or omit all three)")
        annotations, images, n = Path(args.annotations), Path(args.images), args.n if args.n is not None else 500
    settings = _settings(args)
    items = chair_items(annotations, images, n, args.seed, args.prompt)
    records, _, info = run_generation(items, settings, "caption", "chair")
    if records is None:
        return 0
    from .chair import CaptionRecord

    captions = [CaptionRecord(r["image_id"], r["caption"] or " ", f"samples.jsonl:{k + 1}") for k, r in enumerate(records)]
    result = evaluate_chair(captions, annotations, args.variant)
    write_jsonl_atomic(settings.out / "per_caption.jsonl", result.per_caption)
    summary = {**result.summary, "variant": args.variant}
    total = info["generated_tokens_this_run"]
    config = {"task": "chair", "annotations": str(annotations), "images": str(images), "n": n, "prompt": args.prompt,
              **info, "versions": _versions(),
              "tokens_per_second_this_run": round(total / info["generation_seconds_this_run"], 2)
              if info["generation_seconds_this_run"] else None}
    rows = [f"{k:>9}: {v:.4f}" if isinstance(v, float) else f"{k:>9}: {v}" for k, v in summary.items()]
    _finish(settings.out, summary, config, "CHAIR\n" + "\n".join(rows))
    return 0


def pope_items(questions, images: Path, suffix: str) -> list[Item]:
    items = []
    for q in questions:
        items.append(Item(key=f"{q.split}:{q.question_id}", image_path=images / q.image, prompt=q.text + suffix,
                          record={"question_id": q.question_id, "split": q.split, "image": q.image, "question": q.text,
                                  "label": q.label}))
    return items


def _eval_pope(args: argparse.Namespace) -> int:
    from .pope import PopeQuestion, load_questions, score_pope

    splits = ["random", "popular", "adversarial"] if args.split == "all" else [args.split]
    world_default = args.model is None and args.questions is None and args.images is None
    questions: list[PopeQuestion] = []
    if args.questions:
        loaded = load_questions(args.questions)
        questions = [q for q in loaded if args.split == "all" or q.split == args.split] or loaded
        images = Path(args.images) if args.images else None
    elif world_default:
        from . import world

        for split in splits:
            questions += load_questions(world.val_pope_path(split), split)
        images = world.val_image_dir()
        if args.n is None:
            args.n = DEFAULT_WORLD_POPE_N
    else:
        from .paths import pope_coco_dir

        for split in splits:
            questions += load_questions(pope_coco_dir() / f"coco_pope_{split}.json", split)
        images = Path(args.images) if args.images else None
    if images is None:
        raise EvalInputError("--images DIR is required (the folder holding the questions' image files)")
    if args.n is not None:
        questions = questions[: args.n] if args.split != "all" else [
            q for s in splits for q in [x for x in questions if x.split == s][: args.n]]
    if any(q.label is None for q in questions):
        raise EvalInputError("POPE questions need labels ('label' in the question file)")
    settings = _settings(args)
    items = pope_items(questions, images, args.prompt_suffix)
    records, _, info = run_generation(items, settings, "answer", "pope")
    if records is None:
        return 0
    results: dict[str, Any] = {}
    for split in splits:
        members = [q for q in questions if q.split == split]
        split_answers = {r["question_id"]: r["answer"] for r in records if r["split"] == split}
        results.update(score_pope(members, split_answers, args.parser))
    seconds = info["generation_seconds_this_run"]
    config = {"task": "pope", "splits": splits, "parser": args.parser, "prompt_suffix": args.prompt_suffix,
              "questions": args.questions or ("offline world" if world_default else "official COCO POPE"),
              **info, "versions": _versions(),
              "questions_per_second_this_run": round(len(items) / seconds, 2) if seconds else None}
    header = f"{'split':<12}{'accuracy':>9}{'precision':>10}{'recall':>8}{'f1':>8}{'yes':>7}{'n':>6}"
    lines = [header] + [
        f"{s:<12}{m['accuracy']:>9.4f}{m['precision']:>10.4f}{m['recall']:>8.4f}{m['f1']:>8.4f}{m['yes_ratio']:>7.3f}{m['n']:>6}"
        for s, m in results.items()
    ]
    _finish(settings.out, results, config, "POPE\n" + "\n".join(lines))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model path or hub id (default: the shipped offline world model)")
    parser.add_argument("--method", action="append", metavar="NAME[:key=value,...]",
                        help="an attention method to patch in (repeat to compose), e.g. var:rho=0.5")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", help="float32, float16, bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels, so a rerun (or a run on more GPUs) gives the same answers bit "
                             "for bit; slower. Without it, GPU answers can differ between runs where logits nearly tie")
    parser.add_argument("--out", required=True, help="output directory; rerunning the same command resumes it")


def register(commands: argparse._SubParsersAction) -> None:
    chair = commands.add_parser("chair", help="generate captions and score CHAIR (batched, resumable)")
    _common(chair)
    chair.add_argument("--annotations", help="COCO annotations directory (instances_*.json, captions_*.json)")
    chair.add_argument("--images", help="directory of the annotation's image files")
    chair.add_argument("--n", type=int, help=f"number of images sampled with --seed (default 500; {DEFAULT_WORLD_CHAIR_N} on the offline world)")
    chair.add_argument("--max-new-tokens", type=int, default=512)
    chair.add_argument("--prompt", default=CHAIR_PROMPT)
    chair.add_argument("--variant", choices=["opera", "original"], default="opera")
    chair.set_defaults(func=_run(_eval_chair))

    pope = commands.add_parser("pope", help="answer POPE questions and score them (batched, resumable)")
    _common(pope)
    pope.add_argument("--split", choices=["random", "popular", "adversarial", "all"], default="all")
    pope.add_argument("--questions", help="question file (default: the official COCO files, or the offline world's)")
    pope.add_argument("--images", help="directory of the questions' image files")
    pope.add_argument("--annotations", help="COCO annotations directory (accepted for symmetry; labels come from the questions)")
    pope.add_argument("--n", type=int, help=f"only the first N questions of each split (offline world default: {DEFAULT_WORLD_POPE_N})")
    pope.add_argument("--max-new-tokens", type=int, default=16)
    pope.add_argument("--parser", choices=["official", "opera", "vcd"], default="official")
    pope.add_argument("--prompt-suffix", default=POPE_SUFFIX)
    pope.set_defaults(func=_run(_eval_pope))


def _run(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        from mmattn.cli import CLIError

        try:
            return command(args)
        except (EvalInputError, OSError) as error:
            raise CLIError(str(error).replace("\n", " ")) from None
        except ValueError as error:  # bad --method specs and options
            raise CLIError(str(error).replace("\n", " ")) from None

    return wrapped


__all__ = ["Item", "RunSettings", "run_generation", "register", "read_finished", "chair_items", "pope_items"]
