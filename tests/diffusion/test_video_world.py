"""The offline video world: the clip generator, the tokenizer, the statistic on hand-made clips, a training smoke
run that saves and reloads with ``from_pretrained``, the evaluation on it, and the default-model wiring of
``mmattn eval video`` and ``mmattn demo video``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmattn.diffusion import world
from mmattn.diffusion.world import generate as gen
from mmattn.diffusion.world import statistics as stats
from mmattn.diffusion.world.tokenizer import build_tokenizer, prompt_words


def test_clips_are_a_pure_function_of_seed_and_index():
    a, b = gen.generate_clip(3, 17), gen.generate_clip(3, 17)
    assert np.array_equal(a.frames, b.frames) and a.prompt == b.prompt
    assert not np.array_equal(gen.generate_clip(3, 18).frames, a.frames)
    frames, prompts = gen.generate_clips(3, 16, 4)
    assert np.array_equal(frames[1], a.frames) and prompts[1] == a.prompt
    assert a.frames.shape == (gen.FRAMES, gen.SIZE, gen.SIZE, 3) and a.frames.dtype == np.uint8


@pytest.mark.parametrize("index", range(24))
def test_prompt_matches_the_clip(index):
    clip = gen.generate_clip(0, index)
    assert gen.parse_prompt(clip.prompt) == (clip.colour, clip.shape, clip.motion)
    assert clip.prompt in gen.all_prompts()
    # the whole shape stays in the frame, and the prompted colour is there in every frame
    assert ((clip.centres > clip.half_size) & (clip.centres < gen.SIZE - clip.half_size)).all()
    s = stats.clip_statistics(clip.frames, clip.prompt)
    assert s["colour_presence"] == 1.0 and s["dominant_colour_correct"] == 1.0
    assert s["mask_change"] > 0.05
    if clip.motion in gen.TRANSLATIONS:
        dx, dy = gen.TRANSLATIONS[clip.motion]
        travel = (clip.centres[-1] - clip.centres[0]) @ np.array([dx, dy])
        assert travel > 20 and s["direction_correct"] == 1.0
    if clip.motion == "turning":
        assert np.ptp(clip.centres, axis=0).max() == 0 and abs(clip.angles[-1] - clip.angles[0]) > 1.5
    if clip.motion == "bouncing":
        assert np.ptp(clip.centres[:, 1]) > 10 and np.ptp(clip.centres[:, 0]) == 0


def test_parse_prompt_refuses_other_prompts():
    with pytest.raises(ValueError, match="not a video-world prompt"):
        gen.parse_prompt("a corgi running on the beach")


def test_tokenizer_keeps_every_world_word_whole():
    tokenizer = build_tokenizer()
    for word in prompt_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a red square moving left").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 7
    # unknown words fall back to letters, not <unk> (CLIP's unk is its EOS)
    assert tokenizer.unk_token_id not in tokenizer("a zebra flying").input_ids[1:-1]


def _shape_clip(shift_per_frame: float, frames: int = 8) -> torch.Tensor:
    """A hand-made clip: a red 10x10 square on black moving right by ``shift_per_frame`` pixels per frame."""
    video = torch.zeros(frames, 3, 64, 64)
    for t in range(frames):
        x = int(round(10 + shift_per_frame * t))
        video[t, :, 20:30, x:x + 10] = torch.tensor(gen.COLOURS["red"]).view(3, 1, 1)
    return video


def test_statistic_moving_against_static_hand_made_clips():
    moving = stats.clip_statistics(_shape_clip(3), "a red square moving right")
    still = stats.clip_statistics(_shape_clip(0), "a red square moving right")
    assert moving["colour_presence"] == 1.0 == still["colour_presence"]
    assert moving["centroid_speed"] == pytest.approx(3.0) and still["centroid_speed"] == 0.0
    assert moving["mask_change"] > 0.4 and still["mask_change"] == 0.0
    assert moving["frame_difference"] > 0 and still["frame_difference"] == 0.0
    assert moving["direction_correct"] == 1.0 and still["direction_correct"] == 0.0
    assert moving["area_consistency"] == pytest.approx(1.0)
    wrong = stats.clip_statistics(_shape_clip(3), "a blue square moving left")
    assert wrong["colour_presence"] == 0.0 and wrong["dominant_colour_correct"] == 0.0
    assert wrong["centroid_speed"] is None
    assert stats.clip_statistics(stats.static_clip(_shape_clip(3)), "a red square moving right")["mask_change"] == 0


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A 2-step training run of toy widths, saved with save_pretrained."""
    from mmattn.diffusion.world.train import tiny_config, train

    out = tmp_path_factory.mktemp("world") / "pipeline"
    info = train(str(out), seed=0, device="cpu", clips=8, model_config=tiny_config(frames=16), vae_steps=2,
                 vae_batch=4, unet_steps=2, batch=2, log_every=1)
    return out, info


def test_training_smoke_saves_and_reloads(trained_tiny):
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    out, info = trained_tiny
    assert info["unet_steps"] == 2 and info["vae_steps"] == 2
    assert json.loads((out / "training_info.json").read_text())["seed"] == 0
    pipe = AnimateDiffPipeline.from_pretrained(str(out))
    assert isinstance(pipe.unet, UNetMotionModel) and pipe.motion_adapter is None
    assert pipe.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    assert world.load_pipeline(path=out).tokenizer("a red square").input_ids == pipe.tokenizer("a red square").input_ids


def test_training_continues_a_saved_pipeline(trained_tiny, tmp_path):
    import torch
    from diffusers import AutoencoderKL, UNetMotionModel

    from mmattn.diffusion.world.train import train

    first, first_info = trained_tiny
    out = tmp_path / "continued"
    info = train(str(out), seed=1, device="cpu", clips=8, unet_steps=2, batch=2, log_every=1, init_from=str(first))
    assert info["vae_steps"] == 0 and info["unet_steps_total"] == first_info["unet_steps"] + 2
    assert info["model"] == first_info["model"] and info["scaling_factor"] == first_info["scaling_factor"]
    before, after = (AutoencoderKL.from_pretrained(str(d), subfolder="vae") for d in (first, out))
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    unet_before, unet_after = (UNetMotionModel.from_pretrained(str(d), subfolder="unet") for d in (first, out))
    assert not all(torch.equal(a, b) for a, b in zip(unet_before.state_dict().values(), unet_after.state_dict().values()))


def test_evaluation_runs_with_and_without_broadway(trained_tiny):
    from mmattn.diffusion.world.evaluate import evaluate, markdown_table

    out, _ = trained_tiny
    pipe = world.load_pipeline(path=out)
    result = evaluate(pipe, ["a red square moving left"], [0], num_frames=16, steps=5)
    assert set(result["means"]) == {"vanilla", "broadway", "reference", "static"}
    assert result["means"]["static"]["mask_change"] == 0.0 and result["means"]["reference"]["colour_presence"] == 1
    clips = result["_clips"]
    assert not torch.equal(clips[("a red square moving left", 0, "vanilla")],
                           clips[("a red square moving left", 0, "broadway")]), "BroadWay changed nothing"
    assert "| BroadWay - vanilla |" in markdown_table(result)


def test_merged_evaluations_equal_one_evaluation_over_all_seeds(trained_tiny, tmp_path):
    import json

    from mmattn.diffusion.world.evaluate import evaluate, main

    out, _ = trained_tiny
    pipe = world.load_pipeline(path=out)
    prompts = ["a red square moving left", "a cyan circle bouncing"]

    def run(seeds):
        result = evaluate(pipe, prompts, seeds, num_frames=16, steps=3)
        result.pop("_clips")
        result.update(pipeline=str(out), device="cpu", dtype="float32")
        return result

    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, seeds in zip(parts, ([1], [0, 2])):
        path.write_text(json.dumps(run(seeds)))
    assert main(["--merge", *map(str, parts), "--out", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    whole = json.loads(json.dumps(run([0, 1, 2])))
    for key in ("seeds", "means", "broadway_minus_vanilla", "broadway_minus_vanilla_sem", "per_clip"):
        assert merged[key] == whole[key], key
    # frame difference is defined for every clip: six pairs
    differences = [b["frame_difference"] - v["frame_difference"]
                   for v, b in zip(whole["per_clip"]["vanilla"], whole["per_clip"]["broadway"])]
    mean = sum(differences) / len(differences)
    spread = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)) ** 0.5
    assert len(differences) == 6
    assert whole["broadway_minus_vanilla_sem"]["frame_difference"] == pytest.approx(spread / 6 ** 0.5, abs=1e-12)
    assert "±" in (tmp_path / "merged.md").read_text()

    with pytest.raises(SystemExit) as shared:  # the same seed twice
        main(["--merge", str(parts[0]), str(parts[0]), "--out", str(tmp_path / "bad.json")])
    assert shared.value.code == 2
    other = json.loads(parts[1].read_text())
    other["generation"]["num_inference_steps"] = 4
    parts[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit) as mismatched:
        main(["--merge", *map(str, parts), "--out", str(tmp_path / "bad.json")])
    assert mismatched.value.code == 2 and not (tmp_path / "bad.json").exists()


def test_missing_pipeline_fails_clearly(tmp_path):
    with pytest.raises(world.MissingPipelineError, match="python -m mmattn.diffusion.world.train"):
        world.load_pipeline(path=tmp_path)


def test_eval_video_defaults_to_the_world(trained_tiny, monkeypatch, tmp_path, capsys):
    from mmattn.cli import main

    out, _ = trained_tiny
    monkeypatch.setattr(world, "pipeline_dir", lambda: out)
    code = main(["eval", "video", "--prompt", "a red square moving left", "--frames", "16", "--steps", "2",
                 "--out", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert "world_colour_presence" in summary["vanilla"] and "flow_magnitude" in summary["broadway"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "offline video world" and config["metrics"]["flow"] == "lucas_kanade"
    assert config["metrics"]["metrics"] == ["temporal_flickering", "motion", "world"]


def test_eval_video_without_the_world_pipeline_says_so(monkeypatch, tmp_path, capsys):
    from mmattn.cli import main

    monkeypatch.setattr(world, "pipeline_dir", lambda: tmp_path / "absent")
    assert main(["eval", "video", "--out", str(tmp_path / "run")]) == 2
    assert "offline video world's pipeline is missing" in capsys.readouterr().err


def test_eval_video_world_metric_needs_world_prompts(monkeypatch, tmp_path, capsys):
    from mmattn.cli import main

    assert main(["eval", "video", "--model", "tiny-animatediff", "--prompt", "a cat", "--metrics", "world",
                 "--frames", "4", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "video-world prompts only" in capsys.readouterr().err


def test_eval_video_names_the_weights_a_real_model_needs(monkeypatch, tmp_path, capsys):
    from mmattn.cli import main
    import mmattn.eval.weights as weights

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    assert main(["eval", "video", "--model", "tiny-animatediff", "--prompt", "a cat", "--metrics", "motion",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "RAFT weights not found" in err and "--flow lucas_kanade" in err
    del weights


def test_demo_video_defaults_to_the_world(trained_tiny, monkeypatch):
    from mmattn.demos import video as video_demo

    out, _ = trained_tiny
    monkeypatch.setattr(world, "pipeline_dir", lambda: out)
    demo = video_demo.VideoDemo(device="cpu")
    assert demo.problems() == [] and demo.uses_world()
    assert demo.default_prompt() == video_demo.WORLD_PROMPT and demo.model_name() == "offline video world"
    vanilla, treated, report = demo.generate(video_demo.WORLD_PROMPT, 0, 16, 2, 7.5, 0.6, 1.5, 7, 1.0)
    assert vanilla and treated and report["vanilla"]["frame_change"] >= 0


def test_eval_video_refuses_non_world_prompts_before_generating(trained_tiny, monkeypatch, tmp_path, capsys):
    # The default (offline) metrics include the world statistic: a prompt it cannot score must stop the run before
    # anything is generated or config.json is written, so the same --out can be reused with corrected prompts.
    from mmattn.cli import main

    out, _ = trained_tiny
    monkeypatch.setattr(world, "pipeline_dir", lambda: out)
    run = tmp_path / "run"
    assert main(["eval", "video", "--prompt", "a red square moving left", "--prompt", "a corgi running",
                 "--frames", "16", "--steps", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "video-world prompts only" in err and "'a corgi running'" in err
    assert not (run / "config.json").exists() and not (run / "videos").exists()


def test_training_refuses_more_frames_than_the_clips_have(tmp_path):
    # The world's clips have gen.FRAMES frames: asking for more silently trained on 16 and recorded the other number.
    from mmattn.diffusion.world.train import tiny_config, train

    with pytest.raises(ValueError, match="frames"):
        train(str(tmp_path / "p"), clips=2, model_config=tiny_config(frames=gen.FRAMES + 4), vae_steps=1, unet_steps=1)
    assert not (tmp_path / "p").exists()


def test_init_from_refuses_its_own_model_options(trained_tiny, capsys):
    from mmattn.diffusion.world.train import main as train_main

    out, _ = trained_tiny
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--init-from", str(out), "--tiny", "--out", str(out.parent / "x")])
    assert exit_info.value.code == 2
    assert "drop --tiny / --frames" in capsys.readouterr().err


def test_shape_statistic_recognises_every_world_shape_and_rejects_the_wrong_one():
    from mmattn.diffusion.world import generate as gen
    from mmattn.diffusion.world.statistics import clip_statistics

    for index, prompt in enumerate(gen.all_prompts()[::5]):
        clip = gen.clip_for_prompt(prompt, 3, index)
        assert clip_statistics(clip.frames, prompt)["shape_correct"] == 1.0, prompt
        colour, shape, motion = gen.parse_prompt(prompt)
        other = next(s for s in gen.SHAPES if s != shape and gen._allowed(s, motion))
        assert clip_statistics(clip.frames, gen.prompt_for(colour, other, motion))["shape_correct"] == 0.0, prompt


def test_shape_vote_is_a_strict_majority_so_ties_do_not_depend_on_order():
    from mmattn.diffusion.world.statistics import is_strict_mode

    assert is_strict_mode(["square", "square", "circle"], "square")
    # The vote once used max(set(votes), key=votes.count): on a tie the winner followed per-process string hashing.
    assert not is_strict_mode(["square", "circle"], "square")
    assert not is_strict_mode(["circle", "square"], "square")
    assert not is_strict_mode(["triangle", "cross", "cross", "triangle"], "cross")
    assert not is_strict_mode([None, None, "square"], "square")
    assert not is_strict_mode([], "square")


def test_broadway_options_name_every_preset_and_override_it():
    import argparse

    from mmattn.diffusion.broadway import BroadWayConfig
    from mmattn.diffusion.options import PRESET_NAMES, add_broadway_arguments, broadway_config_from_arguments

    assert sorted(PRESET_NAMES) == sorted(BroadWayConfig.presets())
    parser = argparse.ArgumentParser()
    add_broadway_arguments(parser)
    config = broadway_config_from_arguments(parser.parse_args(["--beta", "3", "--tau", "all_but_dc", "--stop", "0.5"]))
    assert (config.beta, config.tau, config.stop) == (3.0, "all_but_dc", 0.5)
    assert config.alpha == BroadWayConfig.animatediff().alpha
