"""Attention kernels for the edit contract: the exact PyTorch path and (on CUDA) Triton kernels.

``attention(...)`` is the one dispatch point. ``MMATTN_KERNEL=exact|triton`` forces a path for debugging;
otherwise CUDA tensors go to Triton when it is usable and everything else to the exact path.
"""

from __future__ import annotations

import functools
import os

import torch

from ..edits import AttentionEdit, AttentionStats
from .exact import exact_attention

__all__ = ["attention", "exact_attention", "triton_available", "selected_backend", "BACKENDS"]

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
    chosen = backend or selected_backend(query)
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
