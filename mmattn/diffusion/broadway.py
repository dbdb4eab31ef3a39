"""BroadWay / ByTheWay: training-free temporal self-guidance and Fourier motion enhancement for text-to-video
diffusion ("ByTheWay: Boost Your Text-to-Video Generation Model to Higher Quality in a Training-free Way",
Bu, Ling et al., CVPR 2025; arXiv 2410.06241, v1 titled "BroadWay").

In the first 20 % of the denoising steps, every temporal self-attention map ``A`` (``F x F`` per spatial position
and head, rows = query frames) of the decoder stages ``up_blocks.1/2/3`` is edited right after its softmax and
before ``A @ V``:

1. **Temporal Self-Guidance** (Eq. 3): ``A2 = A + alpha * (A_ref - A)``, with ``A_ref`` the map of the
   corresponding module in ``up_blocks.1`` in the same forward pass, interpolated to this layer's spatial size.
   The paper finds the coarse decoder stage to anchor motion; pulling finer stages toward it removes structural
   artifacts (disparity between the stages correlates with bad videos).
2. **Fourier Motion Enhancement** (Eqs. 5-7): the high-frequency band of each row's DFT along the key-frame axis
   (the ``2 tau + 1`` bins centred on Nyquist) is scaled by ``beta* = max(beta, sqrt((E1 - E2_low) / E2_high))``,
   where ``E(A) = mean_rows sum_j A_ij^2`` is the map's energy; ``E1`` is read before TSG and the band energies
   after it, on the conditional half of the CFG batch. TSG's convex blend lowers the energy (and with it the
   motion); ``beta_c`` is the gain that restores it exactly, so the max both undoes TSG's loss and applies at
   least the user's gain. The real part of the inverse DFT is renormalised row-wise.

For ``F = 16, tau = 7`` (the published presets) the high band is every bin but DC, and the whole edit collapses to
``A' = u + beta* * (A2 - u)`` with ``u = 1/F``; for any ``tau`` (even ``F``) it is ``A' = A2 @ M`` with the real
symmetric circulant ``M = I + (beta* - 1) P_high``. ``fme_path="closed_form"`` (the default) uses these forms;
``fme_path="fft"`` runs the reference's explicit FFT, and the two agree to float rounding (tested).

Integration (diffusers' own pattern for runtime features, as ``apply_pyramid_attention_broadcast``):

* a wrapping processor (:class:`BroadWayAttnProcessor`) on just the targeted temporal ``Attention`` modules. It
  delegates to the processor it replaced; on active steps it runs that processor under a ``TorchFunctionMode``
  that computes the one ``scaled_dot_product_attention`` (or, for ``AttnProcessor``, the ``probs @ V`` bmm)
  explicitly, edits the probabilities and returns ``A' @ V``. Projections, norms and residuals stay the wrapped
  processor's. The temporal sequence is the frame count, so the explicit ``F x F`` maps are cheap; inactive steps
  (80 %) call the wrapped processor untouched.
* a ``diffusers.hooks`` ``ModelHook`` on the denoiser (named ``"mmattn_broadway"``) that reads the ``timestep``
  argument of each call and finds its index in ``scheduler.timesteps`` (so FreeInit's re-runs restart the
  window, and its fast-sampling schedules scale it), detects the CFG layout, and clears the per-call cache of
  ``up_blocks.1`` maps; plus one hook per temporal transformer recording its ``(batch, H, W, F)`` so the maps can
  be viewed spatially. Motion modules receive no ``cross_attention_kwargs``, so state cannot travel there.
* :func:`remove_broadway` puts every original processor object back (the same objects: outputs afterwards are
  bit-identical to never having applied it) and removes the hooks.

Choices the README code leaves open (spec ``diffusion-broadway-attencraft.md`` §2.2.7, §2.7), as options:
``reference_map`` ("pre": ``up_blocks.1``'s vanilla map, default; "post": its edited one), ``interp_mode``
("nearest" default), ``head_mismatch`` when ``up_blocks.1`` has a different head count (UNet3D/ModelScope: "mean"
over the reference heads, default, or "group"), ``energy_scope`` ("batch": one ``beta*`` for the whole batch as the
reference; "per_sample"), ``cfg_layout`` ("auto" detects ``[uncond, cond]`` from bit-identical latent halves,
which is how diffusers' pipelines build the CFG batch; or a chunk count; energies come from chunk 1, the
conditional one, when there are several), ``clamp_negative`` (the Oct 2024 BroadWay README zeroed negative entries
after the inverse FFT; the CVPR ByTheWay README does not: default False).

Deviations from the reference code, all documented at their options: the radicand of ``beta_c`` is clamped at 0
(the reference yields NaN when ``E1 < E2_low``) and ``beta_c`` falls back to ``beta`` when the high band is empty of
energy (reference: division by zero); ``beta_max`` can cap ``beta*`` (default None: no cap, as the reference); for
odd ``F`` the band is the conjugate-symmetric ``{k : min(k, F-k) >= F/2 - tau}`` (the reference's window then
is not symmetric, and taking the real part silently changes its filter); ``tau`` must leave DC outside the band
(the reference asserts ``2 tau + 1`` bins); everything is computed in float32 whatever the model dtype.

Composition: FreeInit and FreeU compose. FreeNoise rebuilds the motion blocks and calls temporal attention per
frame window, and PAG pipelines set their own processors inside ``__call__`` with a three-way batch: both are
refused with an error, as is any processor class the wrapper does not understand (xFormers, sliced attention).
If something replaces BroadWay's processors after it was applied (``set_attn_processor``,
``fuse_qkv_projections``, ``enable_free_noise``), the next denoiser call raises instead of silently running vanilla.

    from mmattn.diffusion.broadway import BroadWayConfig, broadway
    pipe = AnimateDiffPipeline.from_pretrained(...)
    with broadway(pipe, BroadWayConfig.animatediff()):
        frames = pipe(prompt, num_inference_steps=25).frames
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from .config import DictConfig

logger = logging.getLogger(__name__)

__all__ = [
    "BroadWayConfig",
    "BroadWayState",
    "BroadWayHook",
    "BroadWayAttnProcessor",
    "BroadWayHandle",
    "apply_broadway",
    "remove_broadway",
    "enable_broadway",
    "disable_broadway",
    "broadway_enabled",
    "broadway",
    "broadway_temporal_maps",
    "high_frequency_band",
    "high_band_projector",
    "resolve_tau",
]

_BROADWAY_HOOK = "mmattn_broadway"
_TEMPORAL_CONTAINERS = ("motion_modules", "temp_attentions")

# Paper presets (README of Bujiazi/ByTheWay, "reference parameters"); 20 % of the steps for both.
_PRESETS: dict[str, dict[str, Any]] = {
    "animatediff": {"tau": 7, "alpha": 0.6, "beta": 1.5},
    "videocrafter2": {"tau": 7, "alpha": 0.1, "beta": 10.0},
}


@dataclass
class BroadWayConfig(DictConfig):
    r"""Configuration of BroadWay / ByTheWay.

    Args:
        alpha (`float`, defaults to 0.6): TSG strength; 0 disables the blend toward ``up_blocks.1``.
        beta (`float`, defaults to 1.5): minimum FME gain of the high band; ``beta* = max(beta, beta_c)``.
        tau (`int` or `"all_but_dc"`, defaults to 7): half-width of the high band around the Nyquist bin. Absolute,
            as in the reference: with ``F = 16`` the default covers every bin but DC; with 24 or 32 frames it does
            not. ``"all_but_dc"`` keeps "every non-DC bin" for any frame count.
        start, stop (`float`, defaults to 0.0 and 0.2): active steps are ``int(start*N) <= step < int(stop*N)``
            for ``N = len(scheduler.timesteps)`` (the guiders' rounding; 25 steps -> steps 0-4).
        target_blocks (`tuple[str, ...]`): decoder stages whose temporal attention is edited.
        reference_block (`str`, defaults to `"up_blocks.1"`): the stage whose maps guide the others. Module
            ``<block>.<container>.j.transformer_blocks.k.attnX`` is guided by the same ``j, k, X`` in it.
        attn_names (`tuple[str, ...]`): which temporal attentions of each transformer block (AnimateDiff and UNet3D
            both have two self-attentions, ``attn1`` and ``attn2``).
        reference_map (`str`, defaults to `"pre"`): "pre" guides with ``up_blocks.1``'s vanilla maps, "post" with
            its edited ones (the README does not say).
        interp_mode (`str`, defaults to `"nearest"`): ``torch.nn.functional.interpolate`` mode for resizing the
            reference maps spatially; "nearest" and "bilinear" keep rows stochastic, "bicubic" does not.
        head_mismatch (`str`, defaults to `"mean"`): when the reference has another head count (UNet3D: heads grow
            with channels), "mean" averages its heads and broadcasts; "group" averages contiguous groups of
            ``heads_ref / heads`` heads (needs divisibility). Equal head counts always pair head by head.
        clamp_negative (`bool`, defaults to False): zero negative entries after FME (BroadWay README v1); the CVPR
            README (v3) does not clamp.
        energy_scope (`str`, defaults to `"batch"`): "batch" computes one ``beta*`` per layer from the whole
            conditional chunk (reference; couples the videos of a batch), "per_sample" one per video.
        cfg_layout (`"auto"` or `int`): number of CFG chunks stacked on the batch axis. "auto": 2 when the two
            halves of the latent input are bit-identical (diffusers' ``torch.cat([latents] * 2)``), else 1.
            With 2 or more chunks the energies come from chunk 1 (``[uncond, cond, ...]``).
        beta_max (`float`, *optional*): cap on ``beta*`` (not in the reference; ``beta_c`` blows up for
            near-uniform maps).
        fme_path (`str`, defaults to `"closed_form"`): "closed_form" (circulant / contrast-stretch form) or "fft"
            (the reference's explicit DFT). They agree to float rounding.
        collect_stats (`bool`, defaults to False): record ``E1, E2, E2_low, E2_high, beta_c, beta*`` and the
            post-edit energy ``E3`` per layer and step in :attr:`BroadWayHandle.stats` (costs a device sync per
            layer).
    """

    alpha: float = 0.6
    beta: float = 1.5
    tau: int | str = 7
    start: float = 0.0
    stop: float = 0.2
    target_blocks: tuple[str, ...] = ("up_blocks.1", "up_blocks.2", "up_blocks.3")
    reference_block: str = "up_blocks.1"
    attn_names: tuple[str, ...] = ("attn1", "attn2")
    reference_map: str = "pre"
    interp_mode: str = "nearest"
    head_mismatch: str = "mean"
    clamp_negative: bool = False
    energy_scope: str = "batch"
    cfg_layout: str | int = "auto"
    beta_max: float | None = None
    fme_path: str = "closed_form"
    collect_stats: bool = False

    def __post_init__(self) -> None:
        self.target_blocks = tuple(self.target_blocks)
        self.attn_names = tuple(self.attn_names)
        choices = {
            "reference_map": ("pre", "post"),
            "interp_mode": ("nearest", "nearest-exact", "bilinear", "bicubic", "area"),
            "head_mismatch": ("mean", "group"),
            "energy_scope": ("batch", "per_sample"),
            "fme_path": ("closed_form", "fft"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"BroadWayConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (isinstance(self.tau, int) and self.tau >= 0) and self.tau != "all_but_dc":
            raise ValueError(f"BroadWayConfig.tau must be a non-negative int or 'all_but_dc', got {self.tau!r}")
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise ValueError(f"BroadWayConfig needs 0 <= start <= stop <= 1, got start={self.start}, stop={self.stop}")
        if self.beta <= 0 or (self.beta_max is not None and self.beta_max < self.beta):
            raise ValueError(f"BroadWayConfig needs beta > 0 and beta_max >= beta, got {self.beta}, {self.beta_max}")
        if self.cfg_layout != "auto" and not (isinstance(self.cfg_layout, int) and self.cfg_layout >= 1):
            raise ValueError(f"BroadWayConfig.cfg_layout must be 'auto' or a chunk count >= 1, got {self.cfg_layout!r}")
        if not self.target_blocks:
            raise ValueError("BroadWayConfig.target_blocks is empty: BroadWay would do nothing")

    @classmethod
    def animatediff(cls, **overrides: Any) -> "BroadWayConfig":
        """The AnimateDiff preset: tau 7, alpha 0.6, beta 1.5, first 20 % of the steps."""
        return cls.from_preset("animatediff", **overrides)

    @classmethod
    def videocrafter2(cls, **overrides: Any) -> "BroadWayConfig":
        """The VideoCrafter2 preset: tau 7, alpha 0.1, beta 10, first 20 % of the steps."""
        return cls.from_preset("videocrafter2", **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "BroadWayConfig":
        """A preset by name (``"animatediff"``, ``"videocrafter2"``), with any field overridden."""
        if name not in _PRESETS:
            raise ValueError(f"unknown BroadWay preset {name!r}; presets: {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> dict[str, dict[str, Any]]:
        return {name: dict(values) for name, values in _PRESETS.items()}



# ------------------------------------------------------------------------------------------ the map arithmetic


def resolve_tau(tau: int | str, num_frames: int) -> int:
    """The absolute half-width for ``num_frames``; raises when the band would include DC (sums would change)."""
    largest = (num_frames + 1) // 2 - 1  # the widest band that leaves DC out
    if tau == "all_but_dc":
        return largest
    if tau > largest:
        raise ValueError(
            f"BroadWay tau={tau} needs at least {2 * tau + 2} frames (its band of 2*tau+1 bins would include DC "
            f"with {num_frames}); use tau<={largest} or tau='all_but_dc'"
        )
    return int(tau)


def high_frequency_band(num_frames: int, tau: int | str, device=None) -> torch.Tensor:
    """Boolean mask of the high band over the ``num_frames`` DFT bins.

    Even ``F``: bins ``F/2 - tau ... F/2 + tau`` (the reference's window). Odd ``F``: ``{k : min(k, F-k) >= F/2 -
    tau}``, the conjugate-symmetric version, so the filtered map stays real.
    """
    tau = resolve_tau(tau, num_frames)
    k = torch.arange(num_frames, device=device)
    return 2 * torch.minimum(k, num_frames - k) >= num_frames - 2 * tau


def high_band_projector(band: torch.Tensor) -> torch.Tensor:
    """The real symmetric circulant ``P`` with ``row @ P = Re(ifft(fft(row) * band))`` for a symmetric band.

    Built from cosines, ``P[m, n] = (1/F) sum_{k in band} cos(2 pi k (n - m) / F)``, so the closed form does not
    depend on an FFT at all.
    """
    frames = band.numel()
    k = torch.nonzero(band).flatten().to(torch.float64)
    offsets = torch.arange(frames, dtype=torch.float64, device=band.device)
    shift = offsets[None, :] - offsets[:, None]
    projector = torch.cos(2 * math.pi * k[:, None, None] * shift[None] / frames).sum(0) / frames
    return projector.to(torch.float32)


@functools.lru_cache(maxsize=64)
def _band_cached(num_frames: int, tau: int | str) -> torch.Tensor:
    return high_frequency_band(num_frames, tau)


@functools.lru_cache(maxsize=64)
def _projector_cached(num_frames: int, tau: int | str) -> torch.Tensor:
    return high_band_projector(_band_cached(num_frames, tau))


def _energy(maps: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """``mean over (positions, heads, query frames) of sum_j A_ij^2`` for maps ``[Bc, S, heads, F, F]``."""
    per_video = maps.square().sum(-1).flatten(1).mean(1)
    return per_video if per_sample else per_video.mean()


def broadway_temporal_maps(
    probs: torch.Tensor,
    reference: torch.Tensor | None,
    *,
    alpha: float,
    beta: float,
    tau: int | str,
    cond_chunk: int = 0,
    energy_scope: str = "batch",
    clamp_negative: bool = False,
    beta_max: float | None = None,
    fme_path: str = "closed_form",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply TSG + FME to temporal attention probabilities; returns ``(new_probs, stats)``.

    Args:
        probs: ``[chunks, Bc, S, heads, F, F]`` float probabilities (rows sum to 1); ``chunks`` stacks the CFG
            branches, ``S`` the spatial positions.
        reference: the reference maps already matched to ``probs``' positions (heads may be 1, broadcast), or None
            to skip TSG (the reference layer itself, where the blend is a no-op).
        cond_chunk: the chunk whose energies set ``beta*`` (applied to every chunk).
        energy_scope: "batch" for one ``beta*`` over all videos of that chunk, "per_sample" for one per video.

    ``stats`` holds ``E1, E2, E2_low, E2_high, beta_c, beta_star`` (0-d tensors, or ``[Bc]`` per sample).
    """
    frames = probs.shape[-1]
    per_sample = energy_scope == "per_sample"
    band_cpu = _band_cached(frames, tau)  # decided on the host: no device sync per layer
    band = band_cpu.to(probs.device)
    e1 = _energy(probs[cond_chunk], per_sample)
    blended = probs if reference is None or alpha == 0 else torch.lerp(probs, reference.expand_as(probs), alpha)

    if fme_path == "fft":
        spectrum = torch.fft.fft(blended, dim=-1)
        power = spectrum[cond_chunk].abs().square() / frames
        e_high = _band_energy(power, band, per_sample)
        e_low = _band_energy(power, ~band, per_sample)
        e2 = e_high + e_low
    else:
        if bool(band_cpu[1:].all()):  # every non-DC bin: the high part is the row minus its mean
            high = blended - blended.mean(-1, keepdim=True)
        else:
            high = blended @ _projector_cached(frames, tau).to(blended.device)
        e2 = _energy(blended[cond_chunk], per_sample)
        e_high = _energy(high[cond_chunk], per_sample)
        e_low = e2 - e_high

    # beta_c restores E1 exactly; radicand clamped at 0 and an empty band falls back to beta (reference: NaN/inf).
    ratio = (e1 - e_low).clamp_min(0) / torch.where(e_high > 0, e_high, torch.ones_like(e_high))
    beta_c = torch.where(e_high > 0, ratio.sqrt(), torch.full_like(e_high, beta))
    beta_star = beta_c.clamp_min(beta)
    if beta_max is not None:
        beta_star = beta_star.clamp_max(beta_max)
    gain = beta_star.view(1, -1, 1, 1, 1, 1) if per_sample else beta_star

    if fme_path == "fft":
        scale = torch.where(band, gain, torch.ones_like(gain))  # per-bin gain, broadcast over rows
        edited = torch.fft.ifft(spectrum * scale, dim=-1).real
    else:
        edited = blended + (gain - 1) * high
    if clamp_negative:
        edited = edited.clamp_min(0)
    edited = edited / edited.sum(-1, keepdim=True)
    stats = {"E1": e1, "E2": e2, "E2_low": e_low, "E2_high": e_high, "beta_c": beta_c, "beta_star": beta_star}
    return edited, stats


def _band_energy(power: torch.Tensor, band: torch.Tensor, per_sample: bool) -> torch.Tensor:
    per_video = power[..., band].sum(-1).flatten(1).mean(1)
    return per_video if per_sample else per_video.mean()


def _match_reference(
    reference: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int], heads: int, config: BroadWayConfig
) -> torch.Tensor:
    """Resize ``[chunks, Bc, H1*W1, heads1, F, F]`` reference maps to this layer's positions and heads."""
    chunks, videos, _, ref_heads, frames, _ = reference.shape
    if ref_heads != heads:
        if config.head_mismatch == "group":
            if ref_heads % heads:
                raise ValueError(
                    f"BroadWay head_mismatch='group' needs the reference's {ref_heads} heads to be a multiple of "
                    f"the target's {heads}; use head_mismatch='mean'"
                )
            reference = reference.unflatten(3, (heads, ref_heads // heads)).mean(4)
        else:
            reference = reference.mean(3, keepdim=True)
    if source_hw != target_hw:
        kept_heads = reference.shape[3]
        grid = reference.reshape(chunks * videos, *source_hw, kept_heads * frames * frames).permute(0, 3, 1, 2)
        extra = {"align_corners": False} if config.interp_mode in ("bilinear", "bicubic") else {}
        grid = F.interpolate(grid, size=target_hw, mode=config.interp_mode, **extra)
        reference = grid.permute(0, 2, 3, 1).reshape(chunks, videos, -1, kept_heads, frames, frames)
    return reference


# ------------------------------------------------------------------------------------------ state and hooks


@dataclass
class _Target:
    """One wrapped attention module and how to check that it is still in place."""

    name: str
    key: str  # the path below the decoder stage: "motion_modules.j.transformer_blocks.k.attnX"
    temporal_name: str  # the temporal transformer that owns it
    temporal: torch.nn.Module
    block_index: int
    attn: torch.nn.Module
    block: torch.nn.Module
    attn_attr: str
    previous: Any
    wrapper: "BroadWayAttnProcessor | None" = None


class BroadWayState:
    """Per-denoiser state shared by the hooks and processors: step window, CFG layout, geometry, reference maps."""

    def __init__(self, config: BroadWayConfig, scheduler) -> None:
        self.config = config
        self.scheduler = scheduler
        self.step: int | None = None
        self.num_steps: int | None = None
        self.active = False
        self.cfg_chunks = 1
        self.calls = 0  # denoiser calls seen
        self.active_calls = 0
        self.geometry: dict[str, tuple[int, int, int, int]] = {}  # temporal module -> (batch, H, W, F)
        self.references: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        self.stats: list[dict[str, Any]] = []
        self.record_maps = False
        self.maps: dict[tuple[int, str], dict[str, Any]] = {}

    def reset(self) -> None:
        self.step = self.num_steps = None
        self.active = False
        self.geometry.clear()
        self.references.clear()

    def begin_call(self, sample: torch.Tensor, timestep) -> None:
        self.geometry.clear()
        self.references.clear()
        self.step, self.num_steps = self._step_index(timestep)
        lo, hi = int(self.config.start * self.num_steps), int(self.config.stop * self.num_steps)
        self.active = lo <= self.step < hi
        self.calls += 1
        if self.active:
            self.active_calls += 1
            self.cfg_chunks = self._chunks(sample)

    def end_call(self) -> None:
        self.references.clear()  # up_blocks.1 maps are only valid within one forward pass
        self.active = False

    def _step_index(self, timestep) -> tuple[int, int]:
        timesteps = self.scheduler.timesteps
        if timesteps is None:
            raise RuntimeError("BroadWay: the scheduler has no timesteps; call scheduler.set_timesteps first")
        num_steps = len(timesteps)
        index = getattr(self.scheduler, "step_index", None)
        if index is not None:
            return int(index), num_steps
        t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
        matches = torch.nonzero(timesteps == t).flatten()
        if matches.numel() == 0:
            raise RuntimeError(
                f"BroadWay: timestep {float(t)} is not in scheduler.timesteps; apply BroadWay with the scheduler "
                "that drives the denoising loop (apply_broadway(pipe) uses pipe.scheduler)"
            )
        return int(matches[0]), num_steps

    def _chunks(self, sample: torch.Tensor) -> int:
        layout = self.config.cfg_layout
        batch = sample.shape[0]
        if layout != "auto":
            if batch % layout:
                raise RuntimeError(f"BroadWay cfg_layout={layout} does not divide the batch of {batch}")
            return int(layout)
        half = batch // 2
        return 2 if batch % 2 == 0 and torch.equal(sample[:half], sample[half:]) else 1


class BroadWayHook(ModelHook):
    """On the denoiser: the step window and CFG layout from each call's arguments, and a guard that BroadWay's
    processors are still the ones installed (something that replaced them would otherwise silently disable the
    method)."""

    _is_stateful = True

    def __init__(self, state: BroadWayState, targets: list[_Target]) -> None:
        super().__init__()
        self.state = state
        self.targets = targets

    def pre_forward(self, module, *args, **kwargs):
        self._check_installed()
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.state.begin_call(sample, timestep)
        return args, kwargs

    def post_forward(self, module, output):
        self.state.end_call()
        return output

    def reset_state(self, module):
        self.state.reset()
        return module

    def _check_installed(self) -> None:
        for target in self.targets:
            block = target.temporal.transformer_blocks[target.block_index]
            attn = getattr(block, target.attn_attr, None)
            if block is not target.block or attn is not target.attn or attn.processor is not target.wrapper:
                found = type(getattr(attn, "processor", block)).__name__
                raise RuntimeError(
                    f"BroadWay's processor on {target.name} was replaced (found {found}): something changed the "
                    "attention modules or processors after apply_broadway (set_attn_processor, fuse_qkv_projections, "
                    "enable_free_noise, a PAG pipeline call). Remove BroadWay and apply it last."
                )


class _TemporalGeometryHook(ModelHook):
    """On each temporal transformer: its ``(batch, H, W, frames)``, which the attention call cannot see."""

    def __init__(self, state: BroadWayState, name: str) -> None:
        super().__init__()
        self.state = state
        self.name = name

    def pre_forward(self, module, *args, **kwargs):
        if self.state.active:
            hidden = args[0] if args else kwargs["hidden_states"]
            frames = kwargs["num_frames"] if "num_frames" in kwargs else (args[4] if len(args) > 4 else 1)
            batch_frames, _, height, width = hidden.shape
            self.state.geometry[self.name] = (batch_frames // frames, height, width, frames)
        return args, kwargs


# ------------------------------------------------------------------------------------------ the processor


class _ProbabilityMode(torch.overrides.TorchFunctionMode):
    """Replaces the one attention product inside a processor by ``edit(softmax(QK^T)) @ V`` in float32."""

    def __init__(self, edit, heads: int, explicit_bmm: bool) -> None:
        super().__init__()
        self.edit = edit
        self.heads = heads
        self.explicit_bmm = explicit_bmm
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self._sdpa(*args, **kwargs)
        if self.explicit_bmm and func is torch.bmm:
            # AttnProcessor: torch.bmm(attention_probs, value) right after get_attention_scores.
            self.calls += 1
            probs, value = args[0], args[1]
            edited = self.edit(probs.float().unflatten(0, (-1, self.heads)))
            return torch.bmm(edited.flatten(0, 1), value.float()).to(value.dtype)
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if is_causal or dropout_p or enable_gqa:
            raise RuntimeError("BroadWay: temporal attention with is_causal, dropout or GQA is not supported")
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask.float()
        edited = self.edit(scores.softmax(-1))
        return torch.matmul(edited, value.float()).to(query.dtype)


class BroadWayAttnProcessor:
    """Wraps the processor of one temporal attention module; edits its probabilities on BroadWay's active steps.

    Inactive steps call the wrapped processor as is. Active steps run it under :class:`_ProbabilityMode`, so every
    part of the attention except ``softmax(QK^T) @ V`` stays the wrapped processor's own.
    """

    _explicit = ("AttnProcessor",)  # computes probs with get_attention_scores and applies them with torch.bmm
    supported = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0")

    def __init__(self, inner, state: BroadWayState, target: _Target, is_reference: bool, is_target: bool) -> None:
        self.inner = inner
        self.state = state
        self.name = target.name
        self.key = target.key
        self.temporal_name = target.temporal_name
        self.is_reference = is_reference
        self.is_target = is_target

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if temb is not None:
            kwargs["temb"] = temb
        if not self.state.active:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        mode = _ProbabilityMode(self._edit, attn.heads, type(self.inner).__name__ in self._explicit)
        with mode:
            output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if mode.calls != 1:
            raise RuntimeError(
                f"BroadWay expected one attention product in {type(self.inner).__name__} on {self.name}, saw "
                f"{mode.calls}; supported processors: {', '.join(self.supported)}"
            )
        return output

    def _edit(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs``: ``[B*H*W, heads, F, F]`` float32 (rows ordered batch, y, x as diffusers' reshape)."""
        state, config = self.state, self.state.config
        if self.temporal_name not in state.geometry:
            raise RuntimeError(f"BroadWay: no geometry recorded for {self.temporal_name} (was its hook removed?)")
        batch, height, width, frames = state.geometry[self.temporal_name]
        chunks = state.cfg_chunks
        rows, heads = probs.shape[0], probs.shape[1]
        if rows != batch * height * width or probs.shape[-1] != frames or batch % chunks:
            raise RuntimeError(
                f"BroadWay: attention on {self.name} has {rows} rows x {probs.shape[-1]} frames, expected "
                f"{batch}x{height}x{width} positions x {frames} frames split into {chunks} CFG chunks"
            )
        maps = probs.reshape(chunks, batch // chunks, height * width, heads, frames, frames)
        if self.is_reference and config.reference_map == "pre":
            state.references[self.key] = (maps, (height, width))
        reference = None
        if not self.is_reference:
            if self.key not in state.references:
                raise RuntimeError(f"BroadWay: {self.name} ran before its reference in {config.reference_block}")
            source, source_hw = state.references[self.key]
            if source.shape[:2] != maps.shape[:2] or source.shape[-1] != frames:
                raise RuntimeError(f"BroadWay: the reference of {self.name} has another batch or frame count")
            reference = _match_reference(source, source_hw, (height, width), heads, config)
        if self.is_target:
            edited, stats = broadway_temporal_maps(
                maps, reference, alpha=config.alpha, beta=config.beta, tau=config.tau,
                cond_chunk=1 if chunks > 1 else 0, energy_scope=config.energy_scope,
                clamp_negative=config.clamp_negative, beta_max=config.beta_max, fme_path=config.fme_path,
            )
        else:
            edited, stats = maps, None
        if self.is_reference and config.reference_map == "post":
            state.references[self.key] = (edited, (height, width))
        if config.collect_stats and stats is not None:
            cond = edited[1 if chunks > 1 else 0]
            record = {k: v.tolist() for k, v in stats.items()}
            record["E3"] = _energy(cond, config.energy_scope == "per_sample").tolist()
            state.stats.append({"step": state.step, "module": self.name, **record})
        if state.record_maps:
            state.maps[(state.calls, self.name)] = {
                "vanilla": maps.detach().clone(), "edited": edited.detach().clone(), "hw": (height, width),
                "step": state.step, "chunks": chunks,
            }
        return edited.reshape(probs.shape)

    def __repr__(self) -> str:
        return f"BroadWayAttnProcessor(wrapping {type(self.inner).__name__})"


# ------------------------------------------------------------------------------------------ public API


class BroadWayHandle:
    """What :func:`apply_broadway` returns: ``remove()`` (or use as a context manager), ``stats``, ``summary()``."""

    def __init__(self, denoiser, state: BroadWayState, targets: list[_Target]) -> None:
        self.denoiser = denoiser
        self.state = state
        self.targets = targets

    @property
    def config(self) -> BroadWayConfig:
        return self.state.config

    @property
    def stats(self) -> list[dict[str, Any]]:
        """Per (step, layer) energies and gains, when ``config.collect_stats`` is set."""
        return self.state.stats

    @property
    def record_maps(self) -> bool:
        """When True, every edited layer stores its vanilla and edited maps in :attr:`maps` (tests, analysis)."""
        return self.state.record_maps

    @record_maps.setter
    def record_maps(self, value: bool) -> None:
        self.state.record_maps = bool(value)

    @property
    def maps(self) -> dict[tuple[int, str], dict[str, Any]]:
        return self.state.maps

    def summary(self) -> dict[str, Any]:
        """Which layers are wrapped (and around what), the configuration, and the denoiser calls seen so far."""
        return {
            "config": self.config.to_dict(),
            "modules": {t.name: type(t.previous).__name__ for t in self.targets},
            "calls": self.state.calls,
            "active_calls": self.state.active_calls,
        }

    def remove(self) -> None:
        remove_broadway(self.denoiser)

    def __enter__(self) -> "BroadWayHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _split_pipe(pipe_or_unet, scheduler):
    unet = getattr(pipe_or_unet, "unet", None)
    if unet is None:
        if scheduler is None:
            raise ValueError(
                "apply_broadway on a bare denoiser needs scheduler= (the one whose timesteps drive the loop); "
                "pass the pipeline instead to use pipe.scheduler"
            )
        return None, pipe_or_unet, scheduler
    return pipe_or_unet, unet, scheduler if scheduler is not None else pipe_or_unet.scheduler


def _refuse_incompatible(pipe, unet) -> None:
    if pipe is not None:
        if any(cls.__name__ == "PAGMixin" for cls in type(pipe).__mro__):
            raise ValueError(
                f"BroadWay does not compose with {type(pipe).__name__}: PAG installs its own processors inside "
                "__call__ and stacks a third (perturbed) branch on the batch. Use AnimateDiffPipeline or "
                "TextToVideoSDPipeline."
            )
        if getattr(pipe, "free_noise_enabled", False):
            raise ValueError(
                "BroadWay does not compose with FreeNoise: its FreeNoiseTransformerBlock calls temporal attention "
                "once per frame window, so the maps are neither F x F over the video nor aligned with up_blocks.1's. "
                "Call pipe.disable_free_noise() first."
            )
    for name, module in unet.named_modules():
        if type(module).__name__ == "FreeNoiseTransformerBlock":
            raise ValueError(f"BroadWay does not compose with FreeNoise ({name} is a FreeNoiseTransformerBlock)")


def _is_temporal(module) -> bool:
    return type(module).__name__ in ("AnimateDiffTransformer3D", "TransformerTemporalModel")


def _find_targets(unet, config: BroadWayConfig) -> tuple[list[_Target], dict[str, Any], set[str], set[str]]:
    blocks = set(config.target_blocks) | {config.reference_block}
    targets: list[_Target] = []
    temporal_modules: dict[str, Any] = {}
    stages_with_temporal: set[str] = set()
    for name, module in unet.named_modules():
        if not _is_temporal(module):
            continue
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "up_blocks" or parts[2] not in _TEMPORAL_CONTAINERS:
            continue
        stage = ".".join(parts[:2])
        stages_with_temporal.add(stage)
        if stage not in blocks:
            continue
        temporal_modules[name] = module
        for block_index, block in enumerate(module.transformer_blocks):
            for attn_attr in config.attn_names:
                attn = getattr(block, attn_attr, None)
                if attn is None:
                    continue
                if getattr(attn, "is_cross_attention", False):
                    raise ValueError(f"BroadWay: {name}.transformer_blocks.{block_index}.{attn_attr} is cross-attention")
                full = f"{name}.transformer_blocks.{block_index}.{attn_attr}"
                targets.append(_Target(
                    name=full, key=full[len(stage) + 1:], temporal_name=name, temporal=module,
                    block_index=block_index, attn=attn, block=block,
                    attn_attr=attn_attr, previous=attn.processor,
                ))
    found = {t.name.split(".")[0] + "." + t.name.split(".")[1] for t in targets}
    missing = sorted(blocks - found)
    if missing:
        raise ValueError(
            f"BroadWay: no temporal attention in {missing}; decoder stages with temporal attention: "
            f"{sorted(stages_with_temporal) or 'none (is this a video UNet?)'}"
        )
    return targets, temporal_modules, found, stages_with_temporal


def apply_broadway(pipe_or_unet, config: BroadWayConfig | None = None, *, scheduler=None) -> BroadWayHandle:
    r"""Apply BroadWay to a text-to-video pipeline or its denoiser.

    Args:
        pipe_or_unet: an ``AnimateDiffPipeline`` / ``TextToVideoSDPipeline`` (or anything with ``.unet`` and
            ``.scheduler``), or a ``UNetMotionModel`` / ``UNet3DConditionModel`` together with ``scheduler``.
        config (`BroadWayConfig`, *optional*): defaults to the AnimateDiff preset.
        scheduler: the scheduler whose ``timesteps`` the denoising loop walks (taken from the pipeline if given).

    Returns:
        A :class:`BroadWayHandle`; ``handle.remove()`` or :func:`remove_broadway` restores the original processors.

    Raises ``ValueError`` for PAG pipelines, FreeNoise, missing blocks, a frame/head layout it cannot map, or a
    processor class it does not understand on a targeted module.
    """
    config = config or BroadWayConfig()
    pipe, unet, scheduler = _split_pipe(pipe_or_unet, scheduler)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    if registry.get_hook(_BROADWAY_HOOK) is not None:
        raise ValueError("BroadWay is already applied to this denoiser; remove_broadway() first")
    _refuse_incompatible(pipe, unet)
    targets, temporal_modules, _, _ = _find_targets(unet, config)
    unknown = sorted({f"{t.name}: {type(t.previous).__name__}" for t in targets
                      if type(t.previous).__name__ not in BroadWayAttnProcessor.supported})
    if unknown:
        raise ValueError(
            f"BroadWay cannot wrap these processors: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}. Supported: "
            f"{', '.join(BroadWayAttnProcessor.supported)} (e.g. unet.set_attn_processor(AttnProcessor2_0()) "
            "before applying; xFormers and sliced attention expose no probabilities)"
        )
    keys = {t.key for t in targets if t.name.startswith(config.reference_block + ".")}
    orphans = [t.name for t in targets if t.key not in keys]
    if orphans:
        raise ValueError(f"BroadWay: {orphans[:3]} have no counterpart in {config.reference_block}")

    state = BroadWayState(config, scheduler)
    used_temporal = set()
    for target in targets:
        stage = ".".join(target.name.split(".")[:2])
        target.wrapper = BroadWayAttnProcessor(
            target.previous, state, target, is_reference=stage == config.reference_block,
            is_target=stage in config.target_blocks,
        )
        target.attn.set_processor(target.wrapper)
        used_temporal.add(target.temporal_name)
    for name in sorted(used_temporal):
        HookRegistry.check_if_exists_or_initialize(temporal_modules[name]).register_hook(
            _TemporalGeometryHook(state, name), _BROADWAY_HOOK
        )
    registry.register_hook(BroadWayHook(state, targets), _BROADWAY_HOOK)
    _invalidate_child_registries(registry)
    logger.info("BroadWay on %d temporal attention modules: %s", len(targets), [t.name for t in targets])
    return BroadWayHandle(unet, state, targets)


def _invalidate_child_registries(registry) -> None:
    # Recent diffusers cache the list of child registries (for cache contexts); older releases have no such cache.
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def remove_broadway(pipe_or_unet) -> None:
    """Restore the processors BroadWay replaced (the same objects) and remove its hooks; a no-op if not applied."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    registry = getattr(unet, "_diffusers_hook", None)
    hook = registry.get_hook(_BROADWAY_HOOK) if registry is not None else None
    if hook is None:
        return
    for target in hook.targets:
        if target.attn.processor is target.wrapper:
            target.attn.set_processor(target.previous)
        else:
            logger.warning("BroadWay: %s's processor was replaced after apply_broadway; leaving %s in place",
                           target.name, type(target.attn.processor).__name__)
    registry.remove_hook(_BROADWAY_HOOK, recurse=True)
    _invalidate_child_registries(registry)


def broadway_enabled(pipe_or_unet) -> bool:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    registry = getattr(unet, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(_BROADWAY_HOOK) is not None


def enable_broadway(pipe, config: BroadWayConfig | None = None, **overrides: Any) -> BroadWayHandle:
    """Pipeline sugar in the style of ``pipe.enable_free_init(...)``: config fields may be given as keywords."""
    if overrides:
        config = BroadWayConfig(**{**(config or BroadWayConfig()).to_dict(), **overrides})
    return apply_broadway(pipe, config)


def disable_broadway(pipe) -> None:
    remove_broadway(pipe)


@contextlib.contextmanager
def broadway(pipe_or_unet, config: BroadWayConfig | None = None, *, scheduler=None) -> Iterator[BroadWayHandle]:
    """``with broadway(pipe, config) as handle: pipe(...)``; removed on exit, also after an exception."""
    handle = apply_broadway(pipe_or_unet, config, scheduler=scheduler)
    try:
        yield handle
    finally:
        handle.remove()
