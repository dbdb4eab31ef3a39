"""AttenCraft training-step cost on a Stable Diffusion 2.1-base-shaped model (random weights, one GPU).

UNet2DConditionModel with SD2.1-base's configuration (320/640/1280/1280 channels, heads 5/10/20/20, linear
projections, 1024-d cross-attention), an OpenCLIP-H-shaped text encoder (23 layers, 1024 wide) and the SD VAE, all
randomly initialised; 512x512 training, batch [instance, class] (prior preservation), Custom-Diffusion K/V copies of
all 16 cross-attention layers + two new tokens trainable, AdamW. Two configurations, each in a fresh model:

* ``custom_diffusion``: AttenCraft's extras off (no masks, no attention loss, full prompt every step), i.e. the
  stock Custom Diffusion step: every attention stays on SDPA;
* ``attencraft``: the released defaults: the 5 cross-attention layers at 16x16 run explicitly and keep their
  probabilities for the JSD loss, masked denoising loss, and every 20th step a mask refresh (Q/K of the 5
  self-attention layers at 32x32, S^4 propagation through mmattn.kernels, SSIM gate).

Reported per configuration: median step time of ordinary steps, mean time of refresh steps, the one-off
initialisation forward, and peak allocated memory of each kind of step; plus a micro-benchmark of the propagation
alone (kernel path in float32 and bfloat16 vs a dense float32 reference that materialises the 1024x1024 map). Random weights make the
masks meaningless (when the initial masks are degenerate a fixed left/right split stands in, recorded as such);
the cost is what is measured. Writes JSON and a markdown table.

    python benchmarks/attencraft.py --json benchmarks/results/attencraft_h200.json \\
        --markdown benchmarks/results/attencraft_h200.md
    python benchmarks/attencraft.py --tiny --device cpu --steps 4 --refresh-every 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from mmattn.diffusion.attencraft import AttenCraftConfig
from mmattn.diffusion.attencraft.capture import QKCapture
from mmattn.diffusion.attencraft.masks import AttenCraftError, minmax, propagate_through_self_attention
from mmattn.diffusion.attencraft.training import AttenCraftTrainer


def build_components(device: str, tiny: bool):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmattn.diffusion.testing import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(max_length=16 if tiny else 77)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    with torch.device(device):  # random init directly on the device: seconds instead of a minute of CPU init
        if tiny:
            unet = UNet2DConditionModel(
                sample_size=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1, cross_attention_dim=32,
                attention_head_dim=2, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            )
            text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                pad_token_id=0, bos_token_id=2, eos_token_id=3))
            vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                norm_num_groups=4, sample_size=32)
        else:
            # stabilityai/stable-diffusion-2-1-base unet/config.json
            unet = UNet2DConditionModel(
                sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            )
            # OpenCLIP ViT-H/14 text tower (SD2.x text_encoder/config.json), vocabulary of the stand-in tokenizer
            text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096,
                                                num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                                hidden_act="gelu", pad_token_id=0, bos_token_id=2, eos_token_id=3))
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                                sample_size=512)
    return tokenizer, text.eval(), vae.eval(), unet, scheduler


def two_blob_image(size: int):
    import numpy as np
    from PIL import Image

    array = np.full((size, size, 3), 110, np.uint8)
    q = size // 4
    array[q // 2: q // 2 + q, q // 2: q // 2 + q] = (220, 40, 40)
    array[-(q + q // 2): -(q // 2), -(q + q // 2): -(q // 2)] = (40, 60, 220)
    return Image.fromarray(array)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def run_configuration(name: str, config: AttenCraftConfig, args) -> dict:
    tokenizer, text, vae, unet, scheduler = build_components(args.device, args.tiny)
    image = two_blob_image(config.resolution)
    trainer = AttenCraftTrainer(
        tokenizer=tokenizer, text_encoder=text, vae=vae, unet=unet, noise_scheduler=scheduler, image=image,
        concepts=["cat", "dog"], config=config, class_images=[image.rotate(90)], mixed_precision=args.mixed_precision,
        device=args.device,
    )
    row: dict = {"configuration": name}
    if trainer.uses_masks:
        synchronize(args.device)
        reset_peak(args.device)
        start = time.perf_counter()
        try:
            trainer.initialize_masks()
            row["init_masks_valid"] = True
        except AttenCraftError:
            # random weights: the masks can be degenerate; a fixed split keeps the steps running (cost is the same)
            h, w = trainer.self_hw
            masks = torch.zeros(3, h, w, dtype=torch.bool)
            masks[0, :, : w // 2], masks[1, :, w // 2:] = True, True
            masks[2] = False
            trainer.masks = masks
            row["init_masks_valid"] = False
        synchronize(args.device)
        row["init_s"] = time.perf_counter() - start
        row["init_peak_gib"] = peak_gib(args.device)
    ordinary, refresh, ordinary_peak, refresh_peak = [], [], [], []
    for index in range(args.warmup + args.steps):
        synchronize(args.device)
        reset_peak(args.device)
        start = time.perf_counter()
        record = trainer.train_step()
        synchronize(args.device)
        elapsed = time.perf_counter() - start
        if index < args.warmup:
            continue
        (refresh if record.get("refresh") else ordinary).append(elapsed)
        (refresh_peak if record.get("refresh") else ordinary_peak).append(peak_gib(args.device))
    row.update({
        "steps": len(ordinary) + len(refresh),
        "step_s_median": statistics.median(ordinary) if ordinary else None,
        "step_s_mean": statistics.mean(ordinary) if ordinary else None,
        "refresh_steps": len(refresh),
        "refresh_step_s_mean": statistics.mean(refresh) if refresh else None,
        "step_peak_gib": max(ordinary_peak) if ordinary_peak and ordinary_peak[0] is not None else None,
        "refresh_peak_gib": max(refresh_peak) if refresh_peak and refresh_peak[0] is not None else None,
        "refreshes_accepted": sum(1 for r in trainer.history if r.get("accepted")),
    })
    trainer.close()
    del trainer, tokenizer, text, vae, unet
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def propagation_benchmark(args) -> dict:
    """S^4 y for 5 layers x 10 heads x 1024 pixels x 64-d (SD2.1-base at 512²), 3 maps: the kernel path (float32 and
    bfloat16 attention calls) vs a dense float32 reference that materialises S; accuracy against dense float64.

    Q and K are drawn with logits of standard deviation ~4 so that S is peaked like a trained model's; with unit
    logits S is near-uniform and S^4 y falls below float32 resolution for any implementation (see masks.py)."""
    layers, heads, pixels, dim = (3, 2, 64, 8) if args.tiny else (5, 10, 1024, 64)
    generator = torch.Generator().manual_seed(0)
    qk = [QKCapture(2 * torch.randn(1, heads, pixels, dim, generator=generator).to(args.device),
                    2 * torch.randn(1, heads, pixels, dim, generator=generator).to(args.device), dim ** -0.5)
          for _ in range(layers)]
    y = torch.rand(pixels, 3, generator=generator).to(args.device)

    def dense(dtype):
        s = torch.stack([torch.softmax(c.query[0].to(dtype) @ c.key[0].to(dtype).transpose(-1, -2) * c.scale, -1)
                         for c in qk]).mean((0, 1))
        p = minmax(torch.linalg.matrix_power(minmax(s), 4))
        return minmax(p @ y.to(dtype), dim=0)

    exact = dense(torch.float64)
    variants = {
        "kernel_fp32": lambda: propagate_through_self_attention(qk, y, power=4),
        "kernel_bf16": lambda: propagate_through_self_attention(qk, y, power=4, dtype=torch.bfloat16),
        "dense_fp32": lambda: dense(torch.float32),
    }
    out: dict = {"shape": {"layers": layers, "heads": heads, "pixels": pixels, "head_dim": dim, "maps": 3}}
    for label, fn in variants.items():
        fn()
        synchronize(args.device)
        reset_peak(args.device)
        base = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            synchronize(args.device)
            times.append(time.perf_counter() - start)
        peak = peak_gib(args.device)
        out[label] = {
            "ms": 1000 * statistics.median(times),
            "extra_peak_mib": None if peak is None else (peak * 2**30 - base) / 2**20,
            "max_abs_err_vs_fp64": float((result.double() - exact).abs().max()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per configuration (2 refreshes at 40)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="propagation micro-benchmark repetitions")
    parser.add_argument("--refresh-every", type=int, default=20, help="mask refresh period (spec default 20)")
    parser.add_argument("--tiny", action="store_true", help="toy model (smoke run of the script on a CPU)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or use --tiny --device cpu for a smoke run")

    resolution = 32 if args.tiny else 512
    common = dict(resolution=resolution, max_steps=10**9, checkpoint_every=0, seed=0, refresh_every=args.refresh_every)
    configurations = {
        "custom_diffusion": AttenCraftConfig(masked_loss=False, attention_loss_weight=0.0, concept_sampling="full",
                                             **common),
        "attencraft": AttenCraftConfig(**common),
    }
    rows = []
    for name, config in configurations.items():
        row = run_configuration(name, config, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    propagation = propagation_benchmark(args)
    print(json.dumps({"propagation": propagation}), flush=True)

    import diffusers
    import transformers

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "shape": "tiny" if args.tiny else "SD2.1-base (random weights)", "resolution": resolution,
        "mixed_precision": args.mixed_precision, "steps": args.steps, "warmup": args.warmup,
        "batch": "instance + class (prior preservation)",
    }
    result = {"meta": meta, "rows": rows, "propagation": propagation}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(result))


def markdown(r: dict) -> str:
    def fmt(x, scale=1.0, digits=3):
        return "-" if x is None else f"{x * scale:.{digits}f}"

    m = r["meta"]
    lines = [
        f"AttenCraft training step, {m['shape']}, {m['resolution']}², {m['mixed_precision']}, {m['batch']}, "
        f"{m['device']}, {m['date']} (torch {m['torch']}, diffusers {m['diffusers']})",
        "",
        "| configuration | step ms (median) | refresh step ms | init ms | step peak GiB | refresh peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['configuration']} | {fmt(row['step_s_median'], 1000, 1)} | "
            f"{fmt(row.get('refresh_step_s_mean'), 1000, 1)} | {fmt(row.get('init_s'), 1000, 1)} | "
            f"{fmt(row['step_peak_gib'], 1, 2)} | {fmt(row.get('refresh_peak_gib'), 1, 2)} |"
        )
    base = next((x for x in r["rows"] if x["configuration"] == "custom_diffusion"), None)
    treated = next((x for x in r["rows"] if x["configuration"] == "attencraft"), None)
    if base and treated and base["step_s_median"] and treated["step_s_median"]:
        lines += ["", f"Ordinary-step overhead of AttenCraft: "
                      f"{100 * (treated['step_s_median'] / base['step_s_median'] - 1):+.1f} %"]
    p = r["propagation"]
    shape = p["shape"]
    lines += [
        "",
        f"Propagation S⁴·y alone ({shape['layers']} layers x {shape['heads']} heads x {shape['pixels']} pixels, "
        f"head dim {shape['head_dim']}, 3 maps):",
        "",
        "| path | ms (median) | extra peak MiB | max abs err vs float64 |",
        "|---|---|---|---|",
    ]
    for label in ("kernel_fp32", "kernel_bf16", "dense_fp32"):
        v = p[label]
        lines.append(f"| {label} | {fmt(v['ms'], 1, 2)} | {fmt(v['extra_peak_mib'], 1, 1)} | "
                     f"{v['max_abs_err_vs_fp64']:.2e} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
