"""Composition of attention edits."""

import pytest
import torch

from mmattn.edits import AttentionEdit, MassTransfer, combine_edits
from mmattn.kernels.exact import exact_attention

from .kernels.reference import reference_attention

B, H, N, D = 2, 3, 9, 8


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)], g


def test_product_groups_add_biases_and_multiply_scales():
    (q, k, v), g = inputs()
    groups_a = torch.randint(0, 2, (B, N), generator=g)
    groups_b = torch.randint(0, 3, (B, N), generator=g)
    a = AttentionEdit(key_groups=groups_a, num_groups=2, group_bias=torch.randn(B, H, 2, generator=g),
                      head_scale=torch.rand(B, H, generator=g) + 0.5)
    b = AttentionEdit(key_groups=groups_b, num_groups=3, group_gain=torch.rand(B, H, 3, generator=g),
                      group_bias=torch.randn(B, H, 3, generator=g), head_scale=torch.rand(B, H, generator=g) + 0.5,
                      key_bias=torch.randn(B, 1, N, generator=g), return_lse=True)
    combined = combine_edits(a, b)
    assert combined.num_groups == 6 and combined.return_lse
    got, _ = exact_attention(q, k, v, scale=D**-0.5, edit=combined)
    # The same edit written by hand as per-key biases and gains on one group per key.
    per_key_bias = torch.gather(a.group_bias, 2, groups_a[:, None].expand(B, H, N)) + torch.gather(
        b.group_bias, 2, groups_b[:, None].expand(B, H, N)) + b.key_bias
    single = AttentionEdit(key_groups=groups_b, num_groups=3, group_gain=b.group_gain, key_bias=per_key_bias,
                           head_scale=a.head_scale * b.head_scale)
    want, *_ = reference_attention(q, k, v, scale=D**-0.5, edit=single)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_mass_transfer_groups_are_spread_over_product_groups():
    (q, k, v), g = inputs(1)
    groups_a = torch.randint(0, 3, (B, N), generator=g)
    groups_b = torch.randint(0, 2, (B, N), generator=g)
    transfer = MassTransfer(source_groups=(2,), target_groups=(1,), retain=0.3)
    a = AttentionEdit(key_groups=groups_a, num_groups=3, mass_transfer=transfer)
    b = AttentionEdit(key_groups=groups_b, num_groups=2, group_bias=torch.randn(B, H, 2, generator=g))
    got, _ = exact_attention(q, k, v, scale=D**-0.5, edit=combine_edits(b, a))
    per_key_bias = torch.gather(b.group_bias, 2, groups_b[:, None].expand(B, H, N))
    want, *_ = reference_attention(q, k, v, scale=D**-0.5,
                                   edit=AttentionEdit(key_groups=groups_a, num_groups=3, mass_transfer=transfer,
                                                      key_bias=per_key_bias))
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_incompatible_edits_raise():
    groups = torch.zeros(B, N, dtype=torch.long)
    t = MassTransfer(source_groups=(0,), target_groups=(1,), retain=0.5)
    with pytest.raises(ValueError, match="two mass-transfer"):
        combine_edits(AttentionEdit(key_groups=groups, num_groups=2, mass_transfer=t),
                      AttentionEdit(key_groups=groups, num_groups=2, mass_transfer=t))
    with pytest.raises(ValueError, match="different query rows"):
        combine_edits(AttentionEdit(head_scale=torch.ones(B, H), row_start=torch.tensor([0, 0])),
                      AttentionEdit(head_scale=torch.ones(B, H), row_start=torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="different query rows"):  # None means every row, not "don't care"
        combine_edits(AttentionEdit(head_scale=torch.ones(B, H)),
                      AttentionEdit(key_bias=torch.zeros(B, 1, N), row_start=torch.tensor([3, 3])))
    same = combine_edits(AttentionEdit(head_scale=torch.ones(B, H)),
                         AttentionEdit(key_bias=torch.zeros(B, 1, N), row_start=torch.tensor([0, 0])))
    assert same.row_start is not None and same.head_scale is not None
    with pytest.raises(ValueError, match="disjoint"):
        MassTransfer(source_groups=(0,), target_groups=(0,), retain=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MassTransfer(source_groups=(0,), target_groups=(1,), retain=1.5)
