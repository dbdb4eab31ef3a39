"""Exact PyTorch implementation of the attention-edit contract.

This is the CPU path and the oracle for the Triton kernels. It works in float32 on chunks of query rows, so
memory stays O(chunk x keys) per head instead of O(queries x keys).
"""

from __future__ import annotations

import torch

from ..edits import AttentionEdit, AttentionStats, MassTransfer

DEFAULT_CHUNK_ROWS = 256


def _group_sum(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """values [B, H, R, Nk], groups [B, Nk] -> [B, H, R, G] sums of values per key group."""
    one_hot = torch.nn.functional.one_hot(groups.long(), num_groups).to(values.dtype)  # [B, Nk, G]
    return torch.einsum("bhrk,bkg->bhrg", values, one_hot)


def _mass_transfer_bias(
    probs: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    transfer: MassTransfer,
    selected: torch.Tensor,
) -> torch.Tensor:
    """Per-(row, group) logit bias log w_g of a mass transfer; [B, H, R, G], zero where the row is untouched."""
    masses = _group_sum(probs, groups, num_groups)

    def total(group_ids: tuple[int, ...]) -> torch.Tensor:
        if not group_ids:
            return torch.zeros_like(masses[..., 0])
        return masses[..., list(group_ids)].sum(-1)

    source, target = total(transfer.source_groups), total(transfer.target_groups)
    active = selected & (target > 0)
    if transfer.condition_groups or transfer.ratio_groups:
        condition = total(transfer.condition_groups)
        active = active & (condition >= transfer.min_condition_mass)
        eps = transfer.ratio_eps
        if isinstance(eps, torch.Tensor):
            eps = eps.to(masses).reshape(-1, 1, 1) if eps.dim() else eps.to(masses)
        ratio = total(transfer.ratio_groups) / (condition + eps)
        active = active & ~(ratio > transfer.max_ratio)
    if transfer.heads is not None:
        active = active & transfer.heads.bool()[:, :, None].to(active.device)

    log_w = torch.zeros_like(masses)
    target_gain = 1.0 + (1.0 - transfer.retain) * source / target.clamp_min(torch.finfo(masses.dtype).tiny)
    log_retain = torch.log(torch.tensor(transfer.retain, dtype=masses.dtype, device=masses.device))
    for g in transfer.source_groups:
        log_w[..., g] = log_retain
    for g in transfer.target_groups:
        log_w[..., g] = torch.log(target_gain)
    return torch.where(active[..., None], log_w, torch.zeros_like(log_w))


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    key_padding: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
    edit: AttentionEdit | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention with the edit contract applied.

    Args:
        query: [B, H, Nq, D]; key, value: [B, Hkv, Nk, D] with H a multiple of Hkv (GQA).
        scale: score scale (usually D ** -0.5).
        causal: query row i sees keys up to absolute position Nk - Nq + i.
        key_padding: bool [B, Nk], True for real keys.
        dense_mask: bool [B, 1 or H, Nq, Nk] (True = attend) or an additive float mask; replaces ``causal``.
        edit: the :class:`AttentionEdit` (None: plain attention).

    Returns:
        output [B, Nq, H, D] in the query's dtype, and the requested :class:`AttentionStats`.
    """
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({kv_heads})")
    edit = edit or AttentionEdit()
    edit.validate(batch, num_heads, q_len, kv_len)
    device = query.device
    groups_per_kv = num_heads // kv_heads
    k = key.float().repeat_interleave(groups_per_kv, dim=1) if groups_per_kv > 1 else key.float()
    v = value.float().repeat_interleave(groups_per_kv, dim=1) if groups_per_kv > 1 else value.float()
    q = query.float()

    key_pos = torch.arange(kv_len, device=device)
    row_start = edit.row_start.to(device).long() if edit.row_start is not None else torch.zeros(batch, dtype=torch.long, device=device)
    row_end = edit.row_end.to(device).long() if edit.row_end is not None else torch.full((batch,), kv_len + 1, dtype=torch.long, device=device)
    groups = edit.key_groups.to(device).long() if edit.key_groups is not None else None
    if groups is not None and edit.num_groups:
        # Per-key lookups of the per-group tables: [B, H, Nk].
        gather_idx = groups[:, None, :].expand(batch, num_heads, kv_len)
    bias_per_key = None
    if edit.group_bias is not None:
        bias_per_key = torch.gather(edit.group_bias.float().to(device), 2, gather_idx)
    if edit.key_bias is not None:
        kb = edit.key_bias.float().to(device).expand(batch, num_heads, kv_len)
        bias_per_key = kb if bias_per_key is None else bias_per_key + kb
    gain_per_key = torch.gather(edit.group_gain.float().to(device), 2, gather_idx) if edit.group_gain is not None else None

    output = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=device)
    lse = torch.empty(batch, num_heads, q_len, device=device) if edit.return_lse else None
    group_mass = torch.empty(batch, num_heads, q_len, edit.num_groups, device=device) if edit.return_group_mass else None
    key_mass = torch.zeros(batch, num_heads, kv_len, device=device) if edit.key_mass_rows is not None else None

    for start in range(0, q_len, chunk_rows):
        stop = min(start + chunk_rows, q_len)
        rows = torch.arange(start, stop, device=device)
        row_pos = kv_len - q_len + rows  # absolute position of each query row
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop], k) * scale

        if dense_mask is not None:
            m = dense_mask[:, :, start:stop]
            allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            allowed = allowed.expand(batch, num_heads, stop - start, kv_len)
        else:
            allowed = torch.ones(1, 1, stop - start, kv_len, dtype=torch.bool, device=device)
            if causal:
                allowed = allowed & (key_pos[None, :] <= row_pos[:, None])[None, None]
        if key_padding is not None:
            allowed = allowed & key_padding.to(device).bool()[:, None, None, :]
        allowed = allowed.expand(batch, num_heads, stop - start, kv_len)

        selected = (row_pos[None, :] >= row_start[:, None]) & (row_pos[None, :] < row_end[:, None])  # [B, R]
        sel = selected[:, None, :, None]
        z = scores
        if gain_per_key is not None:
            z = z + torch.where(sel, gain_per_key[:, :, None, :] * scores.abs(), torch.zeros_like(scores))
        if bias_per_key is not None:
            z = z + torch.where(sel, bias_per_key[:, :, None, :].expand_as(z), torch.zeros_like(z))
        z = z.masked_fill(~allowed, float("-inf"))

        if edit.mass_transfer is not None:
            probs = _safe_softmax(z)
            log_w = _mass_transfer_bias(probs, groups, edit.num_groups, edit.mass_transfer, selected[:, None, :].expand(batch, num_heads, -1))
            z = z + torch.gather(log_w, 3, groups[:, None, None, :].expand(batch, num_heads, stop - start, kv_len))

        probs = _safe_softmax(z)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
        if edit.head_scale is not None:
            scale_rows = torch.where(selected[:, None, :], edit.head_scale.float().to(device)[:, :, None], torch.ones((), device=device))
            out = out * scale_rows[..., None]
        output[:, start:stop] = out.transpose(1, 2).to(query.dtype)

        if lse is not None:
            lse[:, :, start:stop] = torch.logsumexp(z, dim=-1)
        if group_mass is not None:
            group_mass[:, :, start:stop] = _group_sum(probs, groups, edit.num_groups)
        if key_mass is not None:
            row_weight = edit.key_mass_rows[:, start:stop].to(device=device, dtype=probs.dtype)
            key_mass += torch.einsum("bhqk,bq->bhk", probs, row_weight)

    return output, AttentionStats(lse=lse, group_mass=group_mass, key_mass=key_mass)


def _safe_softmax(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that returns zeros (not NaN) on rows where every key is masked."""
    row_max = z.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(z - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))
