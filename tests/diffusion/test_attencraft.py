"""AttenCraft on a tiny config-built Stable Diffusion pipeline (CPU, random weights).

The dense re-derivation below is written from the spec (§3.2.2-§3.2.4) without the package's code: it records the
full softmax matrices of the explicit ``AttnProcessor`` by patching ``Attention.get_attention_scores``, selects the
layers by query length (the reference's rule), and computes ``minmax(minmax(minmax(S)^4) @ minmax(c^2))`` with
``torch.matrix_power`` in float64.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import diffusers  # noqa: E402,F401  (the dev extra installs it: a missing one must fail, not skip)

from mmattn.diffusion.attencraft import AttenCraftConfig  # noqa: E402
from mmattn.diffusion.attencraft import masks as masks_module  # noqa: E402
from mmattn.diffusion.attencraft.capture import AttentionCapture, CaptureAttnProcessor  # noqa: E402
from mmattn.diffusion.attencraft.masks import (  # noqa: E402
    AttenCraftError,
    capture_modules,
    concept_masks_from_unet,
    extract_concept_masks,
    ssim,
    target_spans,
)
from mmattn.diffusion.attencraft.pipeline import (  # noqa: E402
    EMBEDS_FILE,
    KV_FILE,
    KV_FILE_BIN,
    load_learned_concepts,
    load_stable_diffusion,
)
from mmattn.diffusion.attencraft.training import AttenCraftTrainer, jensen_shannon, sample_concept_subset  # noqa: E402

from .tiny_sd import IMAGE_SIZE, tiny_sd_pipeline, two_blob_image  # noqa: E402

PROMPT = "a photo of cat and dog"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("attencraft")


@pytest.fixture(scope="module")
def pipe(workdir):
    return tiny_sd_pipeline(str(workdir / "base"))


def _inputs(pipe, timestep=120, seed=3):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    return latents, torch.tensor([timestep]), text, ids


def _dense_masks(unet, latents, t, text, positions, threshold=0.1, power=4):
    """The spec's arithmetic on full matrices, recorded from the explicit processor (independent of mmattn)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    unet = copy.deepcopy(unet)
    unet.set_attn_processor(AttnProcessor())
    records: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            original = module.get_attention_scores

            def recording(query, key, attention_mask=None, _name=name, _original=original):
                probs = _original(query, key, attention_mask)
                records[_name] = probs.detach().double()
                return probs

            module.get_attention_scores = recording
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=text)
    tokens = text.shape[1]
    # the reference's rule: layers whose query length is res^2 (cross 16x16 -> here 4x4, self 32x32 -> 8x8)
    cross = torch.cat([p for n, p in records.items() if n.endswith("attn2") and p.shape[1] == 16 and p.shape[2] == tokens])
    self_ = torch.cat([p for n, p in records.items() if n.endswith("attn1") and p.shape[1] == 64])
    c = cross.mean(0)  # [16, tokens]
    s = self_.mean(0)  # [64, 64]

    def mm(x):
        return (x - x.min()) / (x.max() - x.min())

    p = mm(torch.linalg.matrix_power(mm(s), power))
    maps = []
    for position in positions:
        up = F.interpolate(c[:, position].reshape(1, 1, 4, 4), size=(8, 8), mode="bicubic", align_corners=False)[0, 0]
        maps.append(mm(p @ mm(up.square()).flatten()).reshape(8, 8))
    maps = torch.stack(maps)
    masks = torch.stack([
        torch.stack([(maps[k] - maps[j]) > threshold for j in range(len(maps)) if j != k]).all(0)
        for k in range(len(maps))
    ])
    return maps, masks, len([n for n, p in records.items() if n.endswith("attn2") and p.shape[1] == 16]), \
        len([n for n, p in records.items() if n.endswith("attn1") and p.shape[1] == 64])


# ------------------------------------------------------------------------------------------ masks


def test_kernel_path_masks_equal_dense_rederivation(pipe, monkeypatch):
    latents, t, text, ids = _inputs(pipe)
    spans = target_spans(pipe.tokenizer, ids[0].tolist(), ["cat", "dog"])
    assert [s.positions for s in spans] == [(4,), (6,), (0,)]

    calls = []
    real_attention = masks_module.attention

    def spy(query, key, value, **kwargs):
        assert value.shape[2] == 64 and not kwargs["causal"]  # the cross maps are the values, over 64 self pixels
        calls.append(value.shape)
        return real_attention(query, key, value, **kwargs)

    monkeypatch.setattr(masks_module, "attention", spy)
    config = AttenCraftConfig()
    result = concept_masks_from_unet(pipe.unet, latents, t, text, spans, config)
    maps, masks, cross_layers, self_layers = _dense_masks(pipe.unet, latents, t, text, [4, 6, 0])

    assert (cross_layers, self_layers) == (3, 3)  # down_blocks.2 + up_blocks.1 (x2); down_blocks.1 + up_blocks.2 (x2)
    assert len(calls) == config.self_power * self_layers  # 4 propagation rounds x 3 layers, no dense product
    torch.testing.assert_close(result.propagated.double(), maps, atol=2e-5, rtol=0)
    assert torch.equal(result.masks, masks)
    assert result.valid and result.assignment == [0, 1, 2]
    assert all(m.any() for m in result.masks[:2])  # non-trivial: both concepts own pixels



def test_capture_restores_processors_and_outputs(pipe):
    latents, t, text, _ = _inputs(pipe)
    before = dict(pipe.unet.attn_processors)
    with torch.no_grad():
        reference = pipe.unet(latents, t, encoder_hidden_states=text).sample
    capture = AttentionCapture(pipe.unet, capture_modules(pipe.unet, AttenCraftConfig()))
    assert any(isinstance(p, CaptureAttnProcessor) for p in pipe.unet.attn_processors.values())
    capture.configure({"probs", "qk"})
    with torch.no_grad():
        captured = pipe.unet(latents, t, encoder_hidden_states=text).sample
    assert len(capture.store) == 6
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)  # explicit cross path = SDPA
    capture.remove()
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    with torch.no_grad():
        assert torch.equal(pipe.unet(latents, t, encoder_hidden_states=text).sample, reference)


def test_extract_concept_masks_end_to_end(pipe):
    image = two_blob_image()
    result, overlay = extract_concept_masks(pipe, image, PROMPT, ["cat", "dog"], AttenCraftConfig(seed=0))
    assert result.masks.shape == (3, 8, 8) and result.names == ["cat", "dog", "background"]
    assert overlay.size == image.size
    assert 0 <= result.info["timestep"] < 300
    # masks are disjoint by construction (each pixel has at most one margin winner)
    assert int(result.masks.sum(0).max()) <= 1
    with pytest.raises(AttenCraftError, match="does not occur"):
        extract_concept_masks(pipe, image, PROMPT, ["cat", "vase"])


def test_ssim_matches_the_windowed_formula():
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(9, 10, generator=generator) > 0.5).float()
    b = (torch.rand(9, 10, generator=generator) > 0.5).float()
    assert ssim(a, a) == pytest.approx(1.0)
    # scikit-image's definition, written out per window (uniform 7x7, sample covariance, interior mean)
    values = []
    for i in range(3, 6):
        for j in range(3, 7):
            x, y = a[i - 3:i + 4, j - 3:j + 4].double().flatten(), b[i - 3:i + 4, j - 3:j + 4].double().flatten()
            mx, my = x.mean(), y.mean()
            vx, vy = x.var(unbiased=True), y.var(unbiased=True)
            cxy = ((x - mx) * (y - my)).sum() / (x.numel() - 1)
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert ssim(a, b) == pytest.approx(float(torch.stack(values).mean()), abs=1e-9)


def test_jensen_shannon_and_subset_sampling():
    x = torch.randn(3, 10)
    assert torch.allclose(jensen_shannon(x, x), torch.zeros(3), atol=1e-7)
    far = jensen_shannon(torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]]))
    assert float(far) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # disjoint: ln 2
    generator = torch.Generator().manual_seed(0)
    draws = [tuple(sample_concept_subset(2, generator)) for _ in range(3000)]
    for subset in ((0,), (1,)):
        assert draws.count(subset) / 3000 == pytest.approx(1 / 3, abs=0.04)
    assert (draws.count((0, 1)) + draws.count((1, 0))) / 3000 == pytest.approx(1 / 3, abs=0.04)
    assert draws.count((0, 1)) > 0 and draws.count((1, 0)) > 0


# ------------------------------------------------------------------------------------------ training


def _trainer(workdir, tag, output_dir=None, **overrides):
    pipe = tiny_sd_pipeline(str(workdir / tag))
    image = two_blob_image()
    settings = dict(seed=0, resolution=IMAGE_SIZE, refresh_every=2, learning_rate=1e-2, max_steps=4,
                    checkpoint_every=2)
    settings.update(overrides)
    trainer = AttenCraftTrainer(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet,
        noise_scheduler=pipe.scheduler, image=image, concepts=["cat", "dog"], config=AttenCraftConfig(**settings),
        class_images=[image.rotate(90)], output_dir=output_dir, device="cpu",
    )
    return trainer, pipe


def _probe(trainer):
    return sum(trainer.attention_loss_at(t, seed) for t in (50, 500) for seed in (0, 1)) / 4


TRAINED = {"attention_loss_weight": 20.0}


@pytest.fixture(scope="module")
def trained(workdir):
    out = workdir / "run"
    # The toy model's denoising gradients are as large as the attention loss's, so with the default weight 1 four
    # Adam steps move the attention probe by noise-level amounts; weight 20 makes the attention term's effect
    # measurable (the gradient itself is checked at weight 1 below).
    trainer, pipe = _trainer(workdir, "run_pipe", output_dir=out, **TRAINED)
    trainer.initialize_masks()
    before = _probe(trainer)
    records = trainer.train(progress=False)
    return {"trainer": trainer, "pipe": pipe, "out": out, "before": before, "after": _probe(trainer),
            "records": records}


def test_training_reduces_the_attention_loss(trained):
    records = trained["records"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_attention"], r["loss_prior"]])).all() for r in records)
    assert [r.get("refresh", False) for r in records] == [False, True, False, True]
    assert all(r["prompt"] == "a photo of <new1> and <new2>" for r in records if r.get("refresh"))
    assert trained["after"] < trained["before"] - 1e-4


def test_attention_loss_gradient_descends(workdir):
    trainer, _ = _trainer(workdir, "grad_pipe")
    trainer.initialize_masks()
    optimizer = torch.optim.SGD(trainer.parameters, lr=1.0)
    losses = []
    for _ in range(3):
        loss = trainer.attention_loss_at(50, seed=0, grad=True)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        assert trainer.token_embeds.grad.abs().sum() > 0  # through the text encoder into the new tokens
        assert trainer.kv_parameters[0].grad is not None  # and into the cross-attention K copies
        optimizer.step()
    assert losses[2] < losses[1] < losses[0]


def test_outputs_checkpoints_and_previews(trained):
    out = trained["out"]
    for name in (EMBEDS_FILE, KV_FILE, KV_FILE_BIN, "attencraft.json", "masks.png", "masks.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    previews = sorted(p.name for p in (out / "previews").iterdir())
    assert previews == ["masks_init.png", "masks_step000002.png", "masks_step000004.png"]
    meta = json.loads((out / "attencraft.json").read_text())
    assert meta["placeholders"] == ["<new1>", "<new2>"] and meta["step"] == 4 and meta["kv_layers"] == 10


def test_resume_restores_identical_state(trained, workdir):
    reference = trained["trainer"]
    resumed, _ = _trainer(workdir, "resume_pipe", **TRAINED)
    resumed.load_checkpoint(trained["out"] / "checkpoints" / "checkpoint-000002")
    assert resumed.step == 2 and len(resumed.history) == 2
    resumed.train(progress=False)
    assert resumed.step == 4
    assert torch.equal(resumed.token_embeds, reference.token_embeds)
    for a, b in zip(resumed.kv_parameters, reference.kv_parameters):
        assert torch.equal(a, b)
    assert torch.equal(resumed.masks, reference.masks)
    assert torch.equal(resumed.generator.get_state(), reference.generator.get_state())
    state_a, state_b = resumed.optimizer.state_dict()["state"], reference.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][field], state_b[key][field])
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history]


def test_inference_loads_the_trained_tokens(trained, workdir):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    trainer = trained["trainer"]
    base = tiny_sd_pipeline(str(workdir / "infer_base"))
    loaded = tiny_sd_pipeline(str(workdir / "infer"))
    tokens = load_learned_concepts(loaded, trained["out"])
    assert tokens == ["<new1>", "<new2>"]
    ids = loaded.tokenizer.convert_tokens_to_ids(tokens)
    table = loaded.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], trainer.token_embeds.detach())
    processors = [p for n, p in loaded.unet.attn_processors.items() if "attn2" in n]
    assert processors and all(isinstance(p, CustomDiffusionAttnProcessor2_0) for p in processors)
    kv = dict(loaded.unet.named_modules())["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].processor
    expected = dict(trainer.unet.named_modules())["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].processor
    assert torch.equal(kv.to_k_custom_diffusion.weight, getattr(expected, "inner", expected).to_k_custom_diffusion.weight)

    prompt = "a photo of <new1> and <new2>"
    kwargs = dict(num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt")
    image = loaded(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = base("a photo of cat and dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert image.shape == plain.shape and not torch.equal(image, plain)

    # the .bin is stock diffusers' Custom Diffusion format (spec §3.6: inference needs no custom code)
    stock = tiny_sd_pipeline(str(workdir / "stock"))
    # diffusers 0.42.1 installs the processors only when given the pipeline (set_attn_processor sits inside
    # `if _pipeline is not None`); without it the documented call silently does nothing
    stock.unet.load_attn_procs(str(trained["out"]), weight_name=KV_FILE_BIN, _pipeline=stock)
    stock_kv = dict(stock.unet.named_modules())["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].processor
    assert torch.equal(stock_kv.to_k_custom_diffusion.weight, kv.to_k_custom_diffusion.weight)


def test_plain_custom_diffusion_when_attencraft_is_off(workdir):
    trainer, pipe = _trainer(workdir, "plain", masked_loss=False, attention_loss_weight=0.0,
                             concept_sampling="full", with_prior_preservation=False)
    assert trainer.capture is None  # no wrapped processors: the stock Custom Diffusion step
    record = trainer.train_step()
    assert record["prompt"] == "a photo of <new1> and <new2>" and "loss_attention" not in record
    assert not any(isinstance(p, CaptureAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_bad_inputs_fail_loudly(workdir, tmp_path):
    with pytest.raises(AttenCraftError, match="model_index.json"):
        load_stable_diffusion(tmp_path)
    with pytest.raises(AttenCraftError, match="no such directory"):
        load_stable_diffusion(tmp_path / "absent")
    with pytest.raises(AttenCraftError, match="single-token"):
        pipe = tiny_sd_pipeline(str(workdir / "bad"))
        AttenCraftTrainer(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet,
                          noise_scheduler=pipe.scheduler, image=two_blob_image(), concepts=["cat dog", "dog"],
                          config=AttenCraftConfig(resolution=IMAGE_SIZE, with_prior_preservation=False), device="cpu")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_train_resume_masks_generate(workdir, tmp_path, capsys):
    from mmattn.cli import main

    model = tmp_path / "model"
    tiny_sd_pipeline(str(workdir / "cli_base")).save_pretrained(model)
    image = tmp_path / "pair.png"
    two_blob_image().save(image)
    out = tmp_path / "out"
    common = ["attencraft", "train", "--model", str(model), "--image", str(image), "--concepts", "cat,dog",
              "--out", str(out), "--resolution", str(IMAGE_SIZE), "--lr", "1e-2", "--refresh-every", "2",
              "--checkpoint-every", "1", "--num-class-images", "1", "--class-inference-steps", "1", "--seed", "0",
              "--no-progress"]
    assert main(common + ["--steps", "1"]) == 0
    assert (out / "class_images" / "class_00000.png").is_file()
    assert (out / "checkpoints" / "checkpoint-000001").is_dir()
    assert main(common + ["--steps", "2", "--resume", "latest"]) == 0
    meta = json.loads((out / "attencraft.json").read_text())
    assert meta["step"] == 2
    assert "resumed from" in capsys.readouterr().err

    masks_png = tmp_path / "masks.png"
    assert main(["attencraft", "masks", "--model", str(model), "--image", str(image), "--prompt", PROMPT,
                 "--concepts", "cat,dog", "--out", str(masks_png), "--seed", "0"]) == 0
    assert masks_png.is_file() and json.loads(capsys.readouterr().out)["names"] == ["cat", "dog", "background"]

    images = tmp_path / "gen"
    assert main(["attencraft", "generate", "--model", str(model), "--concepts-dir", str(out), "--prompt",
                 "a photo of <new1> and <new2>", "--out", str(images), "--steps", "1", "--num-images", "1",
                 "--size", str(IMAGE_SIZE)]) == 0
    assert sorted(os.listdir(images)) == ["000_seed42_00.png", "index.jsonl"]
    record = json.loads((images / "index.jsonl").read_text())
    assert record == {"image": "000_seed42_00.png", "prompt": "a photo of <new1> and <new2>", "seed": 42}

    assert main(["attencraft", "train", "--model", str(tmp_path / "nowhere"), "--image", str(image), "--concepts",
                 "cat,dog", "--out", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_propagation_on_the_triton_kernels_matches_the_exact_path(monkeypatch):
    """The GPU path (Triton) computes the same S^4 y; run here under the Triton interpreter when it is on."""
    import os

    from mmattn.diffusion.attencraft.capture import QKCapture
    from mmattn.diffusion.attencraft.masks import propagate_through_self_attention
    from mmattn.kernels import triton_available

    if os.environ.get("TRITON_INTERPRET") != "1" or not triton_available()[0]:
        pytest.skip("Triton interpreter not active in this session (tests/conftest.py enables it on CPU machines)")
    generator = torch.Generator().manual_seed(0)
    qk = [QKCapture(2 * torch.randn(1, 2, 64, 16, generator=generator), 2 * torch.randn(1, 2, 64, 16, generator=generator),
                    0.25) for _ in range(2)]
    maps = torch.rand(64, 3, generator=generator)
    monkeypatch.setenv("MMATTN_KERNEL", "exact")
    exact = propagate_through_self_attention(qk, maps)
    monkeypatch.setenv("MMATTN_KERNEL", "triton")
    triton = propagate_through_self_attention(qk, maps)
    torch.testing.assert_close(triton, exact, atol=1e-5, rtol=0)
    assert float((exact - maps).abs().max()) > 0.1  # the propagation visibly changed the maps


def test_cli_train_bf16_mixed_precision(workdir, tmp_path):
    """One bf16 step in a fresh process (accelerate's state is process-wide: one mixed-precision mode per process)."""
    import subprocess
    import sys

    model = tmp_path / "model"
    tiny_sd_pipeline(str(workdir / "bf16_base")).save_pretrained(model)
    image = tmp_path / "pair.png"
    two_blob_image().save(image)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mmattn.cli", "attencraft", "train", "--model", str(model), "--image", str(image),
               "--concepts", "cat,dog", "--out", str(out), "--resolution", str(IMAGE_SIZE), "--steps", "2",
               "--refresh-every", "2", "--no-prior", "--seed", "0", "--mixed-precision", "bf16", "--device", "cpu",
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((out / "attencraft.json").read_text())
    assert meta["mixed_precision"] == "bf16" and meta["step"] == 2
    from safetensors.torch import load_file

    embeds = load_file(str(out / EMBEDS_FILE))
    assert embeds["<new1>"].dtype == torch.float32 and torch.isfinite(embeds["<new1>"]).all()
