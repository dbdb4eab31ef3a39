"""mmattn.patch on tiny config-built LLaVA and LLaVA-NeXT models (CPU, fp32)."""

import pytest
import torch

import mmattn
from mmattn.edits import AttentionEdit
from mmattn.layout import Role
from mmattn.lvlm.methods.base import AttentionMethod
from mmattn.testing import llava_inputs, llava_next_inputs, select_sample, tiny_llava, tiny_llava_next

MODELS = {
    "llava": (tiny_llava, llava_inputs),
    "llava_next": (tiny_llava_next, llava_next_inputs),
}


@pytest.fixture(params=sorted(MODELS), scope="module")
def model_and_inputs(request):
    build, make_inputs = MODELS[request.param]
    model = build()
    return model, make_inputs(model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, n=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def test_noop_patch_matches_sdpa(model_and_inputs):
    model, inputs = model_and_inputs
    valid = inputs["attention_mask"].bool()
    reference = logits(model, inputs)
    with mmattn.patch(model):
        assert model.config.text_config._attn_implementation == "mmattn"
        assert model.config.vision_config._attn_implementation == "sdpa"
        patched = logits(model, inputs)
    torch.testing.assert_close(patched[valid], reference[valid], atol=1e-5, rtol=1e-5)


def test_noop_patch_greedy_generation_identical(model_and_inputs):
    model, inputs = model_and_inputs
    reference = greedy(model, inputs)
    with mmattn.patch(model, mmattn.RoleBias()):
        patched = greedy(model, inputs)
    assert torch.equal(patched, reference)


def test_left_padded_batch_equals_one_by_one(model_and_inputs):
    model, inputs = model_and_inputs
    method = mmattn.RoleBias(image=0.8, instruction=-0.3, generated=0.5)
    with mmattn.patch(model, method):
        batch_tokens = greedy(model, inputs)
        batch_logits = logits(model, inputs)[:, -1]
        for b in range(inputs["input_ids"].shape[0]):
            single = select_sample(inputs, b)
            single_tokens = greedy(model, single)
            prompt_len = inputs["input_ids"].shape[1]
            assert torch.equal(batch_tokens[b, prompt_len:], single_tokens[0, single["input_ids"].shape[1]:])
            torch.testing.assert_close(batch_logits[b], logits(model, single)[0, -1], atol=1e-4, rtol=1e-4)


def test_remove_restores_bit_identical_outputs(model_and_inputs):
    model, inputs = model_and_inputs
    before = logits(model, inputs)
    handle = mmattn.patch(model, mmattn.RoleBias(image=2.0))
    edited = logits(model, inputs)
    assert not torch.allclose(edited, before, atol=1e-3), "the bias must change the logits"
    handle.remove()
    handle.remove()  # idempotent
    assert model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, inputs), before)
    assert torch.equal(greedy(model, inputs), greedy(model, inputs))


def test_role_bias_matches_eager_with_additive_mask():
    """Independent re-derivation: eager attention with the bias folded into a 4D additive mask."""
    model = tiny_llava(attn_implementation="eager")
    inputs = llava_inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    n = ids.shape[1]
    bias = torch.zeros(ids.shape, dtype=torch.float32)
    bias[ids == model.config.image_token_id] = 1.5
    bias[~mask] = 0
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal[None] & mask[:, None, :]
    additive = torch.where(allowed, bias[:, None, :].expand(-1, n, -1), torch.tensor(float("-inf")))
    # Rows of padding see nothing; give them their own position so eager stays finite (ignored below).
    additive[:, torch.arange(n), torch.arange(n)] = torch.where(
        mask, additive[:, torch.arange(n), torch.arange(n)], torch.zeros(())
    )
    with torch.no_grad():
        expected = model(**{**inputs, "attention_mask": additive[:, None]}).logits
        with mmattn.patch(model, mmattn.RoleBias(image=1.5)):
            got = model(**inputs).logits
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-4)


class RecordImageMass(AttentionMethod):
    """Test-only method: asks for per-role attention mass at prefill and stores it."""

    name = "record_image_mass_test"

    def begin_request(self, context):
        self.masses = {}

    def edit(self, context, call):
        if not call.is_prefill:
            return None
        return AttentionEdit(key_groups=call.roles, num_groups=Role.COUNT, return_group_mass=True)

    def observe(self, context, call, stats):
        self.masses[call.layer_idx] = stats.group_mass


def test_statistics_match_eager_attention_weights():
    model = tiny_llava(attn_implementation="eager")
    inputs = llava_inputs(model)
    with torch.no_grad():
        weights = model(**inputs, output_attentions=True).attentions
        recorder = RecordImageMass()
        with mmattn.patch(model, recorder):
            model(**inputs)
    image = (inputs["input_ids"] == model.config.image_token_id).float()
    valid = inputs["attention_mask"].bool()
    assert len(recorder.masses) == model.config.text_config.num_hidden_layers
    for layer, attn in enumerate(weights):
        expected = torch.einsum("bhqk,bk->bhq", attn.float(), image)
        got = recorder.masses[layer][..., Role.IMAGE]
        torch.testing.assert_close(got.permute(0, 2, 1)[valid], expected.permute(0, 2, 1)[valid], atol=1e-5, rtol=1e-4)


def test_llava_next_layout_marks_newline_tokens():
    model = tiny_llava_next()
    inputs = llava_next_inputs(model)
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad(), mmattn.patch(model) as handle:
        model(**inputs)
        layout = handle.context.layout
    hook.remove()
    newline = model.model.image_newline.detach()
    is_newline_embedding = (captured["embeds"] - newline).abs().amax(-1) < 1e-6
    assert layout.roles.eq(Role.IMAGE_NEWLINE).any()
    assert torch.equal(layout.roles == Role.IMAGE_NEWLINE, is_newline_embedding)
    counts = layout.num_image_tokens.tolist()
    assert len(set(counts)) == 3, "the three images have different anyres token counts"


def test_layout_roles_and_decode_extension():
    model = tiny_llava()
    inputs = llava_inputs(model, images_per_prompt=2)
    with torch.no_grad(), mmattn.patch(model) as handle:
        model(**inputs)
        layout = handle.context.layout
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    assert torch.equal(layout.image, ids == model.config.image_token_id)
    assert torch.equal(layout.valid, mask)
    assert layout.image_index.max().item() == 1
    assert torch.all(layout.image_index[layout.image] >= 0)
    assert torch.all(layout.last_prompt_position == ids.shape[1] - 1)
    extended = layout.roles_for(ids.shape[1] + 3)
    assert torch.all(extended[:, -3:] == Role.GENERATED)
    assert torch.all(layout.roles[~mask] == Role.PAD)
    first_image = layout.image_start
    for b in range(ids.shape[0]):
        assert torch.all(layout.roles[b, : first_image[b]][mask[b, : first_image[b]]] == Role.SYSTEM)


def test_generated_bias_acts_only_during_decode():
    model = tiny_llava()
    inputs = llava_inputs(model)

    def scores(n=4):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, min_new_tokens=n)
        return out.scores

    reference = scores()
    with mmattn.patch(model, mmattn.RoleBias(generated=3.0)):
        edited = scores()
    torch.testing.assert_close(edited[0], reference[0], atol=1e-5, rtol=1e-5)  # prefill sees no generated keys
    assert not torch.allclose(edited[2], reference[2], atol=1e-3), "decode steps attend to generated keys"


def test_unsupported_model_class_names_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        mmattn.patch(llm)


def test_unsupported_attention_implementation_and_double_patch():
    model = tiny_llava()
    with mmattn.patch(model):
        with pytest.raises(RuntimeError, match="already 'mmattn'"):
            mmattn.patch(model)
    model.config.text_config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="supported: eager, sdpa"):
        mmattn.patch(model)


def test_methods_must_be_instances_and_unique():
    model = tiny_llava()
    with pytest.raises(TypeError, match="method instances"):
        mmattn.patch(model, mmattn.RoleBias)
    with pytest.raises(ValueError, match="once per patch"):
        mmattn.patch(model, mmattn.RoleBias(), mmattn.RoleBias())
    assert model.config.text_config._attn_implementation == "sdpa"


def test_method_spec_parsing():
    method = mmattn.parse_method_spec("role_bias:image=0.5,layers=0/2")
    assert method.config.image == 0.5 and method.config.layers == (0, 2)
    with pytest.raises(ValueError, match="registered methods: .*role_bias"):
        mmattn.parse_method_spec("nope")
    with pytest.raises(ValueError, match="its options are"):
        mmattn.parse_method_spec("role_bias:colour=1")
    with pytest.raises(ValueError, match="key=value"):
        mmattn.parse_method_spec("role_bias:image")


def test_two_methods_compose_and_each_sees_its_own_group_masses():
    model = tiny_llava(attn_implementation="eager")
    inputs = llava_inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    n = ids.shape[1]
    image = (ids == model.config.image_token_id) & mask
    additive = torch.where(torch.ones(n, n, dtype=torch.bool).tril()[None] & mask[:, None, :],
                           (image.float() * 0.9)[:, None, :].expand(-1, n, -1), torch.tensor(float("-inf")))
    additive[:, torch.arange(n), torch.arange(n)] = additive[:, torch.arange(n), torch.arange(n)].clamp_min(0)
    with torch.no_grad():
        weights = model(**{**inputs, "attention_mask": additive[:, None]}, output_attentions=True).attentions
        recorder = RecordImageMass()
        with mmattn.patch(model, mmattn.RoleBias(image=0.9), recorder):
            model(**inputs)
    for layer, attn in enumerate(weights):
        expected = torch.einsum("bhqk,bk->bhq", attn.float(), image.float())
        got = recorder.masses[layer][..., Role.IMAGE]
        assert recorder.masses[layer].shape[-1] == Role.COUNT
        torch.testing.assert_close(got.permute(0, 2, 1)[mask], expected.permute(0, 2, 1)[mask], atol=1e-5, rtol=1e-4)


def test_methods_compose_or_explain_why_not():
    model = tiny_llava(layers=5)
    inputs = llava_inputs(model)
    var = dict(tau=1.6, min_image_mass=0.0, rho=0.0, sink_dims=(3, 17))
    with torch.no_grad():
        with mmattn.patch(model, mmattn.VHR(layers=(1, 3)), mmattn.VAR(**var)) as handle:
            both = model(**inputs).logits
            scales = {k: v.clone() for k, v in handle.methods[0].head_scales.items()}
        with mmattn.patch(model, mmattn.VAR(**var)):
            only_var = model(**inputs).logits
        with mmattn.patch(model, mmattn.PAINT(cfg_gamma=1.0, alpha=3.0), mmattn.GIFT(
                informative_tokens="all", saliency_layers=(1,), enhancement_layers=(2, 3))):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with pytest.raises(ValueError, match="var, paint cannot be combined.*different query rows"):
            with mmattn.patch(model, mmattn.VAR(**var), mmattn.PAINT(cfg_gamma=1.0)):
                model(**inputs)
    assert any((s != 1).any() for s in scales.values())
    assert not torch.allclose(both, only_var, atol=1e-4), "VHR's head scale applies alongside VAR's transfer"


def test_failed_patch_leaves_no_hooks_and_no_switch():
    model = tiny_llava(layers=5)

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hook_count()
    with pytest.raises(ValueError, match="processor"):
        mmattn.patch(model, mmattn.VAR(sink_dims=(1, 2)), mmattn.TransPrune(accumulation_layers=(1,), prune_layers=(1,),
                                                                           keep_ratios=(0.5,)), mmattn.GIFT())
    assert hook_count() == before
    assert model.config.text_config._attn_implementation == "sdpa"


def test_auxiliary_streams_do_not_trigger_sequence_hooks():
    """PAINT's image-free guidance stream runs the model again: VAR's and TransPrune's hooks must ignore it."""
    model = tiny_llava(layers=5)
    inputs = llava_inputs(model)
    var = dict(tau=1.6, min_image_mass=0.0, rho=0.0, sink_dims=(3, 17))
    prune = dict(accumulation_layers=(1, 2), prune_layers=(1, 2), keep_ratios=(0.5, 0.25))
    with torch.no_grad():
        with mmattn.patch(model, mmattn.TransPrune(**prune), mmattn.PAINT(cfg_gamma=1.5, first_layer=3, last_layer=3)):
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with pytest.raises(ValueError, match="different query rows"):
            with mmattn.patch(model, mmattn.VAR(**var), mmattn.PAINT(cfg_gamma=1.5)):
                model(**inputs)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3


def test_beam_search_and_several_sequences_per_prompt_are_refused_with_methods():
    model = tiny_llava(layers=2, seed=3)
    inputs = llava_inputs(model)
    with torch.no_grad():
        with mmattn.patch(model, mmattn.RoleBias(image=0.5)):
            with pytest.raises(ValueError, match="one sequence per prompt: got num_beams=2"):
                model.generate(**inputs, max_new_tokens=2, num_beams=2)
            with pytest.raises(ValueError, match="num_return_sequences=2"):
                model.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # greedy is fine
        assert "generate" not in vars(model)  # the guard goes with the patch
        model.generate(**inputs, max_new_tokens=2, num_beams=2)  # unpatched: beam search works
        with mmattn.patch(model):  # no method, no per-sample state: beam search stays allowed
            model.generate(**inputs, max_new_tokens=2, num_beams=2)
