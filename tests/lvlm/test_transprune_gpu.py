"""CUDA-graphed prefill (``TransPrune(cuda_graphs=True)``, ``PrefillLayerGraphs``) against the eager path on a GPU.

Opt in with ``pytest -m gpu``. The graphs replay the same kernels as the eager layers, so results must agree to
rounding; the tests also check that one graph serves prompts of different lengths and that the KV cache each
graphed layer leaves behind is the eager one.
"""

from __future__ import annotations

import os

import pytest
import torch

import mmattn
from mmattn.lvlm.graphs import PrefillLayerGraphs
from mmattn.testing import llava_next_inputs, select_sample, tiny_llava_next

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton interpreter is on in this process"),
]

CFG = dict(accumulation_layers=(1, 2, 3), prune_layers=(1, 3), keep_ratios=(0.6, 0.2))


def on_cuda(inputs: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def run(model, method, inputs, new_tokens=5):
    captured = {}

    def keep_cache(module, args, kwargs, output):
        captured.setdefault("cache", kwargs.get("cache", kwargs.get("past_key_values")))

    hook = model.model.language_model.register_forward_hook(keep_cache, with_kwargs=True)
    try:
        with torch.no_grad(), mmattn.patch(model, method):
            logits = model(**inputs).logits[:, -1]
            kept = [k.clone() for k in method.kept_image_tokens]
            captured.clear()
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                                 output_scores=True)
    finally:
        hook.remove()
    cache = captured["cache"]
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    return logits, kept, out.sequences, torch.stack(out.scores), lengths, cache


@pytest.mark.parametrize("batch", ["single", "padded"])
def test_graphed_transprune_equals_eager(batch):
    model = tiny_llava_next(layers=6, seed=13).cuda()
    inputs = llava_next_inputs(model)
    inputs = on_cuda(select_sample(inputs, 1) if batch == "single" else inputs)
    padded = run(model, mmattn.TransPrune(**CFG, pad_multiple=32), inputs)  # the graphs' own padding, eager
    plain = run(model, mmattn.TransPrune(**CFG), inputs)  # no padding at all
    method = mmattn.TransPrune(**CFG, cuda_graphs=True)
    graphed = run(model, method, inputs)
    assert method.graph_captures == 1  # captured at the first prefill, replayed by generate's
    torch.testing.assert_close(graphed[0], padded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graphed[0], plain[0], atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(graphed[1], plain[1]):
        assert torch.equal(ours, theirs)
    assert torch.equal(graphed[2], plain[2]) and torch.equal(graphed[2], padded[2])
    torch.testing.assert_close(graphed[3], plain[3], atol=1e-4, rtol=1e-4)
    # The graphed layers' caches hold no padding: per-layer lengths and contents are the unpadded run's.
    assert graphed[4] == plain[4] and len(set(graphed[4])) > 1  # pruned layers hold fewer
    assert sum(padded[4]) > sum(plain[4])  # (the eager padded run keeps its padding in the cache)
    for ours, theirs in zip(graphed[5].layers, plain[5].layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-4, rtol=1e-4)


def test_one_graph_serves_prompts_of_nearby_lengths():
    model = tiny_llava_next(layers=6, seed=13).cuda()
    base = select_sample(llava_next_inputs(model, text_lengths=(3, 3, 3)), 0)
    method = mmattn.TransPrune(**CFG, cuda_graphs=True)
    with torch.no_grad(), mmattn.patch(model, method):
        outputs = []
        for extra in (0, 1, 2):  # one to three more instruction tokens: the same padded width
            ids = torch.cat([base["input_ids"], torch.full((1, extra), 7)], 1)
            sample = on_cuda({**base, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
            outputs.append(model(**sample).logits[:, -1])
        assert method.graph_captures == 1
    for extra, graphed in zip((0, 1, 2), outputs):
        ids = torch.cat([base["input_ids"], torch.full((1, extra), 7)], 1)
        sample = on_cuda({**base, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
        with torch.no_grad(), mmattn.patch(model, mmattn.TransPrune(**CFG, pad_multiple=32)):
            torch.testing.assert_close(graphed, model(**sample).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_prefill_layer_graphs_on_an_unpatched_model():
    # The helper knows nothing about methods: graph the last layers of a plain sdpa model.
    model = tiny_llava_next(layers=6, seed=13).cuda()
    inputs = on_cuda(select_sample(llava_next_inputs(model), 0))
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                  output_scores=True)
    layers = model.model.language_model.layers
    graphs = PrefillLayerGraphs(layers, start=2).replay_at_prefill()
    try:
        with torch.no_grad():
            for _ in range(2):
                got = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                     output_scores=True)
    finally:
        graphs.remove()
    assert graphs.captures == 1
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), atol=1e-5, rtol=1e-5)
    assert all("forward" not in vars(layer) for layer in layers)
    with pytest.raises(RuntimeError, match="no_grad"):
        graphs = PrefillLayerGraphs(layers, start=2).install()
        try:
            graphs.replay(torch.zeros(1, 4, model.config.text_config.hidden_size, device="cuda"), {})
        finally:
            graphs.remove()


def test_inference_mode_then_no_grad_reuse_the_graph():
    model = tiny_llava_next(layers=6, seed=13).cuda()
    inputs = on_cuda(select_sample(llava_next_inputs(model), 1))
    method = mmattn.TransPrune(**CFG, cuda_graphs=True)
    with mmattn.patch(model, method):
        with torch.inference_mode():
            first = model(**inputs).logits[:, -1].clone()
        with torch.no_grad():
            second = model(**inputs).logits[:, -1]
        assert method.graph_captures == 1
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_graphs_refuse_what_they_cannot_honour():
    model = tiny_llava_next(layers=6, seed=13).cuda()
    inputs = on_cuda(select_sample(llava_next_inputs(model), 1))
    layers = model.model.language_model.layers
    with mmattn.patch(model, mmattn.TransPrune(**CFG, cuda_graphs=True)):
        with pytest.raises(RuntimeError, match="autocast"), torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model(**inputs)
        with pytest.raises(RuntimeError, match="no_grad"):
            model(**inputs)
        with torch.no_grad():
            with pytest.raises(ValueError, match="output_hidden_states"):
                model(**inputs, output_hidden_states=True)
            model.config.text_config.output_hidden_states = True
            try:
                with pytest.raises(ValueError, match="output_hidden_states"):
                    model(**inputs)
            finally:
                model.config.text_config.output_hidden_states = False
            hook = layers[4].mlp.register_forward_hook(lambda module, args, output: None)
            try:
                with pytest.raises(RuntimeError, match=r"hooks inside the graphed layers.*layers\.4\.mlp"):
                    model(**inputs)
            finally:
                hook.remove()
            hook = layers[4].register_forward_pre_hook(lambda module, args: (args[0] + 0,) + args[1:])
            try:
                with pytest.raises(RuntimeError, match="decoder layer 4 received hidden states"):
                    model(**inputs)
            finally:
                hook.remove()
            model(**inputs)  # and it recovers


def test_replay_refuses_a_cache_that_already_holds_tokens():
    # Inside the graph a layer attends only to the keys it has just made, which is a prefill's semantics only.
    from transformers import DynamicCache

    model = tiny_llava_next(layers=6, seed=13).cuda()
    hidden_size = model.config.text_config.hidden_size
    graphs = PrefillLayerGraphs(model.model.language_model.layers, start=2).install()
    cache = DynamicCache(config=model.config.text_config)
    keys = torch.zeros(1, 2, 3, hidden_size // 4, device="cuda")
    cache.update(keys, keys, 2)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="empty cache only.*holds 3 tokens"):
            graphs.replay(torch.zeros(1, 4, hidden_size, device="cuda"), {"past_key_values": cache})
    finally:
        graphs.remove()
