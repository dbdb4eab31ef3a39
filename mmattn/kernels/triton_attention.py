"""Triton kernels for the attention-edit contract: the fast path of :func:`mmattn.kernels.attention`.

``triton_attention`` computes exactly what :func:`mmattn.kernels.exact.exact_attention` computes (same output
layout ``[B, Nq, H, D]`` in the query dtype, same :class:`~mmattn.edits.AttentionStats`), with fp32 accumulation:

* prefill (``_triton_prefill``): FlashAttention-2 style forward with every edit as a compile-time flag; a mass
  transfer adds a QK-only first pass that computes the per-row transfer weights; per-key mass adds a pass shaped
  like the FlashAttention dK loop over the flagged rows only;
* decode (``_triton_decode``, used when ``Nq * H / Hkv <= 64`` and ``Nq <= 16``): split-KV with GQA packing and a
  reduction kernel; a mass transfer is applied in the same single pass through per-class accumulators.

GQA never materialises repeated K/V. Inputs may be fp16, bf16 or fp32 (fp32 inputs use IEEE fp32 dots, which
are exact but slow; they exist for testing). Head dims up to 256 (padded to a power of two).

Fallbacks to the exact PyTorch path (same results, slower): ``dense_mask`` (user 4-D masks), more than 31 key
groups, and empty inputs.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the interpreter must be enabled before this
module is first imported).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from ..edits import AttentionEdit, AttentionStats
from . import _triton_decode as _dec
from . import _triton_prefill as _pre

__all__ = ["triton_attention", "PrefillConfig", "MAX_GROUPS"]

LOG2E = 1.4426950408889634
MAX_GROUPS = 31  # group-membership sets are passed as 32-bit masks

_INTERPRET = type(_pre._fwd_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _env_config(name: str) -> PrefillConfig | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    bm, bn, w, s = (int(x) for x in raw.split(","))
    return PrefillConfig(bm, bn, w, s)


def _prefill_config(head_d: int, dtype: torch.dtype, q_len: int) -> PrefillConfig:
    """Tile shapes for the forward kernel (Hopper-oriented; see specs/performance.md section 5)."""
    forced = _env_config("MMATTN_TRITON_PREFILL_CONFIG")
    if forced is not None:
        return forced
    if _INTERPRET:
        return PrefillConfig(16, 16, 4, 1)
    if dtype == torch.float32:
        return PrefillConfig(64, 32, 4, 2)
    if head_d <= 64:
        return PrefillConfig(128, 64, 4, 3)
    if head_d <= 128:
        return PrefillConfig(128, 64, 8, 3)
    return PrefillConfig(64, 32, 4, 2)


def _aux_config(head_d: int, dtype: torch.dtype) -> PrefillConfig:
    """Tile shapes for the QK-only kernels (mass-transfer pass 1, per-key mass)."""
    forced = _env_config("MMATTN_TRITON_AUX_CONFIG")
    if forced is not None:
        return forced
    if _INTERPRET:
        return PrefillConfig(16, 16, 4, 1)
    if dtype == torch.float32:
        return PrefillConfig(64, 32, 4, 2)
    if head_d <= 128:
        return PrefillConfig(128, 64, 8, 3)
    return PrefillConfig(64, 32, 4, 2)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Next power of two (plain Python: ``triton.next_power_of_2`` costs microseconds per call on the host)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _bits(groups: tuple[int, ...]) -> int:
    value = 0
    for g in groups:
        value |= 1 << int(g)
    return value


def _stride(t: torch.Tensor | None, dim: int) -> int:
    return 0 if t is None else (t.stride(dim) if t.size(dim) > 1 else 0)


def _as_loadable(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Bool tensors are passed as uint8 views (no copy); everything is moved to the query's device."""
    if t is None:
        return None
    if t.device != device:
        t = t.to(device)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t


def triton_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    key_padding: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
    edit: AttentionEdit | None = None,
    path: str | None = None,
    decode_splits: int | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Edited attention on Triton kernels; shapes and semantics as :func:`~mmattn.kernels.exact.exact_attention`.

    Args:
        query: [B, H, Nq, D]; key, value: [B, Hkv, Nk, D] with H a multiple of Hkv (any strides, last dim
            contiguous preferred).
        dense_mask: not handled by the kernels; a call with one falls back to the exact PyTorch path.
        path: ``"prefill"`` or ``"decode"`` to force a kernel family (default: decode when
            ``Nq <= 16`` and ``Nq * H / Hkv <= 64``).
        decode_splits: force the number of KV splits of the decode path (testing).
    """
    edit = edit or AttentionEdit()
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({kv_heads})")
    edit.validate(batch, num_heads, q_len, kv_len)
    if (
        dense_mask is not None
        or edit.num_groups > MAX_GROUPS
        or q_len == 0
        or kv_len == 0
        or head_dim > 256
    ):
        from .exact import exact_attention

        return exact_attention(
            query, key, value, scale=scale, causal=causal, key_padding=key_padding, dense_mask=dense_mask, edit=edit
        )
    if key.dtype != query.dtype:
        key = key.to(query.dtype)
    if value.dtype != query.dtype:
        value = value.to(query.dtype)
    group = num_heads // kv_heads
    if path is None:
        path = "decode" if (q_len <= 16 and q_len * group <= 64) else "prefill"
    if path == "decode":
        return _decode(query, key, value, scale, causal, key_padding, edit, decode_splits)
    if path != "prefill":
        raise ValueError(f"unknown Triton attention path {path!r}")
    return _prefill(query, key, value, scale, causal, key_padding, edit)


class _EditArgs:
    """Edit tensors as kernel arguments: pointers (a placeholder where absent), strides and flags."""

    def __init__(self, edit: AttentionEdit, key_padding, query: torch.Tensor, num_heads: int):
        dev = query.device
        self.dummy = query
        self.gid = _as_loadable(edit.key_groups, dev)
        self.pad = _as_loadable(key_padding, dev)
        self.gb = _as_loadable(edit.group_bias, dev)
        self.gg = _as_loadable(edit.group_gain, dev)
        self.kb = _as_loadable(edit.key_bias, dev)
        self.rs = _as_loadable(edit.row_start, dev)
        self.re = _as_loadable(edit.row_end, dev)
        self.hs = _as_loadable(edit.head_scale, dev)
        mt = edit.mass_transfer
        self.mt = mt
        self.has_gid = edit.key_groups is not None and edit.num_groups > 0 and edit.needs_groups
        self.G = max(int(edit.num_groups), 0)
        self.G_PAD = max(16, _pow2(max(self.G, 1)))
        if mt is not None:
            self.hm = _as_loadable(mt.heads, dev)
            eps = mt.ratio_eps
            if isinstance(eps, torch.Tensor):
                self.eps_ptr = _as_loadable(eps.reshape(-1), dev)
                self.s_eps = 0 if eps.dim() == 0 else 1
                self.eps_value = 0.0
            else:
                self.eps_ptr = None
                self.s_eps = 0
                self.eps_value = float(eps)
            self.src_bits = _bits(mt.source_groups)
            self.tgt_bits = _bits(mt.target_groups)
            self.cond_bits = _bits(mt.condition_groups)
            self.ratio_bits = _bits(mt.ratio_groups)
            self.has_cond_test = bool(mt.condition_groups or mt.ratio_groups)
            self.retain = float(mt.retain)
            self.log2_retain = math.log2(mt.retain) if mt.retain > 0 else float("-inf")
        else:
            self.hm = None
            self.eps_ptr = None
            self.s_eps = 0
            self.eps_value = 0.0
            self.src_bits = self.tgt_bits = self.cond_bits = self.ratio_bits = 0
            self.has_cond_test = False
            self.retain = 1.0
            self.log2_retain = 0.0

    def p(self, t):
        return self.dummy if t is None else t

    def fold_group_bias(self, edit: AttentionEdit) -> None:
        """Turn the per-(head, group) bias into a per-(head, key) bias, gathered once here.

        In the kernels a group bias costs a group-id load plus a dependent gather per key and tile; a per-key bias
        is one contiguous load. Nsight Compute at n = 2880 (benchmarks/RESULTS.md): 269 us with the group bias
        against 219 us with a key bias, 174 us plain. Worth it for long query blocks (prefill); decode keeps the
        gather, where one extra launch would cost more than it saves."""
        if self.gb is None:
            return
        gid = self.gid.long()  # [B|1, N]
        gb = self.gb.float()  # [B|1, H|1, G]
        batch = max(gid.shape[0], gb.shape[0])
        heads = gb.shape[1]
        index = gid[:, None, :].expand(batch, heads, gid.shape[1])
        folded = torch.gather(gb.expand(batch, heads, gb.shape[2]), 2, index)
        if self.kb is not None:
            folded = folded + self.kb.float()
        self.kb = folded
        self.gb = None
        self.has_gid = edit.group_gain is not None or edit.mass_transfer is not None or edit.return_group_mass

    def table_strides(self):
        """Strides of the per-key / per-(b,h,g) tables, in the order the kernels take them."""
        gid, pad, gb, gg, kb = self.gid, self.pad, self.gb, self.gg, self.kb
        return (
            _stride(gid, 0), _stride(gid, 1), _stride(pad, 0), _stride(pad, 1),
            _stride(gb, 0), _stride(gb, 1), _stride(gb, 2), _stride(gg, 0), _stride(gg, 1), _stride(gg, 2),
            _stride(kb, 0), _stride(kb, 1), _stride(kb, 2),
        )


def _head_d(head_dim: int) -> int:
    return max(16, _pow2(head_dim))


def _prefill(query, key, value, scale, causal, key_padding, edit: AttentionEdit):
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = num_heads // kv_heads
    dev = query.device
    a = _EditArgs(edit, key_padding, query, num_heads)
    a.fold_group_bias(edit)
    HEAD_D = _head_d(head_dim)
    fp32 = query.dtype == torch.float32
    dot_prec = "ieee" if fp32 else "tf32"
    scale2 = float(scale) * LOG2E
    want_key_mass = edit.key_mass_rows is not None
    store_lse = edit.return_lse or want_key_mass
    store_gm = edit.return_group_mass

    out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=dev)
    lse = torch.empty(batch, num_heads, q_len, dtype=torch.float32, device=dev) if store_lse else None
    gm = torch.empty(batch, num_heads, q_len, a.G, dtype=torch.float32, device=dev) if store_gm else None
    lws = lwt = None
    strides = a.table_strides()
    rs_s = _stride(a.rs, 0)
    re_s = _stride(a.re, 0)

    if a.mt is not None:
        lws = torch.empty(batch, num_heads, q_len, dtype=torch.float32, device=dev)
        lwt = torch.empty_like(lws)
        cfg = _aux_config(head_dim, query.dtype)
        grid = (batch * num_heads, _cdiv(q_len, cfg.block_m))
        _pre._mt_pass1_kernel[grid](
            query, key, lws, lwt,
            a.p(a.gid), a.p(a.pad), a.p(a.gb), a.p(a.gg), a.p(a.kb), a.p(a.rs), a.p(a.re), a.p(a.hm), a.p(a.eps_ptr),
            *query.stride(), *key.stride(),
            *strides, rs_s, re_s, _stride(a.hm, 0), _stride(a.hm, 1), a.s_eps,
            num_heads, group, q_len, kv_len, head_dim, scale2,
            a.src_bits, a.tgt_bits, a.cond_bits, a.ratio_bits,
            a.log2_retain, 1.0 - a.retain, float(a.mt.min_condition_mass), float(a.mt.max_ratio), a.eps_value,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=HEAD_D,
            CAUSAL=bool(causal), EVEN_D=HEAD_D == head_dim, DOT_PREC=dot_prec, GM_FP32=fp32,
            HAS_PAD=a.pad is not None, HAS_GBIAS=a.gb is not None, HAS_GGAIN=a.gg is not None,
            HAS_KBIAS=a.kb is not None, HAS_RS=a.rs is not None, HAS_RE=a.re is not None,
            HAS_HM=a.hm is not None, HAS_COND_TEST=a.has_cond_test, EPS_PTR=a.eps_ptr is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cfg = _prefill_config(head_dim, query.dtype, q_len)
    grid = (batch * num_heads, _cdiv(q_len, cfg.block_m))
    _pre._fwd_kernel[grid](
        query, key, value, out, a.p(lse), a.p(gm), a.p(lws), a.p(lwt),
        a.p(a.gid), a.p(a.pad), a.p(a.gb), a.p(a.gg), a.p(a.kb), a.p(a.rs), a.p(a.re), a.p(a.hs),
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        *strides, _stride(a.hs, 0), _stride(a.hs, 1), rs_s, re_s,
        num_heads, group, q_len, kv_len, head_dim, a.G, scale2, a.src_bits, a.tgt_bits,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=HEAD_D, G_PAD=a.G_PAD,
        CAUSAL=bool(causal), EVEN_D=HEAD_D == head_dim, DOT_PREC=dot_prec, GM_FP32=fp32,
        HAS_PAD=a.pad is not None, HAS_GID=a.has_gid, HAS_GBIAS=a.gb is not None, HAS_GGAIN=a.gg is not None,
        HAS_KBIAS=a.kb is not None, HAS_RS=a.rs is not None, HAS_RE=a.re is not None, HAS_MT=a.mt is not None,
        HAS_HS=a.hs is not None, STORE_LSE=store_lse, STORE_GM=store_gm,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    key_mass = None
    if want_key_mass:
        rows = edit.key_mass_rows.to(dev).bool()
        order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)
        counts = rows.sum(dim=1)
        key_mass = torch.empty(batch, num_heads, kv_len, dtype=torch.float32, device=dev)
        kcfg = _aux_config(head_dim, query.dtype)
        grid = (batch * num_heads, _cdiv(kv_len, kcfg.block_n))
        _pre._key_mass_kernel[grid](
            query, key, lse, a.p(lws), a.p(lwt), key_mass, order, counts,
            a.p(a.gid), a.p(a.pad), a.p(a.gb), a.p(a.gg), a.p(a.kb), a.p(a.rs), a.p(a.re),
            *query.stride(), *key.stride(), order.stride(0), order.stride(1),
            *strides, rs_s, re_s,
            num_heads, group, q_len, kv_len, head_dim, scale2, a.src_bits, a.tgt_bits,
            BLOCK_M=kcfg.block_m, BLOCK_N=kcfg.block_n, HEAD_D=HEAD_D,
            CAUSAL=bool(causal), EVEN_D=HEAD_D == head_dim, DOT_PREC=dot_prec,
            HAS_PAD=a.pad is not None, HAS_GID=a.has_gid, HAS_GBIAS=a.gb is not None, HAS_GGAIN=a.gg is not None,
            HAS_KBIAS=a.kb is not None, HAS_RS=a.rs is not None, HAS_RE=a.re is not None, HAS_MT=a.mt is not None,
            num_warps=kcfg.num_warps, num_stages=kcfg.num_stages,
        )
    return out, AttentionStats(lse=lse if edit.return_lse else None, group_mass=gm, key_mass=key_mass)


def _decode_block_n(head_d: int, dtype: torch.dtype) -> int:
    if _INTERPRET:
        return 16
    if dtype == torch.float32:
        return 32
    return 64 if head_d <= 128 else 32


def _decode(query, key, value, scale, causal, key_padding, edit: AttentionEdit, decode_splits):
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = num_heads // kv_heads
    dev = query.device
    a = _EditArgs(edit, key_padding, query, num_heads)
    HEAD_D = _head_d(head_dim)
    fp32 = query.dtype == torch.float32
    dot_prec = "ieee" if fp32 else "tf32"
    BLOCK_N = _decode_block_n(HEAD_D, query.dtype)
    BLOCK_R = max(16, _pow2(q_len * group))
    want_key_mass = edit.key_mass_rows is not None
    has_mt = a.mt is not None
    need_g = has_mt or edit.return_group_mass

    n_tiles = _cdiv(kv_len, BLOCK_N)
    if decode_splits is None:
        # Enough programs to keep ~8 per SM in flight (latency hiding), but at least 2 key tiles per split.
        target = 8 * _num_sms(dev)
        splits = max(1, min(_cdiv(target, batch * kv_heads), _cdiv(kv_len, 2 * BLOCK_N), n_tiles))
    else:
        splits = max(1, min(int(decode_splits), n_tiles))
    chunk = _cdiv(n_tiles, splits) * BLOCK_N
    splits = _cdiv(kv_len, chunk)

    rows = batch * num_heads * q_len
    nacc = 3 if has_mt else 1
    off_l = rows * splits
    off_acc = 2 * rows * splits
    off_g = off_acc + rows * splits * nacc * HEAD_D
    ws_size = off_g + (rows * splits * a.G_PAD if need_g else 0)
    ws = torch.empty(ws_size, dtype=torch.float32, device=dev)
    zs = torch.empty(batch, num_heads, q_len, kv_len, dtype=torch.float32, device=dev) if want_key_mass else None
    strides = a.table_strides()
    rs_s = _stride(a.rs, 0)
    re_s = _stride(a.re, 0)

    _dec._decode_split_kernel[(splits, batch * kv_heads)](
        query, key, value, ws, a.p(zs),
        a.p(a.gid), a.p(a.pad), a.p(a.gb), a.p(a.gg), a.p(a.kb), a.p(a.rs), a.p(a.re),
        *query.stride(), *key.stride(), *value.stride(),
        *strides, rs_s, re_s,
        num_heads, group, q_len, kv_len, head_dim, float(scale) * LOG2E, chunk, splits,
        a.src_bits, a.tgt_bits, off_l, off_acc, off_g,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D, G_PAD=a.G_PAD,
        CAUSAL=bool(causal), EVEN_D=HEAD_D == head_dim, DOT_PREC=dot_prec,
        HAS_PAD=a.pad is not None, HAS_GID=a.has_gid, HAS_GBIAS=a.gb is not None, HAS_GGAIN=a.gg is not None,
        HAS_KBIAS=a.kb is not None, HAS_RS=a.rs is not None, HAS_RE=a.re is not None, HAS_MT=has_mt,
        NEED_G=need_g, KEY_MASS=want_key_mass,
        num_warps=4, num_stages=1 if _INTERPRET else 3,
    )

    out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=dev)
    lse = torch.empty(batch, num_heads, q_len, dtype=torch.float32, device=dev) if edit.return_lse else None
    gm = torch.empty(batch, num_heads, q_len, a.G, dtype=torch.float32, device=dev) if edit.return_group_mass else None
    roww = torch.empty(rows, 4, dtype=torch.float32, device=dev) if want_key_mass else None
    mt = a.mt
    _dec._decode_reduce_kernel[(rows,)](
        ws, out, a.p(lse), a.p(gm), a.p(roww),
        a.p(a.rs), a.p(a.re), a.p(a.hs), a.p(a.hm), a.p(a.eps_ptr),
        *out.stride(), rs_s, re_s, _stride(a.hs, 0), _stride(a.hs, 1), _stride(a.hm, 0), _stride(a.hm, 1), a.s_eps,
        num_heads, q_len, kv_len, head_dim, a.G, splits, off_l, off_acc, off_g,
        a.src_bits, a.tgt_bits, a.cond_bits, a.ratio_bits,
        a.retain, 1.0 - a.retain,
        float(mt.min_condition_mass) if mt is not None else 0.0,
        float(mt.max_ratio) if mt is not None else 0.0,
        a.eps_value,
        S_PAD=_pow2(splits), HEAD_D=HEAD_D, G_PAD=a.G_PAD,
        HAS_RS=a.rs is not None, HAS_RE=a.re is not None, HAS_HS=a.hs is not None, HAS_MT=has_mt,
        HAS_HM=a.hm is not None, HAS_COND_TEST=a.has_cond_test, EPS_PTR=a.eps_ptr is not None,
        NEED_G=need_g, STORE_LSE=edit.return_lse, STORE_GM=edit.return_group_mass, KEY_MASS=want_key_mass,
        num_warps=4,
    )

    key_mass = None
    if want_key_mass:
        kmr = _as_loadable(edit.key_mass_rows, dev)
        key_mass = torch.empty(batch, num_heads, kv_len, dtype=torch.float32, device=dev)
        bn = 16 if _INTERPRET else 256
        _dec._decode_key_mass_kernel[(_cdiv(kv_len, bn), batch * num_heads)](
            zs, roww, kmr, a.p(a.gid), key_mass,
            kmr.stride(0), kmr.stride(1), _stride(a.gid, 0), _stride(a.gid, 1),
            num_heads, q_len, kv_len, a.src_bits, a.tgt_bits,
            BLOCK_N=bn, HAS_MT=has_mt,
            num_warps=4,
        )
    return out, AttentionStats(lse=lse, group_mass=gm, key_mass=key_mass)
