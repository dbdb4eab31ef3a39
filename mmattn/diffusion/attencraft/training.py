"""AttenCraft training: Custom Diffusion fine-tuning guided by attention-derived concept masks (spec §3.2).

Trainable (spec §3.1): one new token embedding per concept (initialised from its initializer word) and, with
``train_kv``, Custom-Diffusion copies of ``to_k``/``to_v`` in every cross-attention layer. Each step:

1. **Prompt**: ``"a photo of <new1> and <new2>"`` restricted to a random non-empty subset of the concepts in random
   order (1/3 each for two concepts), except on every ``refresh_every``-th step, which uses every concept (§3.2.1).
2. **Forward** of ``[instance, class]`` (prior preservation) at ``t ~ U{0..999}``; the cross-attention layers at the
   cross level run explicitly and keep their probabilities with gradient, all others stay on their fused path.
3. **Mask refresh** on those steps: new masks from this forward's maps (self-attention Q/K captured without
   gradient); accepted only when valid and ``SSIM(new, last accepted) >= 0.8`` for every concept (§3.2.6).
4. **Loss** = masked denoising (instance prediction and target multiplied by the union of the prompt's concept
   masks, bicubic to the latent; averaged over the valid area) + ``prior_loss_weight`` x class MSE +
   ``attention_loss_weight`` x mean over the prompt's targets (concepts and the start-of-text token) of
   ``JSD(softmax(vec ĉ_t), softmax(vec mask_t))`` (§3.2.6).

Before step 1, one forward with every concept at ``t ~ U{0..299}`` makes the initial masks (§3.2.5).

Deviations from the released code (``junjie-shentu/AttenCraft`` ``train.py``), each for a stated reason:

* The initialisation forward is not an optimizer step: the reference multiplies its loss by 0 but still steps
  AdamW, whose weight decay then shrinks the trainable weights by ``lr * wd`` (~1e-6) for no purpose.
* Only the new embedding rows are parameters; the reference optimises the whole embedding matrix and zeroes the
  other rows' gradients, so weight decay drifts every frozen row (spec §3.8).
* Masks whose concept region is empty are invalid (the reference only requires distinct token assignments).
* On a refresh step the freshly accepted masks already serve that step's loss.
* Latents are sampled each step from the VAE posterior of the image computed once (the reference re-encodes the
  same image every step: the same distribution, one VAE pass instead of 500).
* Every random draw (timesteps, noise, latent samples, concept subsets, class images) comes from one
  ``torch.Generator`` saved in checkpoints, so a resumed run continues bit-identically on the same device.
* Two or more concepts are supported (the reference hard-codes two): a pixel joins a target when it beats every
  other target by the margin, and subsets are drawn uniformly over all non-empty subsets.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import AttenCraftConfig
from .capture import AttentionCapture
from .masks import (
    AttenCraftError,
    ConceptMasks,
    capture_modules,
    compute_concept_masks,
    cross_attention_maps,
    encode_prompt_ids,
    map_resolutions,
    mask_preview,
    minmax,
    ssim,
    target_maps,
    target_spans,
)
from .pipeline import EMBEDS_FILE, save_learned_concepts

logger = logging.getLogger(__name__)

__all__ = ["AttenCraftTrainer", "jensen_shannon", "sample_concept_subset", "ensure_class_images", "TRAINING_STATE"]

TRAINING_STATE = "training_state.pt"


def jensen_shannon(p_logits: torch.Tensor, q_logits: torch.Tensor, eps: float = 1e-16) -> torch.Tensor:
    """``JSD(softmax(p), softmax(q))`` in nats over the last dimension (the reference's form, ε inside the logs)."""
    p, q = torch.softmax(p_logits.float(), -1), torch.softmax(q_logits.float(), -1)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (torch.log(a + eps) - torch.log(b + eps))).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def sample_concept_subset(count: int, generator: torch.Generator) -> list[int]:
    """A uniformly drawn non-empty subset of ``range(count)`` in random order (two concepts: {A}, {B}, {A, B} at 1/3
    each, as the reference's subset mode, whose two-concept prompts come in either order)."""
    code = int(torch.randint(1, 2 ** count, (1,), generator=generator))
    chosen = [i for i in range(count) if code >> i & 1]
    order = torch.randperm(len(chosen), generator=generator).tolist()
    return [chosen[i] for i in order]


def _image_files(directory: Path) -> list[Path]:
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in suffixes) if directory.is_dir() else []


def ensure_class_images(pipe, directory: str | os.PathLike[str], prompt: str, count: int, *, steps: int = 50,
                        seed: int = 0, batch_size: int = 4, progress: bool = True) -> list[Path]:
    """At least ``count`` class images in ``directory``, generating the missing ones with the base model (as the
    Custom Diffusion / DreamBooth scripts do for prior preservation)."""
    from tqdm.auto import tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    have = _image_files(directory)
    missing = count - len(have)
    if missing > 0:
        generator = torch.Generator().manual_seed(seed + len(have))
        bar = tqdm(total=missing, desc="class images", disable=not progress)
        made = 0
        while made < missing:
            n = min(batch_size, missing - made)
            images = pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, generator=generator).images
            for image in images:
                path = directory / f"class_{len(have) + made:05d}.png"
                temporary = path.with_name(f".{path.name}.tmp.png")
                image.save(temporary)
                os.replace(temporary, path)
                made += 1
            bar.update(n)
        bar.close()
    return _image_files(directory)[:count]


def _pixels(image, resolution: int) -> torch.Tensor:
    """PIL image -> ``[1, 3, R, R]`` in [-1, 1]: shorter side resized to ``resolution`` (bilinear), centre crop; no
    augmentation (``--noaug``, no flips, as ``train.sh``)."""
    from PIL import Image
    import numpy as np

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return array[None]


@dataclass
class _Posterior:
    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator).to(self.mean)
        return self.mean + self.std * noise


class _TokenEmbeddingHook:
    """Forward hook on the text encoder's input embedding: rows of the new tokens come from a trainable parameter,
    so only they receive gradients and no frozen row ever changes."""

    def __init__(self, token_ids: torch.Tensor, parameter: torch.nn.Parameter) -> None:
        self.token_ids = token_ids
        self.parameter = parameter

    def __call__(self, module, args, output):
        input_ids = args[0] if args else None
        if input_ids is None:
            return output
        match = input_ids[..., None] == self.token_ids.to(input_ids.device)  # [B, L, K]
        if not bool(match.any()):
            return output
        replaced = torch.einsum("blk,kd->bld", match.to(self.parameter.dtype), self.parameter).to(output.dtype)
        return torch.where(match.any(-1, keepdim=True), replaced, output)


class AttenCraftTrainer:
    """One AttenCraft run on one image. See the module docstring for the algorithm.

    Args:
        tokenizer, text_encoder, vae, unet: the base model's components (modified in place: new tokens, K/V
            processors; use fresh copies for a second run).
        noise_scheduler: the training scheduler (``DDPMScheduler`` from the model's ``scheduler`` folder).
        image: the PIL image holding the concepts.
        concepts: one initializer word per concept (e.g. ``["cat", "dog"]``); each must be one token.
        placeholders: the new tokens (default ``<new1>``, ``<new2>``, ...).
        class_images: PIL images for prior preservation (needed when ``config.with_prior_preservation``).
        mixed_precision: "no", "fp16" or "bf16" (accelerate); frozen weights are cast, trainable ones stay fp32.
        output_dir: where checkpoints and mask previews go (None: nowhere).
    """

    def __init__(
        self,
        *,
        tokenizer,
        text_encoder,
        vae,
        unet,
        noise_scheduler,
        image,
        concepts: Sequence[str],
        config: AttenCraftConfig | None = None,
        placeholders: Sequence[str] | None = None,
        class_images: Sequence[Any] | None = None,
        mixed_precision: str = "no",
        output_dir: str | os.PathLike[str] | None = None,
        accelerator=None,
        device: str | torch.device | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config = config or AttenCraftConfig()
        self.concepts = list(concepts)
        if not self.concepts:
            raise AttenCraftError("AttenCraft needs at least one concept (two in the paper)")
        self.placeholders = list(placeholders or [f"<new{i + 1}>" for i in range(len(self.concepts))])
        if len(self.placeholders) != len(self.concepts) or len(set(self.placeholders)) != len(self.placeholders):
            raise AttenCraftError(f"need one distinct placeholder per concept: {self.placeholders} for {self.concepts}")
        if config.with_prior_preservation and not class_images:
            raise AttenCraftError("prior preservation is on but no class images were given (or turn it off)")
        if accelerator is None:
            try:
                accelerator = Accelerator(
                    mixed_precision=mixed_precision, cpu=(device is not None and torch.device(device).type == "cpu")
                )
            except ValueError as error:
                if "already been initialized" not in str(error):
                    raise
                raise AttenCraftError(
                    f"accelerate keeps one mixed-precision mode per process and it is already set; mixed_precision="
                    f"{mixed_precision!r} needs a new process (or pass accelerator=)"
                ) from None
        self.accelerator = accelerator
        if self.accelerator.num_processes > 1:
            raise AttenCraftError(
                "AttenCraft trains one image with batch [instance, class] on one process, as the reference (which "
                "asserts batch size 1); launch it without multi-process accelerate"
            )
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                              torch.float32)
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.noise_scheduler = noise_scheduler
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.masks: torch.Tensor | None = None  # [concepts + background, h, w] bool, last accepted
        self.last_masks: ConceptMasks | None = None
        self.uses_masks = config.masked_loss or config.attention_loss_weight > 0 or config.concept_sampling != "full"

        for module in (text_encoder, vae, unet):
            module.requires_grad_(False)
        text_encoder.eval()
        vae.eval()
        self._add_tokens()
        self.kv_parameters = self._install_custom_diffusion() if config.train_kv else []
        for module in (unet, text_encoder):
            module.to(self.device)
            if self.weight_dtype != torch.float32:
                module.to(dtype=self.weight_dtype)  # frozen weights only; the trainable copies go back to fp32
        for p in self.kv_parameters:
            p.data = p.data.float()
        vae.to(self.device)
        self.token_embeds.data = self.token_embeds.data.to(self.device)

        self.capture = AttentionCapture(unet, capture_modules(unet, config)) if self.uses_masks else None
        self.instance = self._encode(image)
        self.class_latents = [self._encode(img) for img in class_images or []] if config.with_prior_preservation else []
        self.latent_hw = tuple(self.instance.mean.shape[-2:])
        if self.uses_masks:
            self.cross_hw, self.self_hw = map_resolutions(self.latent_hw, config)
            if min(self.self_hw) < config.ssim_window:
                raise AttenCraftError(
                    f"masks of {self.self_hw} are smaller than the SSIM window {config.ssim_window}: use a higher "
                    "resolution or a smaller self_level / ssim_window"
                )

        scale = 1.0
        if config.scale_lr:
            scale = self.accelerator.gradient_accumulation_steps * self.accelerator.num_processes
            scale *= 2 if config.with_prior_preservation else 1
        self.learning_rate = config.learning_rate * scale
        params = [self.token_embeds] + self.kv_parameters
        optimizer = torch.optim.AdamW(
            params, lr=self.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        )
        self.parameters = params
        self.optimizer = self.accelerator.prepare(optimizer)

    # ----------------------------------------------------------------------------------------------- setup
    def _add_tokens(self) -> None:
        tokenizer, text_encoder = self.tokenizer, self.text_encoder
        vocab = tokenizer.get_vocab()
        clash = [p for p in self.placeholders if p in vocab]
        if clash:
            raise AttenCraftError(f"placeholder tokens {clash} already exist in the tokenizer; choose new ones")
        init_ids = []
        for word in self.concepts:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise AttenCraftError(
                    f"initializer word {word!r} is {len(ids)} tokens ({tokenizer.convert_ids_to_tokens(ids)}); each "
                    "concept needs a single-token initializer word (e.g. 'cat', 'dog')"
                )
            init_ids.append(ids[0])
        tokenizer.add_tokens(self.placeholders)
        self.token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(self.placeholders))
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings()
        with torch.no_grad():
            for new, old in zip(self.token_ids.tolist(), init_ids):
                table.weight[new] = table.weight[old]
        self.token_embeds = torch.nn.Parameter(table.weight[self.token_ids].detach().clone().float())
        self._hook_handle = table.register_forward_hook(_TokenEmbeddingHook(self.token_ids, self.token_embeds))

    def _install_custom_diffusion(self) -> list[torch.nn.Parameter]:
        """``CustomDiffusionAttnProcessor2_0`` (K/V copies initialised from the pretrained weights) on every
        cross-attention; self-attention keeps its processor (the reference's weightless processors do the same)."""
        from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0

        params: list[torch.nn.Parameter] = []
        for name, module in self.unet.named_modules():
            if not (isinstance(module, Attention) and module.is_cross_attention):
                continue
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=module.to_k.out_features,
                cross_attention_dim=module.to_k.in_features,
            )
            with torch.no_grad():
                processor.to_k_custom_diffusion.weight.copy_(module.to_k.weight)
                processor.to_v_custom_diffusion.weight.copy_(module.to_v.weight)
            processor.requires_grad_(True)
            module.set_processor(processor)
            params += [processor.to_k_custom_diffusion.weight, processor.to_v_custom_diffusion.weight]
        if not params:
            raise AttenCraftError("this UNet has no cross-attention layers to fine-tune")
        return params

    @torch.no_grad()
    def _encode(self, image) -> _Posterior:
        pixels = _pixels(image, self.config.resolution).to(self.device)
        dist = self.vae.encode(pixels).latent_dist
        factor = self.vae.config.scaling_factor
        return _Posterior(dist.mean * factor, dist.std * factor)

    # ----------------------------------------------------------------------------------------------- prompts
    def prompt_for(self, concept_indices: Sequence[int]) -> str:
        c = self.config
        return c.prompt_template.format(c.concept_joiner.join(self.placeholders[i] for i in concept_indices))

    def _text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([encode_prompt_ids(self.tokenizer, p) for p in prompts]).to(self.device)
        return ids, self.text_encoder(ids)[0]

    def _spans(self, ids: torch.Tensor, concept_indices: Sequence[int]):
        return target_spans(self.tokenizer, ids[0].tolist(), [self.placeholders[i] for i in concept_indices])

    # ----------------------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def initialize_masks(self) -> ConceptMasks:
        """The warm-up forward (every concept, ``t < warmup_max_timestep``) that makes the first masks (§3.2.5)."""
        if not self.uses_masks:
            raise AttenCraftError("masks are off (masked_loss False, attention weight 0, full-prompt sampling)")
        everything = list(range(len(self.concepts)))
        ids, text = self._text([self.prompt_for(everything)])
        latents = self.instance.sample(self.generator)
        t = torch.randint(0, max(1, self.config.warmup_max_timestep), (1,), generator=self.generator)
        noise = torch.randn(latents.shape, generator=self.generator).to(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, t.to(latents.device))
        self.capture.configure({"probs", "qk"}, keep_grad=False, batch_index=slice(0, 1))
        with self.accelerator.autocast():
            self.unet(noisy.to(self.weight_dtype), t.to(self.device), encoder_hidden_states=text.to(self.weight_dtype))
        result = self._masks_from_store(self._spans(ids, everything))
        self.capture.configure(())
        if not result.valid:
            raise AttenCraftError(
                f"AttenCraft could not separate the concepts at initialisation: mask areas {result.areas()}, token "
                f"assignment {result.assignment} (each concept needs its own non-empty region). Try another --seed, "
                "better initializer words, or a lower --attention-threshold"
            )
        self.masks, self.last_masks = result.masks.cpu(), result
        self._preview(result, "init")
        return result

    def _masks_from_store(self, spans) -> ConceptMasks:
        store = self.capture.store
        cross = [store[n] for n in self.capture.names("probs")]
        qk = [store[n] for n in self.capture.names("qk")]
        return compute_concept_masks(cross, qk, spans, self.cross_hw, self.self_hw, self.config)

    def _accept(self, new: ConceptMasks) -> tuple[bool, list[float]]:
        """The refresh gate: valid masks and ``SSIM >= ssim_threshold`` with the last accepted, per concept."""
        scores = [ssim(new.masks[k].float().cpu(), self.masks[k].float(), self.config.ssim_window)
                  for k in range(len(self.concepts))]
        return new.valid and all(s >= self.config.ssim_threshold for s in scores), scores

    # ----------------------------------------------------------------------------------------------- step
    def attention_loss(self, cross_probs, spans, present: Sequence[int]) -> torch.Tensor:
        """Mean JSD between each present target's normalised cross map and its mask (concepts, then background)."""
        cross = cross_attention_maps(cross_probs)
        loss_maps = minmax(target_maps(cross, spans, self.cross_hw, self.self_hw), dim=(1, 2))
        mask_index = list(present) + [len(self.concepts)]
        targets = self.masks[mask_index].to(loss_maps.device).float()
        return jensen_shannon(loss_maps.flatten(1), targets.flatten(1), self.config.jsd_eps).mean()

    def attention_loss_at(self, timestep: int, seed: int = 0, concept_indices: Sequence[int] | None = None, *,
                          grad: bool = False):
        """The attention loss of a fixed input (posterior-mean latent, noise from ``seed``, every concept unless
        ``concept_indices``) against the current masks: a deterministic probe free of the training draws. A float,
        or with ``grad=True`` the loss tensor, differentiable in the trainable parameters."""
        present = list(range(len(self.concepts))) if concept_indices is None else list(concept_indices)
        with torch.set_grad_enabled(grad):
            ids, text = self._text([self.prompt_for(present)])
            latents = self.instance.mean
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
            t = torch.tensor([timestep], device=latents.device)
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            self.capture.configure({"probs"}, keep_grad=grad, batch_index=slice(0, 1))
            with self.accelerator.autocast():
                self.unet(noisy.to(self.weight_dtype), t, encoder_hidden_states=text.to(self.weight_dtype))
            cross = [self.capture.store[n] for n in self.capture.names("probs")]
            loss = self.attention_loss(cross, self._spans(ids, present), present)
        self.capture.configure(())
        self.capture.state.clear()
        return loss if grad else float(loss)

    def _valid_mask(self, like: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(like[:1])
        b = self.config.valid_border
        h, w = like.shape[-2:]
        mask[..., b:h - b, b:w - b] = 1.0
        return mask

    def train_step(self) -> dict[str, Any]:
        """One optimisation step; returns its losses and what happened to the masks."""
        config = self.config
        if self.uses_masks and self.masks is None:
            raise AttenCraftError("call initialize_masks() (or load_checkpoint) before training")
        self.step += 1
        everything = list(range(len(self.concepts)))
        refresh = self.uses_masks and self.step % config.refresh_every == 0
        if refresh or config.concept_sampling == "full":
            present = everything
        else:
            present = sample_concept_subset(len(self.concepts), self.generator)
        prompts = [self.prompt_for(present)]
        latents = [self.instance.sample(self.generator)]
        if config.with_prior_preservation:
            index = int(torch.randint(0, len(self.class_latents), (1,), generator=self.generator))
            prompts.append(config.class_prompt)
            latents.append(self.class_latents[index].sample(self.generator))
        latents = torch.cat(latents)
        noise = torch.randn(latents.shape, generator=self.generator).to(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=self.generator).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise AttenCraftError(f"unsupported prediction type {self.noise_scheduler.config.prediction_type!r}; "
                                  "supported: epsilon, v_prediction")

        record: dict[str, Any] = {"step": self.step, "prompt": prompts[0], "timestep": int(timesteps[0])}
        if self.capture is not None:
            self.capture.configure({"probs", "qk"} if refresh else {"probs"}, keep_grad=True, batch_index=slice(0, 1))
        with self.accelerator.autocast():
            ids, text = self._text(prompts)
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, encoder_hidden_states=text.to(self.weight_dtype)).sample
        pred, target = pred.float(), target.float()

        spans = self._spans(ids, present) if self.uses_masks else None
        if refresh:
            with torch.no_grad():
                new = self._masks_from_store(spans)
            accepted, scores = self._accept(new)
            if accepted:
                self.masks, self.last_masks = new.masks.cpu(), new
            record.update({"refresh": True, "accepted": accepted, "ssim": scores, "valid": new.valid})
            self._preview(new, f"step{self.step:06d}")

        valid = self._valid_mask(pred)
        region = torch.ones_like(pred[:1, :1])
        if config.masked_loss:
            union = self.masks[present].any(0).float()[None, None].to(pred.device)
            region = F.interpolate(union, size=pred.shape[-2:], mode="bicubic", align_corners=False)
        per_pixel = ((pred[:1] - target[:1]) * region).square() * valid
        loss_instance = per_pixel.sum() / (valid.sum() * pred.shape[1])
        loss = loss_instance
        record["loss_instance"] = float(loss_instance.detach())
        if config.with_prior_preservation:
            loss_prior = F.mse_loss(pred[1:], target[1:])
            loss = loss + config.prior_loss_weight * loss_prior
            record["loss_prior"] = float(loss_prior.detach())
        if config.attention_loss_weight > 0:
            cross = [self.capture.store[n] for n in self.capture.names("probs")]
            loss_attention = self.attention_loss(cross, spans, present)
            loss = loss + config.attention_loss_weight * loss_attention
            record["loss_attention"] = float(loss_attention.detach())
        record["loss"] = float(loss.detach())

        self.accelerator.backward(loss)
        if config.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.capture is not None:
            self.capture.configure(())
            self.capture.state.clear()  # the stored probabilities hold the step's graph
        self.history.append(record)
        return record

    def train(self, max_steps: int | None = None, *, progress: bool = True,
              callback: Callable[["AttenCraftTrainer", dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run up to ``max_steps`` (default ``config.max_steps``) total steps, checkpointing every
        ``config.checkpoint_every`` steps into ``output_dir/checkpoints`` and saving the result at the end."""
        from tqdm.auto import tqdm

        max_steps = self.config.max_steps if max_steps is None else max_steps
        if self.uses_masks and self.masks is None:
            self.initialize_masks()
        bar = tqdm(total=max_steps, initial=self.step, desc="attencraft",
                   disable=not progress or not self.accelerator.is_local_main_process)
        records = []
        while self.step < max_steps:
            record = self.train_step()
            records.append(record)
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "loss_attention") if k in record})
            if self.output_dir is not None and self.config.checkpoint_every and \
                    self.step % self.config.checkpoint_every == 0:
                self.save_checkpoint(self.output_dir / "checkpoints" / f"checkpoint-{self.step:06d}")
            if callback is not None:
                callback(self, record)
        bar.close()
        if self.output_dir is not None:
            self.save(self.output_dir)
        return records

    # ----------------------------------------------------------------------------------------------- files
    def _preview(self, masks: ConceptMasks, tag: str) -> None:
        if self.output_dir is None:
            return
        pixels = (self._preview_image() + 1) / 2
        path = self.output_dir / "previews" / f"masks_{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp.png")
        mask_preview(pixels, masks).save(temporary)
        os.replace(temporary, path)

    def _preview_image(self) -> torch.Tensor:
        if not hasattr(self, "_preview_pixels"):
            with torch.no_grad():
                latents = self.instance.mean / self.vae.config.scaling_factor
                self._preview_pixels = self.vae.decode(latents.float()).sample[0].clamp(-1, 1).cpu()
        return self._preview_pixels

    def metadata(self) -> dict[str, Any]:
        return {
            "method": "AttenCraft (arXiv 2405.17965)",
            "placeholders": self.placeholders,
            "initializers": self.concepts,
            "step": self.step,
            "config": self.config.to_dict(),
            "learning_rate": self.learning_rate,
            "mixed_precision": self.accelerator.mixed_precision,
            "mask_areas": self.last_masks.areas() if self.last_masks is not None else None,
            "inference_prompt": self.prompt_for(range(len(self.concepts))),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """The learned tokens and K/V weights (loadable with :func:`~.pipeline.load_learned_concepts`) + masks."""
        directory = save_learned_concepts(directory, self.placeholders, self.token_embeds.detach(), self.unet,
                                          self.metadata())
        if self.last_masks is not None:
            self._write_masks(directory)
        return directory

    def _write_masks(self, directory: Path) -> None:
        from .pipeline import save_safetensors_atomic

        save_safetensors_atomic({"masks": self.masks.to(torch.uint8)}, directory / "masks.safetensors",
                                metadata={"names": json.dumps(self.concepts + ["background"])})
        path = directory / "masks.png"
        temporary = path.with_name(f".{path.name}.tmp.png")
        mask_preview((self._preview_image() + 1) / 2, self.last_masks).save(temporary)
        os.replace(temporary, path)

    def save_checkpoint(self, directory: str | os.PathLike[str]) -> Path:
        """Everything needed to continue bit-identically: weights, optimizer, generator, masks, step, history.

        Written to a sibling temporary directory and renamed, so a checkpoint is either complete or absent.
        """
        directory = Path(directory)
        temporary = directory.with_name(f".{directory.name}.tmp")
        if temporary.exists():
            shutil.rmtree(temporary)
        self.save(temporary)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "masks": self.masks,
            "last_masks": None if self.last_masks is None else {
                "names": self.last_masks.names, "masks": self.last_masks.masks.cpu(),
                "propagated": self.last_masks.propagated.detach().cpu(), "assignment": self.last_masks.assignment,
                "valid": self.last_masks.valid},
            "history": self.history,
            "config": self.config.to_dict(),
            "placeholders": self.placeholders,
            "concepts": self.concepts,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
        }
        torch.save(state, temporary / TRAINING_STATE)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(temporary, directory)
        return directory

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Restore a :meth:`save_checkpoint` directory into this (freshly built, same inputs) trainer."""
        from safetensors.torch import load_file

        from .pipeline import KV_FILE

        directory = Path(directory)
        if not (directory / TRAINING_STATE).is_file():
            raise AttenCraftError(f"{directory} is not an AttenCraft checkpoint (no {TRAINING_STATE})")
        state = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=False)
        if state["placeholders"] != self.placeholders or state["concepts"] != self.concepts:
            raise AttenCraftError(
                f"checkpoint {directory} trained {state['concepts']} as {state['placeholders']}, not "
                f"{self.concepts} as {self.placeholders}"
            )
        embeds = load_file(str(directory / EMBEDS_FILE))
        with torch.no_grad():
            for i, token in enumerate(self.placeholders):
                self.token_embeds[i] = embeds[token].to(self.token_embeds)
            if self.kv_parameters:
                kv = load_file(str(directory / KV_FILE))
                from .pipeline import custom_diffusion_state_dict

                current = custom_diffusion_state_dict(self.unet)
                if set(kv) != set(current):
                    raise AttenCraftError(f"checkpoint {directory} holds K/V for other layers than this UNet's")
                for key, tensor in current.items():
                    tensor.copy_(kv[key])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.masks = state["masks"]
        self.history = list(state["history"])
        last = state.get("last_masks")
        if last is not None:
            empty = torch.zeros(0)
            self.last_masks = ConceptMasks(last["names"], last["masks"], last["propagated"], empty,
                                           last["assignment"], last["valid"])

    def close(self) -> None:
        """Remove the capture wrappers and the embedding hook (the K/V processors stay: they are the result)."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        handle = getattr(self, "_hook_handle", None)
        if handle is not None:
            handle.remove()
            self._hook_handle = None
            with torch.no_grad():  # the learned rows into the table, so the text encoder works without the hook
                self.text_encoder.get_input_embeddings().weight[self.token_ids] = self.token_embeds.to(
                    self.text_encoder.get_input_embeddings().weight)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The highest-step complete checkpoint under ``output_dir/checkpoints`` (None when there is none)."""
    root = Path(output_dir) / "checkpoints"
    found = sorted(p for p in root.glob("checkpoint-*") if (p / TRAINING_STATE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


__all__ += ["latest_checkpoint"]
