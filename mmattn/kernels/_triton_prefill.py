"""Triton prefill kernels for the attention-edit contract (see :mod:`mmattn.edits`).

Three kernels, all working in the log2 domain (scores are multiplied by ``scale * log2(e)`` and biases by
``log2(e)`` so the softmax uses ``exp2``), with fp32 accumulation:

``_fwd_kernel``
    FlashAttention-2 style forward: one program per (batch*head, query tile), streaming key/value tiles. Causal
    attention is bottom-right aligned (query row ``i`` sits at absolute key position ``Nk - Nq + i``); key tiles
    that need no element mask run in a separate, mask-free loop. Every edit is a ``tl.constexpr`` flag, so an
    unused feature costs nothing. Optional side outputs: log-sum-exp and per-(row, group) mass of the final
    distribution.
``_mt_pass1_kernel``
    The first pass of a mass transfer: a QK-only pass giving, per row, the masses of the source / target /
    condition / ratio group sets under the edited (pre-transfer) softmax, and from them the per-row log2 weights
    of source and target keys. Query tiles without a selected row, and heads outside ``heads``, only write zeros.
``_key_mass_kernel``
    Per-key mass summed over flagged query rows, structured like the FlashAttention backward dK/dV loop: one
    program per (batch*head, key tile) iterates over the flagged rows (a compacted list), recomputes the edited
    logits and normalises them with the row LSE written by the forward kernel. No atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _key_side(
    offs_n, n_ok, gid_ptr, s_gid_n, pad_ptr, s_pad_n, gb_ptr, s_gb_g, gg_ptr, s_gg_g, kb_ptr, s_kb_n,
    HAS_PAD: tl.constexpr, HAS_GID: tl.constexpr, HAS_GBIAS: tl.constexpr, HAS_GGAIN: tl.constexpr,
    HAS_KBIAS: tl.constexpr,
):
    """Per-key data of one key tile: group id, additive bias (log2 units), |s| gain, padding keep-mask.

    The loops load it one tile ahead: Triton does not software-pipeline these loads, so issuing them a tile
    early hides their latency behind the current tile's matrix products.
    """
    gid = offs_n * 0
    if HAS_GID:
        gid = tl.load(gid_ptr + offs_n * s_gid_n, mask=n_ok, other=0).to(tl.int32)
    bias = offs_n.to(tl.float32) * 0.0
    if HAS_GBIAS:
        bias += tl.load(gb_ptr + gid * s_gb_g).to(tl.float32)
    if HAS_KBIAS:
        bias += tl.load(kb_ptr + offs_n * s_kb_n, mask=n_ok, other=0.0).to(tl.float32)
    bias = bias * 1.4426950408889634
    gain = offs_n.to(tl.float32) * 0.0
    if HAS_GGAIN:
        gain = tl.load(gg_ptr + gid * s_gg_g).to(tl.float32)
    keep = n_ok
    if HAS_PAD:
        keep = tl.load(pad_ptr + offs_n * s_pad_n, mask=n_ok, other=0) != 0
    return gid, bias, gain, keep


@triton.jit
def _apply_edits(
    qk, scale2, offs_n, n_ok, pos_m, sel_m, lw_src, lw_tgt, gid, bias, gain, keep, src_bits, tgt_bits,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GGAIN: tl.constexpr, HAS_ROWSEL: tl.constexpr, HAS_MT: tl.constexpr,
):
    """Edited, masked logits (log2 domain) of one [rows, keys] tile whose head is fixed."""
    z = qk * scale2
    if HAS_GGAIN:
        extra = gain[None, :] * tl.abs(z)
        if HAS_ROWSEL:
            extra = tl.where(sel_m[:, None], extra, 0.0)
        z = z + extra
    if HAS_BIAS:
        if HAS_ROWSEL:
            z = z + tl.where(sel_m[:, None], bias[None, :], 0.0)
        else:
            z = z + bias[None, :]
    if MASKED:
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= pos_m[:, None])
        z = tl.where(valid, z, float("-inf"))
    if HAS_PAD:
        z = tl.where(keep[None, :], z, float("-inf"))
    if HAS_MT:
        is_src = ((src_bits >> gid) & 1) != 0
        is_tgt = ((tgt_bits >> gid) & 1) != 0
        z = z + tl.where(is_src[None, :], lw_src[:, None], tl.where(is_tgt[None, :], lw_tgt[:, None], 0.0))
    return z


@triton.jit
def _tile_ranges(pid_m, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key ranges of one query tile: [0, lo_masked) needs no element mask, [lo_masked, hi) does."""
    if CAUSAL:
        first_pos = Nk - Nq + pid_m * BLOCK_M  # absolute position of the tile's first row
        full_end = tl.minimum(first_pos + 1, Nk)
        n_full = tl.where(full_end > 0, full_end // BLOCK_N, 0)
        hi = tl.minimum(Nk, first_pos + BLOCK_M)
        hi = tl.maximum(hi, 0)
    else:
        n_full = Nk // BLOCK_N
        hi = Nk
    zero = pid_m * 0  # keep both results run-time values even when Nk is specialised to a constant
    lo_masked = n_full * BLOCK_N + zero
    return lo_masked, hi + zero


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, GM, LWS, LWT,
    GID, PAD, GB, GG, KB, RS, RE, HS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, son, soh, sod,
    s_gid_b, s_gid_n, s_pad_b, s_pad_n, s_gb_b, s_gb_h, s_gb_g, s_gg_b, s_gg_h, s_gg_g,
    s_kb_b, s_kb_h, s_kb_n, s_hs_b, s_hs_h, s_rs, s_re,
    H, GROUP, Nq, Nk, D, G, scale2, src_bits, tgt_bits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, G_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, GM_FP32: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_GID: tl.constexpr, HAS_GBIAS: tl.constexpr, HAS_GGAIN: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_RS: tl.constexpr, HAS_RE: tl.constexpr, HAS_MT: tl.constexpr,
    HAS_HS: tl.constexpr, STORE_LSE: tl.constexpr, STORE_GM: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # Longest query tiles first (causal load balance): tile index runs backwards over grid axis 1.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    HAS_ROWSEL: tl.constexpr = HAS_RS or HAS_RE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_nb = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Nq
    d_ok = offs_d < D
    pos_m = Nk - Nq + offs_m

    q_ptrs = Q + b64 * sqb + h64 * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * skb + hk64 * skh + offs_d[:, None] * skd  # [HEAD_D, 1]
    v_base = V + b64 * svb + hk64 * svh + offs_d[None, :] * svd  # [1, HEAD_D]

    sel_m = offs_m >= 0
    if HAS_RS:
        sel_m = sel_m & (pos_m >= tl.load(RS + b * s_rs))
    if HAS_RE:
        sel_m = sel_m & (pos_m < tl.load(RE + b * s_re))
    row_base = pid_bh.to(tl.int64) * Nq
    lw_src = tl.zeros([BLOCK_M], tl.float32)
    lw_tgt = tl.zeros([BLOCK_M], tl.float32)
    if HAS_MT:
        lw_src = tl.load(LWS + row_base + offs_m, mask=m_ok, other=0.0)
        lw_tgt = tl.load(LWT + row_base + offs_m, mask=m_ok, other=0.0)

    gid_ptr = GID + b64 * s_gid_b
    pad_ptr = PAD + b64 * s_pad_b
    gb_ptr = GB + b64 * s_gb_b + h64 * s_gb_h
    gg_ptr = GG + b64 * s_gg_b + h64 * s_gg_h
    kb_ptr = KB + b64 * s_kb_b + h64 * s_kb_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    gacc = tl.zeros([BLOCK_M, G_PAD], tl.float32)
    offs_g = tl.arange(0, G_PAD)

    lo_masked, hi = _tile_ranges(pid_m, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    for stage in tl.static_range(2):
        if stage == 0:
            lo = lo_masked * 0
            end = lo_masked
        else:
            lo = lo_masked
            end = hi
        nx_gid, nx_bias, nx_gain, nx_keep = _key_side(
            lo + offs_nb, (lo + offs_nb) < Nk, gid_ptr, s_gid_n, pad_ptr, s_pad_n, gb_ptr, s_gb_g, gg_ptr,
            s_gg_g, kb_ptr, s_kb_n, HAS_PAD, HAS_GID, HAS_GBIAS, HAS_GGAIN, HAS_KBIAS,
        )
        for start_n in tl.range(lo, end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + offs_nb
            n_ok = offs_n < Nk
            gid = nx_gid
            bias = nx_bias
            gain = nx_gain
            keep = nx_keep
            nx_gid, nx_bias, nx_gain, nx_keep = _key_side(
                offs_n + BLOCK_N, (offs_n + BLOCK_N) < Nk, gid_ptr, s_gid_n, pad_ptr, s_pad_n, gb_ptr, s_gb_g,
                gg_ptr, s_gg_g, kb_ptr, s_kb_n, HAS_PAD, HAS_GID, HAS_GBIAS, HAS_GGAIN, HAS_KBIAS,
            )
            k_ptrs = k_base + offs_n[None, :] * skn
            v_ptrs = v_base + offs_n[:, None] * svn
            if stage == 0:
                if EVEN_D:
                    k = tl.load(k_ptrs)
                    v = tl.load(v_ptrs)
                else:
                    k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            qk = tl.dot(q, k, input_precision=DOT_PREC)
            z = _apply_edits(
                qk, scale2, offs_n, n_ok, pos_m, sel_m, lw_src, lw_tgt, gid, bias, gain, keep, src_bits, tgt_bits,
                stage == 1, CAUSAL, HAS_PAD, HAS_GBIAS or HAS_KBIAS, HAS_GGAIN, HAS_ROWSEL, HAS_MT,
            )
            m_new = tl.maximum(m_i, tl.max(z, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(z - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            if STORE_GM:
                if GM_FP32:
                    onehot = (gid[:, None] == offs_g[None, :]).to(tl.float32)
                    gacc = tl.dot(p, onehot, gacc * alpha[:, None], input_precision="ieee")
                else:
                    onehot = (gid[:, None] == offs_g[None, :]).to(tl.float16)
                    gacc = tl.dot(p.to(tl.float16), onehot, gacc * alpha[:, None])
            m_i = m_new

    l_ok = l_i > 0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_HS:
        gamma = tl.load(HS + b64 * s_hs_b + h64 * s_hs_h).to(tl.float32)
        if HAS_ROWSEL:
            out = out * tl.where(sel_m, gamma, 1.0)[:, None]
        else:
            out = out * gamma
    o_ptrs = O + b64 * sob + h64 * soh + offs_m[:, None].to(tl.int64) * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = tl.where(l_ok, (m_fin + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + row_base + offs_m, lse, mask=m_ok)
    if STORE_GM:
        gm = gacc / l_safe[:, None]
        gm_ptrs = GM + (row_base + offs_m[:, None]) * G + offs_g[None, :]
        tl.store(gm_ptrs, gm, mask=m_ok[:, None] & (offs_g[None, :] < G))


@triton.jit
def _mt_pass1_kernel(
    Q, K, LWS, LWT,
    GID, PAD, GB, GG, KB, RS, RE, HM, EPS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    s_gid_b, s_gid_n, s_pad_b, s_pad_n, s_gb_b, s_gb_h, s_gb_g, s_gg_b, s_gg_h, s_gg_g,
    s_kb_b, s_kb_h, s_kb_n, s_rs, s_re, s_hm_b, s_hm_h, s_eps,
    H, GROUP, Nq, Nk, D, scale2,
    src_bits, tgt_bits, cond_bits, ratio_bits,
    log2_retain, one_minus_retain, min_cond, max_ratio, eps_value,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, GM_FP32: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_GBIAS: tl.constexpr, HAS_GGAIN: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_RS: tl.constexpr, HAS_RE: tl.constexpr, HAS_HM: tl.constexpr,
    HAS_COND_TEST: tl.constexpr, EPS_PTR: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    HAS_ROWSEL: tl.constexpr = HAS_RS or HAS_RE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_nb = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Nq
    d_ok = offs_d < D
    pos_m = Nk - Nq + offs_m
    sel_m = m_ok
    if HAS_RS:
        sel_m = sel_m & (pos_m >= tl.load(RS + b * s_rs))
    if HAS_RE:
        sel_m = sel_m & (pos_m < tl.load(RE + b * s_re))
    if HAS_HM:
        sel_m = sel_m & (tl.load(HM + b64 * s_hm_b + h64 * s_hm_h) != 0)
    row_base = pid_bh.to(tl.int64) * Nq
    lw_src = tl.zeros([BLOCK_M], tl.float32)
    lw_tgt = tl.zeros([BLOCK_M], tl.float32)

    if tl.max(sel_m.to(tl.int32), 0) > 0:
        q_ptrs = Q + b64 * sqb + h64 * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd
        if EVEN_D:
            q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b64 * skb + hk64 * skh + offs_d[:, None] * skd
        gid_ptr = GID + b64 * s_gid_b
        pad_ptr = PAD + b64 * s_pad_b
        gb_ptr = GB + b64 * s_gb_b + h64 * s_gb_h
        gg_ptr = GG + b64 * s_gg_b + h64 * s_gg_h
        kb_ptr = KB + b64 * s_kb_b + h64 * s_kb_h
        # Columns of the class-indicator matrix: 0 source, 1 target, 2 condition, 3 ratio groups.
        offs_c = tl.arange(0, 16)
        cbits = tl.where(offs_c == 0, src_bits, tl.where(offs_c == 1, tgt_bits, tl.where(offs_c == 2, cond_bits, tl.where(offs_c == 3, ratio_bits, 0))))
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        cacc = tl.zeros([BLOCK_M, 16], tl.float32)
        lo_masked, hi = _tile_ranges(pid_m, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
        for stage in tl.static_range(2):
            if stage == 0:
                lo = lo_masked * 0
                end = lo_masked
            else:
                lo = lo_masked
                end = hi
            nx_gid, nx_bias, nx_gain, nx_keep = _key_side(
                lo + offs_nb, (lo + offs_nb) < Nk, gid_ptr, s_gid_n, pad_ptr, s_pad_n, gb_ptr, s_gb_g, gg_ptr,
                s_gg_g, kb_ptr, s_kb_n, HAS_PAD, True, HAS_GBIAS, HAS_GGAIN, HAS_KBIAS,
            )
            for start_n in tl.range(lo, end, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                offs_n = start_n + offs_nb
                n_ok = offs_n < Nk
                gid = nx_gid
                bias = nx_bias
                gain = nx_gain
                keep = nx_keep
                nx_gid, nx_bias, nx_gain, nx_keep = _key_side(
                    offs_n + BLOCK_N, (offs_n + BLOCK_N) < Nk, gid_ptr, s_gid_n, pad_ptr, s_pad_n, gb_ptr, s_gb_g,
                    gg_ptr, s_gg_g, kb_ptr, s_kb_n, HAS_PAD, True, HAS_GBIAS, HAS_GGAIN, HAS_KBIAS,
                )
                k_ptrs = k_base + offs_n[None, :] * skn
                if stage == 0:
                    if EVEN_D:
                        k = tl.load(k_ptrs)
                    else:
                        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                else:
                    k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                qk = tl.dot(q, k, input_precision=DOT_PREC)
                z = _apply_edits(
                    qk, scale2, offs_n, n_ok, pos_m, sel_m, lw_src, lw_tgt, gid, bias, gain, keep, src_bits, tgt_bits,
                    stage == 1, CAUSAL, HAS_PAD, HAS_GBIAS or HAS_KBIAS, HAS_GGAIN, HAS_ROWSEL, False,
                )
                m_new = tl.maximum(m_i, tl.max(z, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(z - m_use[:, None])
                alpha = tl.math.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
                member = ((cbits[None, :] >> gid[:, None]) & 1) != 0
                if GM_FP32:
                    cacc = tl.dot(p, member.to(tl.float32), cacc * alpha[:, None], input_precision="ieee")
                else:
                    cacc = tl.dot(p.to(tl.float16), member.to(tl.float16), cacc * alpha[:, None])
                m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        mass = cacc / l_safe[:, None]
        m_src = tl.sum(tl.where(offs_c[None, :] == 0, mass, 0.0), 1)
        m_tgt = tl.sum(tl.where(offs_c[None, :] == 1, mass, 0.0), 1)
        active = sel_m & (m_tgt > 0)
        if HAS_COND_TEST:
            m_cond = tl.sum(tl.where(offs_c[None, :] == 2, mass, 0.0), 1)
            m_ratio = tl.sum(tl.where(offs_c[None, :] == 3, mass, 0.0), 1)
            if EPS_PTR:
                eps = tl.load(EPS + b * s_eps).to(tl.float32)
            else:
                eps = eps_value
            ratio = m_ratio / (m_cond + eps)
            active = active & (m_cond >= min_cond) & ~(ratio > max_ratio)
        gain_t = 1.0 + one_minus_retain * m_src / tl.maximum(m_tgt, 1.1754943508222875e-38)
        lw_src = tl.where(active, log2_retain, 0.0)
        lw_tgt = tl.where(active, tl.math.log2(gain_t), 0.0)
    tl.store(LWS + row_base + offs_m, lw_src, mask=m_ok)
    tl.store(LWT + row_base + offs_m, lw_tgt, mask=m_ok)


@triton.jit
def _key_mass_kernel(
    Q, K, LSE, LWS, LWT, KM, ORD, CNT,
    GID, PAD, GB, GG, KB, RS, RE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, s_ord_b, s_ord_n,
    s_gid_b, s_gid_n, s_pad_b, s_pad_n, s_gb_b, s_gb_h, s_gb_g, s_gg_b, s_gg_h, s_gg_g,
    s_kb_b, s_kb_h, s_kb_n, s_rs, s_re,
    H, GROUP, Nq, Nk, D, scale2, src_bits, tgt_bits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_GID: tl.constexpr, HAS_GBIAS: tl.constexpr, HAS_GGAIN: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_RS: tl.constexpr, HAS_RE: tl.constexpr, HAS_MT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    HAS_ROWSEL: tl.constexpr = HAS_RS or HAS_RE

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    n_ok = offs_n < Nk
    d_ok = offs_d < D
    k_ptrs = K + b64 * skb + hk64 * skh + offs_d[:, None] * skd + offs_n[None, :].to(tl.int64) * skn
    k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    gid_ptr = GID + b64 * s_gid_b
    pad_ptr = PAD + b64 * s_pad_b
    gb_ptr = GB + b64 * s_gb_b + h64 * s_gb_h
    gg_ptr = GG + b64 * s_gg_b + h64 * s_gg_h
    kb_ptr = KB + b64 * s_kb_b + h64 * s_kb_h
    row_base = pid_bh.to(tl.int64) * Nq
    if HAS_RS:
        rs = tl.load(RS + b * s_rs)
    if HAS_RE:
        re = tl.load(RE + b * s_re)

    gid, bias, gain, keep = _key_side(
        offs_n, n_ok, gid_ptr, s_gid_n, pad_ptr, s_pad_n, gb_ptr, s_gb_g, gg_ptr, s_gg_g, kb_ptr, s_kb_n,
        HAS_PAD, HAS_GID, HAS_GBIAS, HAS_GGAIN, HAS_KBIAS,
    )
    count = tl.load(CNT + b).to(tl.int32)
    colsum = tl.zeros([BLOCK_N], tl.float32)
    first_key = pid_n * BLOCK_N
    for r0 in tl.range(0, count, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        r_ok = offs_r < count
        rows = tl.load(ORD + b64 * s_ord_b + offs_r * s_ord_n, mask=r_ok, other=0).to(tl.int32)
        pos_m = Nk - Nq + rows
        # Rows are in ascending order; under causal masking a block whose last row precedes the key tile is empty.
        if (not CAUSAL) or (tl.max(tl.where(r_ok, pos_m, -1), 0) >= first_key):
            q_ptrs = Q + b64 * sqb + h64 * sqh + rows[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd
            q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            qk = tl.dot(q, k, input_precision=DOT_PREC)
            sel_m = r_ok
            if HAS_RS:
                sel_m = sel_m & (pos_m >= rs)
            if HAS_RE:
                sel_m = sel_m & (pos_m < re)
            lw_src = tl.zeros([BLOCK_M], tl.float32)
            lw_tgt = tl.zeros([BLOCK_M], tl.float32)
            if HAS_MT:
                lw_src = tl.load(LWS + row_base + rows, mask=r_ok, other=0.0)
                lw_tgt = tl.load(LWT + row_base + rows, mask=r_ok, other=0.0)
            z = _apply_edits(
                qk, scale2, offs_n, n_ok, pos_m, sel_m, lw_src, lw_tgt, gid, bias, gain, keep, src_bits, tgt_bits,
                True, CAUSAL, HAS_PAD, HAS_GBIAS or HAS_KBIAS, HAS_GGAIN, HAS_ROWSEL, HAS_MT,
            )
            lse2 = tl.load(LSE + row_base + rows, mask=r_ok, other=float("-inf")) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
            p = tl.math.exp2(z - lse2[:, None])
            p = tl.where(r_ok[:, None], p, 0.0)
            colsum += tl.sum(p, 0)
    tl.store(KM + pid_bh.to(tl.int64) * Nk + offs_n, colsum, mask=n_ok)
