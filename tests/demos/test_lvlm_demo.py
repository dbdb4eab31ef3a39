"""The LVLM demo driven through ``gradio_client`` against an app launched on 127.0.0.1 (tiny random LLaVA, CPU)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import mmattn
from mmattn.demos.attention_map import HEATMAP_SIZE
from mmattn.eval import world

EXAMPLE = "val_00000001.png"


@pytest.fixture(scope="module")
def client(lvlm_server):
    _, url = lvlm_server
    return Client(url, verbose=False)


def instance_categories(file_name: str) -> tuple[int, set[str]]:
    """(image id, COCO instance category names) of a world val image, read straight from the annotations."""
    data = json.loads(world.val_instances_path().read_text())
    image_id = next(entry["id"] for entry in data["images"] if entry["file_name"] == file_name)
    names = {category["id"]: category["name"] for category in data["categories"]}
    return image_id, {names[a["category_id"]] for a in data["annotations"] if a["image_id"] == image_id}


def greedy_answer(demo, image_path, prompt: str, max_new_tokens: int) -> str:
    """The unpatched model's own greedy answer, computed here without the demo."""
    from mmattn.eval.harness import build_prompt

    image = Image.open(image_path).convert("RGB")
    inputs = demo.processor(images=[image], text=[build_prompt(demo.processor, prompt)], return_tensors="pt")
    with torch.no_grad():
        out = demo.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return demo.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_compare_streams_both_answers_heatmaps_and_hallucinations(client, lvlm_server):
    demo, _ = lvlm_server
    prompt, tokens = "Please describe this image in detail.", 6
    job = client.submit(EXAMPLE, None, prompt, "role_bias:image=3\nvhr", tokens, api_name="/compare")
    baseline, patched, baseline_md, patched_md, baseline_heat, patched_heat, attention_md, details = job.result(timeout=300)

    # Both answers, and the baseline is the model's own greedy answer.
    assert baseline and patched
    assert baseline == details["baseline"]["answer"] and patched == details["patched"]["answer"]
    assert baseline == greedy_answer(demo, world.val_image_dir() / EXAMPLE, prompt, tokens)
    assert details["baseline"]["generated_tokens"] == details["patched"]["generated_tokens"] == tokens

    # Streaming: partial answers arrive before the final state, each a prefix of the final answer.
    partial = [out[0] for out in job.outputs()[:-1] if isinstance(out[0], str) and out[0]]
    assert len(partial) >= 2 and all(baseline.startswith(text.strip()) for text in partial)

    # Heatmaps: the model's view of a square 64 px world image, drawn at HEATMAP_SIZE.
    for path in (baseline_heat, patched_heat):
        with Image.open(path) as heat:
            assert heat.size == (HEATMAP_SIZE, HEATMAP_SIZE)
    assert details["image"]["model_view"] == [64, 64]
    # A +3 logit bias on image keys moves the answer's attention onto the image, and the heatmaps show it.
    assert details["patched"]["image_attention"] > details["baseline"]["image_attention"] + 0.05
    assert 0.0 < details["baseline"]["image_attention"] < 1.0
    with Image.open(baseline_heat) as a, Image.open(patched_heat) as b:
        assert a.tobytes() != b.tobytes()
    assert f"{details['patched']['image_attention']:.0%}" in attention_md

    # Hallucinated objects against the image's COCO ground truth.
    image_id, categories = instance_categories(EXAMPLE)
    assert details["image"]["image_id"] == image_id
    for key, markdown in (("baseline", baseline_md), ("patched", patched_md)):
        objects = details[key]["objects"]
        assert categories <= set(objects["ground_truth"])
        assert objects["hallucinated"] == sorted(set(objects["mentioned"]) - set(objects["ground_truth"]))
        assert "Hallucinated objects" in markdown


def test_hallucinations_endpoint_scores_against_the_images_ground_truth(client):
    image_id, categories = instance_categories(EXAMPLE)
    captions = json.loads(world.val_captions_path().read_text())
    human = " ".join(a["caption"].lower() for a in captions["annotations"] if a["image_id"] == image_id)
    data = json.loads(world.val_instances_path().read_text())
    present = sorted(categories)[0]
    absent = next(c["name"] for c in data["categories"] if c["name"] not in categories and c["name"] not in human)

    result = client.predict(EXAMPLE, f"There is a {present} next to a {absent}.", api_name="/hallucinations")
    assert result["hallucinated"] == [absent]
    assert result["correct"] == [present]
    assert result["chair_i"] == pytest.approx(0.5)
    assert categories <= set(result["ground_truth"])


def test_upload_has_no_ground_truth_and_view_sized_heatmaps(client, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(wide)
    _, _, baseline_md, _, baseline_heat, _, _, details = client.predict(
        None, handle_file(str(wide)), "Is there a dog?", "role_bias:image=1", 3, api_name="/compare"
    )
    assert details["image"]["source"] == "upload" and details["image"]["size"] == [90, 60]
    assert details["image"]["model_view"] == [60, 60]  # the processor's center crop
    assert details["baseline"]["objects"]["ground_truth"] is None
    assert "no ground truth" in baseline_md
    with Image.open(baseline_heat) as heat:
        assert heat.size == (HEATMAP_SIZE, HEATMAP_SIZE)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("notes", None, "hi", "var", 3), "not an image"),
        ((EXAMPLE, None, "hi", "no_such_method", 3), "unknown method 'no_such_method'"),
        ((EXAMPLE, None, "hi", "", 3), "choose at least one method"),
        ((None, None, "hi", "var", 3), "pick an example image or upload one"),
        (("../../etc/passwd", None, "hi", "var", 3), "unknown example image"),
        ((EXAMPLE, None, "   ", "var", 3), "type a prompt"),
    ],
    ids=["not_an_image", "unknown_method", "no_method", "no_image", "path_as_example", "empty_prompt"],
)
def test_errors_reach_the_user_as_messages(client, tmp_path, arguments, message):
    if arguments[0] == "notes":
        fake = tmp_path / "notes.png"
        fake.write_text("this is text, not a PNG")
        arguments = (None, handle_file(str(fake)), *arguments[2:])
    with pytest.raises(AppError) as caught:
        client.predict(*arguments, api_name="/compare")
    assert message in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_server_serves_only_uploads_and_world_images(lvlm_server):
    demo, url = lvlm_server
    assert httpx.get(f"{url}gradio_api/file=/etc/hostname").status_code == 403
    assert httpx.get(f"{url}gradio_api/file={world.val_image_dir() / EXAMPLE}").status_code == 200
    # A client naming a server file as its "upload" is refused before the demo sees it.
    payload = {"data": [None, {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, "hi", "var", 3]}
    event = httpx.post(f"{url}gradio_api/call/compare", json=payload).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/compare/{event}", timeout=60).text
    assert "event: error" in stream and open("/etc/hostname").read().strip() not in stream
    # Uploads larger than the limit are rejected by the server.
    big = b"\x89PNG" + b"\0" * (10 * 1024 * 1024 + 1)
    response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert response.status_code == 413


def test_sliders_write_method_specs_that_parse_back():
    from mmattn.demos.lvlm import build_method_spec, parse_method_specs, slider_options

    pairs = slider_options()
    values = []
    for name, option in pairs:
        changed = {("var", "rho"): 0.35, ("vhr", "alpha"): 2.5}
        values.append(changed.get((name, option), getattr(mmattn.METHODS[name].Config(), option)))
    spec = build_method_spec(["var", "vhr", "gift"], values)
    assert spec.splitlines() == ["var:rho=0.35", "vhr:alpha=2.5", "gift"]  # defaults are left out
    var, vhr, gift = parse_method_specs(spec)
    assert (var.config.rho, vhr.config.alpha) == (0.35, 2.5)
    assert gift.config == type(gift.config)()
    with pytest.raises(ValueError, match="line 2"):
        parse_method_specs("var\nvar:nosuch=1")
