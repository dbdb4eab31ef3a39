"""VAR against an independent dense eager re-derivation of the paper's formulas (spec methods-transprune-var §2.2)."""

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

import mmattn
from mmattn.testing import llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next

DIMS = (3, 17)
CFG = dict(tau=1.6, min_image_mass=0.05, rho=0.3, transfer=0.6, sink_dims=DIMS)


class EagerVAR:
    """Eager attention + post-softmax redistribution, written from the spec, for a batch with a known layout."""

    def __init__(self, model, input_ids, attention_mask, cfg):
        self.cfg = cfg
        self.image = (input_ids == model.config.image_token_id) & attention_mask.bool()
        self.valid = attention_mask.bool()
        positions = torch.arange(input_ids.shape[1])
        self.image_end = torch.where(self.image, positions, -1).amax(1) + 1
        self.num_image = self.image.sum(1)
        self.num_layers = model.config.text_config.num_hidden_layers
        self.sinks = {}
        self.visual_sinks_seen = 0
        layers = model.model.language_model.layers
        self.hooks = [layer.register_forward_pre_hook(self.detect(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def detect(self, layer_idx):
        def hook(module, args, kwargs):
            h = args[0].double()
            if h.shape[1] == 1 or layer_idx < 2:
                return
            rms = torch.sqrt((h**2).mean(-1) + 1e-6)
            phi = torch.stack([h[..., d].abs() for d in DIMS], -1).amax(-1) / rms
            sink = (phi > self.cfg["tau"]) & self.valid
            self.sinks[layer_idx] = sink
            self.visual_sinks_seen += int((sink & self.image).sum())
        return hook

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, 1).double()
        v = value.repeat_interleave(rep, 1).double()
        scores = query.double() @ k.transpose(-1, -2) * scaling + attention_mask.double()
        probs = torch.softmax(scores, -1)
        layer = module.layer_idx
        B, H, Q, K = probs.shape
        if 2 <= layer < self.num_layers - 1:
            sink = self.sinks[layer]
            for b in range(B):
                vis_sink = sink[b] & self.image[b]
                if not vis_sink.any():
                    continue
                img = torch.zeros(K, dtype=torch.bool); img[: self.image.shape[1]] = self.image[b]
                vs = torch.zeros(K, dtype=torch.bool); vs[: self.image.shape[1]] = vis_sink
                ts = torch.zeros(K, dtype=torch.bool); ts[: self.image.shape[1]] = sink[b] & ~self.image[b]
                for h in range(H):
                    for i in range(Q):
                        if K - Q + i < self.image_end[b]:
                            continue
                        a = probs[b, h, i]
                        m_img, m_vs, m_ts = a[img].sum(), a[vs].sum(), a[ts].sum()
                        portion = m_vs / (m_img + self.num_image[b] * 1e-6)
                        if m_img < self.cfg["min_image_mass"] or portion > 1 - self.cfg["rho"] or m_img - m_vs <= 0:
                            continue
                        p_keep = 1 - self.cfg["transfer"]
                        new = a.clone()
                        new[vs | ts] = p_keep * a[vs | ts]
                        nonsink = img & ~vs
                        new[nonsink] = a[nonsink] + (1 - p_keep) * (m_vs + m_ts) * a[nonsink] / (m_img - m_vs)
                        probs[b, h, i] = new
        out = (probs @ v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    def remove(self):
        for h in self.hooks:
            h.remove()


def run_reference(model, inputs, max_new_tokens):
    ref = EagerVAR(model, inputs["input_ids"], inputs["attention_mask"], CFG)
    AttentionInterface.register("var_reference_test", ref.attention)
    AttentionMaskInterface.register("var_reference_test", eager_mask)
    model.set_attn_implementation({"text_config": "var_reference_test"})
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        ref.remove()
    return logits, tokens, ref.visual_sinks_seen


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_var_matches_eager_rederivation(kind):
    build, make = (tiny_llava, llava_inputs) if kind == "llava" else (tiny_llava_next, llava_next_inputs)
    model = build(layers=5, seed=3)
    inputs = make(model)
    valid = inputs["attention_mask"].bool()
    ref_logits, ref_tokens, visual_sinks = run_reference(model, inputs, 5)
    assert visual_sinks > 0, "the test needs visual sinks to be meaningful"
    with torch.no_grad():
        plain = model(**inputs).logits
        with mmattn.patch(model, mmattn.VAR(**CFG)):
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert not torch.allclose(plain[valid], ref_logits[valid], atol=1e-4), "VAR must change the logits here"
    torch.testing.assert_close(logits[valid], ref_logits[valid].float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_var_state_resets_between_requests():
    model = tiny_llava(layers=5, seed=3)
    first, second = llava_inputs(model, seed=1), llava_inputs(model, seed=2, text_lengths=(3, 4, 8))
    method = mmattn.VAR(**CFG)
    with torch.no_grad(), mmattn.patch(model, method):
        model(**first)
        fresh = model(**second).logits
    with torch.no_grad(), mmattn.patch(model, mmattn.VAR(**CFG)):
        alone = model(**second).logits
    torch.testing.assert_close(fresh, alone)


def test_var_presets_and_validation():
    assert mmattn.VAR().config.transfer == 0.6
    code = mmattn.VARConfig.reference_code()
    assert code.transfer == pytest.approx(0.4) and code.apply_last_layer
    with pytest.raises(ValueError, match="transfer"):
        mmattn.VAR(transfer=1.5)
    with pytest.raises(ValueError, match="hidden size"):
        mmattn.patch(tiny_llava(), mmattn.VAR(sink_dims=(999,)))


def test_var_warns_when_it_finds_no_sink():
    model = tiny_llava(layers=5, seed=3)
    inputs = llava_inputs(model)
    with torch.no_grad(), mmattn.patch(model, mmattn.VAR(sink_dims=DIMS)):  # tau = 20: random weights have no sink
        with pytest.warns(RuntimeWarning, match="no visual sink"):
            model(**inputs)
