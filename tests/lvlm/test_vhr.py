"""VHR against an independent re-derivation: the image and image-free branches batched in one eager forward
(the paper's "one additional forward pass"), with the head selection done by an o_proj pre-hook."""

import numpy as np
import pytest
import torch

import mmattn
from mmattn.testing import PAD_TOKEN_ID, llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next

LAYERS = (1, 3, 4)
ALPHA = 2.0


def choose_heads(img, txt):
    """img, txt: [H, D] numpy head outputs at the last prompt position -> per-head scale (paper Eq. 4, 6, 7)."""
    vhd = np.sqrt(((img - txt) ** 2).sum(-1))
    ta = (txt**2).sum(-1)
    zero = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
    vhd = np.where(zero, 0.0, vhd)
    median = np.sort(vhd)[(len(vhd) - 1) // 2]  # torch.median's lower middle
    return np.where(vhd > median, ALPHA, 1.0)


def o_proj_hooks(model, fn):
    handles = []
    for idx, layer in enumerate(model.model.language_model.layers):
        attn = layer.self_attn

        def hook(module, args, idx=idx, heads=attn.config.num_attention_heads):
            x = args[0]
            shaped = x.view(*x.shape[:-1], heads, -1)
            return (fn(idx, shaped).reshape(x.shape),)

        handles.append(attn.o_proj.register_forward_pre_hook(hook))
    return handles


def reference(model, inputs, max_new_tokens):
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    B, N = ids.shape
    text_ids = torch.full_like(ids, PAD_TOKEN_ID)
    text_mask = torch.zeros_like(mask)
    for b in range(B):
        row = ids[b][mask[b] & (ids[b] != model.config.image_token_id)]
        text_ids[b, N - len(row):] = row
        text_mask[b, N - len(row):] = True
    both_ids = torch.cat([ids, text_ids])
    both_mask = torch.cat([mask, text_mask]).long()
    positions = (both_mask.cumsum(-1) - 1).clamp_min(0)
    scales = {}

    def lockstep(layer, x):
        if layer not in LAYERS:
            return x
        s = np.stack([choose_heads(x[b, -1].double().numpy(), x[B + b, -1].double().numpy()) for b in range(B)])
        scales[layer] = torch.tensor(s, dtype=x.dtype)
        return x * torch.cat([scales[layer], scales[layer]])[:, None, :, None]

    handles = o_proj_hooks(model, lockstep)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        model(input_ids=both_ids, attention_mask=both_mask, position_ids=positions, **extra)
    for h in handles:
        h.remove()

    handles = o_proj_hooks(model, lambda layer, x: x * scales[layer][:, None, :, None] if layer in scales else x)
    with torch.no_grad():
        logits = model(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    for h in handles:
        h.remove()
    return scales, logits, tokens


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_vhr_matches_batched_two_branch_rederivation(kind):
    build, make = (tiny_llava, llava_inputs) if kind == "llava" else (tiny_llava_next, llava_next_inputs)
    model = build(layers=5, seed=7, attn_implementation="eager")
    inputs = make(model)
    ref_scales, ref_logits, ref_tokens = reference(model, inputs, 5)
    method = mmattn.VHR(layers=LAYERS, alpha=ALPHA)
    with torch.no_grad(), mmattn.patch(model, method):
        logits = model(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
        for layer in LAYERS:
            assert torch.equal(method.head_scales[layer], ref_scales[layer]), f"layer {layer} heads differ"
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)
    assert all((s == ALPHA).any() for s in ref_scales.values())


def test_vhr_default_layers_follow_the_paper():
    cfg = mmattn.VHRConfig()
    assert cfg.layer_set(32) == {1, *range(18, 32)}
    with pytest.raises(ValueError, match="do not exist"):
        mmattn.patch(tiny_llava(layers=3), mmattn.VHR(layers=(5,)))
    with pytest.raises(ValueError, match="outlier_rule"):
        mmattn.VHR(outlier_rule="xor")
