"""Customization metrics (CLIP-I, CLIP-T, DINO) with randomly initialised small backbones: the formulas, masking,
weight lookup messages and the ``mmattn eval customization`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mmattn.eval.weights as mmattn_weights
import torch.nn.functional as F
from PIL import Image

from mmattn.eval import customization as cm
from mmattn.eval.customization import (
    CustomizationConfig,
    CustomizationError,
    CustomizationScorer,
    apply_mask,
    prepare_prompt,
)


def picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def random_scorer(**overrides) -> CustomizationScorer:
    config = dict(clip_model="ViT-S-32", clip_weights=None, dino_model="vit_tiny_patch16_224", dino_weights=None,
                  device="cpu")
    return CustomizationScorer(CustomizationConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return random_scorer(text_replacements={"<new1>": "cat"})


def test_identical_images_score_one_and_different_images_less(scorer):
    a, b = picture(0), picture(1)
    same = scorer.score([a, a], [a], ["a photo of <new1>"] * 2)
    assert same["metrics"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert same["metrics"]["dino"] == pytest.approx(1.0, abs=1e-5)
    other = scorer.score([b], [a], ["a photo of <new1>"])
    assert other["metrics"]["clip_i"] < 1 - 1e-4 and other["metrics"]["dino"] < 1 - 1e-4


def test_pairwise_means_and_clip_t_match_direct_computation(scorer):
    a, b, c = picture(0), picture(1), picture(2)
    result = scorer.score([a, b], [a, c], ["a photo of <new1>", "a dog"])
    model, preprocess, tokenizer = scorer.clip()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(x) for x in (a, b, c)]))
        text = model.encode_text(tokenizer(["a photo of cat", "a dog"]))
    cos = F.cosine_similarity
    expected_i = [(float(cos(image[i], image[0], dim=0)) + float(cos(image[i], image[2], dim=0))) / 2 for i in (0, 1)]
    assert [r["clip_i"] for r in result["per_image"]] == pytest.approx(expected_i, abs=1e-5)
    assert result["metrics"]["clip_i"] == pytest.approx(sum(expected_i) / 2, abs=1e-5)
    expected_t = [float(cos(image[i], text[i], dim=0)) for i in (0, 1)]
    assert result["metrics"]["clip_t"] == pytest.approx(sum(expected_t) / 2, abs=1e-5)
    assert result["per_image"][0]["text"] == "a photo of cat"
    # DINO: Resize(256, bicubic) + CenterCrop(224) + ImageNet normalisation, CLS feature
    pixels = torch.from_numpy(np.array(a.resize((256, 256), Image.BICUBIC))).permute(2, 0, 1).float() / 255
    pixels = pixels[:, 16:240, 16:240]
    pixels = (pixels - torch.tensor(cm.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(cm.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        direct = scorer.dino()(pixels[None])
    torch.testing.assert_close(scorer.dino_features([a]), direct, atol=1e-4, rtol=1e-4)


def test_prompt_preparation():
    assert prepare_prompt("a <new1> cat and a <new2> dog", {"<new1>": "tabby"}) == "a tabby cat and a <new2> dog"
    assert prepare_prompt("a <new1> cat and a <new2> dog", drop_placeholders=True) == "a cat and a dog"


def test_masking():
    a, b = picture(0), picture(1)
    full = np.ones((64, 64), np.uint8)
    plain = random_scorer(metrics=("clip_i", "dino"))
    unmasked = plain.score([a], [b])["metrics"]
    blank = random_scorer(metrics=("clip_i", "dino"), mask_mode="blank")
    blank._clip, blank._dino = plain.clip(), plain.dino()  # the same random backbones
    assert blank.score([a], [b], generated_masks=[full], reference_masks=[full])["metrics"] == pytest.approx(unmasked)

    region = np.zeros((64, 64), np.uint8)
    region[10:20, 30:60] = 1  # 10 x 30 box
    cropped = apply_mask(a, region, "crop", fill=(255, 255, 255))
    assert cropped.size == (30, 30)
    array = np.asarray(cropped)
    assert (array[:10] == 255).all() and (array[20:] == 255).all()  # square padding above and below the box
    assert np.array_equal(array[10:20], np.asarray(a)[10:20, 30:60])
    blanked = np.asarray(apply_mask(a, region, "blank"))
    assert blanked.shape == (64, 64, 3) and (blanked[:10] == 0).all()
    with pytest.raises(CustomizationError, match="empty"):
        apply_mask(a, np.zeros((64, 64)), "crop")
    with pytest.raises(CustomizationError, match="reference image 0"):
        plain.score([a], [b], reference_masks=[np.zeros((8, 8))])


def test_inputs_are_checked(scorer):
    with pytest.raises(CustomizationError, match="need reference images"):
        scorer.score([picture(0)], None, ["x"])
    with pytest.raises(CustomizationError, match="one prompt per generated image"):
        scorer.score([picture(0)], [picture(1)], None)
    with pytest.raises(CustomizationError, match="unknown customization metrics"):
        CustomizationConfig(metrics=("fid",))


def test_missing_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(cm, "_hub_file", lambda repo, filenames: None)
    monkeypatch.setattr(mmattn_weights, "hub_cached_file", lambda repo, filenames: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CustomizationError, match=r"timm/vit_base_patch32_clip_224\.openai/open_clip_model\.safetensors"):
        CustomizationScorer(CustomizationConfig()).clip()
    with pytest.raises(CustomizationError, match=r"dino_deitsmall16_pretrain\.pth"):
        CustomizationScorer(CustomizationConfig()).dino()
    with pytest.raises(CustomizationError, match="CLIP weights file not found"):
        CustomizationScorer(CustomizationConfig(clip_weights=str(tmp_path / "nope.pt"))).clip()
    with pytest.raises(CustomizationError, match="weights file not found"):
        CustomizationScorer(CustomizationConfig(dino_weights=str(tmp_path / "nope.pth"))).dino()


def test_local_weight_files_load(tmp_path):
    import open_clip
    import timm

    torch.manual_seed(1)
    dino = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in dino.state_dict().items()}}, tmp_path / "dino.pth")
    clip = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    loaded = random_scorer(dino_weights=str(tmp_path / "dino.pth"), clip_weights=str(tmp_path / "clip.pt"),
                           clip_quick_gelu=False)
    assert torch.equal(loaded.clip()[0].visual.conv1.weight, clip.visual.conv1.weight)
    assert torch.equal(loaded.dino().patch_embed.proj.weight, dino.patch_embed.proj.weight)


def test_eval_customization_cli(tmp_path, capsys):
    from mmattn.cli import main

    generated, references, masks = tmp_path / "gen", tmp_path / "refs", tmp_path / "ref_masks"
    for directory in (generated, references, masks):
        directory.mkdir()
    picture(0).save(generated / "000_seed42_00.png")
    picture(1).save(generated / "000_seed42_01.png")
    (generated / "index.jsonl").write_text(
        "".join(json.dumps({"image": f"000_seed42_0{i}.png", "prompt": "a photo of <new1>", "seed": 42}) + "\n"
                for i in range(2)))
    picture(0).save(references / "cat.png")
    region = np.zeros((64, 64), np.uint8)
    region[8:40, 8:40] = 255
    Image.fromarray(region).save(masks / "cat.png")
    out = tmp_path / "scores.json"
    common = ["eval", "customization", "--generated", str(generated), "--references", str(references),
              "--random-backbones", "--clip-model", "ViT-S-32", "--dino-model", "vit_tiny_patch16_224",
              "--device", "cpu", "--replace", "<new1>=cat"]
    assert main(common + ["--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["metrics"]) == {"clip_i", "clip_t", "dino"}
    assert summary["counts"] == {"generated": 2, "references": 1}
    saved = json.loads(out.read_text())
    assert saved["per_image"][0]["clip_i"] == pytest.approx(1.0, abs=1e-5)  # image 0 is the reference itself
    assert saved["per_image"][0]["text"] == "a photo of cat"

    assert main(common + ["--reference-masks", str(masks), "--metrics", "clip_i"]) == 0
    masked = json.loads(capsys.readouterr().out)
    assert masked["masked"] == {"generated": False, "references": True, "mode": "crop"}
    assert masked["metrics"]["clip_i"] != pytest.approx(summary["metrics"]["clip_i"])

    assert main(["eval", "customization", "--generated", str(tmp_path / "absent"), "--random-backbones"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(common + ["--replace", "oops"]) == 2
    assert "TOKEN=WORD" in capsys.readouterr().err
