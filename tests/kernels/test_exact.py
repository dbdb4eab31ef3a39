"""The exact PyTorch path against a naive float64 re-derivation of the contract, feature by feature."""

import math

import pytest
import torch

from mmattn.edits import AttentionEdit, MassTransfer
from mmattn.kernels import attention
from mmattn.kernels.exact import exact_attention

from .reference import reference_attention

B, H, HKV, D, G = 2, 4, 2, 8, 4


def make_inputs(q_len, kv_len, seed=0, kv_heads=HKV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, D, generator=g)
    k = torch.randn(B, kv_heads, kv_len, D, generator=g)
    v = torch.randn(B, kv_heads, kv_len, D, generator=g)
    padding = torch.ones(B, kv_len, dtype=torch.bool)
    padding[1, :3] = False  # left padding on sample 1
    groups = torch.randint(0, G, (B, kv_len), generator=g)
    return q, k, v, padding, groups, g


def full_edit(kv_len, q_len, groups, g, **extra):
    return AttentionEdit(
        key_groups=groups,
        num_groups=G,
        row_start=torch.tensor([kv_len - q_len + 2, 5]),
        row_end=torch.tensor([kv_len + 1, kv_len - 1]),
        group_bias=torch.randn(B, H, G, generator=g),
        group_gain=0.3 * torch.randn(B, H, G, generator=g),
        key_bias=torch.randn(B, H, kv_len, generator=g),
        head_scale=1 + torch.rand(B, H, generator=g),
        return_lse=True,
        return_group_mass=True,
        key_mass_rows=torch.rand(B, q_len, generator=g) > 0.5,
        **extra,
    )


def transfer(g, heads=True):
    return MassTransfer(
        source_groups=(2, 3),
        target_groups=(1,),
        retain=0.4,
        heads=(torch.rand(B, H, generator=g) > 0.3) if heads else None,
        condition_groups=(1, 2),
        min_condition_mass=0.05,
        ratio_groups=(2,),
        max_ratio=0.9,
        ratio_eps=torch.tensor([1e-6, 3e-6]),
    )


def check(q, k, v, padding, edit, causal=True, chunk_rows=5):
    out, stats = exact_attention(q, k, v, scale=D**-0.5, causal=causal, key_padding=padding, edit=edit, chunk_rows=chunk_rows)
    ref_out, ref_lse, ref_mass, ref_key_mass = reference_attention(
        q, k, v, scale=D**-0.5, causal=causal, key_padding=padding, edit=edit
    )
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    if edit is not None and edit.return_lse:
        torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    if edit is not None and edit.return_group_mass:
        torch.testing.assert_close(stats.group_mass.double(), ref_mass, atol=2e-5, rtol=1e-5)
    if edit is not None and edit.key_mass_rows is not None:
        torch.testing.assert_close(stats.key_mass.double(), ref_key_mass, atol=2e-5, rtol=1e-5)
    return out, stats


@pytest.mark.parametrize("q_len,kv_len", [(13, 13), (1, 17), (3, 11)])
@pytest.mark.parametrize("causal", [True, False])
def test_plain_attention_matches_reference(q_len, kv_len, causal):
    q, k, v, padding, _, _ = make_inputs(q_len, kv_len)
    check(q, k, v, padding, None, causal=causal)


@pytest.mark.parametrize(
    "field",
    ["group_bias", "group_gain", "key_bias", "head_scale", "rows", "stats"],
)
def test_each_primitive_matches_reference(field):
    q, k, v, padding, groups, g = make_inputs(11, 11, seed=1)
    full = full_edit(11, 11, groups, g)
    edit = AttentionEdit(key_groups=groups, num_groups=G)
    if field == "rows":
        edit.row_start, edit.row_end, edit.group_bias = full.row_start, full.row_end, full.group_bias
    elif field == "stats":
        edit.return_lse, edit.return_group_mass, edit.key_mass_rows = True, True, full.key_mass_rows
    else:
        setattr(edit, field, getattr(full, field))
    out, _ = check(q, k, v, padding, edit)
    plain, _ = exact_attention(q, k, v, scale=D**-0.5, key_padding=padding)
    if field != "stats":
        assert not torch.allclose(out, plain), "the edit must change the output"


@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (1, 15)])
def test_mass_transfer_matches_post_softmax_redistribution(q_len, kv_len):
    q, k, v, padding, groups, g = make_inputs(q_len, kv_len, seed=2)
    edit = AttentionEdit(key_groups=groups, num_groups=G, mass_transfer=transfer(g), return_group_mass=True, return_lse=True)
    out, stats = check(q, k, v, padding, edit)
    plain, _ = exact_attention(q, k, v, scale=D**-0.5, key_padding=padding)
    assert not torch.allclose(out, plain)


def test_everything_at_once_with_gqa_padding_and_decode():
    q, k, v, padding, groups, g = make_inputs(4, 19, seed=3)
    check(q, k, v, padding, full_edit(19, 4, groups, g, mass_transfer=transfer(g)))


def test_mha_and_odd_lengths():
    q, k, v, padding, groups, g = make_inputs(7, 23, seed=4, kv_heads=H)
    check(q, k, v, padding, full_edit(23, 7, groups, g, mass_transfer=transfer(g, heads=False)), chunk_rows=3)


def test_retain_zero_removes_source_mass():
    q, k, v, padding, groups, g = make_inputs(6, 6, seed=5)
    t = MassTransfer(source_groups=(0,), target_groups=(1,), retain=0.0)
    _, stats = exact_attention(
        q, k, v, scale=D**-0.5, key_padding=padding,
        edit=AttentionEdit(key_groups=groups, num_groups=G, mass_transfer=t, return_group_mass=True),
    )
    has_target = stats.group_mass[..., 1] > 0
    assert has_target.any()
    assert torch.all(stats.group_mass[..., 0][has_target] == 0)


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    q, k, v, _, groups, _ = make_inputs(5, 5)
    padding = torch.ones(B, 5, dtype=torch.bool)
    padding[0, :3] = False  # rows 0..2 of sample 0 see only padding under causality
    out, stats = exact_attention(q, k, v, scale=D**-0.5, key_padding=padding, edit=AttentionEdit(return_lse=True))
    assert torch.all(out[0, :3] == 0)
    assert torch.all(stats.lse[0, :, :3] == -math.inf)
    assert torch.isfinite(out).all()


def test_plain_path_matches_torch_sdpa():
    q, k, v, padding, _, _ = make_inputs(12, 12)
    out, _ = exact_attention(q, k, v, scale=D**-0.5, key_padding=None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_dense_mask_replaces_causality():
    q, k, v, _, _, _ = make_inputs(6, 6)
    dense = torch.rand(B, 1, 6, 6) > 0.3
    dense[..., 0] = True
    out, _ = exact_attention(q, k, v, scale=D**-0.5, dense_mask=dense)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_bad_shapes_are_named():
    q, k, v, padding, groups, _ = make_inputs(4, 4)
    with pytest.raises(ValueError, match="group_bias"):
        exact_attention(q, k, v, scale=1.0, edit=AttentionEdit(key_groups=groups, num_groups=G, group_bias=torch.zeros(B, H, G + 1)))
    with pytest.raises(ValueError, match="key_groups"):
        exact_attention(q, k, v, scale=1.0, edit=AttentionEdit(group_bias=torch.zeros(B, H, G), num_groups=G))
    with pytest.raises(ValueError, match="multiple"):
        exact_attention(q, k[:, :1].expand(B, 3, 4, D), v[:, :1].expand(B, 3, 4, D), scale=1.0)


def test_dispatch_override(monkeypatch):
    q, k, v, _, _, _ = make_inputs(3, 3)
    monkeypatch.setenv("MMATTN_KERNEL", "exact")
    out, _ = attention(q, k, v, scale=D**-0.5)
    torch.testing.assert_close(out, exact_attention(q, k, v, scale=D**-0.5)[0])
    monkeypatch.setenv("MMATTN_KERNEL", "fastest")
    with pytest.raises(ValueError, match="exact, triton"):
        attention(q, k, v, scale=D**-0.5)


@pytest.mark.parametrize("q_len,kv_len,causal,padded", [(1, 17, True, True), (13, 13, True, False), (5, 9, False, False)])
def test_sdpa_route_gives_the_exact_path_on_the_calls_it_accepts(q_len, kv_len, causal, padded):
    from mmattn.kernels import sdpa_applies, sdpa_attention

    q, k, v, padding, _, _ = make_inputs(q_len, kv_len, seed=9)  # GQA: 4 query heads over 2 key/value heads
    padding = padding if padded else None
    assert sdpa_applies(q, k, causal, padding, None, None)
    out, stats = sdpa_attention(q, k, v, scale=D**-0.5, causal=causal, key_padding=padding)
    ref, _ = exact_attention(q, k, v, scale=D**-0.5, causal=causal, key_padding=padding)
    assert out.shape == ref.shape and stats.lse is None
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_sdpa_route_refuses_what_it_cannot_compute():
    from mmattn.kernels import sdpa_applies

    q, k, _, padding, groups, g = make_inputs(3, 11)
    square_q, square_k, _, _, _, _ = make_inputs(11, 11)
    assert not sdpa_applies(q, k, True, None, None, None)  # causal, fewer queries than keys: bottom-right aligned
    assert not sdpa_applies(square_q, square_k, True, padding, None, None)  # padded prefill: fully masked rows
    assert not sdpa_applies(q[:, :, :1], k, True, padding, torch.zeros(B, 1, 1, 11), None)  # dense masks
    edit = AttentionEdit(key_groups=groups, num_groups=G, group_bias=torch.randn(B, H, G, generator=g))
    assert not sdpa_applies(q[:, :, :1], k, True, padding, None, edit)  # edits
    assert not sdpa_applies(q[:, :, :1], k, True, padding, None, AttentionEdit(return_lse=True))  # statistics
    assert sdpa_applies(q[:, :, :1], k, True, padding, None, AttentionEdit())  # an empty edit is no edit


def test_dispatch_sends_only_unedited_calls_to_sdpa(monkeypatch):
    import mmattn.kernels as kernels

    calls = []
    monkeypatch.setattr(kernels, "selected_backend", lambda query: "triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: (True, "test"))
    monkeypatch.setattr(kernels, "sdpa_attention", lambda *a, **kw: calls.append("sdpa") or (None, None))
    import mmattn.kernels.triton_attention as triton_module

    monkeypatch.setattr(triton_module, "triton_attention", lambda *a, **kw: calls.append("triton") or (None, None))
    q, k, v, padding, groups, g = make_inputs(1, 9)
    kernels.attention(q, k, v, scale=D**-0.5, key_padding=padding)
    kernels.attention(q, k, v, scale=D**-0.5, key_padding=padding, edit=AttentionEdit(return_lse=True))
    monkeypatch.setenv("MMATTN_KERNEL", "triton")  # forcing Triton really means Triton
    kernels.attention(q, k, v, scale=D**-0.5, key_padding=padding)
    assert calls == ["sdpa", "triton", "triton"]
