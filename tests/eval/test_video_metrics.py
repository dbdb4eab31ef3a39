"""Video metrics on synthetic clips (static, shifted pattern, flicker), randomly initialised backbones, weights
resolution errors, video/grid files, and ``mmattn eval video`` end to end on a tiny pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mmattn.eval.weights as mmattn_weights

from mmattn.cli import main
from mmattn.eval import video as vm
from mmattn.eval.video import (
    VideoMetricsConfig,
    VideoMetricsError,
    VideoScorer,
    frame_consistency_from_features,
    lucas_kanade_flow,
    motion_statistics,
    raft_flow,
    sample_for_dynamic_degree,
    save_grid,
    save_video,
    subject_consistency_from_features,
    temporal_flickering,
)


def pattern(height, width, dx=0.0, dy=0.0):
    """A smooth colour pattern translated by (dx, dy) pixels."""
    ys, xs = torch.meshgrid(torch.arange(height).float() - dy, torch.arange(width).float() - dx, indexing="ij")
    r = 0.5 + 0.25 * torch.sin(2 * math.pi * xs / 23 + 0.3) * torch.cos(2 * math.pi * ys / 17)
    r = r + 0.2 * torch.sin(2 * math.pi * (xs + ys) / 31)
    return torch.stack([r, 0.9 * r.roll(1, 0), 1 - r]).clamp(0, 1)


def static_clip(frames=8, size=48):
    return torch.stack([pattern(size, size)] * frames)


def moving_clip(frames=8, size=48, dx=2.0, dy=1.0):
    return torch.stack([pattern(size, size, dx * t, dy * t) for t in range(frames)])


# ------------------------------------------------------------------------------------------ formulas


def test_temporal_flickering():
    assert temporal_flickering(static_clip()) == 1.0
    black, white = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    assert temporal_flickering(torch.stack([black, white, black, white])) == 0.0
    half = torch.stack([black, torch.full((3, 4, 4), 51 / 255)])  # MAE 51 on the 0-255 scale
    assert temporal_flickering(half) == pytest.approx((255 - 51) / 255)
    assert temporal_flickering(moving_clip()) < 1.0


def test_consistency_formulas():
    same = torch.randn(1, 7).repeat(5, 1)
    assert subject_consistency_from_features(same) == pytest.approx(1.0, abs=1e-6)
    assert frame_consistency_from_features(same) == pytest.approx(1.0, abs=1e-6)
    e = torch.eye(3)
    feats = torch.stack([e[0], e[0], e[1]])  # cos(d1,d2)=1, cos(d1,d3)=0, cos(d2,d3)=0
    assert subject_consistency_from_features(feats) == pytest.approx(((1 + 1) / 2 + (0 + 0) / 2) / 2)
    assert frame_consistency_from_features(feats) == pytest.approx(2 / 6)  # ordered pairs: (1,2), (2,1) of six
    opposite = torch.stack([e[0], -e[0]])
    assert subject_consistency_from_features(opposite) == 0.0  # negative cosines are clipped (VBench)


def test_motion_statistics_rule():
    flows = torch.zeros(7, 2, 64, 64)  # 8 sampled frames: need = round(4 * 8 / 16) = 2 moving pairs
    flows[0, 0, :8] = 10.0  # top 5 % of one pair far above 6 * 64 / 256 = 1.5
    one = motion_statistics(flows, 64, 64)
    assert (one["dynamic_pairs"], one["dynamic_degree"], one["dynamic_threshold"]) == (1, 0.0, 1.5)
    flows[3, 1, :8] = -10.0
    two = motion_statistics(flows, 64, 64)
    assert (two["dynamic_pairs"], two["dynamic_degree"]) == (2, 1.0)
    assert two["flow_magnitude"] == pytest.approx(2 * 8 * 64 * 10 / (7 * 64 * 64))
    assert sample_for_dynamic_degree(torch.arange(24), fps=24).tolist() == list(range(0, 24, 3))
    assert sample_for_dynamic_degree(torch.arange(16), fps=8).tolist() == list(range(16))


def test_lucas_kanade_static_and_shifted():
    still = static_clip()
    flow = lucas_kanade_flow(still[:-1], still[1:])
    assert flow.abs().max() < 1e-4
    assert motion_statistics(flow, 48, 48)["dynamic_degree"] == 0.0
    moving = moving_clip(dx=2.0, dy=1.0)
    flow = lucas_kanade_flow(moving[:-1], moving[1:])[..., 8:-8, 8:-8]
    assert flow[:, 0].median() == pytest.approx(2.0, abs=0.2)
    assert flow[:, 1].median() == pytest.approx(1.0, abs=0.2)
    assert motion_statistics(flow, 48, 48)["dynamic_degree"] == 1.0


def test_raft_plumbing_small_and_odd_sizes():
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    model = raft_small(weights=None).eval()
    for size in ((16, 16), (130, 141)):  # upsampled to RAFT's minimum, padded to multiples of 8
        clip = torch.rand(3, 3, *size)
        with torch.no_grad():
            flow = raft_flow(model, clip[:-1], clip[1:], updates=2)
        assert flow.shape == (2, 2, *size) and torch.isfinite(flow).all()


# ------------------------------------------------------------------------------------------ the scorer


def random_scorer(**overrides):
    config = dict(clip_model="ViT-S-32", clip_weights=None, dino_model="vit_tiny_patch16_224", dino_weights=None,
                  flow="lucas_kanade", raft_weights=None, device="cpu")
    return VideoScorer(VideoMetricsConfig(**{**config, **overrides}))


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return random_scorer()


def test_scorer_on_synthetic_clips(scorer):
    still = scorer.score(static_clip(), "a red car")
    assert still["clip_frame_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert still["subject_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert still["temporal_flickering"] == 1.0
    assert still["flow_magnitude"] < 1e-3 and still["dynamic_degree"] == 0.0
    assert math.isfinite(still["clip_text_alignment"])
    moving = scorer.score(moving_clip(), "a red car")
    assert moving["flow_magnitude"] > 1.0 and moving["dynamic_degree"] == 1.0
    assert moving["temporal_flickering"] < 1.0
    assert moving["clip_frame_consistency"] < 1.0 - 1e-6
    with pytest.raises(VideoMetricsError, match="expected a video"):
        scorer.score(torch.rand(1, 3, 8, 8))


def test_random_raft_scorer_runs():
    result = random_scorer(flow="raft_small", metrics=("motion",)).score(moving_clip(frames=3, size=16))
    assert set(result) >= {"flow_magnitude", "flow_top5", "dynamic_degree"}


def test_missing_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(vm, "_hub_cached", lambda repo, filenames: None)
    monkeypatch.setattr(mmattn_weights, "hub_cached_file", lambda repo, filenames: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(VideoMetricsError, match=r"timm/vit_large_patch14_clip_224\.openai/open_clip_model"):
        VideoScorer(VideoMetricsConfig(clip_weights="openai")).clip()
    with pytest.raises(VideoMetricsError, match=r"dino_vitbase16_pretrain\.pth"):
        VideoScorer(VideoMetricsConfig()).dino()
    with pytest.raises(VideoMetricsError, match=r"raft_large_C_T_V2-1bb1363a\.pth"):
        VideoScorer(VideoMetricsConfig()).raft()
    with pytest.raises(VideoMetricsError, match="weights file not found"):
        VideoScorer(VideoMetricsConfig(dino_weights=str(tmp_path / "nope.pth"))).dino()
    with pytest.raises(VideoMetricsError, match="unknown flow"):
        VideoMetricsConfig(flow="farneback")


def test_local_weight_files_load(tmp_path):
    import open_clip
    import timm
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(1)
    dino = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in dino.state_dict().items()}}, tmp_path / "dino.pth")
    clip = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    raft = raft_small(weights=None).eval()
    torch.save(raft.state_dict(), tmp_path / "raft.pth")
    loaded = random_scorer(dino_weights=str(tmp_path / "dino.pth"), clip_weights=str(tmp_path / "clip.pt"),
                           flow="raft_small", raft_weights=str(tmp_path / "raft.pth"))
    frames = moving_clip(frames=2, size=32)
    resized = torch.nn.functional.interpolate(frames, size=224, mode="bicubic", antialias=True).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = dino((resized - mean) / std)
    torch.testing.assert_close(loaded.dino_features(frames), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(loaded.clip()[0].visual.conv1.weight, clip.visual.conv1.weight)
    assert all(torch.equal(a, b) for a, b in zip(loaded.raft().state_dict().values(), raft.state_dict().values()))


# ------------------------------------------------------------------------------------------ files and the CLI


def test_video_and_grid_files(tmp_path):
    from PIL import Image

    clip = moving_clip(frames=5, size=20)
    path = save_video(clip, tmp_path / "clip", fps=8)
    assert path.suffix in (".gif", ".mp4") and path.exists()
    if path.suffix == ".gif":
        with Image.open(path) as image:
            assert image.n_frames == 5 and image.size == (20, 20)
    grid = save_grid({"vanilla": clip, "broadway": clip.flip(0)}, tmp_path / "grid.png", columns=3)
    with Image.open(grid) as image:
        assert image.size == (72 + 3 * 20, 2 * 20)
    big = save_grid({"a": torch.rand(4, 3, 512, 384)}, tmp_path / "big.png", columns=4, max_height=64)
    with Image.open(big) as image:
        assert image.size == (72 + 4 * 48, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.png", "grid.png", path.name])  # no temp files


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_video_cli_end_to_end(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["eval", "video", "--model", "tiny-t2v", "--prompt", "a dog running on the beach", "--seeds", "3",
            "--out", str(out), "--frames", "8", "--steps", "2", "--height", "16", "--width", "16",
            "--tau", "all_but_dc", "--stop", "0.5", "--random-backbones", "--clip-model", "ViT-S-32",
            "--dino-model", "vit_tiny_patch16_224", "--flow", "lucas_kanade", "--device", "cpu"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["n"] == 1 and set(summary) >= {"vanilla", "broadway", "broadway_minus_vanilla"}
    assert set(summary["vanilla"]) >= {"clip_text_alignment", "clip_frame_consistency", "subject_consistency",
                                       "temporal_flickering", "flow_magnitude", "dynamic_degree"}
    assert json.loads((out / "summary.json").read_text()) == summary
    (record,) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert record["key"] == "p0000_s3" and (out / record["grid"]).exists()
    assert (out / record["vanilla"]["video"]).exists() and (out / record["broadway"]["video"]).exists()
    assert record["vanilla"]["scores"] != record["broadway"]["scores"]  # BroadWay changed the video
    assert json.loads((out / "config.json").read_text())["broadway"]["stop"] == 0.5

    code, again, err = run_cli(capsys, *argv)  # resumes: nothing left to generate
    assert code == 0 and "p0000_s3" not in err and json.loads(again) == summary

    code, stdout, err = run_cli(capsys, *argv[:-2], "--alpha", "0.3", "--device", "cpu")
    assert code == 2 and stdout == "" and "other settings" in err and err.count("\n") == 1

    code, stdout, err = run_cli(capsys, "eval", "video", "--model", "tiny-t2v", "--out", str(tmp_path / "x"))
    assert code == 2 and "--prompt" in err
