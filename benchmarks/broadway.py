"""BroadWay overhead on an AnimateDiff pipeline of SD1.5 shape (random weights, fp16, one GPU).

UNet2DConditionModel with SD1.5's configuration + a MotionAdapter of v1-5-2's shape (8 motion heads, motion mid
block), random CLIP-L-shaped text encoder and SD VAE (unused: ``output_type="latent"``), DDIM 25 steps, CFG 7.5,
16 frames at 512x512. Measures, in the same process and interleaved (V B, B V, ...), the sampling time of the
denoising call without and with BroadWay (AnimateDiff preset: tau 7, alpha 0.6, beta 1.5, first 20 % of steps),
the per-step time on active and inactive steps (synchronised step callbacks, separate runs), and peak memory.
Writes JSON and a markdown table.

    python benchmarks/broadway.py --json benchmarks/results/broadway_h200.json \
        --markdown benchmarks/results/broadway_h200.md
    python benchmarks/broadway.py --tiny   # CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from mmattn.diffusion.broadway import BroadWayConfig, broadway


def build_pipeline(device: str, dtype: torch.dtype, tiny: bool):
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmattn.diffusion.testing import tiny_animatediff_pipeline, tiny_tokenizer

    if tiny:
        return tiny_animatediff_pipeline().to(device)
    tokenizer = tiny_tokenizer(max_length=77)
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the GPU: seconds instead of a minute of CPU init
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        adapter = MotionAdapter(motion_num_attention_heads=8, motion_max_seq_length=32, use_motion_mid_block=True)
        for name, parameter in adapter.named_parameters():
            if "proj_out" in name:  # zero-initialised in the adapter; random so the temporal layers act
                torch.nn.init.normal_(parameter, std=0.02)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            pad_token_id=0, bos_token_id=2, eos_token_id=3))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                                  steps_offset=1, timestep_spacing="linspace")
        pipe = AnimateDiffPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   motion_adapter=adapter, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sample(pipe, args, steps: int, step_times: list[float] | None = None):
    """(seconds, latents) of one denoising call; ``step_times`` collects synchronised per-step times."""
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    synchronize(args.device)
    start = time.perf_counter()
    out = pipe(args.prompt, num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=steps,
               guidance_scale=args.guidance, output_type="latent", generator=generator,
               callback_on_step_end=_stamp(step_times, args.device, start) if step_times is not None else None)
    synchronize(args.device)
    return time.perf_counter() - start, out.frames


def _stamp(step_times: list[float], device: str, start: float):
    last = [start]

    def on_step_end(_pipe, _step, _t, kwargs):
        synchronize(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return kwargs

    return on_step_end


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a red car driving on a street at sunset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny random pipeline (CPU smoke run of the script)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.tiny:
        args.frames, args.size, args.steps, args.repeats = 16, 16, 5, 1
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    config = BroadWayConfig.animatediff()

    started = time.perf_counter()
    pipe = build_pipeline(args.device, dtype, args.tiny)
    build_s = time.perf_counter() - started
    print(f"built in {build_s:.1f}s", flush=True)

    def treated():
        return broadway(pipe, config)

    # Warm-up: both paths, with at least one active BroadWay step (int(0.2 * 5) = 1).
    sample(pipe, args, 5)
    with treated():
        sample(pipe, args, 5)

    times: dict[str, list[float]] = {"vanilla": [], "broadway": []}
    peaks: dict[str, float | None] = {}
    latents = {}
    for repeat in range(args.repeats):
        order = ("vanilla", "broadway") if repeat % 2 == 0 else ("broadway", "vanilla")
        for variant in order:
            reset_peak(args.device)
            if variant == "broadway":
                with treated() as handle:
                    seconds, latents[variant] = sample(pipe, args, args.steps)
                active = handle.state.active_calls
            else:
                seconds, latents[variant] = sample(pipe, args, args.steps)
            times[variant].append(seconds)
            peaks[variant] = max(peaks.get(variant) or 0.0, peak_gib(args.device) or 0.0) or None
            print(f"{variant}: {seconds:.3f}s", flush=True)

    steps: dict[str, list[float]] = {"vanilla": [], "broadway": []}
    sample(pipe, args, args.steps, steps["vanilla"])
    with treated():
        sample(pipe, args, args.steps, steps["broadway"])
    window = int(config.stop * args.steps)

    def mean(values):
        return statistics.fmean(values) if values else None

    median = {k: statistics.median(v) for k, v in times.items()}
    vanilla_latents, broadway_latents = latents["vanilla"].float(), latents["broadway"].float()
    result = {
        "benchmark": "broadway",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "setup": {
            "model": "tiny AnimateDiff (smoke)" if args.tiny else
            "AnimateDiff: SD1.5-shaped UNet + MotionAdapter v1-5-2 shape, random weights",
            "dtype": str(dtype).removeprefix("torch."), "frames": args.frames, "size": args.size,
            "steps": args.steps, "guidance": args.guidance, "scheduler": "DDIM", "repeats": args.repeats,
            "broadway": config.to_dict(), "active_steps": active, "build_s": build_s,
        },
        "vanilla_s": times["vanilla"],
        "broadway_s": times["broadway"],
        "median_s": median,
        "min_s": {k: min(v) for k, v in times.items()},
        "overhead_pct_median": 100 * (median["broadway"] / median["vanilla"] - 1),
        "overhead_pct_min": 100 * (min(times["broadway"]) / min(times["vanilla"]) - 1),
        "step_s": {
            "vanilla_first_window": mean(steps["vanilla"][:window]),
            "broadway_active": mean(steps["broadway"][:window]),
            "vanilla_rest": mean(steps["vanilla"][window:]),
            "broadway_inactive": mean(steps["broadway"][window:]),
        },
        "peak_gib": peaks,
        "latents_finite": bool(torch.isfinite(vanilla_latents).all() and torch.isfinite(broadway_latents).all()),
        "latents_mean_abs_diff": float((broadway_latents - vanilla_latents).abs().mean()),
    }
    step = result["step_s"]
    if step["vanilla_first_window"] and step["broadway_active"]:
        result["active_step_overhead_pct"] = 100 * (step["broadway_active"] / step["vanilla_first_window"] - 1)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(result))


def markdown(r: dict) -> str:
    s = r["setup"]
    peak = r["peak_gib"]

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"{r['device']}, torch {r['torch']}, diffusers {r['diffusers']}, {r['date']}: {s['model']}, {s['dtype']}, "
        f"{s['frames']} frames x {s['size']}², {s['steps']} DDIM steps, CFG {s['guidance']}; BroadWay AnimateDiff "
        f"preset (active on {s['active_steps']} of {s['steps']} steps); median of {s['repeats']} interleaved runs.",
        "",
        "| variant | median s | min s | peak GiB | active-step s | inactive-step s |",
        "|---|---|---|---|---|---|",
        f"| vanilla | {r['median_s']['vanilla']:.3f} | {r['min_s']['vanilla']:.3f} | {fmt(peak.get('vanilla'))} | "
        f"{fmt(r['step_s']['vanilla_first_window'])} | {fmt(r['step_s']['vanilla_rest'])} |",
        f"| BroadWay | {r['median_s']['broadway']:.3f} | {r['min_s']['broadway']:.3f} | "
        f"{fmt(peak.get('broadway'))} | {fmt(r['step_s']['broadway_active'])} | "
        f"{fmt(r['step_s']['broadway_inactive'])} |",
        "",
        f"Overhead: {r['overhead_pct_median']:+.2f} % (median), {r['overhead_pct_min']:+.2f} % (min); "
        f"on the active steps alone {r.get('active_step_overhead_pct', float('nan')):+.1f} %.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
