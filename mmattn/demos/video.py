"""Video demo: the same prompt and seed rendered by a text-to-video pipeline without and with BroadWay.

``mmattn demo video --model PATH`` serves a Gradio app around a *local* diffusers pipeline (a folder written by
``save_pretrained``: AnimateDiff, TextToVideoSD); without ``--model`` it uses the offline video world's shipped
pipeline (:mod:`mmattn.diffusion.world`: coloured shapes that move, turn and bounce). Nothing is downloaded.
BroadWay comes from ``mmattn.diffusion.broadway.apply_broadway``, looked up at run time. Whatever is missing, the
app still starts and says so plainly: without ``--model PATH`` and without the shipped pipeline that it needs a
local pipeline, and without BroadWay that it is not available (it then renders the vanilla video only).

Next to each video it reports a model-free motion statistic (mean absolute change between consecutive frames, in
[0, 1]): BroadWay is meant to raise motion without adding flicker, and this is the cheapest honest proxy until the
video metrics of ``mmattn eval video`` land.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from .errors import DemoInputError, errors_as_messages

__all__ = ["BROADWAY_MODULE", "BROADWAY_PRESETS", "broadway_status", "VideoDemo", "frame_change", "launch",
           "shipped_pipeline"]

logger = logging.getLogger(__name__)

BROADWAY_MODULE = "mmattn.diffusion.broadway"
# Presets of the BroadWay / ByTheWay paper (spec diffusion-broadway-attencraft.md §2.5.2): tau, alpha, beta.
BROADWAY_PRESETS = {
    "AnimateDiff (tau 7, alpha 0.6, beta 1.5)": {"tau": 7, "alpha": 0.6, "beta": 1.5},
    "VideoCrafter2 (tau 7, alpha 0.1, beta 10)": {"tau": 7, "alpha": 0.1, "beta": 10.0},
}
MAX_PROMPT_CHARS = 500
MAX_FRAMES = 32
MAX_STEPS = 100
GIF_FRAME_MS = 125
MIN_DISPLAY_SIZE = 256  # pixels: tiny test pipelines render 16-32 px videos

NEEDS_MODEL = (
    "This demo needs a local diffusers text-to-video pipeline: start it with `mmattn demo video --model PATH`, "
    "where PATH is a folder saved with `save_pretrained` (AnimateDiff, TextToVideoSD). The offline video world's "
    "pipeline (mmattn/diffusion/world/pipeline) is missing from this installation, and nothing is downloaded."
)
WORLD_PROMPT = "a red square moving left"  # the offline world only knows coloured shapes and their motions
NO_BROADWAY = (
    "BroadWay is not yet available in this installation (`mmattn.diffusion.broadway.apply_broadway` was not "
    "found); only the vanilla video can be rendered."
)


def broadway_status():
    """``(module, None)`` when ``mmattn.diffusion.broadway.apply_broadway`` exists, else ``(None, reason)``.

    Checked at every call (not at import), so a BroadWay that lands later is picked up without a code change.
    """
    try:
        module = importlib.import_module(BROADWAY_MODULE)
    except ModuleNotFoundError as error:
        if error.name and BROADWAY_MODULE.startswith(error.name):
            return None, NO_BROADWAY
        raise
    if not callable(getattr(module, "apply_broadway", None)):
        return None, NO_BROADWAY
    return module, None


def shipped_pipeline() -> Path | None:
    """The offline video world's pipeline folder when it is installed, else None."""
    from mmattn.diffusion.world import has_pipeline, pipeline_dir

    return pipeline_dir() if has_pipeline() else None


def frame_change(frames: Sequence[Image.Image]) -> float:
    """Mean absolute change between consecutive frames, with pixels in [0, 1] (0 for a still video)."""
    if len(frames) < 2:
        return 0.0
    arrays = np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0 for frame in frames])
    return float(np.abs(np.diff(arrays, axis=0)).mean())


def _to_pil_frames(frames: Any) -> list[Image.Image]:
    """The first video of a pipeline's ``frames`` (a batch of PIL lists, or a [B, F, H, W, C] array / tensor)."""
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    if isinstance(frames, np.ndarray):
        video = frames[0] if frames.ndim == 5 else frames
        if video.dtype != np.uint8:
            video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
        return [Image.fromarray(frame) for frame in video]
    video = frames[0] if frames and isinstance(frames[0], (list, tuple)) else frames
    return [frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)) for frame in video]


class VideoDemo:
    """A text-to-video pipeline (loaded lazily from a local folder, or given) and the BroadWay comparison."""

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 pipeline: Any = None) -> None:
        self.model_path = model
        self.device = device
        self.dtype = dtype
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self._out_dir = Path(tempfile.mkdtemp(prefix="mmattn-video-demo-"))

    def problems(self) -> list[str]:
        """What keeps the demo from running fully, as messages for the user (empty when all is there)."""
        found = []
        if self._pipeline is None and not self.model_path and shipped_pipeline() is None:
            found.append(NEEDS_MODEL)
        _, reason = broadway_status()
        if reason:
            found.append(reason)
        return found

    def uses_world(self) -> bool:
        """True when the demo runs the offline video world's pipeline (no model given)."""
        return self._pipeline is None and not self.model_path and shipped_pipeline() is not None

    def model_name(self) -> str:
        if self.model_path:
            return self.model_path
        return "offline video world" if self.uses_world() else "given"

    def default_prompt(self) -> str:
        return WORLD_PROMPT if self.uses_world() else "a corgi running on the beach"

    def pipeline(self):
        if self._pipeline is None:
            path = Path(self.model_path) if self.model_path else shipped_pipeline()
            if path is None:
                raise DemoInputError(NEEDS_MODEL)
            if not (path / "model_index.json").is_file():
                raise DemoInputError(f"{path} is not a local diffusers pipeline folder (no model_index.json)")
            import torch
            from diffusers import DiffusionPipeline

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = getattr(torch, self.dtype or ("float16" if device.startswith("cuda") else "float32"))
            self._pipeline = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
            self._pipeline.to(device)
        return self._pipeline

    def _render(self, prompt: str, seed: int, num_frames: int, steps: int, guidance: float) -> list[Image.Image]:
        import torch

        pipe = self.pipeline()
        device = getattr(pipe, "device", "cpu")
        generator = torch.Generator(device=device).manual_seed(int(seed))
        result = pipe(prompt=prompt, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generator, output_type="pil")
        return _to_pil_frames(result.frames if hasattr(result, "frames") else result[0])

    def _save_gif(self, frames: list[Image.Image], name: str) -> str:
        """An animated GIF of ``frames``; small videos are enlarged (whole pixels) so that they can be seen."""
        factor = -(-MIN_DISPLAY_SIZE // max(frames[0].size))
        if factor > 1:
            frames = [f.resize((f.width * factor, f.height * factor), Image.Resampling.NEAREST) for f in frames]
        path = Path(tempfile.mkdtemp(dir=self._out_dir)) / f"{name}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
        return str(path)

    def generate(self, prompt: str, seed: int, num_frames: int, steps: int, guidance: float, alpha: float,
                 beta: float, tau: int, stop: float) -> tuple[str, str | None, dict[str, Any]]:
        """(vanilla GIF path, BroadWay GIF path or None, metrics and notes)."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise DemoInputError("type a prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise DemoInputError(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        num_frames, steps = int(num_frames), int(steps)
        if not 2 <= num_frames <= MAX_FRAMES or not 1 <= steps <= MAX_STEPS:
            raise DemoInputError(f"frames must lie in [2, {MAX_FRAMES}] and steps in [1, {MAX_STEPS}]")
        options = {"alpha": float(alpha), "beta": float(beta), "tau": int(tau), "stop": float(stop)}
        with self._lock:
            pipe = self.pipeline()
            vanilla = self._render(prompt, seed, num_frames, steps, guidance)
            report: dict[str, Any] = {"prompt": prompt, "seed": int(seed), "frames": len(vanilla),
                                      "vanilla": {"frame_change": frame_change(vanilla)}}
            module, reason = broadway_status()
            broadway_path = None
            if module is None:
                report["broadway"] = None
                report["note"] = reason
            else:
                handle = module.apply_broadway(pipe, _broadway_config(module, options))
                try:
                    treated = self._render(prompt, seed, num_frames, steps, guidance)
                finally:
                    remove = getattr(module, "remove_broadway", None)
                    if callable(remove):
                        remove(pipe)
                    elif hasattr(handle, "remove"):
                        handle.remove()
                # BroadWay edits steps int(start*N) <= step < int(stop*N), start 0 (spec §2.5.2).
                active_steps = int(options["stop"] * steps)
                report["broadway"] = {"frame_change": frame_change(treated), "options": options,
                                      "active_steps": active_steps}
                if active_steps == 0:
                    report["note"] = (f"BroadWay was active on no step ({steps} steps x stop {options['stop']:g} < 1): "
                                      "the two videos are the same; raise the steps or the active fraction")
                broadway_path = self._save_gif(treated, "broadway")
            return self._save_gif(vanilla, "vanilla"), broadway_path, report

    def build_app(self) -> gr.Blocks:
        return _build_app(self)


def _broadway_config(module, options: dict[str, Any]):
    """BroadWay's config from the demo's options: ``BroadWayConfig`` when the module has one, else the dict."""
    config_cls = getattr(module, "BroadWayConfig", None)
    if config_cls is None:
        return dict(options)
    known = {field.name for field in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else None
    return config_cls(**{k: v for k, v in options.items() if known is None or k in known})


def _build_app(demo: VideoDemo) -> gr.Blocks:
    first_preset = next(iter(BROADWAY_PRESETS.values()))

    def status() -> str:
        problems = demo.problems()
        if not problems:
            return f"Pipeline `{demo.model_name()}`; BroadWay available."
        return "\n\n".join(f"**{text}**" for text in problems)

    def generate(prompt, seed, num_frames, steps, guidance, alpha, beta, tau, stop):
        """Vanilla and BroadWay videos of one prompt and seed, with a motion statistic each."""
        with errors_as_messages("video demo run", logger):
            vanilla, treated, report = demo.generate(prompt, seed, num_frames, steps, guidance, alpha, beta, tau, stop)
        if treated is None or report.get("note"):
            gr.Warning(report.get("note") or NO_BROADWAY)
        return vanilla, treated, report

    def apply_preset(name):
        values = BROADWAY_PRESETS[name]
        return values["alpha"], values["beta"], values["tau"]

    with gr.Blocks(title="mmattn: BroadWay video demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# mmattn: text-to-video with and without BroadWay")
        notice = gr.Markdown(status(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                prompt = gr.Textbox(value=demo.default_prompt(), label="Prompt", max_length=MAX_PROMPT_CHARS)
                seed = gr.Number(value=0, precision=0, label="Seed")
                with gr.Row():
                    num_frames = gr.Slider(2, MAX_FRAMES, value=16, step=1, label="Frames")
                    steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Steps")
                guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance scale")
                preset = gr.Dropdown(choices=list(BROADWAY_PRESETS), value=next(iter(BROADWAY_PRESETS)),
                                     label="BroadWay preset")
                alpha = gr.Slider(0.0, 1.0, value=first_preset["alpha"], step=0.05,
                                  label="alpha (temporal self-guidance)")
                beta = gr.Slider(1.0, 15.0, value=first_preset["beta"], step=0.1, label="beta (motion enhancement)")
                tau = gr.Slider(1, MAX_FRAMES // 2, value=first_preset["tau"], step=1, label="tau (frequency cut)",
                                info="needs frames >= 2 tau + 1")
                stop = gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="active for this fraction of the steps")
                run = gr.Button("Generate", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                with gr.Row():
                    vanilla = gr.Image(label="Vanilla", type="filepath", interactive=False, height=320,
                                       elem_id="vanilla")
                    treated = gr.Image(label="BroadWay", type="filepath", interactive=False, height=320,
                                       elem_id="broadway")
                report = gr.JSON(label="Metrics", elem_id="metrics")
        preset.change(apply_preset, inputs=preset, outputs=[alpha, beta, tau], api_visibility="private", queue=False)
        run.click(generate, inputs=[prompt, seed, num_frames, steps, guidance, alpha, beta, tau, stop],
                  outputs=[vanilla, treated, report], api_name="generate", concurrency_limit=1)
        app.load(status, outputs=notice, api_name="status", queue=False)
    return app


def launch(demo: VideoDemo, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False, **kwargs: Any) -> gr.Blocks:
    """Build and launch the app; it reads no files but its own outputs (no ``allowed_paths``)."""
    app = demo.build_app()
    app.queue(max_size=8, default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=share, show_error=False, max_file_size="1mb",
               prevent_thread_lock=prevent_thread_lock, quiet=prevent_thread_lock, **kwargs)
    return app
