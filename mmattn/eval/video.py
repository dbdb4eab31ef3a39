"""Video metrics and the generate-and-score loop behind ``mmattn eval video``.

Metrics (spec ``evaluators.md`` §4; a video is a float tensor ``[T, 3, H, W]`` in ``[0, 1]``):

* ``clip_text_alignment``: mean over frames of ``logit_scale * cos(text, frame)`` with CLIP image/text embeddings
  (the loveu-tgve / CLIPScore-style convention: about 20-35 for OpenAI CLIP, whose ``logit_scale`` is 100).
* ``clip_frame_consistency``: mean cosine over all ordered pairs ``i != j`` of CLIP frame embeddings.
* ``subject_consistency``: VBench's formula on DINO CLS features, ``1/(T-1) sum_{t>=2} (max(0, cos(d_1, d_t)) +
  max(0, cos(d_{t-1}, d_t))) / 2``; frames resized so the shorter side is 224, no crop, ImageNet statistics.
* ``temporal_flickering``: VBench's ``(255 - mean_t MAE(f_t, f_{t+1})) / 255`` on the 0-255 scale.
* ``motion``: optical flow between consecutive frames (after VBench's subsampling to about 8 fps):
  ``flow_magnitude`` (mean per-pixel magnitude, pixels), ``flow_top5`` (mean of each pair's top-5 % magnitudes,
  VBench's per-pair statistic) and ``dynamic_degree`` (VBench's 0/1: at least ``round(4 N / 16)`` pairs whose top-5 %
  mean exceeds ``6 min(H, W) / 256``). Flow comes from torchvision RAFT (``raft_large``, FlyingChairs+Things
  weights ``C_T_V2``, the training data of VBench's ``raft-things.pth``, 20 updates), or from ``lucas_kanade``, a
  weight-free pyramidal Lucas-Kanade estimator for machines without RAFT weights (recorded in every result, never
  comparable with RAFT numbers).
* ``world``: the video world's colour / shape statistic (:mod:`mmattn.diffusion.world.statistics`: prompted colour
  present, centroid speed, mask change, area consistency...), reported as ``world_<name>``; weight-free, and only
  for the world's prompts ("a red square moving left").

Weights are never downloaded: each backbone loads from a local file, or from the Hugging Face / torch hub caches
where ``from_pretrained``-style tools put them; a missing file raises :class:`VideoMetricsError` naming the file and
the places looked in. ``weights=None`` builds a randomly initialised backbone (tests, smoke runs).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .io import EvalInputError, read_jsonl, write_json_atomic, write_jsonl_atomic
from .weights import hub_cache_dir, hub_cached_file, load_state_dict, timm_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_ESTIMATORS = ("raft_large", "raft_small", "lucas_kanade")
METRICS = ("clip_text_alignment", "clip_frame_consistency", "subject_consistency", "temporal_flickering", "motion",
           "world")
# The default for real models (the spec's set; CLIP, DINO and RAFT weights must be local).
DEFAULT_METRICS = METRICS[:5]
# What runs with no weights at all: flicker, Lucas-Kanade motion, and the video world's colour / shape statistic.
OFFLINE_METRICS = ("temporal_flickering", "motion", "world")
# Which metrics need which weights (for error messages).
WEIGHTS_NEEDED = {
    "clip_text_alignment": "open_clip CLIP weights (--clip-weights)",
    "clip_frame_consistency": "open_clip CLIP weights (--clip-weights)",
    "subject_consistency": "DINO weights (--dino-weights)",
    "motion": "RAFT weights (--raft-weights) unless the flow is lucas_kanade",
}
WEIGHT_FREE_HINT = (
    "metrics needing weights: " + "; ".join(f"{k}: {v}" for k, v in WEIGHTS_NEEDED.items())
    + ". Weight-free: --metrics temporal_flickering motion world --flow lucas_kanade (world: video-world prompts)"
)


class VideoMetricsError(EvalInputError):
    """A backbone's weights or an input video is missing or unusable; the message names the file expected."""


# ------------------------------------------------------------------------------------------ metric formulas


def temporal_flickering(frames: torch.Tensor) -> float:
    """VBench temporal flickering: ``(255 - mean_t MAE(f_t, f_{t+1})) / 255``; 1 for a static clip."""
    if frames.shape[0] < 2:
        raise ValueError("temporal flickering needs at least two frames")
    pixels = (frames.float().clamp(0, 1) * 255).round()  # VBench reads uint8 frames
    mae = (pixels[1:] - pixels[:-1]).abs().flatten(1).mean(1)
    return float((255 - mae.mean()) / 255)


def subject_consistency_from_features(features: torch.Tensor) -> float:
    """VBench subject/background consistency from per-frame features ``[T, D]``: first-frame and previous-frame
    cosines, each clipped at 0, averaged over frames 2..T."""
    if features.shape[0] < 2:
        raise ValueError("consistency needs at least two frames")
    unit = F.normalize(features.float(), dim=-1)
    to_first = (unit[1:] @ unit[0]).clamp_min(0)
    to_previous = (unit[1:] * unit[:-1]).sum(-1).clamp_min(0)
    return float(((to_first + to_previous) / 2).mean())


def frame_consistency_from_features(features: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs ``i != j`` (the video-editing convention, loveu-tgve)."""
    frames = features.shape[0]
    if frames < 2:
        raise ValueError("consistency needs at least two frames")
    unit = F.normalize(features.float(), dim=-1)
    cos = unit @ unit.T
    return float((cos.sum() - cos.diagonal().sum()) / (frames * (frames - 1)))


def text_alignment_from_features(image_features: torch.Tensor, text_features: torch.Tensor,
                                 logit_scale: float) -> float:
    """Mean over frames of ``logit_scale * cos(text, frame)`` (CLIP's ``logits_per_image``)."""
    cos = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).flatten()
    return float(logit_scale * cos.mean())


def motion_statistics(flows: torch.Tensor, height: int, width: int) -> dict[str, float]:
    """Flow statistics of ``[N, 2, H, W]`` flows between consecutive (sub-sampled) frames.

    ``dynamic_degree`` follows VBench: a pair counts when the mean of its top 5 % flow magnitudes exceeds
    ``6 * min(H, W) / 256``; the video is dynamic (1.0) when at least ``round(4 * (N + 1) / 16)`` pairs count, with
    ``N + 1`` the number of sampled frames.
    """
    magnitude = flows.float().norm(dim=1).flatten(1)  # [N, H*W]
    top = max(1, int(magnitude.shape[1] * 0.05))
    top5 = magnitude.topk(top, dim=1).values.mean(1)
    threshold = 6.0 * min(height, width) / 256.0
    need = round(4 * (flows.shape[0] + 1) / 16.0)
    moving = int((top5 > threshold).sum())
    return {
        "flow_magnitude": float(magnitude.mean()),
        "flow_top5": float(top5.mean()),
        "dynamic_degree": float(moving >= need),
        "dynamic_pairs": moving,
        "dynamic_threshold": threshold,
    }


def sample_for_dynamic_degree(frames: torch.Tensor, fps: float) -> torch.Tensor:
    """VBench's sub-sampling to about 8 fps: every ``round(fps / 8)``-th frame."""
    return frames[:: max(1, round(fps / 8.0))]


# ------------------------------------------------------------------------------------------ optical flow


def lucas_kanade_flow(first: torch.Tensor, second: torch.Tensor, levels: int = 4, window: int = 9,
                      iterations: int = 3) -> torch.Tensor:
    """Dense pyramidal Lucas-Kanade flow from ``first`` to ``second`` (``[N, 3, H, W]`` in [0, 1]) -> ``[N, 2, H, W]``
    in pixels (x, y). Weight-free; identical frames give exactly zero flow."""
    pyramid = [(_gray(first), _gray(second))]
    for _ in range(levels - 1):
        a, b = pyramid[-1]
        if min(a.shape[-2:]) < 2 * window:
            break
        pyramid.append((F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)))
    flow = torch.zeros(first.shape[0], 2, *pyramid[-1][0].shape[-2:], device=first.device)
    for level, (a, b) in enumerate(reversed(pyramid)):
        if level:
            flow = 2 * F.interpolate(flow, size=a.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(iterations):
            warped = _warp(b, flow)
            gy, gx = torch.gradient(0.5 * (a + warped), dim=(-2, -1))
            gt = warped - a
            def box(x):
                return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)

            ixx, iyy, ixy = box(gx * gx), box(gy * gy), box(gx * gy)
            ixt, iyt = box(gx * gt), box(gy * gt)
            det = ixx * iyy - ixy * ixy
            ok = det > 1e-9
            safe = torch.where(ok, det, torch.ones_like(det))
            du = torch.where(ok, -(iyy * ixt - ixy * iyt) / safe, torch.zeros_like(det))
            dv = torch.where(ok, -(ixx * iyt - ixy * ixt) / safe, torch.zeros_like(det))
            flow = flow + torch.cat([du, dv], 1)
    return flow


def _gray(frames: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=frames.device).view(1, 3, 1, 1)
    return (frames.float() * weights).sum(1, keepdim=True)


def _warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` at ``x + flow`` (bilinear, border padding)."""
    n, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device), torch.arange(w, device=image.device), indexing="ij")
    x = (xs + flow[:, 0]) * 2 / max(w - 1, 1) - 1
    y = (ys + flow[:, 1]) * 2 / max(h - 1, 1) - 1
    return F.grid_sample(image, torch.stack([x, y], -1), mode="bilinear", padding_mode="border", align_corners=True)


def raft_flow(model: torch.nn.Module, first: torch.Tensor, second: torch.Tensor, updates: int = 20,
              batch: int = 8) -> torch.Tensor:
    """torchvision RAFT flow ``first -> second`` for ``[N, 3, H, W]`` frames in [0, 1], in input pixels.

    RAFT needs sides divisible by 8 and at least 128 (its correlation pyramid); smaller frames are upsampled and the
    flow scaled back, other sizes padded by replication (VBench's ``InputPadder``) and the flow cropped.
    """
    height, width = first.shape[-2:]
    scale = max(1.0, 128.0 / min(height, width))
    outs = []
    for start in range(0, first.shape[0], batch):
        a, b = first[start:start + batch].float() * 2 - 1, second[start:start + batch].float() * 2 - 1
        if scale > 1:
            size = (math.ceil(height * scale), math.ceil(width * scale))
            a, b = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (a, b))
        h, w = a.shape[-2:]
        pad = (0, (8 - w % 8) % 8, 0, (8 - h % 8) % 8)
        a, b = F.pad(a, pad, mode="replicate"), F.pad(b, pad, mode="replicate")
        flow = model(a, b, num_flow_updates=updates)[-1][..., :h, :w]
        if scale > 1:
            flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([width / w, height / h], device=flow.device).view(1, 2, 1, 1)
        outs.append(flow)
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------ weights


def _hub_cached(repo: str, filenames: Sequence[str]) -> str | None:
    return hub_cached_file(repo, filenames)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    return load_state_dict(path, VideoMetricsError)


@dataclass
class VideoMetricsConfig:
    """Backbones and weights of :class:`VideoScorer`.

    ``*_weights``: a local file; a tag resolved in the caches ("openai" for CLIP, "hub" for DINO and RAFT); or
    None for a randomly initialised backbone (tests, smoke runs: the scores are then meaningless).
    """

    clip_model: str = "ViT-L-14"  # §4.3: frame consistency and text alignment with OpenAI ViT-L/14
    clip_weights: str | None = "openai"
    dino_model: str = "vit_base_patch16_224.dino"  # VBench subject consistency: DINO ViT-B/16
    dino_weights: str | None = "hub"
    flow: str = "raft_large"
    raft_weights: str | None = "hub"
    flow_updates: int = 20  # VBench runs RAFT with 20 iterations
    fps: float = 8.0  # frame rate of the videos, for VBench's ~8 fps sub-sampling of dynamic degree
    metrics: tuple[str, ...] = DEFAULT_METRICS
    device: str | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise VideoMetricsError(f"unknown video metrics {unknown}; available: {', '.join(METRICS)}")
        if self.flow not in FLOW_ESTIMATORS:
            raise VideoMetricsError(f"unknown flow estimator {self.flow!r}; available: {', '.join(FLOW_ESTIMATORS)}")


class VideoScorer:
    """Scores videos with the metrics of :class:`VideoMetricsConfig`; backbones load on first use."""

    def __init__(self, config: VideoMetricsConfig | None = None) -> None:
        self.config = config or VideoMetricsConfig()
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._clip = self._dino = self._raft = None
        self.weights_used: dict[str, str | None] = {}

    # -- backbones -------------------------------------------------------------------------------------------
    def clip(self):
        if self._clip is None:
            import open_clip

            name, weights = self.config.clip_model, self.config.clip_weights
            kwargs: dict[str, Any] = {}
            if weights is None:
                source = None
            elif os.path.isfile(weights):
                source = weights
            else:
                cfg = open_clip.get_pretrained_cfg(name, weights)
                if not cfg:
                    raise VideoMetricsError(
                        f"CLIP weights {weights!r}: neither a file nor a pretrained tag of {name} "
                        f"(tags: {open_clip.list_pretrained_tags_by_model(name)})"
                    )
                repo = (cfg.get("hf_hub") or "").rstrip("/")
                url_file = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg.get("url") or ""))
                source = _hub_cached(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")) if repo \
                    else None
                if source is None and cfg.get("url") and os.path.isfile(url_file):
                    source = url_file
                if source is None:
                    raise VideoMetricsError(
                        f"CLIP weights for {name} ({weights}) not found: expected {repo}/open_clip_model.safetensors "
                        f"(or open_clip_pytorch_model.bin) in the Hugging Face hub cache {hub_cache_dir()}"
                        + (f", or {url_file}" if cfg.get("url") else "")
                        + "; or pass a local checkpoint file as the CLIP weights"
                    )
                kwargs = {"force_quick_gelu": bool(cfg.get("quick_gelu")), "image_mean": cfg.get("mean"),
                          "image_std": cfg.get("std")}
            model = open_clip.create_model(name, pretrained=source, **{k: v for k, v in kwargs.items() if v})
            self._clip = (model.eval().to(self.device), open_clip.get_tokenizer(name))
            self.weights_used["clip"] = source
        return self._clip

    def dino(self):
        if self._dino is None:
            name = self.config.dino_model
            # The torch.hub fallback is VBench's DINO ViT-B/16 file.
            fallback = "dino_vitbase16_pretrain.pth" if name.startswith("vit_base_patch16") else "-"
            model, path = timm_backbone(name, self.config.dino_weights, fallback, VideoMetricsError, dynamic_img_size=True)
            self._dino = model.eval().to(self.device)
            self.weights_used["dino"] = path
        return self._dino

    def raft(self):
        if self._raft is None:
            from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights, raft_large, raft_small

            large = self.config.flow == "raft_large"
            weights, path = self.config.raft_weights, None
            if weights == "hub":
                url = (Raft_Large_Weights.C_T_V2 if large else Raft_Small_Weights.C_T_V2).url
                path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
                if not os.path.isfile(path):
                    raise VideoMetricsError(
                        f"RAFT weights not found: expected {path} (torchvision's {os.path.basename(url)}); or pass a "
                        "local torchvision RAFT state dict as the RAFT weights, or use the weight-free "
                        "lucas_kanade flow"
                    )
            elif weights is not None:
                path = weights
            model = (raft_large if large else raft_small)(weights=None)
            if path is not None:
                model.load_state_dict(_load_state_dict(path))
            self._raft = model.eval().to(self.device)
            self.weights_used["raft"] = path
        return self._raft

    # -- features --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_image_features(self, frames: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        model, _ = self.clip()
        cfg = model.visual.preprocess_cfg
        size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
        images = TF.resize(frames.float(), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        images = TF.normalize(TF.center_crop(images, [size, size]).clamp(0, 1), cfg["mean"], cfg["std"])
        return torch.cat([model.encode_image(chunk.to(self.device)).float()
                          for chunk in images.split(self.config.batch_size)])

    @torch.no_grad()
    def clip_text_features(self, text: str) -> torch.Tensor:
        model, tokenizer = self.clip()
        return model.encode_text(tokenizer([text]).to(self.device)).float()[0]

    @torch.no_grad()
    def dino_features(self, frames: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        images = TF.resize(frames.float(), 224, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        images = TF.normalize(images.clamp(0, 1), IMAGENET_MEAN, IMAGENET_STD)
        model = self.dino()
        return torch.cat([model(chunk.to(self.device)).float() for chunk in images.split(self.config.batch_size)])

    @torch.no_grad()
    def flow(self, frames: torch.Tensor) -> torch.Tensor:
        first, second = frames[:-1].to(self.device), frames[1:].to(self.device)
        if self.config.flow == "lucas_kanade":
            return lucas_kanade_flow(first, second)
        return raft_flow(self.raft(), first, second, self.config.flow_updates, self.config.batch_size)

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, frames: torch.Tensor, prompt: str | None = None) -> dict[str, float]:
        """All configured metrics of one video ``[T, 3, H, W]`` in [0, 1]."""
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 2:
            raise VideoMetricsError(f"expected a video [T>=2, 3, H, W], got shape {tuple(frames.shape)}")
        wanted, scores = self.config.metrics, {}
        frames = frames.float().clamp(0, 1).cpu()
        if "clip_text_alignment" in wanted or "clip_frame_consistency" in wanted:
            image = self.clip_image_features(frames)
            if "clip_frame_consistency" in wanted:
                scores["clip_frame_consistency"] = frame_consistency_from_features(image)
            if "clip_text_alignment" in wanted and prompt is not None:
                scale = float(self.clip()[0].logit_scale.detach().exp())
                scores["clip_text_alignment"] = text_alignment_from_features(image, self.clip_text_features(prompt),
                                                                             scale)
        if "subject_consistency" in wanted:
            scores["subject_consistency"] = subject_consistency_from_features(self.dino_features(frames))
        if "temporal_flickering" in wanted:
            scores["temporal_flickering"] = temporal_flickering(frames)
        if "motion" in wanted:
            sampled = sample_for_dynamic_degree(frames, self.config.fps)
            if sampled.shape[0] >= 2:
                scores.update(motion_statistics(self.flow(sampled), *frames.shape[-2:]))
        if "world" in wanted:
            scores.update(world_scores(frames, prompt))
        return scores

    def load_backbones(self) -> None:
        """Load every backbone the configured metrics need now, so missing weights fail before any generation."""
        wanted = self.config.metrics
        if "clip_text_alignment" in wanted or "clip_frame_consistency" in wanted:
            self.clip()
        if "subject_consistency" in wanted:
            self.dino()
        if "motion" in wanted and self.config.flow != "lucas_kanade":
            self.raft()

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.config), "weights_used": dict(self.weights_used)}


def world_scores(frames: torch.Tensor, prompt: str | None) -> dict[str, float]:
    """The video world's statistic as ``world_<name>`` scores (undefined ones left out)."""
    from mmattn.diffusion.world.statistics import clip_statistics

    try:
        stats = clip_statistics(frames, prompt or "")
    except ValueError as error:
        raise VideoMetricsError(f"the world metric scores video-world prompts only: {error}") from None
    return {f"world_{k}": v for k, v in stats.items() if v is not None}


# ------------------------------------------------------------------------------------------ files


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(descriptor)
    return temporary


def _to_uint8(frames: torch.Tensor):
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_video(frames: torch.Tensor, stem: str | os.PathLike[str], fps: float = 8.0) -> Path:
    """Write ``stem.mp4`` when PyAV is installed, else ``stem.gif`` (Pillow); atomically. Returns the path."""
    pixels = _to_uint8(frames)
    try:
        import av  # noqa: F401
    except ImportError:
        av = None
    if av is not None and pixels.shape[1] % 2 == 0 and pixels.shape[2] % 2 == 0:  # yuv420p needs even sides
        path = Path(f"{stem}.mp4")
        temporary = _atomic_target(path)
        try:
            with av.open(temporary, mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=int(round(fps)))
                stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
                for frame in pixels:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path
    from PIL import Image

    path = Path(f"{stem}.gif")
    temporary = _atomic_target(path)
    try:
        images = [Image.fromarray(frame) for frame in pixels]
        images[0].save(temporary, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, int(round(1000 / fps))), loop=0)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_grid(rows: dict[str, torch.Tensor], path: str | os.PathLike[str], columns: int = 8,
              max_height: int = 256) -> Path:
    """A PNG with one labelled row per variant and up to ``columns`` evenly spaced frames each (side by side),
    frames scaled down to at most ``max_height`` pixels so a 16-frame 512² comparison stays viewable."""
    from PIL import Image, ImageDraw

    label_width = 72
    videos = list(rows.items())
    frames = videos[0][1].shape[0]
    picks = sorted({round(i * (frames - 1) / max(1, columns - 1)) for i in range(min(columns, frames))})
    height, width = videos[0][1].shape[-2:]
    if height > max_height:
        size = (max_height, max(1, round(width * max_height / height)))
        videos = [(label, F.interpolate(video[picks].float(), size=size, mode="area")) for label, video in videos]
        picks, (height, width) = list(range(len(picks))), size
    grid = Image.new("RGB", (label_width + len(picks) * width, len(videos) * height), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, video) in enumerate(videos):
        pixels = _to_uint8(video[picks])
        for col, frame in enumerate(pixels):
            grid.paste(Image.fromarray(frame), (label_width + col * width, row * height))
        draw.text((4, row * height + 4), label, fill="black")
    path = Path(path)
    temporary = _atomic_target(path)
    try:
        grid.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------ generate and score


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per non-blank line (``#`` starts a comment line)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise EvalInputError(f"{path}: no prompts")
    return prompts


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


_NOT_AVERAGED = ("dynamic_threshold",)  # a per-video constant of the frame size, not a score


def summarize(records: list[dict[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    """Mean of every metric per variant, and each treated variant's mean difference to the first (vanilla)."""
    summary: dict[str, Any] = {"n": len(records)}
    for variant in variants:
        keys = sorted({k for r in records for k, v in r[variant]["scores"].items()
                       if isinstance(v, (int, float)) and k not in _NOT_AVERAGED})
        summary[variant] = {k: _mean([r[variant]["scores"][k] for r in records if k in r[variant]["scores"]])
                            for k in keys}
    base = variants[0]
    for variant in variants[1:]:
        summary[f"{variant}_minus_{base}"] = {
            k: summary[variant][k] - summary[base][k] for k in summary[variant]
            if summary[base].get(k) is not None and summary[variant][k] is not None
        }
    return summary


def evaluate_videos(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    *,
    treatments: dict[str, Callable[[Any], Any]],
    scorer: VideoScorer,
    generation: dict[str, Any],
    settings: dict[str, Any] | None = None,
    fps: float = 8.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate every (prompt, seed) without and with each treatment, save videos and a grid, score, summarise.

    ``pipe`` is a pipeline, or a zero-argument callable returning one: it is then called only when something is
    left to generate, after the settings check (a finished run is summarised without loading the model).
    ``treatments`` maps a variant name to a context-manager factory taking the pipeline (e.g. ``lambda pipe:
    broadway(pipe, config)``); "vanilla" runs first with the same seed. ``out_dir`` receives ``videos/``,
    ``grids/``, ``samples.jsonl`` (one record per prompt and seed, rewritten atomically after each) and
    ``summary.json``. A rerun with the same ``settings`` resumes after the finished samples; different settings
    in a non-empty directory are refused rather than mixed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**(settings or {}), "prompts": list(prompts), "seeds": [int(s) for s in seeds],
                "generation": generation, "variants": ["vanilla", *treatments], "metrics": scorer.describe()}
    settings["metrics"].pop("weights_used", None)
    settings_path, samples_path = out / "config.json", out / "samples.jsonl"
    if settings_path.exists():
        from .io import read_json

        previous = read_json(settings_path)
        if previous != _jsonable(settings):
            raise EvalInputError(f"{out}: holds a run with other settings (config.json); use another --out")
    write_json_atomic(settings_path, _jsonable(settings))
    records = read_jsonl(samples_path) if samples_path.exists() else []
    done = {r["key"] for r in records}
    variants = ["vanilla", *treatments]
    if callable(pipe) and not hasattr(pipe, "components"):  # a loader, not a DiffusionPipeline
        loader, pipe = pipe, None
    for p_index, prompt in enumerate(prompts):
        for seed in seeds:
            key = f"p{p_index:04d}_s{int(seed)}"
            if key in done:
                continue
            if pipe is None:
                pipe = loader()
            record: dict[str, Any] = {"key": key, "prompt": prompt, "seed": int(seed)}
            videos = {}
            for variant in variants:
                start = time.perf_counter()
                with treatments[variant](pipe) if variant != "vanilla" else contextlib.nullcontext():
                    frames = _generate(pipe, prompt, int(seed), generation)
                seconds = time.perf_counter() - start
                path = save_video(frames, out / "videos" / f"{key}_{variant}", fps)
                videos[variant] = frames
                record[variant] = {"video": str(path.relative_to(out)), "seconds": seconds,
                                   "scores": scorer.score(frames, prompt)}
            record["grid"] = str(save_grid(videos, out / "grids" / f"{key}.png").relative_to(out))
            record["weights"] = dict(scorer.weights_used)  # which files scored it (None: random backbone)
            records.append(record)
            write_jsonl_atomic(samples_path, records)
            if log:
                log(f"{key}: " + ", ".join(f"{v} {record[v]['scores']}" for v in variants))
    weights: dict[str, Any] = {}
    for record in records:
        weights.update(record.get("weights", {}))
    summary = {**summarize(records, variants), "weights_used": weights}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _generate(pipe, prompt: str, seed: int, generation: dict[str, Any]) -> torch.Tensor:
    device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device=torch.device(device).type).manual_seed(seed)
    output = pipe(prompt=prompt, generator=generator, output_type="pt", **generation)
    frames = output.frames
    frames = frames[0] if isinstance(frames, (list, tuple)) else frames[0]
    return frames.float().cpu()


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))
