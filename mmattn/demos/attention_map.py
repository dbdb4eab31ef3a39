"""Where an LVLM's answer looks in the image: per-patch attention mass of the generated tokens, as a heatmap.

:class:`ImageAttentionRecorder` is an ordinary :class:`~mmattn.AttentionMethod` that edits nothing: it asks each
attention call for ``AttentionStats.key_mass`` (the attention of chosen query rows summed per key) over the rows
that *produce* generated tokens (the last prompt row at prefill, then every decode row) and accumulates it per
layer. Patched next to other methods, it therefore sees the attention *after* their edits; patched alone, the
model's own attention. It is deliberately not in the global registry (``mmattn.METHODS``): it is a demo
instrument, not a method users should select with ``--method``.

The rest turns that mass into a picture: the image-patch entries are reshaped to the vision tower's patch grid
and overlaid on the part of the image the model actually sees (after its processor's resize and center crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..edits import AttentionEdit
from ..layout import Role
from ..lvlm.methods.base import AttentionMethod

__all__ = [
    "ImageAttentionRecorder",
    "patch_grid_side",
    "image_patch_grid",
    "kept_patch_grid",
    "model_view",
    "render_heatmap",
    "HEATMAP_SIZE",
]

HEATMAP_SIZE = 384  # longer side of a rendered heatmap, in pixels: world images are 64 px, too small to read


@dataclass
class ImageAttentionRecorderConfig:
    """No options: the recorder always records every layer, head-averaged."""


class ImageAttentionRecorder(AttentionMethod):
    """Accumulates, per decoder layer, the head-averaged attention mass that generated tokens put on each prompt key.

    After a ``generate()`` call, :meth:`prompt_mass` is ``[layers, batch, prompt_len]``: the mean over generated
    tokens of their attention on each prompt position (a row sums to at most 1; the rest went to earlier
    generated tokens). Only the request's own branch is recorded (auxiliary image-free branches of VHR / PAINT
    are not the answer's attention).
    """

    name = "demo_image_attention"
    Config = ImageAttentionRecorderConfig

    def begin_request(self, context) -> None:
        layout = context.layout
        self.roles = layout.roles.detach().cpu() if layout is not None else None
        self._sums: dict[int, torch.Tensor] = {}
        self._rows: dict[int, int] = {}
        self._kept: dict[int, torch.Tensor] = {}  # layer -> bool [B, P], only for layers that see a pruned prompt

    def edit(self, context, call):
        if call.branch != "image" or context.layout is None or self.roles is None:
            return None
        if call.is_prefill:
            # The row that predicts the first generated token: the last real prompt token of each sample (in
            # this layer's sequence, which token pruning may have shortened).
            layout = context.layout_at(call.layer_idx)
            rows = torch.zeros(call.batch_size, call.q_len, dtype=torch.bool, device=call.device)
            last = layout.last_prompt_position.to(call.device) - (call.kv_len - call.q_len)
            rows[torch.arange(call.batch_size, device=call.device), last] = True
        else:
            rows = torch.ones(call.batch_size, call.q_len, dtype=torch.bool, device=call.device)
        return AttentionEdit(key_mass_rows=rows)

    def observe(self, context, call, stats) -> None:
        if stats.key_mass is None or self.roles is None:
            return
        batch, prompt_length = self.roles.shape
        mass = stats.key_mass.float().mean(dim=1).cpu()  # [B, Nk], heads averaged
        layer = call.layer_idx
        index = context.sequence_maps.get(layer)
        if index is None:
            prompt = mass[:, :prompt_length]
        else:
            # A pruned layer's keys are the kept prompt positions (``index``, -1 for padding), then generated
            # tokens: scatter their mass back to prompt positions; pruned positions get none.
            index = index.cpu()
            valid = index >= 0
            prompt = torch.zeros(batch, prompt_length)
            prompt.scatter_add_(1, index.clamp_min(0), torch.where(valid, mass[:, : index.shape[1]], 0.0))
            if call.is_prefill:
                kept = torch.zeros(batch, prompt_length, dtype=torch.bool)
                kept.scatter_(1, index.clamp_min(0), valid)
                self._kept[layer] = kept
        self._sums[layer] = self._sums[layer] + prompt if layer in self._sums else prompt
        self._rows[layer] = self._rows.get(layer, 0) + (1 if call.is_prefill else call.q_len)

    def kept_positions(self) -> torch.Tensor | None:
        """bool ``[batch, prompt_len]``: prompt tokens still present in the deepest layer (token pruning, e.g.
        TransPrune); None when no layer saw a pruned prompt."""
        if not getattr(self, "_kept", None):
            return None
        return self._kept[max(self._kept)]

    @property
    def num_generated_rows(self) -> int:
        """How many generated-token rows were recorded (per layer); 0 before any generation."""
        return max(self._rows.values(), default=0) if hasattr(self, "_rows") else 0

    def prompt_mass(self) -> torch.Tensor:
        """``[layers, batch, prompt_len]``: mean attention per generated token on each prompt key."""
        if not getattr(self, "_sums", None):
            raise RuntimeError("ImageAttentionRecorder has recorded nothing: run a generation while it is patched in")
        layers = sorted(self._sums)
        return torch.stack([self._sums[layer] / self._rows[layer] for layer in layers])


def patch_grid_side(model_config) -> int:
    """Patches per side of the vision tower's (base) view: LLaVA's image tokens are this grid, row-major."""
    vision = model_config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


def _image_patch_positions(recorder: ImageAttentionRecorder, side: int, sample: int) -> torch.Tensor:
    """Prompt positions of the base view's ``side x side`` patch tokens of the first image, row-major.

    LLaVA's image span is ``side**2`` patch features (plus a leading CLS feature with the ``"full"`` selection
    strategy); LLaVA-NeXT's starts with the base view's ``side**2`` features followed by the anyres crops.
    """
    positions = (recorder.roles[sample] == Role.IMAGE).nonzero().flatten()
    count = side * side
    if positions.numel() == count + 1:  # "full" strategy: CLS feature first
        positions = positions[1:]
    if positions.numel() < count:
        raise ValueError(f"the prompt has {positions.numel()} image tokens, fewer than the {side}x{side} patch grid")
    return positions[:count]


def image_patch_grid(recorder: ImageAttentionRecorder, side: int, sample: int = 0) -> np.ndarray:
    """Layer-averaged attention mass of the answer on each image patch of ``sample``, as a ``[side, side]`` array."""
    mass = recorder.prompt_mass().mean(dim=0)[sample]  # [P]
    return mass[_image_patch_positions(recorder, side, sample)].reshape(side, side).numpy()


def kept_patch_grid(recorder: ImageAttentionRecorder, side: int, sample: int = 0) -> np.ndarray | None:
    """bool ``[side, side]``: patches still present in the deepest layer; None when nothing was pruned."""
    kept = recorder.kept_positions()
    if kept is None:
        return None
    return kept[sample][_image_patch_positions(recorder, side, sample)].reshape(side, side).numpy()


def _size_field(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def model_view(image: Image.Image, image_processor) -> Image.Image:
    """The part of ``image`` the vision tower sees: CLIP-style processors resize the shortest edge and center crop.

    Processors that resize to a fixed height/width without cropping see the whole image.
    """
    width, height = image.size
    shortest = _size_field(getattr(image_processor, "size", None), "shortest_edge")
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    crop_height, crop_width = _size_field(crop, "height"), _size_field(crop, "width")
    if not (shortest and crop_height and crop_width):
        return image
    scale = shortest / min(width, height)
    view_width, view_height = min(width, crop_width / scale), min(height, crop_height / scale)
    left, top = (width - view_width) / 2, (height - view_height) / 2
    return image.crop((round(left), round(top), round(left + view_width), round(top + view_height)))


# A perceptually ordered black -> purple -> orange -> pale yellow ramp (matplotlib's "inferno", without
# matplotlib): more attention is brighter, which reads correctly when blended over a photo.
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]],
    dtype=np.float64,
)
_DROPPED = np.array([40, 40, 40], dtype=np.float64)  # colour of patches removed by token pruning


def _colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB along :data:`_RAMP` (linear interpolation between its stops)."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return _RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction


def render_heatmap(view: Image.Image, grid: np.ndarray, vmax: float, size: int = HEATMAP_SIZE,
                   opacity: float = 0.55, kept: np.ndarray | None = None, gamma: float = 0.5) -> Image.Image:
    """Overlay ``grid`` (patch masses, row-major over ``view``) on ``view``, scaled so its longer side is ``size``.

    Colours are ``(grid / vmax) ** gamma`` so that two heatmaps rendered with the same ``vmax`` are comparable.
    The default square root keeps the other patches readable next to a visual sink (one patch holding many times
    the mass of the rest, typical of LLaVA). Patches are drawn as blocks (nearest neighbour) because the model
    attends to whole patches, not to pixels. With ``kept`` (a bool grid from token pruning), dropped patches are
    drawn dark grey instead of coloured.
    """
    width, height = view.size
    scale = size / max(width, height)
    out_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = np.asarray(view.convert("RGB").resize(out_size, Image.Resampling.BICUBIC), dtype=np.float64)
    grid = np.clip(np.asarray(grid, dtype=np.float64), 0.0, None)
    normalised = (grid / vmax) ** gamma if vmax > 0 else np.zeros_like(grid)
    colours = _colours(normalised)
    if kept is not None:
        colours = np.where(np.asarray(kept, dtype=bool)[..., None], colours, _DROPPED)
    colour_image = Image.fromarray(colours.round().astype(np.uint8))
    overlay = np.asarray(colour_image.resize(out_size, Image.Resampling.NEAREST), dtype=np.float64)
    blended = (1 - opacity) * base + opacity * overlay
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
