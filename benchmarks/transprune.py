"""TransPrune on a LLaVA-NeXT-7B-shaped model with random weights (bf16, one GPU): prefill time, peak memory and
decode tokens/s, unpruned (plain sdpa, and mmattn with no method) against TransPrune-High, at batch 1 and 8.

Images are 672x672 (a 2x2 anyres grid: 2,928 image tokens incl. newlines, as LLaVA-NeXT's prompts).

"+ CUDA graphs" rows replay layers 13-32 (after the last pruning layer) as CUDA graphs at prefill: TransPrune with
``cuda_graphs=True``, and, so that the baseline is treated the same, plain sdpa with the same layers graphed by
``mmattn.lvlm.graphs.PrefillLayerGraphs``. "first call" is the warm-up generate (2 tokens), which captures the graphs.

    python benchmarks/transprune.py --json benchmarks/results/transprune_h200.json --markdown benchmarks/results/transprune_h200.md
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
from mmattn.lvlm.graphs import PrefillLayerGraphs
from mmattn.testing import llava_next_7b, pad_left


def inputs_for(model, batch: int) -> dict:
    from mmattn.layout import NextImageGeometry

    geometry = NextImageGeometry.from_image_size(model.config, (672, 672))
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(batch):
        rows.append([1] + torch.randint(3, 31000, (6,), generator=g).tolist() + [32000] * geometry.num_tokens
                    + torch.randint(3, 31000, (14 + b % 4,), generator=g).tolist())
    ids, mask = pad_left(rows)
    pixels = torch.randn(batch, geometry.num_crops, 3, 336, 336, generator=g).to(torch.bfloat16)
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "pixel_values": pixels.cuda(),
            "image_sizes": torch.tensor([[672, 672]] * batch).cuda(), "image_tokens": geometry.num_tokens}


def measure(model, inputs, decode_tokens: int, repeats: int) -> dict:
    inputs = {k: v for k, v in inputs.items() if k != "image_tokens"}

    language_model = model.model.language_model
    llm_spans = []  # per run: GPU-timeline span of the language model's prefill forward, ms

    def run(new_tokens):
        # CUDA events around the language model's first forward: the span on the GPU's timeline from the end of
        # the vision work to the last prefill kernel, idle gaps included (no synchronisation added).
        events = []

        def before(module, args, kwargs):
            if not events:
                events.append(torch.cuda.Event(enable_timing=True))
                events[0].record()

        def after(module, args, kwargs, output):
            if len(events) == 1:
                events.append(torch.cuda.Event(enable_timing=True))
                events[1].record()

        hooks = [language_model.register_forward_pre_hook(before, with_kwargs=True),
                 language_model.register_forward_hook(after, with_kwargs=True)]
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()
        llm_spans.append(events[0].elapsed_time(events[1]) / 1000)
        return elapsed

    first = run(2)  # warm-up (captures CUDA graphs where used)
    torch.cuda.reset_peak_memory_stats()
    llm_spans.clear()
    prefill = min(run(1) for _ in range(repeats))
    llm_prefill = min(llm_spans)
    peak = torch.cuda.max_memory_allocated() / 2**30
    full = min(run(decode_tokens + 1) for _ in range(repeats))
    batch = inputs["input_ids"].shape[0]
    return {"prefill_s": prefill, "llm_prefill_s": llm_prefill, "first_call_s": first, "peak_gib": peak,
            "decode_tokens_per_s": batch * decode_tokens / max(full - prefill, 1e-9)}


def profile_prefill(model, path: Path) -> None:
    """Where a batch-1 TransPrune prefill spends host and device time, and which lines wait for the GPU."""
    import collections
    import warnings

    from torch.profiler import ProfilerActivity, profile

    import functools

    from mmattn.lvlm.methods import transprune as transprune_module

    def annotated(function, name):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return function(*args, **kwargs)

        return wrapper

    def annotate_module(module, name):
        handles = {}

        def enter(*_):
            handles["range"] = torch.ops.profiler._record_function_enter_new(name, None)

        def leave(*_):
            torch.ops.profiler._record_function_exit._RecordFunction(handles.pop("range"))

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    inputs = {k: v for k, v in inputs_for(model, 1).items() if k != "image_tokens"}
    report = []
    region_hooks = (annotate_module(model.model.vision_tower, "region: vision tower")
                    + annotate_module(model.model.language_model, "region: language model"))
    original_score = transprune_module.transition_score
    transprune_module.transition_score = annotated(original_score, "region: transprune TTV terms")
    for variant in ("sdpa (unpruned)", "TransPrune-High", "TransPrune-High + CUDA graphs"):
        handle = None
        if variant.startswith("TransPrune"):
            method = mmattn.TransPrune(cuda_graphs=variant.endswith("graphs"))
            method._scores = annotated(method._scores, "region: transprune IGA + scores")
            method._prune = annotated(method._prune, "region: transprune prune (incl. scores)")
            handle = mmattn.patch(model, method)
        try:
            with torch.no_grad():
                for _ in range(2):
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                torch.cuda.set_sync_debug_mode("default")
                sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                    torch.cuda.synchronize()
        finally:
            if handle is not None:
                handle.remove()
        report.append(f"===== {variant}: {sum(sites.values())} synchronising calls")
        report += [f"{count:5d}  {site}" for site, count in sites.most_common(40)]
        events = prof.key_averages()
        report.append("regions (CPU total ms / GPU ms as the profiler attributes it, calls); a second line per region "
                      "is its span on the GPU timeline:")
        report += [f"  {e.key}: {e.cpu_time_total / 1000:.2f} / {e.device_time_total / 1000:.2f} ({e.count})"
                   for e in events if e.key.startswith("region:")]
        report.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
        report.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    for hook in region_hooks:
        hook.remove()
    transprune_module.transition_score = original_score
    path.write_text("\n".join(report))
    print("\n".join(report[:200]))


VARIANTS = ("sdpa (unpruned)", "sdpa (unpruned) + CUDA graphs", "mmattn, no method (unpruned)", "TransPrune-High",
            "TransPrune-High + CUDA graphs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", required=True)
    parser.add_argument("--profile", metavar="FILE", help="instead: profile TransPrune's batch-1 prefill (torch "
                        "profiler table, and the source lines that synchronise with the GPU) into FILE")
    args = parser.parse_args()
    model = llava_next_7b(args.layers)
    if args.profile:
        profile_prefill(model, Path(args.profile))
        return
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = inputs_for(model, batch)
        with torch.no_grad():  # before any variant, so that the first one measured does not pay for a cold GPU
            for _ in range(3):
                model.generate(**{k: v for k, v in inputs.items() if k != "image_tokens"}, max_new_tokens=2,
                               do_sample=False)
        for variant in VARIANTS:
            gc.collect()
            torch.cuda.empty_cache()
            handle, undo = None, None
            if variant.startswith("mmattn"):
                handle = mmattn.patch(model)
            elif variant.startswith("TransPrune-High"):
                handle = mmattn.patch(model, mmattn.TransPrune(cuda_graphs=variant.endswith("CUDA graphs")))
            elif variant.endswith("CUDA graphs"):
                start = max(mmattn.TransPruneConfig().prune_layers)  # the layers TransPrune(cuda_graphs=True) graphs
                undo = PrefillLayerGraphs(model.model.language_model.layers, start).replay_at_prefill().remove
            try:
                row = {"variant": variant, "batch": batch, "image_tokens": inputs["image_tokens"],
                       **measure(model, inputs, args.decode_tokens, args.repeats)}
            except torch.cuda.OutOfMemoryError:
                row = {"variant": variant, "batch": batch, "error": "out of memory"}
            finally:
                if handle is not None:
                    handle.remove()
                if undo is not None:
                    undo()
            rows.append(row)
            print(json.dumps(row), flush=True)
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": {"gpu": gpu, "date": date, "torch": torch.__version__,
                                                    "model": "LLaVA-NeXT-7B-shaped, random weights, bf16"},
                                           "rows": rows}, indent=2))
    base = {r["batch"]: r for r in rows if r["variant"] == "sdpa (unpruned)" and "error" not in r}
    lines = [f"LLaVA-NeXT-7B-shaped (random weights, bf16), one 672x672 image per prompt, {gpu}, {date}. "
             f"TFLOPs (paper accounting, `mmattn.transprune_tflops`): {mmattn.transprune_tflops(2880, prune=False):.2f} "
             f"-> {mmattn.transprune_tflops(2880):.2f}.", "",
             "\"prefill\": `generate(max_new_tokens=1)` end to end (vision tower, projector, LLM prefill, first token), "
             "best of the repeats; \"LLM prefill\": the language model's prefill forward alone, its span on the GPU "
             "timeline (CUDA events at its start and end; idle gaps included).", "",
             "| variant | batch | prefill ms | speed-up vs sdpa | LLM prefill ms | LLM speed-up | first call ms | "
             "peak GiB | decode tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['error']} | | | | | | |")
            continue
        b = base.get(r["batch"])
        speed = f"{b['prefill_s'] / r['prefill_s']:.2f}x" if b else "-"
        llm_speed = f"{b['llm_prefill_s'] / r['llm_prefill_s']:.2f}x" if b else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {1000 * r['prefill_s']:.1f} | {speed} | "
                     f"{1000 * r['llm_prefill_s']:.1f} | {llm_speed} | "
                     f"{1000 * r['first_call_s']:.0f} | {r['peak_gib']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} |")
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
