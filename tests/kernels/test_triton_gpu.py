"""Triton kernels on a CUDA GPU: error against float64 must be at most 2x that of a same-precision PyTorch reference.

Opt in with ``pytest -m gpu``. The references are an independent, vectorised re-derivation of the edit contract
(chunked over query rows): once in float64 ("truth", on the same rounded inputs) and once as eager attention in
the input precision (scores and P.V in the input dtype, edits and softmax in float32), the usual way these
methods are run today. Sweeps lengths 1-9000, odd sizes, GQA, fully masked rows and extreme logits.
"""

from __future__ import annotations

import os

import pytest
import torch

from mmattn.edits import AttentionEdit, MassTransfer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton interpreter is on in this process"),
]

DEV = "cuda"


def _kernel():
    from mmattn.kernels.triton_attention import triton_attention  # imported lazily: see test_triton_interpret

    return triton_attention


def reference(q, k, v, *, scale, causal, pad, edit, mm_dtype, acc_dtype, chunk=512):
    """The contract, vectorised. Matmuls in ``mm_dtype``; edits, softmax and statistics in ``acc_dtype``."""
    edit = edit or AttentionEdit()
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    rep = H // Hkv
    qm = q.to(mm_dtype)
    km = k.to(mm_dtype).repeat_interleave(rep, 1)
    vm = v.to(mm_dtype).repeat_interleave(rep, 1)
    out = torch.zeros(B, Nq, H, D, dtype=acc_dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=acc_dtype, device=q.device)
    G = edit.num_groups
    gm = torch.zeros(B, H, Nq, max(G, 1), dtype=acc_dtype, device=q.device)
    km_out = torch.zeros(B, H, Nk, dtype=acc_dtype, device=q.device)
    onehot = None
    if edit.key_groups is not None and G:
        onehot = torch.nn.functional.one_hot(edit.key_groups.long(), G).to(acc_dtype)  # [B, Nk, G]
        gidx = edit.key_groups.long()[:, None, None, :]
    kpos = torch.arange(Nk, device=q.device)
    rs = edit.row_start.long() if edit.row_start is not None else torch.zeros(B, dtype=torch.long, device=q.device)
    re = edit.row_end.long() if edit.row_end is not None else torch.full((B,), Nk + 1, device=q.device)
    for r0 in range(0, Nq, chunk):
        r1 = min(Nq, r0 + chunk)
        pos = Nk - Nq + torch.arange(r0, r1, device=q.device)
        s = torch.matmul(qm[:, :, r0:r1], km.transpose(-1, -2)).to(acc_dtype) * scale
        sel = ((pos[None] >= rs[:, None]) & (pos[None] < re[:, None]))[:, None, :, None]  # [B,1,R,1]
        z = s
        if edit.group_gain is not None:
            gain = torch.gather(edit.group_gain.to(acc_dtype)[:, :, None, :].expand(B, H, r1 - r0, G), 3, gidx.expand(B, H, r1 - r0, Nk))
            z = z + torch.where(sel, gain * s.abs(), 0)
        if edit.group_bias is not None:
            bias = torch.gather(edit.group_bias.to(acc_dtype)[:, :, None, :].expand(B, H, r1 - r0, G), 3, gidx.expand(B, H, r1 - r0, Nk))
            z = z + torch.where(sel, bias, 0)
        if edit.key_bias is not None:
            z = z + torch.where(sel, edit.key_bias.to(acc_dtype)[:, :, None, :], 0)
        allowed = torch.ones_like(z, dtype=torch.bool)
        if causal:
            allowed = allowed & (kpos[None, None, None, :] <= pos[None, None, :, None])
        if pad is not None:
            allowed = allowed & pad[:, None, None, :]
        z = z.masked_fill(~allowed, float("-inf"))

        def softmax(x):
            mx = x.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, 0)
            e = torch.exp(x - mx)
            den = e.sum(-1, keepdim=True)
            return e / torch.where(den > 0, den, 1)

        t = edit.mass_transfer
        if t is not None:
            p0 = softmax(z)
            masses = torch.einsum("bhrk,bkg->bhrg", p0, onehot)
            tot = lambda ids: masses[..., list(ids)].sum(-1) if ids else torch.zeros_like(masses[..., 0])  # noqa: E731
            src, tgt = tot(t.source_groups), tot(t.target_groups)
            active = sel[..., 0] & (tgt > 0)
            if t.condition_groups or t.ratio_groups:
                cond = tot(t.condition_groups)
                eps = t.ratio_eps
                eps = eps.to(acc_dtype).reshape(-1, 1, 1) if isinstance(eps, torch.Tensor) and eps.dim() else float(eps)
                active = active & (cond >= t.min_condition_mass) & ~(tot(t.ratio_groups) / (cond + eps) > t.max_ratio)
            if t.heads is not None:
                active = active & t.heads.bool()[:, :, None]
            w = torch.ones_like(masses)
            w[..., list(t.source_groups)] = t.retain
            w[..., list(t.target_groups)] = (1 + (1 - t.retain) * src / tgt.clamp_min(1e-300))[..., None]
            w = torch.where(active[..., None], w, torch.ones_like(w))
            z = z + torch.log(torch.gather(w, 3, gidx.expand(B, H, r1 - r0, Nk)))
        p = softmax(z)
        o = torch.matmul(p.to(mm_dtype), vm).to(acc_dtype)
        if edit.head_scale is not None:
            o = o * torch.where(sel[..., 0], edit.head_scale.to(acc_dtype)[:, :, None], 1)[..., None]
        out[:, r0:r1] = o.transpose(1, 2)
        lse[:, :, r0:r1] = torch.logsumexp(z, -1)
        if G:
            gm[:, :, r0:r1] = torch.einsum("bhrk,bkg->bhrg", p, onehot)
        if edit.key_mass_rows is not None:
            km_out += torch.einsum("bhrk,br->bhk", p, edit.key_mass_rows[:, r0:r1].to(acc_dtype))
    return out, lse, gm[..., :G], km_out


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    fin = torch.isfinite(ref)
    return ((x[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def check(q, k, v, *, causal=True, pad=None, edit=None, path=None, floor=None):
    scale = q.shape[-1] ** -0.5
    out, stats = _kernel()(q, k, v, scale=scale, causal=causal, key_padding=pad, edit=edit, path=path)
    torch.cuda.synchronize()
    truth = reference(q, k, v, scale=scale, causal=causal, pad=pad, edit=edit, mm_dtype=torch.float64, acc_dtype=torch.float64)
    lowp = reference(q, k, v, scale=scale, causal=causal, pad=pad, edit=edit, mm_dtype=q.dtype, acc_dtype=torch.float32)
    floor = floor if floor is not None else (2e-6 if q.dtype == torch.float32 else 1e-5)
    assert not torch.isnan(out).any()
    errs = {"out": (rel_err(out, truth[0]), rel_err(lowp[0], truth[0]))}
    edit = edit or AttentionEdit()
    if edit.return_lse:
        assert torch.equal(torch.isneginf(stats.lse), torch.isneginf(truth[1]))
        errs["lse"] = (rel_err(stats.lse, truth[1]), rel_err(lowp[1], truth[1]))
    if edit.return_group_mass:
        errs["group_mass"] = (rel_err(stats.group_mass, truth[2]), rel_err(lowp[2], truth[2]))
    if edit.key_mass_rows is not None:
        errs["key_mass"] = (rel_err(stats.key_mass, truth[3]), rel_err(lowp[3], truth[3]))
    for name, (ours, theirs) in errs.items():
        assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3e} vs same-precision reference {theirs:.3e}"
    # Rows without any visible key: output exactly 0.
    dead = torch.isneginf(truth[1]).permute(0, 2, 1)  # [B, Nq, H]
    if dead.any():
        assert (out[dead] == 0).all()
    return out, stats, errs


def inputs(B, H, Hkv, Nq, Nk, D, dtype=torch.bfloat16, seed=0, logit_scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = (torch.randn(B, H, Nq, D, device=DEV, generator=g) * logit_scale).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, device=DEV, generator=g).to(dtype)
    return q, k, v, g


def var_like_edit(B, H, Nq, Nk, g, *, stats=True, scores=True):
    """Groups 0 other, 1 image, 2 image sink, 3 text sink; transfer on rows after the image, as VAR does."""
    groups = torch.zeros(B, Nk, dtype=torch.long, device=DEV)
    img0, img1 = min(5, Nk), max(min(5, Nk), Nk - max(1, Nk // 10))
    groups[:, img0:img1] = 1
    if img1 > img0:
        sinks = torch.randint(img0, img1, (B, 4), device=DEV, generator=g)
        groups.scatter_(1, sinks, 2)
    groups[:, 0] = 3
    edit = AttentionEdit(
        key_groups=groups,
        num_groups=4,
        row_start=torch.full((B,), img1, device=DEV),
        mass_transfer=MassTransfer(
            source_groups=(2, 3), target_groups=(1,), retain=0.6,
            heads=torch.rand(B, H, device=DEV, generator=g) > 0.2,
            condition_groups=(1, 2), min_condition_mass=0.2, ratio_groups=(2,), max_ratio=0.5,
            ratio_eps=max(img1 - img0, 0) * 1e-6,
        ),
    )
    if scores:
        edit.group_bias = torch.randn(B, H, 4, device=DEV, generator=g)
        edit.group_gain = 0.2 * torch.randn(B, H, 4, device=DEV, generator=g)
        edit.key_bias = 0.5 * torch.randn(B, 1, Nk, device=DEV, generator=g)
        edit.head_scale = 0.5 + torch.rand(B, H, device=DEV, generator=g)
    if stats:
        edit.return_lse = True
        edit.return_group_mass = True
        edit.key_mass_rows = torch.rand(B, Nq, device=DEV, generator=g) > 0.7
    return edit


@pytest.mark.parametrize("n", [1, 17, 128, 129, 1000, 2049, 4097, 9000])
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_plain_sweep(n, D):
    q, k, v, _ = inputs(1, 4, 2, n, n, D, seed=n)
    check(q, k, v, path="prefill")


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 640), (3, 4095), (16, 9000), (7, 100)])
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2)])
def test_decode_plain_sweep(Nq, Nk, H, Hkv):
    q, k, v, _ = inputs(2, H, Hkv, Nq, Nk, 128, seed=Nk)
    check(q, k, v, path="decode")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk", [(333, 333), (77, 1500), (2900, 2900)])
def test_prefill_full_edit(causal, Nq, Nk):
    q, k, v, g = inputs(2, 8, 2, Nq, Nk, 128, seed=Nq + Nk)
    pad = torch.ones(2, Nk, dtype=torch.bool, device=DEV)
    pad[1, :37] = False
    check(q, k, v, causal=causal, pad=pad, edit=var_like_edit(2, 8, Nq, Nk, g), path="prefill")


@pytest.mark.parametrize("Nq,Nk", [(1, 2880), (4, 777), (1, 9000)])
@pytest.mark.parametrize("H,Hkv", [(32, 32), (16, 4)])
def test_decode_full_edit(Nq, Nk, H, Hkv):
    q, k, v, g = inputs(2, H, Hkv, Nq, Nk, 128, seed=Nk)
    pad = torch.ones(2, Nk, dtype=torch.bool, device=DEV)
    pad[0, :11] = False
    check(q, k, v, pad=pad, edit=var_like_edit(2, H, Nq, Nk, g), path="decode")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("path,Nq", [("prefill", 300), ("decode", 2)])
def test_other_dtypes(dtype, path, Nq):
    q, k, v, g = inputs(1, 4, 2, Nq, 700, 64, dtype=dtype, seed=5)
    check(q, k, v, edit=var_like_edit(1, 4, Nq, 700, g), path=path)


@pytest.mark.parametrize("path,Nq", [("prefill", 200), ("decode", 1)])
def test_fully_masked_rows_and_extreme_logits(path, Nq):
    q, k, v, g = inputs(2, 4, 4, Nq, 500, 128, seed=9, logit_scale=40.0)  # |scores| in the hundreds
    pad = torch.ones(2, 500, dtype=torch.bool, device=DEV)
    pad[0] = False  # sample 0: every row fully masked
    pad[1, 100:] = False
    edit = AttentionEdit(return_lse=True, key_mass_rows=torch.ones(2, Nq, dtype=torch.bool, device=DEV))
    out, stats, _ = check(q, k, v, pad=pad, edit=edit, path=path)
    assert (out[0] == 0).all() and torch.isneginf(stats.lse[0]).all() and (stats.key_mass[0] == 0).all()
    assert torch.isfinite(stats.lse[1]).all()


def test_causal_rows_before_first_key_and_odd_head_dim():
    q, k, v, g = inputs(1, 4, 1, 300, 170, 80, seed=13)  # Nq > Nk: the first 130 rows see no key
    out, stats, _ = check(q, k, v, edit=AttentionEdit(return_lse=True), path="prefill")
    assert torch.isneginf(stats.lse[:, :, :130]).all() and (out[:, :130] == 0).all()


def test_dispatch_picks_decode_and_prefill_consistently():
    q, k, v, g = inputs(1, 8, 2, 4, 3000, 128, seed=21)
    edit = var_like_edit(1, 8, 4, 3000, g)
    f = _kernel()
    a, sa = f(q, k, v, scale=128**-0.5, edit=edit, path="decode")
    b, sb = f(q, k, v, scale=128**-0.5, edit=edit, path="prefill")
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(sa.group_mass, sb.group_mass, atol=1e-3, rtol=1e-3)
