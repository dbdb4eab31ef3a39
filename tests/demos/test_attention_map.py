"""The demo's attention instrument and heatmap rendering, against independent re-derivations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmattn
from mmattn.demos.attention_map import (
    ImageAttentionRecorder,
    image_patch_grid,
    model_view,
    patch_grid_side,
    render_heatmap,
)
from mmattn.layout import Role
from mmattn.testing import llava_inputs, select_sample, tiny_llava


def _generate_with(model, inputs, *methods, max_new_tokens=5):
    recorder = ImageAttentionRecorder()
    with torch.no_grad(), mmattn.patch(model, recorder, *methods):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    return recorder, out


def _eager_prompt_mass(inputs, sequence, prompt_length):
    """Mean over the rows that produced generated tokens of eager attention on prompt keys, per layer."""
    eager = tiny_llava(seed=0, attn_implementation="eager")
    attention_mask = torch.ones_like(sequence)
    with torch.no_grad():
        out = eager(input_ids=sequence, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                    output_attentions=True)
    rows = slice(prompt_length - 1, sequence.shape[1] - 1)  # the last generated token produced nothing
    return torch.stack([a[0, :, rows, :prompt_length].double().mean(dim=(0, 1)) for a in out.attentions])


@pytest.mark.parametrize("methods", [(), (mmattn.RoleBias(image=2.0),)], ids=["alone", "with_role_bias"])
def test_recorder_equals_eager_attention_of_generated_rows(methods):
    model = tiny_llava(seed=0)
    inputs = select_sample(llava_inputs(model, text_lengths=(4,)), 0)
    recorder, sequence = _generate_with(model, inputs, *methods)
    prompt_length = inputs["input_ids"].shape[1]
    recorded = recorder.prompt_mass()[:, 0].double()
    assert recorder.num_generated_rows == sequence.shape[1] - prompt_length
    if not methods:
        torch.testing.assert_close(recorded, _eager_prompt_mass(inputs, sequence, prompt_length), atol=1e-5, rtol=1e-4)
    else:
        # With a +2 image bias the answer must look more at the image than the unpatched model does.
        reference = _eager_prompt_mass(inputs, sequence, prompt_length)
        image = recorder.roles[0] == Role.IMAGE
        assert recorded[:, image].sum(-1).mean() > reference[:, image].sum(-1).mean() + 0.05


def test_image_patch_grid_is_the_image_span_row_major():
    model = tiny_llava(seed=0)
    inputs = select_sample(llava_inputs(model, text_lengths=(3,)), 0)
    recorder, _ = _generate_with(model, inputs, max_new_tokens=3)
    side = patch_grid_side(model.config)
    grid = image_patch_grid(recorder, side)
    assert grid.shape == (side, side) == (5, 5)
    flat = recorder.prompt_mass().mean(0)[0][recorder.roles[0] == Role.IMAGE].numpy()
    np.testing.assert_allclose(grid.reshape(-1), flat)
    assert 0.0 < grid.sum() <= 1.0 + 1e-6


def test_model_view_matches_the_processors_center_crop():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    wide = Image.new("RGB", (120, 60))
    assert model_view(wide, processor).size == (60, 60)
    square = Image.new("RGB", (64, 64))
    assert model_view(square, processor).size == (64, 64)
    # What the processor keeps of a wide image is its central square: a marker there survives, one outside not.
    marked = np.zeros((60, 120, 3), dtype=np.uint8)
    marked[:, 30:90] = 255
    view = np.asarray(model_view(Image.fromarray(marked), processor))
    assert view.min() == 255


def test_render_heatmap_puts_the_hot_patch_where_the_mass_is():
    view = Image.new("RGB", (64, 64), (128, 128, 128))
    grid = np.zeros((4, 4))
    grid[1, 3] = 1.0  # row 1, column 3
    heat = np.asarray(render_heatmap(view, grid, vmax=1.0, size=128)).astype(int)
    assert heat.shape == (128, 128, 3)
    cell = 128 // 4
    hot = heat[1 * cell : 2 * cell, 3 * cell : 4 * cell]
    cold = heat[0:cell, 0:cell]
    assert hot.sum(-1).mean() > cold.sum(-1).mean() + 200  # more mass is brighter
    assert (heat[0:cell, 0:cell] == cold[0, 0]).all()  # uniform patches stay uniform (nearest, no smearing)
    # The same grid with a larger vmax is cooler: colours are comparable across heatmaps.
    cooler = np.asarray(render_heatmap(view, grid, vmax=4.0, size=128)).astype(int)
    assert not np.array_equal(cooler[1 * cell : 2 * cell, 3 * cell : 4 * cell], hot)


def test_recorder_maps_pruned_layers_back_to_prompt_positions():
    from mmattn.demos.attention_map import kept_patch_grid

    model = tiny_llava(seed=0)
    inputs = select_sample(llava_inputs(model, text_lengths=(4,)), 0)
    prune = mmattn.create_method("transprune", accumulation_layers=(1,), prune_layers=(1,), keep_ratios=(0.5,))
    recorder, _ = _generate_with(model, inputs, prune, max_new_tokens=4)
    image = recorder.roles[0] == Role.IMAGE
    kept = recorder.kept_positions()[0]
    assert int(kept[image].sum()) == int(image.sum()) // 2  # floor(25 * 0.5) image tokens survive layer 1
    assert kept[~image].all()  # text is never pruned
    mass = recorder.prompt_mass()[:, 0]  # [layers, P]
    assert (mass[0, image] > 0).all()  # layer 0 sees every image token
    assert (mass[1:, image & ~kept] == 0).all() and (mass[1:, image & kept] > 0).all()
    side = patch_grid_side(model.config)
    grid = kept_patch_grid(recorder, side)
    assert grid.shape == (side, side) and grid.sum() == int(image.sum()) // 2


def test_render_heatmap_square_root_scale_keeps_small_patches_visible():
    from mmattn.demos.attention_map import _colours

    view = Image.new("RGB", (8, 8), (0, 0, 0))
    grid = np.array([[1.0, 0.25], [0.0, 0.0]])
    heat = np.asarray(render_heatmap(view, grid, vmax=1.0, size=8, opacity=1.0)).astype(float)
    np.testing.assert_allclose(heat[0, 4], _colours(np.array(0.5)).round(), atol=1)  # sqrt(0.25) = 0.5
    linear = np.asarray(render_heatmap(view, grid, vmax=1.0, size=8, opacity=1.0, gamma=1.0)).astype(float)
    np.testing.assert_allclose(linear[0, 4], _colours(np.array(0.25)).round(), atol=1)
