"""Generate the evaluation prompts with and without BroadWay and score them with the world statistic.

    python -m mmattn.diffusion.world.evaluate --pipeline mmattn/diffusion/world/pipeline --seeds 0 1 2 3 \\
        --out runs/video_world.json [--markdown runs/video_world.md] [--grid runs/video_world.png]
    python -m mmattn.diffusion.world.evaluate --merge runs/seeds_0-3.json runs/seeds_4-11.json --out runs/all.json

For every prompt of :data:`EVAL_PROMPTS` (or ``--prompt``) and seed, the pipeline renders one clip vanilla and one
with BroadWay (same seed; ``--preset`` animatediff by default: tau 7, alpha 0.6, beta 1.5 in the first 20 % of the
steps, on the temporal attention of ``up_blocks.1/2/3``, all of which the tiny ``UNetMotionModel`` has; anything
missing makes :func:`apply_broadway` raise). One clip per call, so BroadWay's batch-wide ``beta*`` sees one video,
as in the reference. Each clip gets :func:`statistics.clip_statistics`; so do the world's own clips of the same
prompts (``reference``: what the training data scores) and their first frames held still (``static``: the zero
line of the motion measures). The JSON holds per-clip values and means; the markdown a table of the means. Both
are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch

from . import EVAL_PROMPTS, generate as gen, load_pipeline
from .statistics import CONSISTENCY_KEYS, MOTION_KEYS, PROMPT_KEYS, clip_statistics, mean_statistics, static_clip

__all__ = ["evaluate", "markdown_table", "main", "REFERENCE_SEED"]

REFERENCE_SEED = 12345  # seed of the world clips the generated ones are compared with (not the training seed 0)
TABLE_KEYS = (*PROMPT_KEYS, *MOTION_KEYS, *CONSISTENCY_KEYS)


def evaluate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, broadway_config=None, num_frames: int = 16,
             steps: int = 25, guidance: float = 7.5, log=None) -> dict[str, Any]:
    """Per-clip statistics and means for vanilla, BroadWay, the world's reference clips and still clips."""
    from mmattn.diffusion.broadway import BroadWayConfig, broadway

    config = broadway_config or BroadWayConfig.animatediff()
    device = getattr(pipe, "_execution_device", None) or pipe.device
    records: dict[str, list[dict[str, Any]]] = {"vanilla": [], "broadway": [], "reference": [], "static": []}
    clips: dict[tuple[str, int, str], torch.Tensor] = {}
    seconds = {"vanilla": 0.0, "broadway": 0.0}
    for p_index, prompt in enumerate(prompts):
        for seed in seeds:
            for variant in ("vanilla", "broadway"):
                generator = torch.Generator(device=torch.device(device).type).manual_seed(int(seed))
                start = time.perf_counter()
                with broadway(pipe, config) if variant == "broadway" else contextlib.nullcontext():
                    frames = pipe(prompt=prompt, num_frames=num_frames, num_inference_steps=steps,
                                  guidance_scale=guidance, generator=generator, output_type="pt").frames[0]
                seconds[variant] += time.perf_counter() - start
                frames = frames.float().cpu()
                clips[(prompt, int(seed), variant)] = frames
                records[variant].append({"prompt": prompt, "seed": int(seed), **clip_statistics(frames, prompt)})
            if log:
                log(f"{prompt!r} seed {seed}: vanilla {_short(records['vanilla'][-1])} | "
                    f"broadway {_short(records['broadway'][-1])}")
    records.update(reference_records(prompts, seeds, num_frames))
    return {
        "prompts": list(prompts), "seeds": [int(s) for s in seeds],
        "generation": {"num_frames": num_frames, "num_inference_steps": steps, "guidance_scale": guidance,
                       "height": int(next(iter(clips.values())).shape[-2]), "width": int(next(iter(clips.values())).shape[-1])},
        "broadway": config.to_dict(), "seconds": seconds, **summarise(records), "per_clip": records, "_clips": clips,
    }


def reference_records(prompts: Sequence[str], seeds: Sequence[int], num_frames: int) -> dict[str, list[dict[str, Any]]]:
    """Statistics of the world's own clip of each prompt and seed (``reference``) and of that clip held still
    (``static``). A clip depends on its prompt and seed alone, so evaluations over separate seed lists merge into
    exactly the evaluation over their union."""
    records: dict[str, list[dict[str, Any]]] = {"reference": [], "static": []}
    for p_index, prompt in enumerate(prompts):
        for seed in seeds:
            reference = gen.clip_for_prompt(prompt, REFERENCE_SEED, p_index * 1000 + int(seed)).frames[:num_frames]
            records["reference"].append({"prompt": prompt, "seed": int(seed), **clip_statistics(reference, prompt)})
            records["static"].append({"prompt": prompt, "seed": int(seed),
                                      **clip_statistics(static_clip(reference), prompt)})
    return records


def summarise(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Means per variant, and BroadWay minus vanilla paired by prompt and seed with its standard error (over the
    clips where both define the statistic)."""
    means = {variant: mean_statistics([{k: r[k] for k in TABLE_KEYS} for r in rows])
             for variant, rows in records.items()}
    difference, sem = {}, {}
    for key in TABLE_KEYS:
        pairs = [b[key] - v[key] for v, b in zip(records["vanilla"], records["broadway"])
                 if v.get(key) is not None and b.get(key) is not None]
        difference[key] = float(np.mean(pairs)) if pairs else None
        sem[key] = float(np.std(pairs, ddof=1) / np.sqrt(len(pairs))) if len(pairs) > 1 else None
    return {"means": means, "broadway_minus_vanilla": difference, "broadway_minus_vanilla_sem": sem}


MERGE_MUST_MATCH = ("prompts", "generation", "broadway", "pipeline", "device", "dtype")


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One evaluation from several over disjoint seeds with the same settings (e.g. run on different days)."""
    first = results[0]
    for other in results[1:]:
        for key in MERGE_MUST_MATCH:
            if other.get(key) != first.get(key):
                raise ValueError(f"cannot merge evaluations with different {key!r}: {first.get(key)!r} vs "
                                 f"{other.get(key)!r}")
    seeds = [s for r in results for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cannot merge evaluations that share seeds: {sorted(seeds)}")
    order = {prompt: i for i, prompt in enumerate(first["prompts"])}
    key = lambda record: (order[record["prompt"]], record["seed"])  # noqa: E731 (evaluate's own order)
    records = {variant: sorted((rec for r in results for rec in r["per_clip"][variant]), key=key)
               for variant in ("vanilla", "broadway")}
    records.update(reference_records(first["prompts"], sorted(seeds), first["generation"]["num_frames"]))
    seconds = {v: sum(r["seconds"][v] for r in results) for v in ("vanilla", "broadway")}
    return {**{k: first[k] for k in MERGE_MUST_MATCH}, "seeds": sorted(seeds), "seconds": seconds,
            **summarise(records), "per_clip": records}


def _short(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k} {stats[k]:.3f}" for k in ("colour_presence", "centroid_speed", "mask_change",
                                                       "area_consistency") if stats.get(k) is not None)


def markdown_table(result: dict[str, Any]) -> str:
    """The means as a markdown table (one row per variant), with the settings above it."""
    gen_cfg = result["generation"]
    bw = result["broadway"]
    lines = [
        f"Prompts: {len(result['prompts'])} ({', '.join(result['prompts'])}); seeds {result['seeds']}; "
        f"{gen_cfg['num_frames']} frames {gen_cfg['height']}x{gen_cfg['width']}, {gen_cfg['num_inference_steps']} "
        f"DDIM steps, guidance {gen_cfg['guidance_scale']}; BroadWay tau {bw['tau']}, alpha {bw['alpha']}, "
        f"beta {bw['beta']}, steps {bw['start']}-{bw['stop']}.",
        "",
        "| variant | " + " | ".join(TABLE_KEYS) + " |",
        "|---|" + "---|" * len(TABLE_KEYS),
    ]
    rows = [("vanilla", result["means"]["vanilla"]), ("BroadWay", result["means"]["broadway"]),
            ("BroadWay - vanilla", result["broadway_minus_vanilla"]),
            ("world clips (reference)", result["means"]["reference"]), ("still clips", result["means"]["static"])]
    sem = result.get("broadway_minus_vanilla_sem", {})
    for name, values in rows:
        cells = ["—" if values.get(k) is None else f"{values[k]:.4f}" if "-" not in name
                 else f"{values[k]:+.4f} ± {sem[k]:.4f}" if sem.get(k) is not None else f"{values[k]:+.4f}"
                 for k in TABLE_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mmattn.diffusion.options import add_broadway_arguments, broadway_config_from_arguments
    from mmattn.eval.io import write_json_atomic, write_text_atomic

    p = argparse.ArgumentParser(description="The video world's pipeline with and without BroadWay, scored with "
                                "the weight-free colour / motion / consistency statistic.")
    p.add_argument("--pipeline", default=None, help="pipeline folder (default: the shipped one)")
    p.add_argument("--prompt", action="append", default=[], help="a world prompt (repeatable; default: EVAL_PROMPTS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--markdown", help="markdown table (default: --out with .md)")
    p.add_argument("--grid", help="PNG: vanilla and BroadWay frames of the first seed of every prompt")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    add_broadway_arguments(p)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="instead of generating: merge evaluations (this "
                   "command's JSON files) over disjoint seeds with the same settings into --out")
    a = p.parse_args(argv)
    markdown = a.markdown or (a.out[:-5] if a.out.endswith(".json") else a.out) + ".md"
    if a.merge:
        parts = []
        for path in a.merge:
            try:
                with open(path) as f:
                    parts.append(json.load(f))
            except (OSError, json.JSONDecodeError) as error:
                p.error(f"cannot read evaluation {path}: {error}")
        try:
            result = merge(parts)
        except (KeyError, TypeError) as error:
            p.error(f"not an evaluation written by this command (missing {error})")
        except ValueError as error:
            p.error(str(error))
        write_json_atomic(a.out, result)
        write_text_atomic(markdown, markdown_table(result))
        print(markdown_table(result))
        return 0
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for prompt in a.prompt:
        gen.parse_prompt(prompt)  # fail before loading anything
    pipe = load_pipeline(device=device, dtype=getattr(torch, a.dtype), path=a.pipeline)
    result = evaluate(pipe, a.prompt or EVAL_PROMPTS, a.seeds, broadway_config=broadway_config_from_arguments(a),
                      num_frames=a.frames, steps=a.steps, guidance=a.guidance,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    clips = result.pop("_clips")
    result["pipeline"] = str(a.pipeline or "shipped")
    result["device"], result["dtype"] = device, a.dtype
    write_json_atomic(a.out, result)
    write_text_atomic(markdown, markdown_table(result))
    if a.grid:
        from mmattn.eval.video import save_grid

        _save_grids(clips, result, a.grid, save_grid)
    print(json.dumps({"means": result["means"], "broadway_minus_vanilla": result["broadway_minus_vanilla"]}))
    return 0


def _save_grids(clips, result, path: str, save_grid) -> None:
    """One PNG: for every prompt, a vanilla and a BroadWay row (first seed)."""
    seed = result["seeds"][0]
    rows = {}
    for i, prompt in enumerate(result["prompts"]):
        rows[f"{i} vanilla"] = clips[(prompt, seed, "vanilla")]
        rows[f"{i} BroadWay"] = clips[(prompt, seed, "broadway")]
    save_grid(rows, path, columns=result["generation"]["num_frames"])


if __name__ == "__main__":
    sys.exit(main())
