"""Triton decode kernels (few query rows, long KV cache): split-KV ("flash-decoding") with a reduction.

``_decode_split_kernel``
    One program per (KV split, batch*kv_head). The query rows of all query heads that share a KV head are packed
    into one tile (GQA packing: ``row = head_in_group * Nq + i``), so each K/V tile is read once per KV head.
    Each program writes a partial (running max, sum, output accumulator, per-group sums) for its KV range.
    With a mass transfer, the output accumulator is kept separately for the "other", "source" and "target"
    key classes, so the transfer is applied exactly in the reduction, in a single pass over the KV cache.
    With per-key mass requested, the edited logits of the (few) rows are also written out.
``_decode_reduce_kernel``
    One program per (batch, head, row): merges the partials with the usual LSE rescaling, evaluates the
    mass-transfer conditions on the merged group masses, applies the transfer weights, head scale, and writes the
    output and statistics.
``_decode_key_mass_kernel``
    Per-key mass over flagged rows from the stored logits, the row LSE and the transfer weights.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dec_key_side(
    offs_n, n_ok, b64, h_r64, sel_r, GID, PAD, GB, GG, KB,
    s_gid_b, s_gid_n, s_pad_b, s_pad_n, s_gb_b, s_gb_h, s_gb_g, s_gg_b, s_gg_h, s_gg_g, s_kb_b, s_kb_h, s_kb_n,
    BLOCK_R: tl.constexpr, HAS_PAD: tl.constexpr, HAS_GID: tl.constexpr, HAS_GBIAS: tl.constexpr,
    HAS_GGAIN: tl.constexpr, HAS_KBIAS: tl.constexpr, HAS_ROWSEL: tl.constexpr,
):
    """Per-key data of one key tile for the packed rows: group ids, [rows, keys] bias (log2 units, zero on
    unselected rows) and gain, and the padding keep-mask. Loaded one tile ahead by the loop."""
    gid = offs_n * 0
    if HAS_GID:
        gid = tl.load(GID + b64 * s_gid_b + offs_n * s_gid_n, mask=n_ok, other=0).to(tl.int32)
    zero2 = (sel_r[:, None] & n_ok[None, :]).to(tl.float32) * 0.0
    bias = zero2
    if HAS_GBIAS:
        bias += tl.load(GB + b64 * s_gb_b + h_r64[:, None] * s_gb_h + gid[None, :] * s_gb_g).to(tl.float32)
    if HAS_KBIAS:
        kb_ptrs = KB + b64 * s_kb_b + h_r64[:, None] * s_kb_h + offs_n[None, :] * s_kb_n
        bias += tl.load(kb_ptrs, mask=n_ok[None, :], other=0.0).to(tl.float32)
    bias = bias * 1.4426950408889634
    gain = zero2
    if HAS_GGAIN:
        gain = tl.load(GG + b64 * s_gg_b + h_r64[:, None] * s_gg_h + gid[None, :] * s_gg_g).to(tl.float32)
    if HAS_ROWSEL:
        bias = tl.where(sel_r[:, None], bias, 0.0)
        gain = tl.where(sel_r[:, None], gain, 0.0)
    keep = n_ok
    if HAS_PAD:
        keep = tl.load(PAD + b64 * s_pad_b + offs_n * s_pad_n, mask=n_ok, other=0) != 0
    return gid, bias, gain, keep


@triton.jit
def _decode_split_kernel(
    Q, K, V, WS, ZS,
    GID, PAD, GB, GG, KB, RS, RE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    s_gid_b, s_gid_n, s_pad_b, s_pad_n, s_gb_b, s_gb_h, s_gb_g, s_gg_b, s_gg_h, s_gg_g,
    s_kb_b, s_kb_h, s_kb_n, s_rs, s_re,
    H, GROUP, Nq, Nk, D, scale2, chunk, S, src_bits, tgt_bits, off_l, off_acc, off_g,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, G_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_GID: tl.constexpr, HAS_GBIAS: tl.constexpr, HAS_GGAIN: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_RS: tl.constexpr, HAS_RE: tl.constexpr, HAS_MT: tl.constexpr,
    NEED_G: tl.constexpr, KEY_MASS: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    HKV = H // GROUP
    b = pid_bk // HKV
    hk = pid_bk % HKV
    b64 = b.to(tl.int64)
    HAS_ROWSEL: tl.constexpr = HAS_RS or HAS_RE

    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < GROUP * Nq
    h_r = hk * GROUP + tl.where(r_ok, offs_r // Nq, 0)
    i_r = tl.where(r_ok, offs_r % Nq, 0)
    pos_r = Nk - Nq + i_r
    h_r64 = h_r.to(tl.int64)
    offs_d = tl.arange(0, HEAD_D)
    d_ok = offs_d < D
    offs_nb = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b64 * sqb + h_r64[:, None] * sqh + i_r[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh + offs_d[:, None] * skd
    v_base = V + b64 * svb + hk.to(tl.int64) * svh + offs_d[None, :] * svd

    sel_r = r_ok
    if HAS_RS:
        sel_r = sel_r & (pos_r >= tl.load(RS + b * s_rs))
    if HAS_RE:
        sel_r = sel_r & (pos_r < tl.load(RE + b * s_re))
    rid = (b64 * H + h_r64) * Nq + i_r  # flat (batch, head, row) index of each packed row

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc0 = tl.zeros([BLOCK_R, HEAD_D], tl.float32)
    acc1 = tl.zeros([BLOCK_R, HEAD_D], tl.float32)
    acc2 = tl.zeros([BLOCK_R, HEAD_D], tl.float32)
    gacc = tl.zeros([BLOCK_R, G_PAD], tl.float32)
    offs_g = tl.arange(0, G_PAD)

    n_lo = pid_s * chunk
    n_hi = tl.minimum(n_lo + chunk, Nk)
    nx_gid, nx_bias, nx_gain, nx_keep = _dec_key_side(
        n_lo + offs_nb, (n_lo + offs_nb) < n_hi, b64, h_r64, sel_r, GID, PAD, GB, GG, KB,
        s_gid_b, s_gid_n, s_pad_b, s_pad_n, s_gb_b, s_gb_h, s_gb_g, s_gg_b, s_gg_h, s_gg_g, s_kb_b, s_kb_h, s_kb_n,
        BLOCK_R, HAS_PAD, HAS_GID, HAS_GBIAS, HAS_GGAIN, HAS_KBIAS, HAS_ROWSEL,
    )
    for start_n in tl.range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_nb
        n_ok = offs_n < n_hi
        gid = nx_gid
        bias = nx_bias
        gain = nx_gain
        keep = nx_keep
        nx_gid, nx_bias, nx_gain, nx_keep = _dec_key_side(
            offs_n + BLOCK_N, (offs_n + BLOCK_N) < n_hi, b64, h_r64, sel_r, GID, PAD, GB, GG, KB,
            s_gid_b, s_gid_n, s_pad_b, s_pad_n, s_gb_b, s_gb_h, s_gb_g, s_gg_b, s_gg_h, s_gg_g, s_kb_b, s_kb_h,
            s_kb_n, BLOCK_R, HAS_PAD, HAS_GID, HAS_GBIAS, HAS_GGAIN, HAS_KBIAS, HAS_ROWSEL,
        )
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * skn, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PREC)
        z = qk * scale2
        if HAS_GGAIN:
            z = z + gain * tl.abs(z)
        if HAS_GBIAS or HAS_KBIAS:
            z = z + bias
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= pos_r[:, None])
        if HAS_PAD:
            valid = valid & keep[None, :]
        z = tl.where(valid, z, float("-inf"))
        if KEY_MASS:
            tl.store(ZS + rid[:, None] * Nk + offs_n[None, :], z, mask=r_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(z - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_MT:
            is_src = (((src_bits >> gid) & 1) != 0)[None, :]
            is_tgt = (((tgt_bits >> gid) & 1) != 0)[None, :]
            p_src = tl.where(is_src, p, 0.0)
            p_tgt = tl.where(is_tgt, p, 0.0)
            p_oth = tl.where(is_src | is_tgt, 0.0, p)
            acc0 = tl.dot(p_oth.to(v.dtype), v, acc0 * alpha[:, None], input_precision=DOT_PREC)
            acc1 = tl.dot(p_src.to(v.dtype), v, acc1 * alpha[:, None], input_precision=DOT_PREC)
            acc2 = tl.dot(p_tgt.to(v.dtype), v, acc2 * alpha[:, None], input_precision=DOT_PREC)
        else:
            acc0 = tl.dot(p.to(v.dtype), v, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if NEED_G:
            onehot = (gid[:, None] == offs_g[None, :]).to(tl.float32)
            gacc = tl.dot(p, onehot, gacc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    part = rid * S + pid_s  # [BLOCK_R] partial index
    tl.store(WS + part, m_i, mask=r_ok)
    tl.store(WS + off_l + part, l_i, mask=r_ok)
    NACC: tl.constexpr = 3 if HAS_MT else 1
    acc_ptrs = WS + off_acc + part[:, None] * (NACC * HEAD_D) + offs_d[None, :]
    tl.store(acc_ptrs, acc0, mask=r_ok[:, None])
    if HAS_MT:
        tl.store(acc_ptrs + HEAD_D, acc1, mask=r_ok[:, None])
        tl.store(acc_ptrs + 2 * HEAD_D, acc2, mask=r_ok[:, None])
    if NEED_G:
        tl.store(WS + off_g + part[:, None] * G_PAD + offs_g[None, :], gacc, mask=r_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    WS, O, LSE, GM, ROWW,
    RS, RE, HS, HM, EPS,
    sob, son, soh, sod, s_rs, s_re, s_hs_b, s_hs_h, s_hm_b, s_hm_h, s_eps,
    H, Nq, Nk, D, G, S, off_l, off_acc, off_g,
    src_bits, tgt_bits, cond_bits, ratio_bits,
    retain, one_minus_retain, min_cond, max_ratio, eps_value,
    S_PAD: tl.constexpr, HEAD_D: tl.constexpr, G_PAD: tl.constexpr,
    HAS_RS: tl.constexpr, HAS_RE: tl.constexpr, HAS_HS: tl.constexpr, HAS_MT: tl.constexpr,
    HAS_HM: tl.constexpr, HAS_COND_TEST: tl.constexpr, EPS_PTR: tl.constexpr,
    NEED_G: tl.constexpr, STORE_LSE: tl.constexpr, STORE_GM: tl.constexpr, KEY_MASS: tl.constexpr,
):
    rid = tl.program_id(0).to(tl.int64)
    i = rid % Nq
    bh = rid // Nq
    h = bh % H
    b = bh // H
    pos = Nk - Nq + i
    offs_s = tl.arange(0, S_PAD)
    s_ok = offs_s < S
    offs_d = tl.arange(0, HEAD_D)
    offs_g = tl.arange(0, G_PAD)
    part = rid * S + offs_s

    ms = tl.load(WS + part, mask=s_ok, other=float("-inf"))
    ls = tl.load(WS + off_l + part, mask=s_ok, other=0.0)
    m = tl.max(ms, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    f = tl.math.exp2(ms - m_use)
    l_tot = tl.sum(f * ls, 0)
    NACC: tl.constexpr = 3 if HAS_MT else 1
    acc_ptrs = WS + off_acc + part[:, None] * (NACC * HEAD_D) + offs_d[None, :]
    a0 = tl.sum(f[:, None] * tl.load(acc_ptrs, mask=s_ok[:, None], other=0.0), 0)
    if NEED_G:
        gs = tl.sum(f[:, None] * tl.load(WS + off_g + part[:, None] * G_PAD + offs_g[None, :], mask=s_ok[:, None], other=0.0), 0)

    sel = pos >= 0
    sel = sel | (pos < 0)
    if HAS_RS:
        sel = sel & (pos >= tl.load(RS + b * s_rs))
    if HAS_RE:
        sel = sel & (pos < tl.load(RE + b * s_re))

    w_src = 1.0
    w_tgt = 1.0
    if HAS_MT:
        a1 = tl.sum(f[:, None] * tl.load(acc_ptrs + HEAD_D, mask=s_ok[:, None], other=0.0), 0)
        a2 = tl.sum(f[:, None] * tl.load(acc_ptrs + 2 * HEAD_D, mask=s_ok[:, None], other=0.0), 0)
        g_ok = offs_g < G
        is_src = (((src_bits >> offs_g) & 1) != 0) & g_ok
        is_tgt = (((tgt_bits >> offs_g) & 1) != 0) & g_ok
        l_src = tl.sum(tl.where(is_src, gs, 0.0), 0)
        l_tgt = tl.sum(tl.where(is_tgt, gs, 0.0), 0)
        l_oth = tl.sum(tl.where(is_src | is_tgt | ~g_ok, 0.0, gs), 0)
        l_safe = tl.where(l_tot > 0, l_tot, 1.0)
        m_src = l_src / l_safe
        m_tgt = l_tgt / l_safe
        active = sel & (m_tgt > 0)
        if HAS_HM:
            active = active & (tl.load(HM + b * s_hm_b + h * s_hm_h) != 0)
        if HAS_COND_TEST:
            is_cond = (((cond_bits >> offs_g) & 1) != 0) & g_ok
            is_ratio = (((ratio_bits >> offs_g) & 1) != 0) & g_ok
            m_cond = tl.sum(tl.where(is_cond, gs, 0.0), 0) / l_safe
            m_ratio = tl.sum(tl.where(is_ratio, gs, 0.0), 0) / l_safe
            if EPS_PTR:
                eps = tl.load(EPS + b * s_eps).to(tl.float32)
            else:
                eps = eps_value
            ratio = m_ratio / (m_cond + eps)
            active = active & (m_cond >= min_cond) & ~(ratio > max_ratio)
        w_src = tl.where(active, retain, 1.0)
        w_tgt = tl.where(active, 1.0 + one_minus_retain * m_src / tl.maximum(m_tgt, 1.1754943508222875e-38), 1.0)
        num = a0 + w_src * a1 + w_tgt * a2
        den = l_oth + w_src * l_src + w_tgt * l_tgt
    else:
        num = a0
        den = l_tot
    den_ok = den > 0
    den_safe = tl.where(den_ok, den, 1.0)
    out = num / den_safe
    if HAS_HS:
        gamma = tl.load(HS + b * s_hs_b + h * s_hs_h).to(tl.float32)
        out = out * tl.where(sel, gamma, 1.0)
    tl.store(O + b * sob + i * son + h * soh + offs_d * sod, out.to(O.dtype.element_ty), mask=offs_d < D)
    lse2 = tl.where(den_ok, m_use + tl.math.log2(den_safe), float("-inf"))
    if STORE_LSE:
        tl.store(LSE + rid, lse2 * 0.6931471805599453)
    if STORE_GM:
        if HAS_MT:
            w_g = tl.where(is_src, w_src, tl.where(is_tgt, w_tgt, 1.0))
        else:
            w_g = 1.0
        tl.store(GM + rid * G + offs_g, w_g * gs / den_safe, mask=offs_g < G)
    if KEY_MASS:
        tl.store(ROWW + rid * 4, lse2)
        if HAS_MT:
            tl.store(ROWW + rid * 4 + 1, tl.math.log2(w_src))
            tl.store(ROWW + rid * 4 + 2, tl.math.log2(w_tgt))


@triton.jit
def _decode_key_mass_kernel(
    ZS, ROWW, KMR, GID, KM,
    s_kmr_b, s_kmr_n, s_gid_b, s_gid_n,
    H, Nq, Nk, src_bits, tgt_bits,
    BLOCK_N: tl.constexpr, HAS_MT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    if HAS_MT:
        gid = tl.load(GID + b * s_gid_b + offs_n * s_gid_n, mask=n_ok, other=0).to(tl.int32)
        is_src = ((src_bits >> gid) & 1) != 0
        is_tgt = ((tgt_bits >> gid) & 1) != 0
    colsum = tl.zeros([BLOCK_N], tl.float32)
    for i in tl.range(0, Nq):
        if tl.load(KMR + b * s_kmr_b + i * s_kmr_n) != 0:
            rid = pid_bh * Nq + i
            z = tl.load(ZS + rid * Nk + offs_n, mask=n_ok, other=float("-inf"))
            lse2 = tl.load(ROWW + rid * 4)
            lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
            if HAS_MT:
                z = z + tl.where(is_src, tl.load(ROWW + rid * 4 + 1), tl.where(is_tgt, tl.load(ROWW + rid * 4 + 2), 0.0))
            colsum += tl.math.exp2(z - lse2)
    tl.store(KM + pid_bh * Nk + offs_n, colsum, mask=n_ok)
