"""GIFT against an independent eager re-derivation of the reference code's post-softmax formulas (spec §2.1)."""

from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

import mmattn
from mmattn.lvlm.methods.gift import informative_mask
from mmattn.testing import llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next

SALIENCY, ENHANCE, ALPHA = (1,), (2, 3), 3.0
NLTK_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "nltk_data"


class EagerGIFT:
    def __init__(self, model, inputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        image_token = model.config.image_token_id
        self.image = (ids == image_token) & mask
        if "image_sizes" in inputs:  # LLaVA-NeXT: newline slots are not saliency targets
            with torch.no_grad():
                feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
            newline = torch.cat(feats) == model.model.image_newline
            flat = self.image.clone()
            flat[self.image] = ~newline.all(-1)
            self.image = flat
        pos = torch.arange(ids.shape[1])
        image_end = torch.where((ids == image_token) & mask, pos, -1).amax(1) + 1
        self.query = mask & (ids != image_token) & (pos[None] >= image_end[:, None])
        self.N = ids.shape[1]
        self.w = None

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(rep, 1).double(), value.repeat_interleave(rep, 1).double()
        P = torch.softmax(query.double() @ k.transpose(-1, -2) * scaling + attention_mask.double(), -1)
        B, H, Q, K = P.shape
        layer = module.layer_idx
        if layer in SALIENCY and Q > 1:
            self.w = torch.ones(B, self.N, dtype=torch.float64)
            for b in range(B):
                rows = self.query[b].nonzero().flatten()
                img = self.image[b]
                D = (P[b][:, rows][:, :, img] - P[b][:, rows - 1][:, :, img]).clamp_min(0)  # [H, R, V]
                heads = D.sum(dim=(1, 2)).topk(H // 2).indices
                s = D[heads].mean(dim=(0, 1))
                s = s.clamp(float(s.mean() - 3 * s.std()), float(s.mean() + 3 * s.std()))
                s = (s - s.min()) / (s.max() - s.min())
                self.w[b, img] = torch.exp(ALPHA * s)
        if layer in ENHANCE:
            P = P.clone()
            for b in range(B):
                p = P[b, :, -1]  # the newest row: last prompt row (left padding) or the decode row
                img = torch.zeros(K, dtype=torch.bool); img[: self.N] = self.image[b]
                qry = torch.zeros(K, dtype=torch.bool); qry[: self.N] = self.query[b]
                w = torch.ones(K, dtype=torch.float64); w[: self.N] = self.w[b]
                hv = p[:, img].sum(-1).topk(H // 2).indices
                hq = p[:, qry].sum(-1).topk(H // 2).indices
                r = (p[hv][:, img] * w[img]).sum() / p[hv][:, img].sum()
                new = p.clone()
                new[hv[:, None], img.nonzero().flatten()[None]] = p[hv][:, img] * w[img]
                new[hq[:, None], qry.nonzero().flatten()[None]] = new[hq][:, qry] * r
                P[b, :, -1] = new / new.sum(-1, keepdim=True)
        out = (P @ v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_gift_matches_eager_rederivation(kind):
    build, make = (tiny_llava, llava_inputs) if kind == "llava" else (tiny_llava_next, llava_next_inputs)
    model = build(layers=4, seed=11)
    inputs = make(model)
    ref = EagerGIFT(model, inputs)
    AttentionInterface.register("gift_reference_test", ref.attention)
    AttentionMaskInterface.register("gift_reference_test", eager_mask)
    model.set_attn_implementation({"text_config": "gift_reference_test"})
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    model.set_attn_implementation({"text_config": "sdpa"})
    method = mmattn.GIFT(alpha=ALPHA, saliency_layers=SALIENCY, enhancement_layers=ENHANCE, informative_tokens="all")
    with torch.no_grad():
        plain = model(**inputs).logits
        with mmattn.patch(model, method):
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[:, :-1], plain[:, :-1], atol=1e-5, rtol=1e-5)
    assert (logits[:, -1] - plain[:, -1]).abs().max() > 1e-3, "GIFT must change the last row"
    assert torch.equal(tokens, ref_tokens)


def test_informative_words_by_pos_tag(monkeypatch):
    import nltk
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert NLTK_DATA.is_dir(), f"shared NLTK data missing at {NLTK_DATA}"
    monkeypatch.setattr(nltk.data, "path", [str(NLTK_DATA)] + list(nltk.data.path))
    words = ["[UNK]", "is", "there", "a", "red", "dog", "in", "the", "image", "?", "ASSISTANT:"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = tokenizer("is there a red dog in the image ? ASSISTANT:")["input_ids"]
    flags = informative_mask(tokenizer, ids, "ASSISTANT:")
    chosen = [w for w, f in zip(tokenizer.convert_ids_to_tokens(ids), flags) if f]
    assert chosen == ["is", "red", "dog", "image"]


def test_gift_layer_defaults_and_errors():
    assert mmattn.GIFTConfig().resolve(32) == ((11,), tuple(range(12, 23)))
    assert mmattn.GIFTConfig().resolve(40) == ((10,), tuple(range(14, 21)))
    with pytest.raises(ValueError, match="processor"):
        mmattn.patch(tiny_llava(), mmattn.GIFT())
    with pytest.raises(ValueError, match="do not exist"):
        mmattn.patch(tiny_llava(layers=3), mmattn.GIFT(informative_tokens="all", saliency_layers=(7,), enhancement_layers=(8,)))
