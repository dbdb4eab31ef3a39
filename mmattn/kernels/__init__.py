"""Attention kernels for the edit contract: the exact PyTorch path and (on CUDA) Triton kernels.

``attention(...)`` is the one dispatch point. ``MMATTN_KERNEL=exact|triton`` forces a path for debugging;
otherwise CUDA tensors go to Triton when it is usable and everything else to the exact path, with one exception:
an unedited call that torch's ``scaled_dot_product_attention`` computes exactly the same way — one query row
(decode), or a causal square block without padding — goes to SDPA, on the GPU (FlashAttention/cuDNN kernels,
faster than ours and cheaper to launch: benchmarks/RESULTS.md, kernel section) as on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch

from ..edits import AttentionEdit, AttentionStats
from .exact import exact_attention

__all__ = ["attention", "exact_attention", "sdpa_attention", "sdpa_applies", "triton_available", "selected_backend",
           "BACKENDS"]

BACKENDS = ("exact", "triton")


def triton_available() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and why not when they cannot (cached: called per attention)."""
    return _triton_status(os.environ.get("TRITON_INTERPRET") == "1")


@functools.lru_cache(maxsize=None)
def _triton_status(interpret: bool) -> tuple[bool, str]:
    try:
        from . import triton_attention  # noqa: F401
    except ImportError as error:
        return False, f"Triton kernels unavailable: {error}"
    if interpret:
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"CUDA ({torch.cuda.get_device_name()})"


def selected_backend(query: torch.Tensor) -> str:
    forced = os.environ.get("MMATTN_KERNEL", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MMATTN_KERNEL={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        return forced
    if query.is_cuda and triton_available()[0]:
        return "triton"
    return "exact"


def sdpa_applies(query: torch.Tensor, key: torch.Tensor, causal: bool, key_padding: torch.Tensor | None,
                 dense_mask: torch.Tensor | None, edit: AttentionEdit | None) -> bool:
    """Whether torch SDPA gives this call's exact semantics. Causal attention here is bottom-right aligned and
    SDPA's ``is_causal`` top-left, so only one query row or a square block qualifies; padding is allowed only with
    one query row, which then always has a valid key (itself), so no row is fully masked (SDPA would give NaN)."""
    if dense_mask is not None or (edit is not None and not edit.is_noop):
        return False
    if not causal:
        return key_padding is None
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return True
    return q_len == kv_len and key_padding is None


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float, causal: bool = True,
                   key_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, AttentionStats]:
    """Unedited attention through torch SDPA for the calls :func:`sdpa_applies` accepts; output [B, Nq, H, D]."""
    import torch.nn.functional as F

    mask = None if key_padding is None else key_padding.to(device=query.device, dtype=torch.bool)[:, None, None, :]
    output = F.scaled_dot_product_attention(
        query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask, scale=scale,
        is_causal=bool(causal) and query.shape[2] > 1, enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2), AttentionStats()


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    key_padding: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
    edit: AttentionEdit | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Edited attention. Shapes and semantics: see :func:`mmattn.kernels.exact.exact_attention`."""
    forced = backend or os.environ.get("MMATTN_KERNEL", "").strip()
    chosen = backend or selected_backend(query)
    if not forced and sdpa_applies(query, key, causal, key_padding, dense_mask, edit):
        return sdpa_attention(query, key, value, scale=scale, causal=causal, key_padding=key_padding)
    if chosen == "triton":
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(f"MMATTN_KERNEL=triton was requested but {why}; use MMATTN_KERNEL=exact")
        from .triton_attention import triton_attention

        return triton_attention(
            query, key, value, scale=scale, causal=causal, key_padding=key_padding, dense_mask=dense_mask, edit=edit
        )
    if chosen != "exact":
        raise ValueError(f"unknown attention backend {chosen!r}; choose one of {', '.join(BACKENDS)}")
    return exact_attention(
        query, key, value, scale=scale, causal=causal, key_padding=key_padding, dense_mask=dense_mask, edit=edit
    )
