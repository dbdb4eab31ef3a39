"""Subject-customization metrics: CLIP-I, CLIP-T and DINO (spec ``evaluators.md`` §4.4), optionally per concept region.

Definitions (ImagenHub's ``dreambooth_metric.py``, the DreamBooth protocol):

* ``clip_i``: mean cosine similarity of CLIP image embeddings over every (generated, reference) pair;
* ``dino``: the same with DINO CLS features;
* ``clip_t``: mean cosine similarity between each generated image's CLIP embedding and its prompt's text embedding
  (raw cosine, not x100; text truncated to CLIP's 77 tokens). Placeholder tokens such as ``<new1>`` mean nothing to
  CLIP: ``text_replacements`` swaps them for class words ("<new1>" -> "cat"), ``drop_placeholders`` removes any
  ``<...>`` token left (DisenDiff's text alignment removes them).

Backbones (§4.4): OpenAI CLIP ViT-B/32 through open_clip (QuickGELU; preprocessing: shorter side to 224 bicubic,
centre crop, CLIP mean/std) and DINO ViT-S/16 through timm (``vit_small_patch16_224.dino``, CLS after the final
norm; preprocessing: resize 256 bicubic, centre crop 224, ImageNet mean/std). AttenCraft's own backbones are
unverified (it ships no evaluation code), so results are labelled with the backbones used.

Masked evaluation (multi-concept papers score each concept on its region): with a mask per image, ``mask_mode``
"blank" fills the pixels outside the mask with ``mask_fill`` and "crop" additionally crops to the mask's bounding box,
grown to a square (padded with the fill) so the centre crop of the preprocessing cannot cut the concept off. Which of
the two (and which fill) the papers used is not documented; both are offered and recorded in the results.

Weights are never downloaded: each backbone loads from a local file, or from the caches where open_clip / timm /
torch hub put them; a missing file raises :class:`CustomizationError` naming the file expected. ``None`` builds a
randomly initialised backbone (tests and smoke runs: the scores are then meaningless).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .io import EvalInputError
from .weights import hub_cache_dir, hub_cached_file, load_state_dict, timm_backbone

__all__ = [
    "METRICS",
    "MASK_MODES",
    "CustomizationError",
    "CustomizationConfig",
    "CustomizationScorer",
    "apply_mask",
    "pairwise_mean_cosine",
    "paired_cosine",
    "prepare_prompt",
]

METRICS = ("clip_i", "clip_t", "dino")
MASK_MODES = ("blank", "crop")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PLACEHOLDER = re.compile(r"<[^<>\s]+>")


class CustomizationError(EvalInputError):
    """A backbone's weights, an image or a mask is missing or unusable; the message names what and where."""


# ------------------------------------------------------------------------------------------ formulas


def pairwise_mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``a`` ``[N, D]``: mean cosine with every row of ``b`` ``[M, D]`` -> ``[N]``."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean(1)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``[N, D]`` matrices -> ``[N]``."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def prepare_prompt(prompt: str, replacements: dict[str, str] | None = None, drop_placeholders: bool = False) -> str:
    """The text CLIP-T scores: placeholders replaced by class words, leftover ``<...>`` tokens optionally removed."""
    for token, word in (replacements or {}).items():
        prompt = prompt.replace(token, word)
    if drop_placeholders:
        prompt = _PLACEHOLDER.sub("", prompt)
    return " ".join(prompt.split())


def apply_mask(image, mask, mode: str = "crop", fill: tuple[int, int, int] = (0, 0, 0)):
    """Restrict a PIL image to a concept region. ``mask``: a PIL image or array (non-zero = inside), resized
    (nearest) to the image when the sizes differ. See the module docstring for ``mode``."""
    import numpy as np
    from PIL import Image

    if mode not in MASK_MODES:
        raise CustomizationError(f"unknown mask mode {mode!r}; modes: {', '.join(MASK_MODES)}")
    image = image.convert("RGB")
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, Image.Image):
        mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.NEAREST)
    inside = np.asarray(mask.convert("L")) > 0
    if not inside.any():
        raise CustomizationError("the concept mask is empty: nothing to score")
    pixels = np.asarray(image).copy()
    pixels[~inside] = fill
    result = Image.fromarray(pixels)
    if mode == "blank":
        return result
    rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(bottom - top, right - left)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    box = (int(round(cx - side / 2)), int(round(cy - side / 2)))
    square = Image.new("RGB", (side, side), tuple(fill))
    square.paste(result.crop((box[0], box[1], box[0] + side, box[1] + side)), (0, 0))
    # PIL fills the part of a crop outside the image with black; repaint it with the fill colour
    outside = np.ones((side, side), bool)
    y0, x0 = max(0, -box[1]), max(0, -box[0])
    y1, x1 = min(side, image.height - box[1]), min(side, image.width - box[0])
    outside[y0:y1, x0:x1] = False
    array = np.asarray(square).copy()
    array[outside] = fill
    return Image.fromarray(array)


# ------------------------------------------------------------------------------------------ weights


def _hub_file(repo: str, filenames: Sequence[str]) -> str | None:
    return hub_cached_file(repo, filenames)


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    return load_state_dict(path, CustomizationError)


@dataclass
class CustomizationConfig:
    """Backbones, weights and options of :class:`CustomizationScorer`.

    ``clip_weights``: a local open_clip / OpenAI checkpoint file, "openai" (looked up in the Hugging Face cache and
    ``~/.cache/clip``), or None for random weights. ``dino_weights``: a local file, "hub" (the Hugging Face cache's
    ``timm/<dino_model>`` or torch hub's ``dino_deitsmall16_pretrain.pth``), or None.
    """

    clip_model: str = "ViT-B-32"  # §4.4: OpenAI ViT-B/32 for CLIP-I and CLIP-T
    clip_weights: str | None = "openai"
    clip_quick_gelu: bool = True  # OpenAI's weights were trained with QuickGELU
    dino_model: str = "vit_small_patch16_224.dino"  # §4.4: DINO ViT-S/16
    dino_weights: str | None = "hub"
    metrics: tuple[str, ...] = METRICS
    mask_mode: str = "crop"
    mask_fill: tuple[int, int, int] = (0, 0, 0)
    text_replacements: dict[str, str] = field(default_factory=dict)
    drop_placeholders: bool = False
    device: str | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise CustomizationError(f"unknown customization metrics {unknown}; available: {', '.join(METRICS)}")
        if self.mask_mode not in MASK_MODES:
            raise CustomizationError(f"unknown mask mode {self.mask_mode!r}; modes: {', '.join(MASK_MODES)}")
        self.mask_fill = tuple(int(c) for c in self.mask_fill)


class CustomizationScorer:
    """CLIP-I / CLIP-T / DINO of generated images against reference images and prompts; backbones load on first use."""

    def __init__(self, config: CustomizationConfig | None = None) -> None:
        self.config = config or CustomizationConfig()
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._clip = self._dino = None
        self.weights_used: dict[str, str | None] = {}

    # -- backbones -------------------------------------------------------------------------------------------
    def _clip_source(self) -> str | None:
        import open_clip

        name, weights = self.config.clip_model, self.config.clip_weights
        if weights is None:
            return None
        if weights != "openai":
            if not os.path.isfile(weights):
                raise CustomizationError(f"CLIP weights file not found: {weights} (a local open_clip or OpenAI "
                                         f"checkpoint of {name})")
            return weights
        cfg = open_clip.get_pretrained_cfg(name, "openai") or {}
        repo = (cfg.get("hf_hub") or "").rstrip("/")
        found = _hub_file(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")) if repo else None
        url_file = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg.get("url") or ""))
        if found is None and cfg.get("url") and os.path.isfile(url_file):
            found = url_file
        if found is None:
            expected = f"{repo}/open_clip_model.safetensors in the Hugging Face hub cache {hub_cache_dir()}" \
                if repo else f"an OpenAI checkpoint of {name}"
            raise CustomizationError(
                f"CLIP weights for {name} (openai) not found: expected {expected}"
                + (f", or {url_file}" if cfg.get("url") else "")
                + "; pass a local checkpoint file as the CLIP weights (--clip-weights PATH)"
            )
        return found

    def clip(self):
        if self._clip is None:
            import open_clip

            source = self._clip_source()
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.config.clip_model, pretrained=source, force_quick_gelu=self.config.clip_quick_gelu,
            )
            self._clip = (model.eval().to(self.device), preprocess, open_clip.get_tokenizer(self.config.clip_model))
            self.weights_used["clip"] = source
        return self._clip

    def dino(self):
        if self._dino is None:
            name = self.config.dino_model
            # The torch.hub fallback is DINO's ViT-S/16, the customization papers' backbone.
            fallback = "dino_deitsmall16_pretrain.pth" if name.startswith("vit_small_patch16") else "-"
            model, path = timm_backbone(name, self.config.dino_weights, fallback, CustomizationError)
            self._dino = model.eval().to(self.device)
            self.weights_used["dino"] = path
        return self._dino

    # -- features --------------------------------------------------------------------------------------------
    def _batched(self, model_call, tensors: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for start in range(0, len(tensors), self.config.batch_size):
            batch = torch.stack(tensors[start:start + self.config.batch_size]).to(self.device)
            out.append(model_call(batch).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def clip_image_features(self, images: Sequence[Any]) -> torch.Tensor:
        model, preprocess, _ = self.clip()
        return self._batched(model.encode_image, [preprocess(image.convert("RGB")) for image in images])

    @torch.no_grad()
    def clip_text_features(self, texts: Sequence[str]) -> torch.Tensor:
        model, _, tokenizer = self.clip()
        return model.encode_text(tokenizer(list(texts)).to(self.device)).float().cpu()

    @torch.no_grad()
    def dino_features(self, images: Sequence[Any]) -> torch.Tensor:
        from torchvision import transforms as T

        transform = T.Compose([
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        return self._batched(self.dino(), [transform(image.convert("RGB")) for image in images])

    # -- scoring ---------------------------------------------------------------------------------------------
    def _masked(self, images, masks, what: str):
        if masks is None:
            return list(images)
        if len(masks) != len(images):
            raise CustomizationError(f"{len(masks)} {what} masks for {len(images)} {what} images")
        out = []
        for i, (image, mask) in enumerate(zip(images, masks)):
            if mask is None:
                out.append(image)
                continue
            try:
                out.append(apply_mask(image, mask, self.config.mask_mode, self.config.mask_fill))
            except CustomizationError as error:
                raise CustomizationError(f"{what} image {i}: {error}") from None
        return out

    def score(
        self,
        generated: Sequence[Any],
        references: Sequence[Any] | None = None,
        prompts: Sequence[str] | None = None,
        *,
        generated_masks: Sequence[Any] | None = None,
        reference_masks: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """Scores of PIL images. Returns ``{"metrics": {name: mean}, "per_image": [...], "counts": {...}}``.

        ``clip_i``/``dino`` need ``references``; ``clip_t`` needs one prompt per generated image. Masks (one per
        image, None for "whole image") restrict CLIP-I/DINO to a concept's region; CLIP-T always sees the whole
        generated image (the prompt describes the whole scene).
        """
        wanted = self.config.metrics
        if not generated:
            raise CustomizationError("no generated images to score")
        needs_refs = [m for m in ("clip_i", "dino") if m in wanted]
        if needs_refs and not references:
            raise CustomizationError(f"{', '.join(needs_refs)} need reference images")
        if "clip_t" in wanted and (prompts is None or len(prompts) != len(generated)):
            raise CustomizationError(f"clip_t needs one prompt per generated image ({len(generated)} images, "
                                     f"{0 if prompts is None else len(prompts)} prompts)")
        per_image: list[dict[str, Any]] = [{} for _ in generated]
        metrics: dict[str, float] = {}
        if needs_refs:
            gen_images = self._masked(generated, generated_masks, "generated")
            ref_images = self._masked(references, reference_masks, "reference")
            for name, features in (("clip_i", self.clip_image_features), ("dino", self.dino_features)):
                if name in wanted:
                    values = pairwise_mean_cosine(features(gen_images), features(ref_images))
                    metrics[name] = float(values.mean())
                    for record, value in zip(per_image, values.tolist()):
                        record[name] = value
        if "clip_t" in wanted:
            texts = [prepare_prompt(p, self.config.text_replacements, self.config.drop_placeholders) for p in prompts]
            values = paired_cosine(self.clip_image_features(list(generated)), self.clip_text_features(texts))
            metrics["clip_t"] = float(values.mean())
            for record, value, text in zip(per_image, values.tolist(), texts):
                record["clip_t"], record["text"] = value, text
        return {"metrics": metrics, "per_image": per_image,
                "counts": {"generated": len(generated), "references": len(references or [])}}

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.config), "weights_used": dict(self.weights_used)}
