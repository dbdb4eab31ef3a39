"""Parity of the Triton kernels with the exact PyTorch path, under the Triton interpreter on the CPU.

Every feature of the edit contract is checked on both kernel families (prefill and split-KV decode) at small
shapes. Each check also asserts that the feature visibly changes the exact result, so a kernel that ignored a
feature would fail here rather than pass vacuously.

The interpreter must be switched on before the kernel modules are imported (``@triton.jit`` decides at
decoration time). When something in this pytest session has already imported them compiled, the whole module
re-runs itself in a subprocess with ``TRITON_INTERPRET=1``.

Not covered here: bf16 inputs (the interpreter's ``tl.dot`` multiplies bf16 bit patterns as integers, a Triton
interpreter limitation); they are covered by the GPU tests.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

# Triton decides interpreted-or-compiled when a function is decorated, and that includes triton.language's own
# helpers (tl.zeros, ...), decorated when triton is first imported. So the interpreter can run in this process
# only if TRITON_INTERPRET=1 is set before anything imports triton (``import mmattn`` does, via transformers).
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # stays set: the interpreter also reads it at call time
_INTERPRETER_ON = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mmattn.edits import AttentionEdit, MassTransfer  # noqa: E402
from mmattn.kernels.exact import exact_attention  # noqa: E402

TA = None
if _INTERPRETER_ON:
    try:
        import mmattn.kernels.triton_attention as TA  # noqa: E402
    except ImportError as error:  # pragma: no cover - triton missing
        pytest.skip(f"triton unavailable: {error}", allow_module_level=True)
    if not TA._INTERPRET:  # imported compiled earlier in this process
        TA = None

in_process = pytest.mark.skipif(TA is None, reason="triton already imported compiled; see test_in_subprocess")


@pytest.mark.skipif(TA is not None, reason="interpreter active in this process")
def test_in_subprocess():
    """Run this whole module again in a fresh interpreter-mode process and require it to pass."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "test_in_subprocess" not in proc.stdout.split("passed")[0][-200:]


B, H, D, G = 2, 4, 8, 4
PATHS = ["prefill", "decode"]


def make(q_len, kv_len, *, kv_heads=2, head_dim=D, dtype=torch.float32, seed=0, padding=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, head_dim, generator=g)
    k = torch.randn(B, kv_heads, kv_len, head_dim, generator=g)
    v = torch.randn(B, kv_heads, kv_len, head_dim, generator=g)
    pad = None
    if padding:
        pad = torch.ones(B, kv_len, dtype=torch.bool)
        pad[1, : min(3, kv_len - 1)] = False  # left padding on sample 1
    groups = torch.randint(0, G, (B, kv_len), generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), pad, groups, g


def run_both(q, k, v, *, path, causal=True, pad=None, edit=None, splits=3):
    out, stats = TA.triton_attention(
        q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, key_padding=pad, edit=edit, path=path, decode_splits=splits
    )
    ref, ref_stats = exact_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, key_padding=pad, edit=edit)
    return out, stats, ref, ref_stats


def assert_parity(out, stats, ref, ref_stats, edit, atol=2e-5, rtol=1e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    if edit is None:
        return
    for name in ("lse", "group_mass", "key_mass"):
        got, want = getattr(stats, name), getattr(ref_stats, name)
        assert (got is None) == (want is None), name
        if want is None:
            continue
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=2e-5, rtol=1e-5, msg=name)
        assert torch.equal(got[~finite], want[~finite]), name


def assert_observable(q, k, v, pad, with_edit, without_edit, causal=True):
    """The feature under test must change the exact result well beyond the parity tolerance."""
    a, _ = exact_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, key_padding=pad, edit=with_edit)
    b, _ = exact_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, key_padding=pad, edit=without_edit)
    assert (a - b).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------- plain attention
@in_process
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "q_len,kv_len,kv_heads",
    [(19, 19, 2), (3, 40, 4), (5, 33, 1)],
)
def test_plain(path, causal, q_len, kv_len, kv_heads):
    if path == "decode" and q_len * H // kv_heads > 64:
        pytest.skip("decode packs at most 64 rows")
    q, k, v, pad, _, _ = make(q_len, kv_len, kv_heads=kv_heads, seed=q_len + kv_len)
    assert_parity(*run_both(q, k, v, path=path, causal=causal, pad=pad), None)


@in_process
def test_prefill_long_multi_tile_no_padding():
    # Several key tiles, so both the mask-free and the masked loops run; query rows before key rows (Nq > Nk):
    # under causal masking the first rows see no key at all and must give output 0 and LSE -inf.
    q, k, v, _, _, _ = make(40, 29, seed=3, padding=False)
    edit = AttentionEdit(return_lse=True)
    out, stats, ref, ref_stats = run_both(q, k, v, path="prefill", causal=True, edit=edit)
    assert_parity(out, stats, ref, ref_stats, edit)
    assert torch.isneginf(stats.lse[:, :, :11]).all() and (out[:, :11] == 0).all()


@in_process
@pytest.mark.parametrize("path", PATHS)
def test_fully_masked_rows_and_padding(path):
    q, k, v, pad, _, _ = make(3, 24, seed=4)
    pad[0] = False  # sample 0 has no real key at all
    edit = AttentionEdit(return_lse=True)
    out, stats, ref, ref_stats = run_both(q, k, v, path=path, pad=pad, edit=edit)
    assert_parity(out, stats, ref, ref_stats, edit)
    assert (out[0] == 0).all() and torch.isneginf(stats.lse[0]).all()
    assert torch.isfinite(stats.lse[1]).all()


@in_process
@pytest.mark.parametrize("path", PATHS)
def test_head_dim_not_power_of_two_and_strided_inputs(path):
    q, k, v, pad, _, _ = make(4, 37, head_dim=12, seed=5)
    # [B, N, H, D] memory transposed to [B, H, N, D], as transformers hands it over.
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    assert_parity(*run_both(q, k, v, path=path, pad=pad), None)


@in_process
@pytest.mark.parametrize("path", PATHS)
def test_fp16_inputs(path):
    q, k, v, pad, groups, g = make(4, 45, dtype=torch.float16, seed=6)
    edit = AttentionEdit(key_groups=groups, num_groups=G, group_bias=torch.randn(B, H, G, generator=g), return_lse=True)
    out, stats, ref, ref_stats = run_both(q, k, v, path=path, pad=pad, edit=edit)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(stats.lse, ref_stats.lse, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- score edits
def _score_edits(kv_len, groups, g, which):
    fields = {}
    if "group_bias" in which:
        fields["group_bias"] = 2 * torch.randn(B, H, G, generator=g)
    if "group_gain" in which:
        fields["group_gain"] = 0.8 * torch.randn(B, H, G, generator=g)
    if "key_bias" in which:
        fields["key_bias"] = 2 * torch.randn(B, H, kv_len, generator=g)
    if "key_bias_shared" in which:
        fields["key_bias"] = 2 * torch.randn(B, 1, kv_len, generator=g)
    if "head_scale" in which:
        fields["head_scale"] = 0.5 + torch.rand(B, H, generator=g)
    needs_groups = "group_bias" in which or "group_gain" in which
    return AttentionEdit(key_groups=groups if needs_groups else None, num_groups=G if needs_groups else 0, **fields)


@in_process
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", ["group_bias", "group_gain", "key_bias", "key_bias_shared", "head_scale",
                                   "group_bias+key_bias_shared", "group_bias+group_gain"])
@pytest.mark.parametrize("rows", ["all", "start", "start_end"])
def test_score_edits(path, which, rows):
    q_len = 4 if path == "decode" else 21
    kv_len = 30
    q, k, v, pad, groups, g = make(q_len, kv_len, seed=7)
    edit = _score_edits(kv_len, groups, g, which)
    if rows == "start":
        edit.row_start = torch.tensor([kv_len - 2, kv_len - q_len + 1])
    elif rows == "start_end":
        edit.row_start = torch.tensor([kv_len - q_len + 1, 0])
        edit.row_end = torch.tensor([kv_len - 1, kv_len - 2])
    assert_observable(q, k, v, pad, edit, None)
    assert_parity(*run_both(q, k, v, path=path, pad=pad, edit=edit), edit)
    if rows != "all":  # the unselected rows must be untouched
        out, _ = TA.triton_attention(q, k, v, scale=D**-0.5, key_padding=pad, edit=edit, path=path, decode_splits=3)
        plain, _ = exact_attention(q, k, v, scale=D**-0.5, key_padding=pad)
        pos = torch.arange(kv_len - q_len, kv_len)
        for b in range(B):
            start = int(edit.row_start[b])
            end = int(edit.row_end[b]) if edit.row_end is not None else kv_len + 1
            unselected = (pos < start) | (pos >= end)
            assert unselected.any()
            torch.testing.assert_close(out[b, unselected], plain[b, unselected], atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- mass transfer
def _transfer(g, *, heads=True, conditions=True, retain=0.4, eps_tensor=True):
    kwargs = {}
    if conditions:
        kwargs = dict(
            condition_groups=(1, 2),
            min_condition_mass=0.15,
            ratio_groups=(2,),
            max_ratio=0.7,
            ratio_eps=torch.tensor([1e-6, 3e-6]) if eps_tensor else 1e-6,
        )
    return MassTransfer(
        source_groups=(2, 3),
        target_groups=(1,),
        retain=retain,
        heads=(torch.rand(B, H, generator=g) > 0.3) if heads else None,
        **kwargs,
    )


def _active_rows(q, k, v, pad, edit):
    """How many (b, h, row) triples the transfer actually changes (exact path)."""
    a, _ = exact_attention(q, k, v, scale=q.shape[-1] ** -0.5, key_padding=pad, edit=edit)
    plain = AttentionEdit(**{**edit.__dict__, "mass_transfer": None})
    b, _ = exact_attention(q, k, v, scale=q.shape[-1] ** -0.5, key_padding=pad, edit=plain)
    changed = (a - b).abs().amax(-1) > 1e-4  # [B, Nq, H]
    return int(changed.sum()), changed.numel()


@in_process
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "variant", ["conditions", "no_conditions", "retain_zero", "scalar_eps", "with_score_edits"]
)
def test_mass_transfer(path, variant):
    q_len = 6 if path == "decode" else 26
    kv_len = 34
    q, k, v, pad, groups, g = make(q_len, kv_len, seed=11, kv_heads=2 if path == "prefill" else 4)
    transfer = _transfer(
        g,
        conditions=variant != "no_conditions",
        retain=0.0 if variant == "retain_zero" else 0.4,
        eps_tensor=variant != "scalar_eps",
        heads=variant != "no_conditions",
    )
    edit = AttentionEdit(key_groups=groups, num_groups=G, mass_transfer=transfer, return_group_mass=True, return_lse=True)
    if variant == "with_score_edits":
        edit.group_bias = torch.randn(B, H, G, generator=g)
        edit.key_bias = torch.randn(B, H, kv_len, generator=g)
        edit.row_start = torch.tensor([kv_len - q_len + 2, kv_len - 3])
        edit.head_scale = 0.5 + torch.rand(B, H, generator=g)
    active, total = _active_rows(q, k, v, pad, edit)
    assert 0 < active, "the transfer must act somewhere"
    if variant != "no_conditions":
        assert active < total, "conditions / heads must exclude some rows"
    assert_parity(*run_both(q, k, v, path=path, pad=pad, edit=edit), edit, atol=3e-5)


@in_process
@pytest.mark.parametrize("path", PATHS)
def test_mass_transfer_targets_without_mass_leave_row_unchanged(path):
    q_len = 5 if path == "decode" else 18
    q, k, v, pad, groups, g = make(q_len, 27, seed=12)
    groups[0] = torch.where(groups[0] == 1, 0, groups[0])  # sample 0 has no target key at all
    edit = AttentionEdit(key_groups=groups, num_groups=G, mass_transfer=_transfer(g, heads=False, conditions=False))
    out, stats, ref, ref_stats = run_both(q, k, v, path=path, pad=pad, edit=edit)
    assert_parity(out, stats, ref, ref_stats, edit)
    plain, _ = exact_attention(q, k, v, scale=D**-0.5, key_padding=pad)
    torch.testing.assert_close(out[0], plain[0], atol=2e-5, rtol=1e-5)
    assert (out[1] - plain[1]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------- statistics
@in_process
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", ["random", "none", "all"])
@pytest.mark.parametrize("causal", [True, False])
def test_statistics(path, rows, causal):
    q_len = 5 if path == "decode" else 23
    kv_len = 31
    q, k, v, pad, groups, g = make(q_len, kv_len, seed=13)
    if rows == "random":
        flagged = torch.rand(B, q_len, generator=g) > 0.5
        flagged[:, 0] = True
    else:
        flagged = torch.full((B, q_len), rows == "all")
    edit = AttentionEdit(
        key_groups=groups, num_groups=G, return_lse=True, return_group_mass=True, key_mass_rows=flagged
    )
    out, stats, ref, ref_stats = run_both(q, k, v, path=path, causal=causal, pad=pad, edit=edit)
    assert_parity(out, stats, ref, ref_stats, edit)
    if rows == "none":
        assert (stats.key_mass == 0).all()
    else:
        assert stats.key_mass.sum() > 1


@in_process
@pytest.mark.parametrize("path", PATHS)
def test_everything_at_once(path):
    q_len = 4 if path == "decode" else 29
    kv_len = 41
    q, k, v, pad, groups, g = make(q_len, kv_len, seed=17)
    edit = AttentionEdit(
        key_groups=groups,
        num_groups=G,
        row_start=torch.tensor([kv_len - q_len + 2, 5]),
        row_end=torch.tensor([kv_len + 1, kv_len - 1]),
        group_bias=torch.randn(B, H, G, generator=g),
        group_gain=0.3 * torch.randn(B, H, G, generator=g),
        key_bias=torch.randn(B, H, kv_len, generator=g),
        head_scale=1 + torch.rand(B, H, generator=g),
        mass_transfer=_transfer(g),
        return_lse=True,
        return_group_mass=True,
        key_mass_rows=torch.rand(B, q_len, generator=g) > 0.5,
    )
    assert_parity(*run_both(q, k, v, path=path, pad=pad, edit=edit), edit, atol=3e-5)
    assert_parity(*run_both(q, k, v, path=path, causal=False, pad=pad, edit=edit), edit, atol=3e-5)


@in_process
def test_decode_split_counts_agree():
    q, k, v, pad, groups, g = make(2, 70, seed=19)
    edit = AttentionEdit(key_groups=groups, num_groups=G, mass_transfer=_transfer(g), return_group_mass=True, return_lse=True)
    ref, ref_stats = exact_attention(q, k, v, scale=D**-0.5, key_padding=pad, edit=edit)
    for splits in (1, 2, 5):
        out, stats = TA.triton_attention(q, k, v, scale=D**-0.5, key_padding=pad, edit=edit, path="decode", decode_splits=splits)
        assert_parity(out, stats, ref, ref_stats, edit, atol=3e-5)


@in_process
def test_dense_mask_falls_back_to_exact():
    q, k, v, _, _, g = make(6, 6, seed=23)
    mask = torch.rand(B, 1, 6, 6, generator=g) > 0.3
    mask[..., 0] = True
    out, _ = TA.triton_attention(q, k, v, scale=D**-0.5, dense_mask=mask)
    ref, _ = exact_attention(q, k, v, scale=D**-0.5, dense_mask=mask)
    torch.testing.assert_close(out, ref)


@in_process
def test_interpreter_is_really_used():
    assert TA._INTERPRET
    assert math.isfinite(float(TA.LOG2E))
