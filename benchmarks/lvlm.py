"""LVLM generation benchmark on a LLaVA-1.5-7B-shaped model with random weights (bf16, one GPU).

Measures, at batch 1 and 16, for the plain model (sdpa), the reference codes' attention mode (eager with
``output_attentions=True``: the cost floor of the reference implementations, their own method logic excluded),
mmattn with no method, and every LVLM method on mmattn's kernels:

- CHAIR-style captioning: generated tokens per second (``--caption-tokens`` new tokens per sample, forced);
- POPE-style answering: questions per second (``--answer-tokens`` new tokens per sample);
- peak GPU memory of each.

Prompts are LLaVA-1.5-shaped: BOS, a short system text, 576 image tokens, a short question. Writes JSON and a
markdown table (GPU, date).

    python benchmarks/lvlm.py --json benchmarks/results/lvlm_h200.json --markdown benchmarks/results/lvlm_h200.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch

import mmattn
from mmattn.testing import llava_7b, pad_left

METHODS = {
    "role_bias": lambda: mmattn.RoleBias(image=0.5),
    "var": lambda: mmattn.VAR(tau=2.5),  # random weights have no phi > 20 sinks: a low tau makes VAR act
    "gift": lambda: mmattn.GIFT(informative_tokens="all"),
    "vhr": lambda: mmattn.VHR(),
    "paint (cfg 1.1)": lambda: mmattn.PAINT(),
    "paint (no cfg)": lambda: mmattn.PAINT(cfg_gamma=1.0),
}


def inputs_for(model, batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        system = torch.randint(3, 31000, (6,), generator=g).tolist()
        question = torch.randint(3, 31000, (14 + b % 5,), generator=g).tolist()
        rows.append([1] + system + [32000] * 576 + question)
    ids, mask = pad_left(rows)
    pixels = torch.randn(batch, 3, 336, 336, generator=g).to(torch.bfloat16)
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "pixel_values": pixels.cuda()}


def timed_generate(model, inputs, new_tokens: int, repeats: int, **extra) -> tuple[float, float]:
    """(best seconds, peak GiB) of generate() with exactly ``new_tokens`` new tokens."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--caption-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, help="fewer decoder layers (smoke tests); default: 32 like 7B")
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args()

    model = llava_7b(args.layers)
    variants = ["sdpa (baseline)", "eager + output_attentions (reference mode)", "mmattn, no method", *METHODS]
    if args.only:
        variants = [v for v in variants if v in args.only.split(",")]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = inputs_for(model, batch)
        # One-time costs (cuBLAS heuristics, allocator growth, kernel caches) must not land on the first variant.
        timed_generate(model, inputs, args.caption_tokens, 1)
        for variant in variants:
            gc.collect()
            torch.cuda.empty_cache()
            extra = {}
            handle = None
            if variant.startswith("eager"):
                model.set_attn_implementation({"text_config": "eager"})
                extra = {"output_attentions": True, "return_dict_in_generate": True}
            elif variant.startswith("mmattn"):
                handle = mmattn.patch(model)
            elif variant in METHODS:
                handle = mmattn.patch(model, METHODS[variant]())
            try:
                timed_generate(model, inputs, 2, 1, **extra)  # warm-up: kernels compiled, caches allocated
                caption_s, caption_mem = timed_generate(model, inputs, args.caption_tokens, args.repeats, **extra)
                answer_s, answer_mem = timed_generate(model, inputs, args.answer_tokens, args.repeats, **extra)
                row = {
                    "variant": variant, "batch": batch,
                    "caption_tokens_per_s": batch * args.caption_tokens / caption_s,
                    "caption_peak_gib": caption_mem,
                    "questions_per_s": batch / answer_s,
                    "answer_peak_gib": answer_mem,
                }
            except torch.cuda.OutOfMemoryError:
                row = {"variant": variant, "batch": batch, "error": "out of memory"}
            finally:
                if handle is not None:
                    handle.remove()
                if variant.startswith("eager"):
                    model.set_attn_implementation({"text_config": "sdpa"})
            rows.append(row)
            print(json.dumps(row), flush=True)

    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    meta = {"gpu": gpu, "date": date, "torch": torch.__version__, "model": "LLaVA-1.5-7B-shaped, random weights, bf16",
            "caption_tokens": args.caption_tokens, "answer_tokens": args.answer_tokens, "prompt_tokens": "~597 (576 image)",
            "kernel": mmattn.kernels.selected_backend(torch.empty(1, device="cuda"))}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    base = {r["batch"]: r for r in rows if r["variant"] == "sdpa (baseline)" and "error" not in r}
    lines = [f"LLaVA-1.5-7B-shaped (random weights, bf16), {gpu}, {date}, torch {torch.__version__}; "
             f"captions: {args.caption_tokens} new tokens, POPE answers: {args.answer_tokens} new tokens; "
             f"ratios are against sdpa at the same batch.", "",
             "| variant | batch | caption tok/s | × sdpa | POPE q/s | × sdpa | peak GiB (caption) | × sdpa |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['error']} | | | | | |")
            continue
        b = base.get(r["batch"])
        ratio = (lambda k: f"{r[k] / b[k]:.2f}") if b else (lambda k: "-")
        lines.append(f"| {r['variant']} | {r['batch']} | {r['caption_tokens_per_s']:.1f} | {ratio('caption_tokens_per_s')} | "
                     f"{r['questions_per_s']:.2f} | {ratio('questions_per_s')} | {r['caption_peak_gib']:.2f} | "
                     f"{ratio('caption_peak_gib')} |")
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
