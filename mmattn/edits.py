"""The attention-edit contract: the one interface between methods and kernels.

For one attention call (one layer) with batch b, query head h, query row i and key j, the scores are
``s_ij = scale * q_i . k_j``. On *selected* rows (see ``row_start`` / ``row_end``) the kernels compute

    z_ij = s_ij + group_bias[b, h, g(j)] + group_gain[b, h, g(j)] * |s_ij| + key_bias[b, h, j]

then apply the causal / padding mask, then (optionally) a VAR-style :class:`MassTransfer`, which is a
per-row, per-group logit bias ``log w_g`` computed from the row's own group masses under ``softmax(z)``.
The output is ``o_h = head_scale[b, h] * softmax(z') @ v`` on selected rows and plain attention on the others.

Statistics (never the full matrix) describe the final attention distribution ``softmax(z')``:
log-sum-exp per row, mass per (row, group), and mass per key summed over a chosen subset of query rows.

Query row ``i`` of a call with ``Nq`` queries and ``Nk`` keys sits at absolute key position ``Nk - Nq + i``
(the KV cache holds everything before it); row selection and causality use that position.

A post-softmax multiplicative weight followed by renormalisation equals a logit bias ``log w``, so
GIFT-style reweighting is a ``key_bias``. Kernels know nothing about methods: they only see these tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["AttentionEdit", "MassTransfer", "AttentionStats", "combine_edits"]


@dataclass
class MassTransfer:
    """Move part of the attention mass of ``source_groups`` onto ``target_groups`` (VAR's redistribution).

    For a selected (head, row) with group masses ``M_g`` under the pre-transfer softmax, sources keep the
    fraction ``retain`` of their mass and targets receive the rest in proportion to their own mass:
    ``w_src = retain``, ``w_tgt = 1 + (1 - retain) * M_src / M_tgt``, all other groups ``w = 1``.

    A row takes part only when ``M_cond >= min_condition_mass`` and
    ``M_ratio / (M_cond + ratio_eps[b]) <= max_ratio`` (``M_cond``, ``M_ratio``: summed masses of
    ``condition_groups`` / ``ratio_groups``; empty tuples make the test vacuous), and when ``M_tgt > 0``
    (a row whose targets hold no mass is left unchanged rather than divided by zero).
    """

    source_groups: tuple[int, ...]
    target_groups: tuple[int, ...]
    retain: float
    heads: torch.Tensor | None = None  # bool [B, H]; None = every head
    condition_groups: tuple[int, ...] = ()
    min_condition_mass: float = 0.0
    ratio_groups: tuple[int, ...] = ()
    max_ratio: float = math.inf
    ratio_eps: torch.Tensor | float = 0.0  # scalar or [B]

    def __post_init__(self) -> None:
        self.source_groups = tuple(int(g) for g in self.source_groups)
        self.target_groups = tuple(int(g) for g in self.target_groups)
        self.condition_groups = tuple(int(g) for g in self.condition_groups)
        self.ratio_groups = tuple(int(g) for g in self.ratio_groups)
        if not self.source_groups or not self.target_groups:
            raise ValueError("MassTransfer needs at least one source group and one target group")
        if set(self.source_groups) & set(self.target_groups):
            raise ValueError("MassTransfer source and target groups must be disjoint")
        if not 0.0 <= self.retain <= 1.0:
            raise ValueError(f"MassTransfer.retain must lie in [0, 1], got {self.retain}")


@dataclass
class AttentionEdit:
    """Everything a method asks of one attention call. All fields are optional; an empty edit is plain attention."""

    key_groups: torch.Tensor | None = None  # integer [B, Nk], values in [0, num_groups)
    num_groups: int = 0
    row_start: torch.Tensor | None = None  # integer [B]: first selected absolute position (None: 0)
    row_end: torch.Tensor | None = None  # integer [B]: one past the last selected position (None: no end)
    group_bias: torch.Tensor | None = None  # float [B, H, G]
    group_gain: torch.Tensor | None = None  # float [B, H, G], multiplies |s|
    key_bias: torch.Tensor | None = None  # float [B, H or 1, Nk]
    mass_transfer: MassTransfer | None = None
    head_scale: torch.Tensor | None = None  # float [B, H]
    return_lse: bool = False
    return_group_mass: bool = False
    key_mass_rows: torch.Tensor | None = None  # bool [B, Nq]: rows whose attention is summed per key

    @property
    def needs_groups(self) -> bool:
        return (
            self.group_bias is not None
            or self.group_gain is not None
            or self.mass_transfer is not None
            or self.return_group_mass
        )

    @property
    def modifies_scores(self) -> bool:
        return (
            self.group_bias is not None
            or self.group_gain is not None
            or self.key_bias is not None
            or self.mass_transfer is not None
        )

    @property
    def is_noop(self) -> bool:
        return (
            not self.modifies_scores
            and self.head_scale is None
            and not self.return_lse
            and not self.return_group_mass
            and self.key_mass_rows is None
        )

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        """Check shapes against one call; raises ``ValueError`` naming the offending field."""

        def check(name: str, value: torch.Tensor | None, shapes: list[tuple[int, ...]]) -> None:
            if value is not None and tuple(value.shape) not in shapes:
                wanted = " or ".join(str(list(s)) for s in shapes)
                raise ValueError(f"AttentionEdit.{name} has shape {list(value.shape)}, expected {wanted}")

        if self.needs_groups:
            if self.key_groups is None or self.num_groups <= 0:
                raise ValueError("AttentionEdit uses key groups but key_groups / num_groups are not set")
        if self.key_groups is not None:
            check("key_groups", self.key_groups, [(batch, kv_len)])
            if self.key_groups.dtype.is_floating_point:
                raise ValueError("AttentionEdit.key_groups must be an integer tensor")
        g = self.num_groups
        check("row_start", self.row_start, [(batch,)])
        check("row_end", self.row_end, [(batch,)])
        check("group_bias", self.group_bias, [(batch, num_heads, g)])
        check("group_gain", self.group_gain, [(batch, num_heads, g)])
        check("key_bias", self.key_bias, [(batch, num_heads, kv_len), (batch, 1, kv_len)])
        check("head_scale", self.head_scale, [(batch, num_heads)])
        check("key_mass_rows", self.key_mass_rows, [(batch, q_len)])
        transfer = self.mass_transfer
        if transfer is not None:
            check("mass_transfer.heads", transfer.heads, [(batch, num_heads)])
            used = transfer.source_groups + transfer.target_groups + transfer.condition_groups + transfer.ratio_groups
            if any(not 0 <= gid < g for gid in used):
                raise ValueError(f"MassTransfer names a group outside [0, {g}): {sorted(set(used))}")
            if isinstance(transfer.ratio_eps, torch.Tensor):
                check("mass_transfer.ratio_eps", transfer.ratio_eps, [(batch,), ()])


@dataclass
class AttentionStats:
    """What a call returns besides the output; each field is set only when the edit asked for it."""

    lse: torch.Tensor | None = None  # float32 [B, H, Nq]; -inf on fully masked rows
    group_mass: torch.Tensor | None = None  # float32 [B, H, Nq, G]
    key_mass: torch.Tensor | None = None  # float32 [B, H, Nk]: sum over key_mass_rows of attention


def _same_rows(a: torch.Tensor | None, b: torch.Tensor | None, unbounded: int, what: str) -> torch.Tensor | None:
    """Two edits' row bounds must agree; None means unbounded (``unbounded`` stands in for it)."""
    if a is None and b is None:
        return None
    ta = a if a is not None else torch.full_like(b, unbounded)
    tb = b if b is not None else torch.full_like(a, unbounded)
    if ta.shape == tb.shape and torch.equal(ta.to(tb.device), tb):
        return a if a is not None else b
    raise ValueError(f"cannot compose two edits that select different query rows ({what})")


def _same_key_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape == b.shape and torch.equal(a, b):
        return a
    raise ValueError("cannot compose two edits that ask for per-key mass over different query rows")


def _expand_groups(values: torch.Tensor | None, num_a: int, num_b: int, side: str) -> torch.Tensor | None:
    """Spread a per-group table of one edit over the product groups ``ga * num_b + gb``."""
    if values is None:
        return None
    if side == "a":
        return values.repeat_interleave(num_b, dim=-1)
    return values.repeat(*([1] * (values.dim() - 1)), num_a)


def _sum_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def combine_edits(a: AttentionEdit | None, b: AttentionEdit | None) -> AttentionEdit | None:
    """Compose two edits into one: biases and gains add, head scales multiply, statistics requests merge.

    Different key-group maps are combined into product groups (``ga * Gb + gb``). Two mass transfers, or
    score edits on different query rows, cannot be expressed as one edit and raise ``ValueError``.
    """
    if a is None:
        return b
    if b is None:
        return a
    if a.mass_transfer is not None and b.mass_transfer is not None:
        raise ValueError("cannot compose two mass-transfer edits (e.g. VAR twice) in one attention call")
    if (a.modifies_scores or a.head_scale is not None) and (b.modifies_scores or b.head_scale is not None):
        row_start = _same_rows(a.row_start, b.row_start, 0, "row_start")
        row_end = _same_rows(a.row_end, b.row_end, torch.iinfo(torch.int64).max, "row_end")
    else:
        active = a if (a.modifies_scores or a.head_scale is not None) else b
        row_start, row_end = active.row_start, active.row_end

    if a.key_groups is None or b.key_groups is None:
        key_groups = a.key_groups if a.key_groups is not None else b.key_groups
        num_groups = a.num_groups if a.key_groups is not None else b.num_groups
        group_bias = _sum_optional(a.group_bias, b.group_bias)
        group_gain = _sum_optional(a.group_gain, b.group_gain)
        transfer = a.mass_transfer or b.mass_transfer
        remap_a = remap_b = None
    else:
        ga, gb = a.num_groups, b.num_groups
        key_groups = a.key_groups.long() * gb + b.key_groups.long()
        num_groups = ga * gb
        group_bias = _sum_optional(_expand_groups(a.group_bias, ga, gb, "a"), _expand_groups(b.group_bias, ga, gb, "b"))
        group_gain = _sum_optional(_expand_groups(a.group_gain, ga, gb, "a"), _expand_groups(b.group_gain, ga, gb, "b"))
        remap_a = {g: tuple(g * gb + x for x in range(gb)) for g in range(ga)}
        remap_b = {g: tuple(x * gb + g for x in range(ga)) for g in range(gb)}
        transfer = None
        for edit, remap in ((a, remap_a), (b, remap_b)):
            if edit.mass_transfer is not None:
                t = edit.mass_transfer

                def spread(groups: tuple[int, ...]) -> tuple[int, ...]:
                    return tuple(sorted(x for g in groups for x in remap[g]))

                transfer = replace(
                    t,
                    source_groups=spread(t.source_groups),
                    target_groups=spread(t.target_groups),
                    condition_groups=spread(t.condition_groups),
                    ratio_groups=spread(t.ratio_groups),
                )

    head_scale = a.head_scale if b.head_scale is None else (b.head_scale if a.head_scale is None else a.head_scale * b.head_scale)
    if a.key_mass_rows is None or b.key_mass_rows is None:
        key_mass_rows = a.key_mass_rows if a.key_mass_rows is not None else b.key_mass_rows
    else:
        key_mass_rows = _same_key_rows(a.key_mass_rows, b.key_mass_rows)
    return AttentionEdit(
        key_groups=key_groups,
        num_groups=num_groups,
        row_start=row_start,
        row_end=row_end,
        group_bias=group_bias,
        group_gain=group_gain,
        key_bias=_sum_optional(a.key_bias, b.key_bias),
        mass_transfer=transfer,
        head_scale=head_scale,
        return_lse=a.return_lse or b.return_lse,
        return_group_mass=a.return_group_mass or b.return_group_mass,
        key_mass_rows=key_mass_rows,
    )

