"""AttenCraft concept masks: cross-attention maps propagated through self-attention (spec §3.2.2-§3.2.4, §3.7).

For targets ``t`` (each concept's token span, plus token 0, the start-of-text token, as the background):

1. ``C``: the cross-attention probabilities of every ``attn2`` layer at the cross level (16x16 for SD2.1-base at
   512²), instance sample, averaged over (layer, head); a multi-token span takes the pixel-wise max over its tokens.
2. ``c_t`` is bicubic-upsampled (align_corners False) to the self level (32x32); ``ĉ_t = minmax(c_t)`` is the
   attention-loss map, ``ĉ²_t = minmax(c_t²)`` the mask map (squaring sharpens the peaks).
3. ``S``: the self-attention probabilities of every ``attn1`` layer at the self level, averaged over (layer, head);
   ``Ŝ = minmax(S)`` (one global min-max), and the propagated map is ``s_t = minmax(minmax(Ŝ⁴) · ĉ²_t)``.
4. Pixel ``p`` belongs to target ``k`` iff ``s_k(p) - s_j(p) > θ`` (0.1) for every other target ``j``; other pixels
   belong to no mask. Each mask's token is ``argmax_t Σ_p s_t(p) mask(p)``; the masks are valid only when those
   tokens are distinct and every concept mask is non-empty.

How step 3 runs without an ``N x N`` map: ``S · y`` is the mean over (layer, head) of one attention call whose
values are ``y`` (the cross maps), so ``S⁴ · y`` is four rounds of :func:`mmattn.kernels.attention` with ``V = y``
(zero-padded to the head width; the exact CPU path works on row chunks, Triton on CUDA is FlashAttention-style).
The reference's min-max normalisations of ``S`` and ``Ŝ⁴`` need no work at all: ``S`` is row-stochastic (a mean of
softmax rows), so ``S 1 = 1`` and ``S J = J`` for ``J = 1 1ᵀ``; ``Ŝ = (S - min(S) J) / (max - min)`` then gives
``Ŝ⁴ y = (S⁴ y + c 1) / scale`` for a per-column constant ``c``, and ``minmax(Ŝ⁴) y`` adds another constant and a
positive scale, all of which the final per-column min-max removes. So ``s_t = minmax(S⁴ ĉ²_t)`` exactly (the spec's
§3.7 keeps an optional ``min(S)`` correction; it cancels identically, its measured 1.6e-13 was rounding). For the
same reason each round may re-normalise its columns (``S`` maps constants to constants), which the propagation does:
without it the contrast of ``S^k y`` shrinks geometrically against its mean and float32 loses it.
Conditioning: that contrast shrinks by about the second eigenvalue of ``S`` per round. For a near-uniform
self-attention (random weights: ~0.03) ``S⁴ y`` varies by ~1e-7 of its mean and the masks of any float32
implementation, the reference's included, are rounding noise; trained models attend locally and are far from that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...kernels import attention
from . import AttenCraftConfig
from .capture import AttentionCapture, QKCapture, attention_modules_at_level

__all__ = [
    "ConceptMasks",
    "TargetSpan",
    "AttenCraftError",
    "find_token_span",
    "target_spans",
    "minmax",
    "propagate_through_self_attention",
    "assign_masks",
    "cross_attention_maps",
    "compute_concept_masks",
    "concept_masks_from_unet",
    "extract_concept_masks",
    "overlay_masks",
    "mask_preview",
    "ssim",
    "map_resolutions",
    "target_maps",
    "capture_modules",
    "masks_from_capture",
    "encode_image",
    "encode_prompt_ids",
]

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))
BACKGROUND_COLOR = (128, 128, 128)


class AttenCraftError(ValueError):
    """A user-facing AttenCraft problem (inputs, model, tokens); the message says what is supported."""


# ------------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class TargetSpan:
    """One target of the maps: a concept's token positions in the prompt, or the start-of-text token (background)."""

    name: str
    positions: tuple[int, ...]


def find_token_span(tokenizer, prompt_ids: Sequence[int], phrase: str, start: int = 1) -> tuple[int, ...]:
    """Positions of ``phrase``'s tokens inside ``prompt_ids`` (first occurrence at or after ``start``).

    Tokenizer-driven, so any tokenizer works (the reference hard-codes CLIP ids of "of"/"and", spec §3.8).
    """
    ids = list(tokenizer(phrase, add_special_tokens=False).input_ids)
    if not ids:
        raise AttenCraftError(f"concept {phrase!r} tokenizes to nothing")
    prompt_ids = list(prompt_ids)
    for i in range(start, len(prompt_ids) - len(ids) + 1):
        if prompt_ids[i:i + len(ids)] == ids:
            return tuple(range(i, i + len(ids)))
    shown = tokenizer.convert_ids_to_tokens(prompt_ids)
    raise AttenCraftError(
        f"concept {phrase!r} (tokens {tokenizer.convert_ids_to_tokens(ids)}) does not occur in the prompt's tokens "
        f"{[t for t in shown if t != tokenizer.pad_token]}; the prompt must contain every concept (or it was truncated)"
    )


def target_spans(tokenizer, prompt_ids: Sequence[int], concepts: Sequence[str]) -> list[TargetSpan]:
    """Spans of each concept, in order, then the background target (token 0, spec §3.2.1)."""
    spans = [TargetSpan(concept, find_token_span(tokenizer, prompt_ids, concept)) for concept in concepts]
    taken = [p for s in spans for p in s.positions]
    if len(taken) != len(set(taken)):
        raise AttenCraftError(f"concept spans overlap in the prompt: {[(s.name, s.positions) for s in spans]}")
    spans.append(TargetSpan("background", (0,)))
    return spans


# ------------------------------------------------------------------------------------------ map arithmetic


def minmax(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 0.0) -> torch.Tensor:
    """``(x - min) / (max - min)`` over ``dim`` (all entries when None); a constant input maps to zeros."""
    if dim is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    span = hi - lo
    return (x - lo) / torch.where(span > eps, span, torch.ones_like(span))


def map_resolutions(latent_hw: tuple[int, int], config: AttenCraftConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(cross_hw, self_hw)`` for a latent size: ``latent / 2**level`` (SD2.1-base 512²: 64 -> 16 and 32)."""
    out = []
    for level in (config.cross_level, config.self_level):
        factor = 2 ** level
        if latent_hw[0] % factor or latent_hw[1] % factor:
            raise AttenCraftError(f"latent size {latent_hw} is not divisible by 2**{level} (resolution level {level})")
        out.append((latent_hw[0] // factor, latent_hw[1] // factor))
    return out[0], out[1]


def _as_qk_list(self_qk: Sequence[QKCapture]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """[(q [H, N, d], k [H, N, d], scale)] for the instance sample of every self-attention layer."""
    out = []
    for capture in self_qk:
        q, k = capture.query, capture.key
        if q.dim() == 4:
            if q.shape[0] != 1:
                raise ValueError(f"expected one captured sample, got {q.shape[0]}")
            q, k = q[0], k[0]
        out.append((q, k, capture.scale))
    return out


def _affinity_apply(layers, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S · y`` with ``S = mean_{layer,head} softmax(Q K^T s)``: attention calls whose values are ``y``'s columns."""
    rows, width = y.shape
    total_heads = sum(q.shape[0] for q, _, _ in layers)
    acc = torch.zeros(rows, width, dtype=torch.float32, device=y.device)
    for q, k, scale in layers:
        heads, _, head_dim = q.shape
        for col in range(0, width, head_dim):
            block = y[:, col:col + head_dim]
            # values must share the query's head width (the kernels' contract): pad the map columns with zeros
            v = torch.zeros(1, heads, rows, head_dim, dtype=dtype, device=y.device)
            v[..., : block.shape[1]] = block.to(dtype)
            out, _ = attention(q[None].to(dtype), k[None].to(dtype), v, scale=scale, causal=False)
            acc[:, col:col + block.shape[1]] += out[0, :, :, : block.shape[1]].float().sum(1)
    return acc / total_heads


def propagate_through_self_attention(
    self_qk: Sequence[QKCapture],
    maps: torch.Tensor,
    *,
    power: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``minmax(minmax(Ŝ^power) · maps)`` per column, computed as ``minmax(S^power · maps)`` without materialising
    ``S`` (see the module docstring for why the two are equal).

    Args:
        self_qk: the captured ``(Q, K, scale)`` of each self-attention layer at the self level.
        maps: ``[N, T]`` columns to propagate (``N`` = self-level pixels).
    """
    layers = _as_qk_list(self_qk)
    if maps.shape[0] != layers[0][0].shape[1]:
        raise ValueError(f"maps have {maps.shape[0]} rows but the self-attention has {layers[0][0].shape[1]} queries")
    y = minmax(maps.float(), dim=0)
    for _ in range(power):
        y = minmax(_affinity_apply(layers, y, dtype), dim=0)
    return y


def assign_masks(maps: torch.Tensor, threshold: float) -> tuple[torch.Tensor, list[int], bool]:
    """Winner-by-margin masks from propagated maps ``[T, h, w]`` (spec §3.2.4, generalised from 3 classes to T).

    Returns ``(masks [T, h, w] bool, assignment, valid)``: ``masks[k]`` holds the pixels where target ``k`` beats every
    other target by more than ``threshold``; ``assignment[k] = argmax_t Σ s_t · masks[k]`` (the reference's token
    re-identification); ``valid`` when the assignment is a permutation and no concept mask (all but the last,
    background, target) is empty. The reference only checks distinctness; an empty concept mask passes that check
    but gives its concept neither denoising loss nor a meaningful attention target, so it is refused here.
    """
    targets = maps.shape[0]
    if targets < 2:
        raise ValueError("mask assignment needs at least two targets (a concept and the background)")
    masks = []
    for k in range(targets):
        others = torch.cat([maps[:k], maps[k + 1:]])
        masks.append(((maps[k][None] - others) > threshold).all(0))
    masks = torch.stack(masks)
    weights = torch.einsum("thw,khw->kt", maps.float(), masks.float())
    assignment = [int(i) for i in weights.argmax(1)]
    valid = sorted(assignment) == list(range(targets)) and bool(masks[:-1].flatten(1).any(1).all())
    return masks, assignment, valid


def cross_attention_maps(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over (layer, head) of captured cross-attention probabilities ``[1, heads, N, tokens]`` -> ``[N, tokens]``."""
    stacked = torch.cat([p.reshape(-1, *p.shape[-2:]) for p in probs])
    return stacked.mean(0)


def target_maps(cross: torch.Tensor, spans: Sequence[TargetSpan], cross_hw: tuple[int, int],
                self_hw: tuple[int, int]) -> torch.Tensor:
    """Per-target cross maps ``[T, h_self, w_self]``: span max, then bicubic 16->32 (align_corners False)."""
    columns = torch.stack([cross[:, list(span.positions)].amax(dim=1) for span in spans])  # [T, N_cross]
    grid = columns.reshape(len(spans), 1, *cross_hw)
    if tuple(cross_hw) != tuple(self_hw):
        grid = F.interpolate(grid, size=self_hw, mode="bicubic", align_corners=False)
    return grid[:, 0]


@dataclass
class ConceptMasks:
    """Masks of one image. Targets are the concepts in order, then the background (start-of-text token).

    ``masks``: ``[T, h, w]`` bool at the self level; ``propagated``: ``[T, h, w]`` maps ``s_t`` in [0, 1];
    ``loss_maps``: ``[T, h, w]`` ``ĉ_t`` (with grad when computed from captured probabilities with grad);
    ``assignment``/``valid``: see :func:`assign_masks`.
    """

    names: list[str]
    masks: torch.Tensor
    propagated: torch.Tensor
    loss_maps: torch.Tensor
    assignment: list[int]
    valid: bool
    info: dict[str, Any] = field(default_factory=dict)

    def mask(self, name: str) -> torch.Tensor:
        return self.masks[self.names.index(name)]

    def areas(self) -> dict[str, float]:
        return {name: float(m.float().mean()) for name, m in zip(self.names, self.masks)}

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "assignment": list(self.assignment), "valid": self.valid,
                "areas": self.areas(), **self.info}


def compute_concept_masks(
    cross_probs: Sequence[torch.Tensor],
    self_qk: Sequence[QKCapture],
    spans: Sequence[TargetSpan],
    cross_hw: tuple[int, int],
    self_hw: tuple[int, int],
    config: AttenCraftConfig,
) -> ConceptMasks:
    """Masks from captured maps: steps 1-4 of the module docstring."""
    cross = cross_attention_maps(cross_probs)
    if cross.shape[0] != cross_hw[0] * cross_hw[1]:
        raise ValueError(f"cross maps have {cross.shape[0]} pixels, expected {cross_hw[0]}x{cross_hw[1]}")
    maps = target_maps(cross, spans, cross_hw, self_hw)  # [T, h, w]
    loss_maps = minmax(maps, dim=(1, 2))
    mask_maps = minmax(maps.square(), dim=(1, 2))
    propagated = propagate_through_self_attention(
        self_qk, mask_maps.detach().flatten(1).T, power=config.self_power,
        dtype=getattr(torch, config.propagation_dtype),
    ).T.reshape(len(spans), *self_hw)
    masks, assignment, valid = assign_masks(propagated, config.attention_threshold)
    return ConceptMasks([s.name for s in spans], masks, propagated, loss_maps, assignment, valid)


# ------------------------------------------------------------------------------------------ from a UNet


def capture_modules(unet, config: AttenCraftConfig, *, cross: bool = True, self_attn: bool = True) -> dict[str, tuple[Any, str]]:
    """The modules AttenCraft reads: ``attn2`` at the cross level ("probs"), ``attn1`` at the self level ("qk")."""
    modules: dict[str, tuple[Any, str]] = {}
    if cross:
        modules.update({n: (m, "probs") for n, m in attention_modules_at_level(unet, config.cross_level, "attn2").items()})
    if self_attn:
        modules.update({n: (m, "qk") for n, m in attention_modules_at_level(unet, config.self_level, "attn1").items()})
    return modules


def masks_from_capture(capture: AttentionCapture, spans, latent_hw, config: AttenCraftConfig) -> ConceptMasks:
    cross_hw, self_hw = map_resolutions(latent_hw, config)
    cross = [capture.store[n] for n in capture.names("probs")]
    qk = [capture.store[n] for n in capture.names("qk")]
    if not cross or not qk or len(cross) + len(qk) != len(capture.names("probs")) + len(capture.names("qk")):
        raise RuntimeError("AttenCraft: the denoiser call did not reach every captured layer")
    return compute_concept_masks(cross, qk, spans, cross_hw, self_hw, config)


@torch.no_grad()
def concept_masks_from_unet(
    unet,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    spans: Sequence[TargetSpan],
    config: AttenCraftConfig | None = None,
) -> ConceptMasks:
    """One denoiser call with capture on the AttenCraft layers, then :func:`compute_concept_masks` on sample 0."""
    config = config or AttenCraftConfig()
    with AttentionCapture(unet, capture_modules(unet, config)) as capture:
        capture.configure({"probs", "qk"}, keep_grad=False, batch_index=slice(0, 1))
        unet(noisy_latents, timestep, encoder_hidden_states=encoder_hidden_states)
        return masks_from_capture(capture, spans, tuple(noisy_latents.shape[-2:]), config)


def _pipe_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def encode_image(pipe, image, size: int | None = None, generator: torch.Generator | None = None):
    """Image -> scaled latents with the pipeline's processor (resize to ``size``, the model's default when None)."""
    size = size or _pipe_size(pipe)
    pixels = pipe.image_processor.preprocess(image, height=size, width=size).to(pipe.vae.device, pipe.vae.dtype)
    dist = pipe.vae.encode(pixels).latent_dist
    latents = dist.sample(generator=generator) if generator is not None else dist.mode()
    return latents * pipe.vae.config.scaling_factor


def encode_prompt_ids(tokenizer, prompt: str, device=None) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device) if device is not None else ids


@torch.no_grad()
def extract_concept_masks(
    pipe,
    image,
    prompt: str,
    concept_tokens: Sequence[str],
    config: AttenCraftConfig | None = None,
    *,
    timestep: int | None = None,
    generator: torch.Generator | None = None,
    size: int | None = None,
):
    """Masks of the concepts in one image, from a single low-noise denoiser call (AttenCraft's initialisation).

    Args:
        pipe: a diffusers Stable Diffusion pipeline (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
            ``scheduler``, ``image_processor``).
        image: a PIL image (or anything ``pipe.image_processor.preprocess`` accepts).
        prompt: a prompt naming the concepts, e.g. "a photo of a cat and a dog".
        concept_tokens: the phrases of the concepts as they appear in the prompt, e.g. ``["cat", "dog"]``.
        timestep: the noise level; default ``t ~ U{0, ..., warmup_max_timestep - 1}`` (300, spec §3.2.5).
        generator: the random source of the timestep, noise and latent sample (a CPU generator).

    Returns:
        ``(ConceptMasks, overlay)``: masks ``[concepts + background, h, w]`` at the self level, and a PIL image of the
        input with each mask tinted.
    """
    config = config or AttenCraftConfig()
    if not concept_tokens:
        raise AttenCraftError("extract_concept_masks needs at least one concept")
    generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    unet, device = pipe.unet, pipe.unet.device
    latents = encode_image(pipe, image, size, generator=generator)
    if timestep is None:
        timestep = int(torch.randint(0, config.warmup_max_timestep, (1,), generator=generator))
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.tensor([timestep], device=latents.device)
    noisy = pipe.scheduler.add_noise(latents, noise, t) if hasattr(pipe.scheduler, "add_noise") else latents
    ids = encode_prompt_ids(pipe.tokenizer, prompt)
    spans = target_spans(pipe.tokenizer, ids[0].tolist(), concept_tokens)
    text = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(device, unet.dtype)
    result = concept_masks_from_unet(unet, noisy.to(device, unet.dtype), t.to(device), text, spans, config)
    result.info.update({"timestep": int(timestep), "prompt": prompt})
    return result, overlay_masks(image, result)


# ------------------------------------------------------------------------------------------ pictures


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = (image.detach().float().clamp(0, 1) * 255).round().byte()
        if array.dim() == 3 and array.shape[0] in (1, 3):
            array = array.permute(1, 2, 0)
        return Image.fromarray(array.cpu().numpy()).convert("RGB")
    raise TypeError(f"expected a PIL image or a [3, H, W] tensor in [0, 1], got {type(image).__name__}")


def overlay_masks(image, masks: ConceptMasks, alpha: float = 0.5):
    """The image with each concept mask tinted in its own colour; background grey-tinted; unassigned left as is."""
    import numpy as np
    from PIL import Image

    base = _to_pil(image)
    array = np.asarray(base).astype(np.float32)
    for k, name in enumerate(masks.names):
        mask = masks.masks[k].float()[None, None]
        up = F.interpolate(mask, size=(base.height, base.width), mode="nearest")[0, 0].cpu().numpy() > 0.5
        color = np.array(BACKGROUND_COLOR if k == len(masks.names) - 1 else PALETTE[k % len(PALETTE)], np.float32)
        array[up] = (1 - alpha) * array[up] + alpha * color
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


def mask_preview(image, masks: ConceptMasks, tile: int = 256):
    """A strip: the overlay, then each target's propagated map as a grey heatmap, each ``tile`` pixels high."""
    import numpy as np
    from PIL import Image

    overlay = overlay_masks(image, masks).resize((tile, tile), Image.BILINEAR)
    tiles = [overlay]
    for k in range(len(masks.names)):
        heat = (masks.propagated[k].detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        tiles.append(Image.fromarray(heat).resize((tile, tile), Image.NEAREST).convert("RGB"))
    strip = Image.new("RGB", (tile * len(tiles), tile))
    for i, t in enumerate(tiles):
        strip.paste(t, (i * tile, 0))
    return strip


# ------------------------------------------------------------------------------------------ SSIM


def ssim(a: torch.Tensor, b: torch.Tensor, win_size: int = 7, data_range: float = 1.0) -> float:
    """scikit-image's ``structural_similarity(a, b, win_size=7, data_range=1)`` for 2-D maps (uniform window,
    sample covariance, mean over the pixels whose window fits inside the image), without the dependency."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"ssim needs two 2-D maps of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape) < win_size:
        raise ValueError(f"ssim window {win_size} needs maps of at least {win_size}x{win_size}, got {tuple(a.shape)}")
    x, y = a.double()[None, None], b.double()[None, None]
    mean = lambda t: F.avg_pool2d(t, win_size, stride=1)  # noqa: E731
    ux, uy = mean(x), mean(y)
    n = win_size * win_size
    cov = n / (n - 1)
    vx, vy = cov * (mean(x * x) - ux * ux), cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())
