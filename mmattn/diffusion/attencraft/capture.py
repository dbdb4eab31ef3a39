"""Name-keyed capture of attention probabilities or (Q, K) from diffusers ``Attention`` modules.

This is the capture half of the shared attention-capture API (spec ``diffusion-broadway-attencraft.md`` §4):
select modules by name, capture either

* ``"probs"``: ``softmax(Q K^T * scale)`` of the selected batch rows, computed explicitly in float32 and used for
  the layer's own output, so gradients flow through the stored tensor (AttenCraft's attention loss), or
* ``"qk"``: the detached ``(Q, K, scale)`` of the selected rows, while the layer keeps its fused SDPA path (the
  self-attention affinity is never materialised; :mod:`.masks` multiplies with it through the kernels),

into a store keyed by module name and cleared at every denoiser call, so gradient checkpointing or extra attention
calls cannot desynchronise it (the reference's call-counting ``AttentionStore`` can, spec §3.8).

Integration follows the project's diffusers rules (``ecosystem.md`` §2): a wrapping processor
(:class:`CaptureAttnProcessor`) delegates to the processor it found, running it under a ``TorchFunctionMode`` that
intercepts the one attention product (``F.scaled_dot_product_attention`` for SDPA processors; ``torch.baddbmm`` and
``torch.bmm`` of ``Attention.get_attention_scores`` for the explicit ones), so projections, Custom-Diffusion K/V
copies, norms and residuals stay the wrapped processor's own. When a module is not asked to capture on a call, the
wrapped processor runs untouched. :meth:`AttentionCapture.remove` puts the original processor objects back.
A ``diffusers.hooks`` ``ModelHook`` named ``"mmattn_attencraft"`` on the denoiser clears the store per call (the
BroadWay hook is ``"mmattn_broadway"``; the two never touch the same modules: BroadWay wraps temporal attention,
AttenCraft spatial attention of image UNets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionCapture",
    "CaptureAttnProcessor",
    "CaptureState",
    "QKCapture",
    "SUPPORTED_PROCESSORS",
    "attention_level",
    "attention_modules_at_level",
]

CAPTURE_HOOK = "mmattn_attencraft"
ROLES = ("probs", "qk")
# Processors whose attention product the interceptor understands: SDPA ones call F.scaled_dot_product_attention
# once; explicit ones call Attention.get_attention_scores (one baddbmm) then one bmm with the probabilities.
_SDPA = ("AttnProcessor2_0", "CustomDiffusionAttnProcessor2_0", "FusedAttnProcessor2_0")
_EXPLICIT = ("AttnProcessor", "CustomDiffusionAttnProcessor")
SUPPORTED_PROCESSORS = _SDPA + _EXPLICIT


@dataclass
class QKCapture:
    """Detached queries and keys of one layer for the selected rows: ``[b, heads, N, d]`` each, float32."""

    query: torch.Tensor
    key: torch.Tensor
    scale: float


@dataclass
class CaptureState:
    """What to capture on the next denoiser calls, and what was captured on the current one.

    ``active_roles``: the roles that capture on this call (a module whose role is absent runs untouched).
    ``batch_index``: the batch rows to keep (AttenCraft: row 0, the instance sample of ``[instance, class]``).
    ``keep_grad``: keep the autograd graph of "probs" captures (training); False stores detached copies.
    """

    active_roles: set[str] = field(default_factory=set)
    batch_index: Any = field(default_factory=lambda: slice(0, 1))
    keep_grad: bool = False
    store: dict[str, Any] = field(default_factory=dict)
    calls: int = 0

    def clear(self) -> None:
        self.store.clear()


class _CaptureHook(ModelHook):
    """On the denoiser: a fresh store for every forward call (maps are only meaningful within one call)."""

    def __init__(self, state: CaptureState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.clear()
        self.state.calls += 1
        return args, kwargs


class _InterceptMode(torch.overrides.TorchFunctionMode):
    """Runs inside the wrapped processor; replaces or observes its single attention product."""

    def __init__(self, processor: "CaptureAttnProcessor", attn, explicit: bool) -> None:
        super().__init__()
        self.processor = processor
        self.heads = attn.heads
        self.explicit = explicit
        self.products = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not self.explicit:
            self.products += 1
            return self._sdpa(*args, **kwargs)
        if self.explicit and func is torch.baddbmm and self.processor.role == "qk":
            # get_attention_scores: baddbmm(input, query, key^T, beta=, alpha=scale), heads folded into the batch.
            query, key_t = args[1], args[2]
            scale = kwargs.get("alpha", args[4] if len(args) > 4 else 1.0)
            self.products += 1
            self.processor._store_qk(query.unflatten(0, (-1, self.heads)),
                                     key_t.transpose(-1, -2).unflatten(0, (-1, self.heads)), float(scale))
            return func(*args, **kwargs)
        if self.explicit and func is torch.bmm and self.processor.role == "probs":
            probs = args[0]
            self.products += 1
            self.processor._store_probs(probs.unflatten(0, (-1, self.heads)))
            return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if is_causal or dropout_p or enable_gqa:
            raise RuntimeError(
                f"AttenCraft capture on {self.processor.name}: causal, dropout and GQA attention are not spatial "
                "UNet attention; refusing to guess the probabilities"
            )
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        if self.processor.role == "qk":
            self.processor._store_qk(query, key, scale)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask.float()
        probs = scores.softmax(dim=-1)
        self.processor._store_probs(probs)
        return torch.matmul(probs.to(value.dtype), value)


class CaptureAttnProcessor(torch.nn.Module):
    """Wraps the processor of one ``Attention`` module and captures its probabilities or (Q, K) on request.

    An ``nn.Module`` so a wrapped trainable processor (Custom Diffusion's K/V copies) stays registered under the
    UNet: ``unet.parameters()``, ``.to()`` and optimizers keep seeing it.
    """

    def __init__(self, inner, state: CaptureState, name: str, role: str) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"capture role must be one of {ROLES}, got {role!r}")
        kind = type(inner).__name__
        if kind not in SUPPORTED_PROCESSORS:
            raise ValueError(
                f"AttenCraft cannot capture attention through {kind} on {name}; supported processors: "
                f"{', '.join(SUPPORTED_PROCESSORS)} (xFormers, sliced and other fused processors expose no "
                "probabilities; call unet.set_attn_processor(AttnProcessor2_0()) first)"
            )
        self.inner = inner  # registered as a submodule when it is one
        self.state = state
        self.name = name
        self.role = role
        self.explicit = kind in _EXPLICIT

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if temb is not None:
            kwargs["temb"] = temb
        if self.role not in self.state.active_roles:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        mode = _InterceptMode(self, attn, self.explicit)
        with mode:
            output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if mode.products != 1:
            raise RuntimeError(
                f"AttenCraft expected one attention product in {type(self.inner).__name__} on {self.name}, saw "
                f"{mode.products}; supported processors: {', '.join(SUPPORTED_PROCESSORS)}"
            )
        return output

    def _store_probs(self, probs: torch.Tensor) -> None:
        kept = probs[self.state.batch_index].float()
        self.state.store[self.name] = kept if self.state.keep_grad else kept.detach()

    def _store_qk(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        index = self.state.batch_index
        self.state.store[self.name] = QKCapture(query[index].detach().float(), key[index].detach().float(), scale)

    def __repr__(self) -> str:
        return f"CaptureAttnProcessor({self.role}, wrapping {type(self.inner).__name__})"


# ------------------------------------------------------------------------------------------ layer selection


def attention_level(name: str, num_blocks: int) -> int | None:
    """Resolution level of a ``UNet2DConditionModel`` attention module from its name: maps are
    ``latent_side / 2**level`` on a side. ``down_blocks.i`` is level ``i`` (each down block but the last ends with a
    downsampler), ``up_blocks.j`` level ``num_blocks - 1 - j``, the mid block the deepest level. SD2.1-base at
    512² (latent 64): level 1 = 32x32 (``down_blocks.1``, ``up_blocks.2``), level 2 = 16x16 (``down_blocks.2``,
    ``up_blocks.1``), the layers the spec names (§3.2.2)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_blocks - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return num_blocks - 1
    return None


def attention_modules_at_level(unet, level: int, attn_name: str) -> dict[str, Any]:
    """``{module name: Attention}`` for every ``attn1`` (self) or ``attn2`` (cross) module at ``level``.

    Every layer at that resolution takes part, down, mid and up, as the reference's query-length rule does.
    """
    from diffusers.models.attention_processor import Attention

    num_blocks = len(getattr(unet.config, "block_out_channels", ()))
    if not num_blocks or not hasattr(unet, "down_blocks"):
        raise ValueError(
            f"AttenCraft needs a UNet2DConditionModel-style denoiser (down_blocks/up_blocks), got {type(unet).__name__}"
        )
    found: dict[str, Any] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("." + attn_name) and attention_level(name, num_blocks) == level:
            found[name] = module
    if not found:
        levels = sorted({attention_level(n, num_blocks) for n, m in unet.named_modules()
                         if isinstance(m, Attention) and n.endswith("." + attn_name)} - {None})
        raise ValueError(
            f"AttenCraft: no {attn_name} attention at resolution level {level} (maps of latent/{2 ** level}); "
            f"this UNet has {attn_name} layers at levels {levels}"
        )
    return found


# ------------------------------------------------------------------------------------------ the handle


class AttentionCapture:
    """Wraps the processors of the given modules; ``remove()`` (or the context manager) restores them.

    Args:
        unet: the denoiser (receives the store-clearing hook).
        modules: ``{name: (Attention module, role)}`` with role "probs" or "qk".
    """

    def __init__(self, unet, modules: dict[str, tuple[Any, str]]) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        if registry.get_hook(CAPTURE_HOOK) is not None:
            raise ValueError("AttenCraft capture is already applied to this denoiser; remove it first")
        self.unet = unet
        self.state = CaptureState()
        self._originals: dict[str, tuple[Any, Any, CaptureAttnProcessor]] = {}
        try:
            for name, (attn, role) in modules.items():
                if isinstance(attn.processor, CaptureAttnProcessor):
                    raise ValueError(f"{name} already carries an AttenCraft capture processor")
                wrapper = CaptureAttnProcessor(attn.processor, self.state, name, role)
                self._originals[name] = (attn, attn.processor, wrapper)
                attn.set_processor(wrapper)
        except Exception:
            self._restore()
            raise
        registry.register_hook(_CaptureHook(self.state), CAPTURE_HOOK)

    @property
    def store(self) -> dict[str, Any]:
        return self.state.store

    def names(self, role: str) -> list[str]:
        return [name for name, (_, _, wrapper) in self._originals.items() if wrapper.role == role]

    def configure(self, roles: set[str] | tuple[str, ...] = (), *, keep_grad: bool = False, batch_index: Any = None) -> None:
        """Which roles capture on the following calls (empty: none, the wrapped processors run untouched)."""
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown capture roles {sorted(unknown)}; roles: {ROLES}")
        self.state.active_roles = set(roles)
        self.state.keep_grad = keep_grad
        if batch_index is not None:
            self.state.batch_index = batch_index

    def _restore(self) -> None:
        for name, (attn, previous, wrapper) in self._originals.items():
            if attn.processor is wrapper:
                attn.set_processor(previous)
            else:
                logger.warning("AttenCraft: the processor of %s was replaced after capture; leaving %s in place",
                               name, type(attn.processor).__name__)
        self._originals.clear()

    def remove(self) -> None:
        self._restore()
        registry = getattr(self.unet, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(CAPTURE_HOOK) is not None:
            registry.remove_hook(CAPTURE_HOOK, recurse=True)
        self.state.clear()

    def __enter__(self) -> "AttentionCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
