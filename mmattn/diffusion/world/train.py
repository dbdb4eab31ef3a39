"""Train the video world's tiny ``AnimateDiffPipeline`` from scratch (seeded) and save it with ``save_pretrained``.

    python -m mmattn.diffusion.world.train --out mmattn/diffusion/world/pipeline --seed 0 --device cuda \\
        --workers 8 --unet-minutes 4 --max-minutes 6.5                                    # one H200: ~6 minutes
    python -m mmattn.diffusion.world.train --out /tmp/p --device cpu --clips 64 --vae-steps 20 --unet-steps 20  # smoke

Three phases, all on one pool of clips generated up front (``--clips`` clips of :mod:`.generate`, ``--data-seed``):

1. the ``AutoencoderKL`` on single frames (L1 + MSE reconstruction, a tiny KL term), then its ``scaling_factor``
   set to ``1 / std`` of the pool's latents (what SD's 0.18215 is for SD's VAE);
2. the pool encoded once to latents (posterior means), kept on the device;
3. the ``UNetMotionModel`` (2D UNet and motion modules together, from scratch: there is no image model to start
   from) and the ``CLIPTextModel``, epsilon prediction on DDIM's training schedule, min-SNR-5 loss weights (faster
   convergence for small budgets), 10 % empty prompts for classifier-free guidance, an EMA of the weights (saved).

``--unet-steps auto`` times the first steps and fixes the step count so the UNet phase takes ``--unet-minutes``;
the count is written to ``training_info.json``, and passing it back as ``--unet-steps N`` reproduces the run on
the same kind of device. ``--max-minutes`` is a safety stop for the whole run that still saves what it has.
bfloat16 autocast on CUDA; everything seeded, ``torch.use_deterministic_algorithms(True, warn_only=True)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import generate as gen
from ...eval.io import directory_replaced_on_success, write_json_atomic
from .model import WorldModelConfig, assemble_pipeline, build_all, build_scheduler, count_parameters

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline")
EMPTY_PROMPT_RATE = 0.1
MIN_SNR_GAMMA = 5.0
WARMUP_STEPS = 100
# --unet-steps auto times steps CALIBRATION_START..CALIBRATION_END: the first steps carry one-off costs (kernel
# selection, allocator growth) that made an earlier run finish in 70 % of the minutes it was given.
CALIBRATION_START = 10
CALIBRATION_END = 50


def make_pool(seed: int, num: int, workers: int = 1, chunk: int = 256) -> tuple[np.ndarray, list[str]]:
    """uint8 clips ``[num, F, H, W, 3]`` and their prompts: clips ``0 .. num - 1`` of the world (order-free)."""
    jobs = [(seed, start, min(chunk, num - start)) for start in range(0, num, chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # fork: the pool is made before anything touches CUDA, and forked workers skip re-importing the package
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with context.Pool(min(workers, len(jobs))) as pool:
            parts = pool.starmap(gen.generate_clips, jobs)
    else:
        parts = [gen.generate_clips(*job) for job in jobs]
    return np.concatenate([p[0] for p in parts]), [prompt for p in parts for prompt in p[1]]


class Clock:
    """Wall time since start, and the ``--max-minutes`` safety stop."""

    def __init__(self, max_minutes: float | None) -> None:
        self.start = time.time()
        self.max_minutes = max_minutes

    def elapsed(self) -> float:
        return time.time() - self.start

    def out_of_time(self) -> bool:
        return bool(self.max_minutes) and self.elapsed() > 60 * self.max_minutes


def _to_unit(pixels_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]`` in [-1, 1] (the VAE's range)."""
    return pixels_u8.movedim(-1, -3).float().div(127.5).sub(1.0)


def train_vae(vae, frames_u8: torch.Tensor, *, steps: int, batch: int, lr: float, device: str, amp: bool,
              generator: torch.Generator, clock: Clock, log_every: int) -> dict:
    """Reconstruction training on random single frames of ``frames_u8`` (``[N, H, W, 3]`` on ``device``)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    done, last = 0, None
    for step in range(steps):
        if clock.out_of_time():
            break
        index = torch.randint(0, frames_u8.shape[0], (batch,), generator=generator, device=device)
        x = _to_unit(frames_u8[index])
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=None)
            recon = vae.decode(z).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        done += 1
        if done % log_every == 0 or done == steps:
            last = loss.item()
            print(f"vae step {done}/{steps} loss {last:.4f} {clock.elapsed():.0f}s", flush=True)
    vae.eval()
    return {"vae_steps": done, "vae_final_loss": last}


@torch.no_grad()
def encode_pool(vae, clips_u8: torch.Tensor, device: str, amp: bool, batch: int = 512) -> torch.Tensor:
    """Posterior means of every frame, ``[N, C, F, h, w]`` float32 on ``device`` (the UNet's layout), unscaled."""
    n, frames = clips_u8.shape[:2]
    flat = clips_u8.reshape(n * frames, *clips_u8.shape[2:])
    outs = []
    for start in range(0, flat.shape[0], batch):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            outs.append(vae.encode(_to_unit(flat[start:start + batch].to(device))).latent_dist.mean.float())
    latents = torch.cat(outs)
    return latents.reshape(n, frames, *latents.shape[1:]).transpose(1, 2).contiguous()


class EMA:
    """Exponential moving average of parameters, with the usual warm-up ``min(decay, (1 + s) / (10 + s))``."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def train(out: str, seed: int = 0, device: str = "cpu", *, data_seed: int = 0, clips: int = 8192, workers: int = 1,
          model_config: WorldModelConfig | None = None, vae_steps: int = 1500, vae_batch: int = 256,
          vae_lr: float = 1e-3, unet_steps: int | str = "auto", unet_minutes: float = 4.0, batch: int = 32,
          lr: float = 5e-4, ema_decay: float = 0.999, max_minutes: float | None = None, amp: bool | None = None,
          log_every: int = 50, init_from: str | None = None) -> dict:
    previous = None
    if init_from is not None:
        # Continue a saved pipeline: its VAE (and latent scale) stay fixed, UNet and text encoder train on.
        with open(os.path.join(init_from, "training_info.json")) as f:
            previous = json.load(f)
        model_config = WorldModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in previous["model"].items()})
    config = model_config or WorldModelConfig()
    if not 1 <= config.frames <= gen.FRAMES:
        raise ValueError(f"training clips have {gen.FRAMES} frames; frames must lie in 1..{gen.FRAMES}, got {config.frames}")
    amp = device.startswith("cuda") if amp is None else amp
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    clock = Clock(max_minutes)

    pool_u8, prompts = make_pool(data_seed, clips, workers)
    pool_u8 = pool_u8[:, :config.frames]
    t_data = clock.elapsed()
    print(f"data: {len(prompts)} clips of {pool_u8.shape[1]} frames, {len(set(prompts))} prompts, "
          f"{t_data:.1f}s", flush=True)

    torch.manual_seed(seed)
    if init_from is None:
        vae, text_encoder, tokenizer, unet = build_all(config)
    else:
        vae, text_encoder, tokenizer, unet = load_parts(init_from)
    vae.to(device)
    text_encoder.to(device)
    unet.to(device)
    parameters = {"vae": count_parameters(vae), "text_encoder": count_parameters(text_encoder),
                  "unet": count_parameters(unet)}
    print(f"parameters: {json.dumps(parameters)}", flush=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    pool = torch.from_numpy(pool_u8).to(device)

    # 1. the VAE, on single frames
    if init_from is None:
        vae_info = train_vae(vae, pool.reshape(-1, *pool.shape[2:]), steps=vae_steps, batch=vae_batch, lr=vae_lr,
                             device=device, amp=amp, generator=generator, clock=clock, log_every=log_every)
    else:
        vae_info = {"vae_steps": 0, "vae_final_loss": None}
    vae.requires_grad_(False)
    t_vae = clock.elapsed()

    # 2. the pool's latents, and the scaling factor that gives them unit variance
    latents = encode_pool(vae, pool, device, amp)
    del pool
    if init_from is None:
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
    else:
        scaling = float(vae.config.scaling_factor)  # the UNet learned latents at this scale
    latents = latents.mul_(scaling)
    print(f"latents {tuple(latents.shape)}, scaling_factor {scaling:.4f}, {clock.elapsed():.0f}s", flush=True)

    # 3. UNet + text encoder
    distinct = sorted(set(prompts))
    token = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,  # noqa: E731
                                    truncation=True, return_tensors="pt").input_ids
    prompt_ids = token(distinct).to(device)
    empty_ids = token([""]).to(device)
    clip_prompt = torch.tensor([distinct.index(p) for p in prompts], device=device)
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    weights_by_t = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # min-SNR-gamma for epsilon prediction

    trained = [unet, text_encoder]
    params = [p for m in trained for p in m.parameters()]
    decay_params = [p for p in params if p.ndim >= 2]
    other_params = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 0.01}, {"params": other_params,
                             "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    plan = {"total": None if unet_steps == "auto" else int(unet_steps)}

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / WARMUP_STEPS)
        total = plan["total"] or 10 ** 9
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = EMA(trained, ema_decay)
    unet.train()
    text_encoder.train()
    # noise, timesteps and picks come from a generator on the device: no host work or copies per step
    draw = torch.Generator(device=device).manual_seed(seed)
    step, history, t_unet = 0, [], time.time()
    while plan["total"] is None or step < plan["total"]:
        if clock.out_of_time():
            print(f"--max-minutes reached at step {step}: saving", flush=True)
            break
        if plan["total"] is None and step in (CALIBRATION_START, CALIBRATION_END):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if step == CALIBRATION_START:
                t_calibration = time.time()
            else:
                rate = (CALIBRATION_END - CALIBRATION_START) / (time.time() - t_calibration)
                spent = time.time() - t_unet
                plan["total"] = max(step + 1, step + int(rate * (60 * unet_minutes - spent)))
                print(f"{rate:.1f} steps/s: {plan['total']} UNet steps for {unet_minutes} minutes", flush=True)
        index = torch.randint(0, latents.shape[0], (batch,), generator=draw, device=device)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=draw, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=draw, device=device)
        noisy = scheduler.add_noise(x0, noise, t)
        ids = prompt_ids[clip_prompt[index]]
        drop = torch.rand(batch, generator=draw, device=device) < EMPTY_PROMPT_RATE
        ids = torch.where(drop[:, None], empty_ids, ids)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            # one context per frame, as AnimateDiffPipeline passes it (the UNet folds frames into the batch)
            context = text_encoder(ids)[0].repeat_interleave(x0.shape[2], dim=0)
            prediction = unet(noisy, t, encoder_hidden_states=context).sample.float()
        per_clip = (prediction - noise).pow(2).flatten(1).mean(1)
        loss = (per_clip * weights_by_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        step += 1
        if step % log_every == 0:
            value = loss.item()
            history.append((step, value))
            print(f"unet step {step}/{plan['total']} loss {value:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{clock.elapsed():.0f}s", flush=True)
    t_unet = time.time() - t_unet

    ema.copy_to()
    for module in (vae, text_encoder, unet):
        module.to("cpu", torch.float32).eval()
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    info = {
        "seed": seed, "data_seed": data_seed, "device": device, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None, "amp_bf16": amp,
        "clips": clips, "frames": config.frames, "size": config.size, "model": config.to_dict(),
        "parameters": parameters, **vae_info, "vae_batch": vae_batch, "vae_lr": vae_lr, "scaling_factor": scaling,
        "unet_steps": step, "planned_unet_steps": plan["total"], "batch": batch, "lr": lr, "ema_decay": ema_decay,
        "empty_prompt_rate": EMPTY_PROMPT_RATE, "min_snr_gamma": MIN_SNR_GAMMA,
        "final_loss": history[-1][1] if history else None, "data_seconds": round(t_data, 1),
        "vae_seconds": round(t_vae - t_data, 1), "unet_seconds": round(t_unet, 1),
        "total_seconds": round(clock.elapsed(), 1),
    }
    if previous is not None:
        info["init_from"] = {"path": init_from, "training_info": previous}
        info["unet_steps_total"] = previous.get("unet_steps_total", previous["unet_steps"]) + step
    with directory_replaced_on_success(out) as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
        write_json_atomic(os.path.join(folder, "training_info.json"), info, indent=1)
    print(json.dumps(info), flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the video world's tiny AnimateDiff pipeline.")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=8192, help="clips generated for the training pool")
    p.add_argument("--workers", type=int, default=1, help="processes generating the pool")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=256, help="frames per VAE step")
    p.add_argument("--unet-steps", default="auto", help="UNet steps, or 'auto' to fill --unet-minutes")
    p.add_argument("--unet-minutes", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=32, help="clips per UNet step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-minutes", type=float, default=None, help="stop the whole run after this long, then save")
    p.add_argument("--tiny", action="store_true", help="toy widths (smoke tests; the result is useless)")
    p.add_argument("--frames", type=int, default=gen.FRAMES, help="frames per training clip (<= 16)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--init-from", metavar="DIR", help="continue training a saved world pipeline (its model config "
                   "and VAE are kept; --vae-steps is ignored)")
    a = p.parse_args(argv)
    if a.init_from and (a.tiny or a.frames != gen.FRAMES):
        p.error("--init-from continues the saved pipeline's own configuration; drop --tiny / --frames")
    config = tiny_config(a.frames) if a.tiny else WorldModelConfig(frames=a.frames)
    steps = a.unet_steps if a.unet_steps == "auto" else int(a.unet_steps)
    train(a.out, a.seed, a.device, data_seed=a.data_seed, clips=a.clips, workers=a.workers, model_config=config,
          vae_steps=a.vae_steps, vae_batch=a.vae_batch, unet_steps=steps, unet_minutes=a.unet_minutes,
          batch=a.batch, lr=a.lr, max_minutes=a.max_minutes, log_every=a.log_every, init_from=a.init_from)


def load_parts(path: str):
    """``(vae, text_encoder, tokenizer, unet)`` of a saved world pipeline, in float32."""
    from diffusers import AutoencoderKL, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return (AutoencoderKL.from_pretrained(path, subfolder="vae"),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            UNetMotionModel.from_pretrained(path, subfolder="unet"))


def tiny_config(frames: int = gen.FRAMES) -> WorldModelConfig:
    """Toy widths for smoke tests: same architecture, a few hundred thousand parameters."""
    return WorldModelConfig(vae_channels=(8, 8, 8), unet_channels=(16, 16, 16, 16), unet_head_dim=8, motion_heads=2,
                            text_width=16, text_layers=1, text_heads=2, norm_groups=4, frames=frames)


if __name__ == "__main__":
    main()
