"""VAR: Visual Attention Redistribution ("See What You Are Told: Visual Attention Sink in Large Multimodal
Models", Kang et al., ICLR 2025).

Visual sink tokens are image tokens whose hidden state has massive activations in a few fixed channels. VAR takes
part of the attention mass that text rows put on sinks (visual and textual) and gives it to the non-sink image
tokens, in proportion to their own attention, on "image-centric" heads only.

Compiled to the edit contract as a :class:`~mmattn.edits.MassTransfer` on four key groups
(other / image non-sink / image sink / text sink), applied on rows after the image span (prefill) and on every
decode row, in layers 2 .. L-2 (the paper skips the last layer).

Conventions (the paper's, spec ``methods-transprune-var.md`` §2.3):
- ``rho``: the *minimum visual non-sink ratio* (M_img - M_vs) / M_img of a row (the code's ``rho`` is 1 - this);
- ``transfer``: the fraction of sink mass moved to image tokens (the code's ``p`` is the fraction *kept*:
  the released default p = 0.6 moves 0.4). ``VARConfig.reference_code()`` reproduces the released code's
  defaults (transfer 0.4, last layer included).

Deviations from the released code, on purpose (documented bugs, spec §2.7): per-sample state that is reset on
every request (P3), the last layer skipped unless ``apply_last_layer`` (P4), per-model sink dims (P5), fp32
masses (P14), batched per-sample spans and sinks (P1, P12: the image group is the union of all images' tokens).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ...edits import AttentionEdit, MassTransfer
from ...layout import Role
from .base import AttentionMethod, register_method

OTHER, IMAGE, IMAGE_SINK, TEXT_SINK = 0, 1, 2, 3
NUM_GROUPS = 4

# Massive-activation channels per backbone (spec §2.3, reference `src/logic/constants.py`).
SINK_DIMS_BY_BACKBONE = {
    "llama-2-7b": (2533, 1415),  # LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B
    "llama-2-13b": (2100, 4743),  # LLaVA-1.5-13B, LLaVA-NeXT-Vicuna-13B
}


def sink_dims_for(model) -> tuple[int, ...] | None:
    """Known sink channels for a checkpoint name, or None (then they are calibrated per request)."""
    name = str(getattr(model.config, "_name_or_path", "") or "").lower()
    text = model.config.text_config
    if ("llava-1.5-7b" in name or "llava-v1.6-vicuna-7b" in name) and text.hidden_size == 4096:
        return SINK_DIMS_BY_BACKBONE["llama-2-7b"]
    if ("llava-1.5-13b" in name or "llava-v1.6-vicuna-13b" in name) and text.hidden_size == 5120:
        return SINK_DIMS_BY_BACKBONE["llama-2-13b"]
    return None


@dataclass
class VARConfig:
    tau: float = 20.0  # sink if phi > tau (paper: tau = 20 in all experiments)
    min_image_mass: float = 0.2  # a row takes part only if its image mass is at least this ("summ")
    rho: float = 0.5  # minimum visual non-sink ratio; presets: 0.5 hallucination, 0.8 general, 0.9 vision-centric
    transfer: float = 0.6  # fraction of sink mass moved onto non-sink image tokens (paper's p)
    first_layer: int = 2  # layers 0 and 1 never get sink sets (reference `sink_select_layers = range(L)[2:]`)
    apply_last_layer: bool = False  # the paper skips the last layer; the released code does not (bug P4)
    sink_dims: tuple[int, ...] | None = None  # None: known dims for the checkpoint, else calibrated
    calibration_dims: int = 2  # how many channels to calibrate on the first real token when dims are unknown

    @classmethod
    def reference_code(cls) -> "VARConfig":
        """The released code's effective behaviour: keeps 60% of sink mass and also edits the last layer."""
        return cls(transfer=0.4, apply_last_layer=True)

    def __post_init__(self) -> None:
        if not 0.0 <= self.transfer <= 1.0:
            raise ValueError(f"VAR transfer must lie in [0, 1], got {self.transfer}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"VAR rho must lie in [0, 1], got {self.rho}")


def sink_scores(hidden: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """phi_j = max_{d in dims} |h_j[d]| / sqrt(mean_k h_j[k]^2 + 1e-6), fp32, without the RMSNorm weight.

    ``dims`` is [B, n] (per-sample channels)."""
    h = hidden.float()
    rms = torch.sqrt(h.pow(2).mean(-1) + 1e-6)
    picked = torch.gather(h.abs(), 2, dims[:, None, :].expand(-1, h.shape[1], -1))
    return picked.amax(-1) / rms


@register_method
class VAR(AttentionMethod):
    name = "var"
    Config = VARConfig

    def attach(self, context) -> None:
        self._num_layers = context.num_layers
        self._dims = self.config.sink_dims or sink_dims_for(context.model)
        hidden = context.model.config.text_config.hidden_size
        if self._dims is not None and max(self._dims) >= hidden:
            raise ValueError(f"VAR sink_dims {self._dims} do not fit hidden size {hidden}")
        layers = context.language_model.layers
        self._hooks = [
            layer.register_forward_pre_hook(self._make_sink_hook(context, idx), with_kwargs=True)
            for idx, layer in enumerate(layers)
            if idx >= self.config.first_layer
        ]

    def detach(self, context) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def begin_request(self, context) -> None:
        # Per-request state (the released code never resets it: bug P3).
        self.groups_by_layer: dict[int, torch.Tensor] = {}
        self.has_visual_sink: dict[int, torch.Tensor] = {}
        self.sample_dims: torch.Tensor | None = None

    def _warn_if_sinkless(self) -> None:
        if getattr(self, "_warned", False) or any(bool(v.any()) for v in self.has_visual_sink.values()):
            return
        self._warned = True
        warnings.warn(
            f"VAR found no visual sink (phi > tau={self.config.tau}) in any layer, so it leaves this request unchanged "
            "(the paper's behaviour). Models without massive activations (e.g. small or untrained ones) need a lower "
            "tau; compare mmattn.lvlm.methods.var.sink_scores on your model's hidden states.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _make_sink_hook(self, context, layer_idx: int):
        def hook(module, args, kwargs):
            if context.step != 0 or context.layout is None or not context.in_request:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            self._detect_sinks(context, layer_idx, hidden)
            return None

        return hook

    def _detect_sinks(self, context, layer_idx: int, hidden: torch.Tensor) -> None:
        layout = context.layout_at(layer_idx)
        roles = layout.roles.to(hidden.device)
        if roles.shape[1] != hidden.shape[1]:
            raise RuntimeError("VAR saw hidden states that do not match the prompt layout")
        if self.sample_dims is None:
            if self._dims is not None:
                self.sample_dims = torch.tensor(self._dims, device=hidden.device).expand(hidden.shape[0], -1)
            else:
                # Unknown backbone: the massive channels are the largest |h|/rms channels of the first real
                # token (BOS is the strongest text sink), measured at the first layer that has sinks.
                first = layout.valid.to(hidden.device).float().argmax(1)
                h = hidden[torch.arange(hidden.shape[0]), first].float()
                ratio = h.abs() / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
                self.sample_dims = ratio.topk(self.config.calibration_dims, dim=-1).indices
        phi = sink_scores(hidden, self.sample_dims)
        valid = roles != Role.PAD
        sink = (phi > self.config.tau) & valid
        image = (roles == Role.IMAGE) | (roles == Role.IMAGE_NEWLINE)
        groups = torch.full_like(roles, OTHER)
        groups[image] = IMAGE
        groups[image & sink] = IMAGE_SINK
        groups[~image & sink] = TEXT_SINK
        self.groups_by_layer[layer_idx] = groups
        self.has_visual_sink[layer_idx] = (image & sink).any(dim=1)

    def edit(self, context, call):
        cfg = self.config
        layer = call.layer_idx
        if layer < cfg.first_layer or (layer == call.num_layers - 1 and not cfg.apply_last_layer):
            return None
        groups = getattr(self, "groups_by_layer", {}).get(layer)
        if groups is None:
            if call.is_prefill and context.layout is None:
                raise RuntimeError("VAR needs the prompt's input_ids at prefill to find the image tokens")
            return None
        active = self.has_visual_sink[layer]
        if call.is_prefill and layer == max(self.has_visual_sink):
            self._warn_if_sinkless()
        if not bool(active.any()):
            return None  # no visual sink in this layer: VAR does nothing here (spec P9)
        layout = context.layout_at(layer)
        key_groups = groups
        if call.kv_len > groups.shape[1]:
            pad = torch.full((groups.shape[0], call.kv_len - groups.shape[1]), OTHER, dtype=groups.dtype, device=groups.device)
            key_groups = torch.cat([groups, pad], dim=1)  # generated tokens are never sinks
        else:
            key_groups = groups[:, : call.kv_len]
        num_image = layout.num_image_tokens.to(call.device).float()
        transfer = MassTransfer(
            source_groups=(IMAGE_SINK, TEXT_SINK),
            target_groups=(IMAGE,),
            retain=1.0 - cfg.transfer,
            heads=active[:, None].expand(-1, call.num_heads),
            condition_groups=(IMAGE, IMAGE_SINK),
            min_condition_mass=cfg.min_image_mass,
            ratio_groups=(IMAGE_SINK,),
            max_ratio=1.0 - cfg.rho,
            ratio_eps=num_image * 1e-6,  # the reference adds 1e-6 per image key to the denominator
        )
        return AttentionEdit(
            key_groups=key_groups,
            num_groups=NUM_GROUPS,
            row_start=layout.image_end.to(call.device),  # text after the image at prefill; every decode row
            mass_transfer=transfer,
        )
