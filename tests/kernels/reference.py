"""A deliberately naive float64 re-derivation of the attention-edit contract (one row at a time).

Independent of mmattn.kernels: it reads the contract's formulas, not the kernel code. Slow; small shapes only.
"""

from __future__ import annotations

import math

import torch

from mmattn.edits import AttentionEdit


def reference_attention(q, k, v, *, scale, causal=True, key_padding=None, edit: AttentionEdit | None = None):
    edit = edit or AttentionEdit()
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    rep = H // Hkv
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, Nq, H, D, dtype=torch.float64)
    lse = torch.full((B, H, Nq), -math.inf, dtype=torch.float64)
    G = edit.num_groups
    group_mass = torch.zeros(B, H, Nq, max(G, 1), dtype=torch.float64)
    key_mass = torch.zeros(B, H, Nk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // rep], v[b, h // rep]
            for i in range(Nq):
                pos = Nk - Nq + i
                s = (kh @ q[b, h, i]) * scale
                allowed = torch.ones(Nk, dtype=torch.bool)
                if causal:
                    allowed &= torch.arange(Nk) <= pos
                if key_padding is not None:
                    allowed &= key_padding[b].bool()
                start = int(edit.row_start[b]) if edit.row_start is not None else 0
                end = int(edit.row_end[b]) if edit.row_end is not None else Nk + 1
                selected = start <= pos < end
                z = s.clone()
                if selected:
                    for j in range(Nk):
                        g = int(edit.key_groups[b, j]) if edit.key_groups is not None else None
                        if edit.group_gain is not None:
                            z[j] += float(edit.group_gain[b, h, g]) * abs(float(s[j]))
                        if edit.group_bias is not None:
                            z[j] += float(edit.group_bias[b, h, g])
                        if edit.key_bias is not None:
                            z[j] += float(edit.key_bias[b, h if edit.key_bias.shape[1] > 1 else 0, j])
                z = torch.where(allowed, z, torch.tensor(-math.inf, dtype=torch.float64))
                if not allowed.any():
                    continue  # output 0, lse -inf, masses 0
                p = torch.softmax(z, 0)
                t = edit.mass_transfer
                if t is not None and selected and (t.heads is None or bool(t.heads[b, h])):
                    mass = [float(p[edit.key_groups[b] == g].sum()) for g in range(G)]
                    src = sum(mass[g] for g in t.source_groups)
                    tgt = sum(mass[g] for g in t.target_groups)
                    cond = sum(mass[g] for g in t.condition_groups)
                    eps = float(t.ratio_eps[b]) if isinstance(t.ratio_eps, torch.Tensor) and t.ratio_eps.dim() else float(t.ratio_eps)
                    ok = tgt > 0
                    if t.condition_groups or t.ratio_groups:
                        ok = ok and cond >= t.min_condition_mass
                        ok = ok and sum(mass[g] for g in t.ratio_groups) / (cond + eps) <= t.max_ratio
                    if ok:
                        # Post-softmax form of the transfer, exactly as VAR states it.
                        new_p = p.clone()
                        for j in range(Nk):
                            g = int(edit.key_groups[b, j])
                            if g in t.source_groups:
                                new_p[j] = t.retain * p[j]
                            elif g in t.target_groups:
                                new_p[j] = p[j] + (1 - t.retain) * src * p[j] / tgt
                        z = torch.log(new_p) + torch.logsumexp(z, 0)  # logits of the new distribution
                        p = new_p
                o = p @ vh
                if selected and edit.head_scale is not None:
                    o = o * float(edit.head_scale[b, h])
                out[b, i, h] = o
                lse[b, h, i] = torch.logsumexp(z, 0)
                if G:
                    for g in range(G):
                        group_mass[b, h, i, g] = p[edit.key_groups[b] == g].sum()
                if edit.key_mass_rows is not None and bool(edit.key_mass_rows[b, i]):
                    key_mass[b, h] += p
    return out, lse, group_mass[..., :G], key_mass
