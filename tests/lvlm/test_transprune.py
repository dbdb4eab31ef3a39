"""TransPrune against a straightforward per-sample re-derivation: an explicit eager layer loop that scores, removes
tokens at the same layers and decodes without a KV cache (spec methods-transprune-var §1.2)."""

import pytest
import torch

import mmattn
from mmattn.testing import llava_inputs, llava_next_inputs, select_sample, tiny_llava, tiny_llava_next

CFG = dict(accumulation_layers=(1, 2, 3), prune_layers=(1, 3), keep_ratios=(0.6, 0.2))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def eager_attention(attn, x, cos, sin):
    B, L, _ = x.shape
    d = attn.head_dim
    q = rotate(attn.q_proj(x).view(B, L, -1, d).transpose(1, 2).double(), cos, sin)
    k = rotate(attn.k_proj(x).view(B, L, -1, d).transpose(1, 2).double(), cos, sin)
    v = attn.v_proj(x).view(B, L, -1, d).transpose(1, 2).double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * attn.scaling
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    return probs, (probs @ v).transpose(1, 2).reshape(B, L, -1).float()


def ttv_term(x, y):
    m = y.double().norm(dim=-1) / x.double().norm(dim=-1)
    cos = (x.double() * y.double()).sum(-1) / (x.double().norm(dim=-1) * y.double().norm(dim=-1))
    e = torch.exp(1 - cos)
    return m * e / e.sum()


def reference(model, sample, steps, cfg=CFG):
    """One unpadded sample: prefill with scoring and pruning, then greedy decode without a cache."""
    lm = model.model.language_model
    captured = {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(e=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**sample)
    hook.remove()
    embeds = captured["e"]
    image = (sample["input_ids"][0] == model.config.image_token_id)
    n_image = int(image.sum())
    prune_at = {p: r for p, r in zip(cfg["prune_layers"], cfg["keep_ratios"])}  # prune before layers[p]
    keep_sets = {}
    tokens = []
    for step in range(steps + 1):
        h = torch.cat([embeds, lm.embed_tokens(torch.tensor([tokens], dtype=torch.long))], 1) if tokens else embeds
        alive = torch.arange(h.shape[1])  # original positions of the current sequence
        is_image = torch.cat([image, torch.zeros(len(tokens), dtype=torch.bool)])
        ttv = torch.zeros(h.shape[1], dtype=torch.float64)
        for index, layer in enumerate(lm.layers):
            positions = torch.arange(h.shape[1])[None]
            cos, sin = (t.double()[:, None] for t in lm.rotary_emb(h, positions))
            if index in prune_at:
                if step == 0:
                    current_image = is_image[alive]
                    probs, _ = eager_attention(layer.self_attn, layer.input_layernorm(h), cos, sin)
                    end = int(current_image.nonzero().max()) + 1
                    iga = probs[0, :, end:, :].mean(0).mean(0)
                    t = torch.where(current_image, ttv, 0.0)
                    g = torch.where(current_image, iga, 0.0)
                    score = 0.5 * t / (t.sum() + 1e-8) + 0.5 * g / (g.sum() + 1e-8)
                    k = int(n_image * prune_at[index])
                    top = score.masked_fill(~current_image, float("-inf")).topk(k).indices
                    keep = ~current_image
                    keep[top] = True
                    keep_sets[index] = alive[keep]
                keep = torch.isin(alive, keep_sets[index]) | ~is_image[alive]
                h, alive, ttv = h[:, keep], alive[keep], ttv[keep]
                positions = torch.arange(h.shape[1])[None]
                cos, sin = (t.double()[:, None] for t in lm.rotary_emb(h, positions))
            x_a = layer.input_layernorm(h)
            _, y = eager_attention(layer.self_attn, x_a, cos, sin)
            y_a = layer.self_attn.o_proj(y)
            u = h + y_a
            x_f = layer.post_attention_layernorm(u)
            y_f = layer.mlp(x_f)
            if index + 1 in cfg["accumulation_layers"] and step == 0:
                ttv = ttv + ttv_term(x_a[0], y_a[0]) + ttv_term(x_f[0], y_f[0])
            h = u + y_f
        logits = model.lm_head(lm.norm(h))[0, -1]
        if step == 0:
            first_logits = logits
        if step < steps:
            tokens.append(int(logits.argmax()))
    return first_logits, tokens, keep_sets


@pytest.mark.parametrize("batch", ["padded", "single"])  # "single": no padding anywhere, masks stay None
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_transprune_matches_per_sample_rederivation(kind, batch):
    build, make = (tiny_llava, llava_inputs) if kind == "llava" else (tiny_llava_next, llava_next_inputs)
    model = build(layers=5, seed=13)
    inputs = make(model)
    if batch == "single":
        inputs = select_sample(inputs, 1)
    method = mmattn.TransPrune(**CFG)
    with torch.no_grad(), mmattn.patch(model, method):
        logits = model(**inputs).logits[:, -1]
        kept = [k.clone() for k in method.kept_image_tokens]
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    image = inputs["input_ids"] == model.config.image_token_id
    for b in range(inputs["input_ids"].shape[0]):
        sample = select_sample(inputs, b)
        with torch.no_grad():
            ref_logits, ref_tokens, ref_keep = reference(model, sample, 4)
        offset = inputs["input_ids"].shape[1] - sample["input_ids"].shape[1]
        for stage, layer in enumerate(CFG["prune_layers"]):
            ours = (kept[stage][b].nonzero().flatten() - offset).tolist()
            theirs = [p for p in ref_keep[layer].tolist() if bool(image[b, p + offset])]
            assert ours == theirs, f"sample {b}, stage {stage}: kept image tokens differ"
        assert len(ours) == int(image[b].sum() * CFG["keep_ratios"][-1])
        torch.testing.assert_close(logits[b].double(), ref_logits.double(), atol=1e-4, rtol=1e-4)
        ours_tokens = generated[b].tolist()
        stop = ours_tokens.index(2) + 1 if 2 in ours_tokens else len(ours_tokens)  # generate() stops at EOS
        assert ours_tokens[:stop] == ref_tokens[:stop]


def test_two_images_per_sample_when_the_last_image_is_pruned_away():
    # IGA's rows start after the last image token still present; once a stage has removed every token of a sample's
    # last image, the rows between its images (here the word after the first image) count too, as in the reference.
    cfg = dict(accumulation_layers=(1, 2, 3), prune_layers=(1, 2, 3), keep_ratios=(0.5, 0.3, 0.1))
    model = tiny_llava(layers=5, seed=1)
    inputs = llava_inputs(model, images_per_prompt=2, seed=1)
    method = mmattn.TransPrune(**cfg)
    with torch.no_grad(), mmattn.patch(model, method):
        logits = model(**inputs).logits[:, -1]
    kept = [k.clone() for k in method.kept_image_tokens]
    image = inputs["input_ids"] == model.config.image_token_id
    second_image = [image[b].nonzero().flatten()[25:] for b in range(image.shape[0])]
    assert any(not kept[1][b, second_image[b]].any() for b in range(image.shape[0])), "the case is not exercised"
    for b in range(inputs["input_ids"].shape[0]):
        sample = select_sample(inputs, b, images_per_prompt=2)
        with torch.no_grad():
            ref_logits, _, ref_keep = reference(model, sample, 0, cfg)
        offset = inputs["input_ids"].shape[1] - sample["input_ids"].shape[1]
        for stage, layer in enumerate(cfg["prune_layers"]):
            ours = (kept[stage][b].nonzero().flatten() - offset).tolist()
            theirs = [p for p in ref_keep[layer].tolist() if bool(image[b, p + offset])]
            assert ours == theirs, f"sample {b}, stage {stage}: kept image tokens differ"
        torch.testing.assert_close(logits[b].double(), ref_logits.double(), atol=1e-4, rtol=1e-4)


def test_flop_counter_reproduces_the_paper():
    assert mmattn.transprune_tflops(576, prune=False) == pytest.approx(3.82, rel=0.01)
    assert mmattn.transprune_tflops(576) == pytest.approx(1.56, rel=0.01)
    assert mmattn.transprune_tflops(2880, prune=False) == pytest.approx(20.83, rel=0.01)
    assert mmattn.transprune_tflops(2880) == pytest.approx(8.33, rel=0.01)


def test_composes_with_attention_edits_and_validates():
    model = tiny_llava(layers=5, seed=13)
    inputs = llava_inputs(model)
    var = mmattn.VAR(tau=1.6, min_image_mass=0.0, rho=0.0, sink_dims=(3, 17))
    with torch.no_grad(), mmattn.patch(model, mmattn.TransPrune(**CFG), var) as handle:
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert 4 in var.groups_by_layer and var.groups_by_layer[4].shape[1] < inputs["input_ids"].shape[1]
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
    with pytest.raises(ValueError, match="keep ratio"):
        mmattn.TransPrune(prune_layers=(1, 2), keep_ratios=(0.5,))
    with pytest.raises(ValueError, match="layers"):
        mmattn.patch(tiny_llava(layers=3), mmattn.TransPrune())


@pytest.mark.parametrize("multiple", [16, 128])  # 128: wider than the sequence entering the last stage
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_padding_after_the_last_stage_changes_nothing(kind, multiple):
    # pad_multiple left-pads the sequence after the last pruning layer (what lets one CUDA graph serve many prompt
    # lengths); the padding is masked, so kept tokens, logits and generations equal the unpadded run's.
    build, make = (tiny_llava, llava_inputs) if kind == "llava" else (tiny_llava_next, llava_next_inputs)
    model = build(layers=5, seed=13)
    for inputs in (make(model), select_sample(make(model), 1)):
        results = []
        for pad in (1, multiple):
            method = mmattn.TransPrune(**CFG, pad_multiple=pad)
            with torch.no_grad(), mmattn.patch(model, method):
                logits = model(**inputs).logits[:, -1]
                kept = [k.clone() for k in method.kept_image_tokens]
                widths = dict(method._state["widths"])
                generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            results.append((logits, kept, widths, generated))
        (logits, kept, widths, generated), (padded_logits, padded_kept, padded_widths, padded_generated) = results
        last = CFG["prune_layers"][-1]
        assert padded_widths[last] % multiple == 0 and padded_widths[last] > widths[last], "no padding was added"
        assert padded_widths[last - 1] == widths[last - 1]  # earlier stages are not padded
        for ours, theirs in zip(padded_kept, kept):
            assert torch.equal(ours, theirs)
        torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(padded_generated, generated)


def test_cuda_graph_option_validates():
    with pytest.raises(ValueError, match="pad_multiple"):
        mmattn.TransPrune(pad_multiple=0)
    with pytest.raises(ValueError, match="max_graphs"):
        mmattn.TransPrune(max_graphs=0)
    assert mmattn.TransPrune(cuda_graphs=True).config.padding() == 32
    assert mmattn.TransPrune().config.padding() == 1
    assert mmattn.TransPrune(cuda_graphs=True, pad_multiple=8).config.padding() == 8
    # resolved when used, so overriding cuda_graphs on an existing config still pads
    assert mmattn.TransPrune(mmattn.TransPruneConfig(), cuda_graphs=True).config.padding() == 32
    model = tiny_llava(layers=5, seed=13)
    with pytest.raises(ValueError, match="CUDA GPU"):
        mmattn.patch(model, mmattn.TransPrune(**CFG, cuda_graphs=True))
    var = mmattn.VAR(tau=1.6, min_image_mass=0.0, rho=0.0, sink_dims=(3, 17))
    with pytest.raises(ValueError, match="attention-editing methods \\(var\\)"):
        mmattn.patch(model, mmattn.TransPrune(**CFG, cuda_graphs=True), var)
    # A refused patch leaves the model as it was: plain patching still works and no layer keeps a wrapper.
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    with torch.no_grad(), mmattn.patch(model, mmattn.TransPrune(**CFG)):
        model(**llava_inputs(model))
