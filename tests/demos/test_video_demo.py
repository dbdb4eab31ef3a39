"""The video demo through ``gradio_client``: honest about what is missing, side by side when BroadWay exists.

The side-by-side path runs on a fake pipeline and a fake
``mmattn.diffusion.broadway`` module (a model-free backend, as the ecosystem notes recommend for CPU CI).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import mmattn.demos.video as video_demo
from mmattn.demos.video import (
    BROADWAY_MODULE,
    MIN_DISPLAY_SIZE,
    NEEDS_MODEL,
    NO_BROADWAY,
    VideoDemo,
    broadway_status,
    launch,
)

from .conftest import free_port


class StillOrMovingPipeline:
    """A seeded image sliding one pixel per frame; with 'BroadWay' applied it slides faster (more motion)."""

    device = "cpu"

    def __init__(self):
        self.broadway = None
        self.configs = []

    def __call__(self, prompt, num_frames, num_inference_steps, guidance_scale, generator, output_type):
        rng = np.random.default_rng(generator.initial_seed() + len(prompt))
        phase = rng.random(3) * 2 * np.pi  # a smooth seeded wave: a larger shift is a larger change
        columns = np.sin(2 * np.pi * np.arange(16)[None, :, None] / 16 + phase)
        still = np.broadcast_to((columns + 1) * 127.5, (16, 16, 3)).round().astype(np.uint8)
        shift = 1 if self.broadway is None else 1 + round(self.broadway.alpha * 4)
        frames = [Image.fromarray(np.roll(still, i * shift, axis=1)) for i in range(num_frames)]
        return types.SimpleNamespace(frames=[frames])


@pytest.fixture
def fake_broadway(monkeypatch):
    module = types.ModuleType(BROADWAY_MODULE)

    @dataclass
    class BroadWayConfig:
        alpha: float
        beta: float
        tau: int = 7

    def apply_broadway(pipe, config):
        pipe.broadway = config
        pipe.configs.append(config)

    def remove_broadway(pipe):
        pipe.broadway = None

    module.BroadWayConfig, module.apply_broadway, module.remove_broadway = BroadWayConfig, apply_broadway, remove_broadway
    monkeypatch.setitem(sys.modules, BROADWAY_MODULE, module)
    return module


def served(demo):
    app = launch(demo, port=free_port(), prevent_thread_lock=True)
    return app, Client(app.local_url, verbose=False)


def test_without_a_model_the_app_says_it_needs_a_local_pipeline_and_broadway(monkeypatch):
    monkeypatch.setattr(video_demo, "shipped_pipeline", lambda: None)  # an installation without the world pipeline
    app, client = served(VideoDemo())
    try:
        status = client.predict(api_name="/status")
        assert "--model PATH" in status
        assert ("BroadWay is not yet available" in status) == (broadway_status()[0] is None)
        with pytest.raises(AppError, match="needs a local diffusers text-to-video pipeline"):
            client.predict("a cat", 0, 4, 2, 7.5, 0.6, 1.5, 7, 0.2, api_name="/generate")
    finally:
        app.close()


def test_broadway_runs_side_by_side_with_the_same_seed(fake_broadway):
    pipeline = StillOrMovingPipeline()
    app, client = served(VideoDemo(pipeline=pipeline))
    try:
        assert "BroadWay available" in client.predict(api_name="/status")
        vanilla, treated, report = client.predict("a cat", 3, 6, 2, 7.5, 0.5, 1.5, 7, 0.2, api_name="/generate")
    finally:
        app.close()
    assert pipeline.broadway is None, "BroadWay must be removed after the run"
    assert [(c.alpha, c.beta, c.tau) for c in pipeline.configs] == [(0.5, 1.5, 7)]  # 'stop' is not a field here
    for path in (vanilla, treated):
        with Image.open(path) as gif:
            assert gif.n_frames == 6 and gif.size == (MIN_DISPLAY_SIZE, MIN_DISPLAY_SIZE)  # 16 px, enlarged x16
    assert report["broadway"]["frame_change"] > report["vanilla"]["frame_change"] > 0.0
    with Image.open(vanilla) as a, Image.open(treated) as b:
        assert a.tobytes() == b.tobytes()  # same seed: the first frames agree


def test_without_broadway_only_the_vanilla_video_is_rendered(monkeypatch):
    monkeypatch.setattr(video_demo, "shipped_pipeline", lambda: None)
    monkeypatch.setitem(sys.modules, BROADWAY_MODULE, None)  # the module cannot be imported
    assert broadway_status() == (None, NO_BROADWAY)
    demo = VideoDemo(pipeline=StillOrMovingPipeline())
    assert demo.problems() == [NO_BROADWAY]
    vanilla, treated, report = demo.generate("a cat", 0, 3, 1, 7.5, 0.6, 1.5, 7, 0.2)
    assert treated is None and report["broadway"] is None and report["note"] == NO_BROADWAY
    with Image.open(vanilla) as gif:
        assert gif.n_frames == 3
    assert VideoDemo().problems()[0] == NEEDS_MODEL


def test_a_saved_local_pipeline_renders_vanilla_and_broadway(tmp_path):
    """End to end on a real (tiny, random) AnimateDiff pipeline loaded from a folder, with the real BroadWay."""
    from mmattn.diffusion import broadway
    from mmattn.diffusion.testing import tiny_animatediff_pipeline

    tiny_animatediff_pipeline().save_pretrained(tmp_path / "pipe")
    demo = VideoDemo(model=str(tmp_path / "pipe"), device="cpu")
    assert demo.problems() == []
    vanilla, treated, report = demo.generate("a cat", 0, 3, 1, 7.5, 0.6, 1.5, 1, 1.0)
    assert not broadway.broadway_enabled(demo.pipeline()), "BroadWay must be removed after the run"
    assert report["broadway"]["options"] == {"alpha": 0.6, "beta": 1.5, "tau": 1, "stop": 1.0}
    assert report["broadway"]["active_steps"] == 1 and "note" not in report
    with Image.open(vanilla) as a, Image.open(treated) as b:
        assert a.n_frames == b.n_frames == 3 and a.size == b.size
    # Same seed, BroadWay active on every step: the videos differ (alpha, beta away from the identity 0, 1).
    assert report["broadway"]["frame_change"] != report["vanilla"]["frame_change"]
