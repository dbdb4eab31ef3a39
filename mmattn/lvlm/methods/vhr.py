"""VHR: Vision-aware Head Reinforcement ("Cross-Modal Hallucination Mitigation via Vision-aware Head Divergence",
He et al., ACL 2025).

At the first generation step, for every reinforced layer, VHR compares each head's output at the last prompt
position with and without the image (the *vision-aware head divergence*, VHD), zeroes the VHD of heads whose
text-only output surges (outliers in both VHD and text-only norm), and multiplies the outputs of heads with VHD
above the layer median by ``alpha``. The heads are fixed after prefill and scaled at every position afterwards.

The image-free branch runs in lock-step with the real prefill, layer by layer, so that each layer's VHD sees the
already-reinforced earlier layers (paper §3): at every layer of the prefill, the attention call of the image
branch runs the same decoder layer on the text-only hidden states (the prompts with their image tokens removed,
left-padded, no KV cache), then decides that layer's heads. It compiles to the edit contract's ``head_scale``
(applied to all rows).

Choices the paper leaves open (spec ``methods-gift-vhr-paint.md`` §3.6), as options: ``squared_distance``
(default False: the paper's L2), ``outlier_rule`` ("and", the spec's reading of Eq. 6, or "or"),
``scale_text_branch`` (default True), the population standard deviation for mu + sigma, and the lower median of
``torch.median``. The official code was not available to check these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...edits import AttentionEdit
from .base import AttentionMethod, register_method


@dataclass
class VHRConfig:
    alpha: float = 2.0  # head output scale (paper §4.4: 2 for LLaVA-1.5, LLaVA-NeXT, InstructBLIP)
    layers: tuple[int, ...] | None = None  # None: layer 1 and the last 14 (paper: "second and last 14 layers")
    last_layers: int = 14
    include_second_layer: bool = True
    squared_distance: bool = False
    outlier_rule: str = "and"  # Eq. 6: zero VHD when VHD and text-only norm are both outliers ("and") or either
    use_outlier_rule: bool = True  # False reproduces the paper's "outlier VHR" ablation
    scale_text_branch: bool = True

    def __post_init__(self) -> None:
        if self.outlier_rule not in ("and", "or"):
            raise ValueError(f"VHR outlier_rule must be 'and' or 'or', got {self.outlier_rule!r}")
        if self.alpha <= 0:
            raise ValueError(f"VHR alpha must be positive, got {self.alpha}")

    def layer_set(self, num_layers: int) -> set[int]:
        if self.layers is not None:
            return set(self.layers)
        chosen = set(range(max(0, num_layers - self.last_layers), num_layers))
        if self.include_second_layer and num_layers > 1:
            chosen.add(1)
        return chosen


def head_divergence_scale(image_heads: torch.Tensor, text_heads: torch.Tensor, cfg: VHRConfig) -> torch.Tensor:
    """Per-(sample, head) scale from head outputs at the last prompt position ([B, H, D] each)."""
    diff = (image_heads.float() - text_heads.float()).pow(2).sum(-1)
    vhd = diff if cfg.squared_distance else diff.sqrt()
    if cfg.use_outlier_rule:
        text_norm = text_heads.float().pow(2).sum(-1)

        def outlier(x: torch.Tensor) -> torch.Tensor:
            return x > x.mean(-1, keepdim=True) + x.std(-1, unbiased=False, keepdim=True)

        surge = outlier(vhd) & outlier(text_norm) if cfg.outlier_rule == "and" else outlier(vhd) | outlier(text_norm)
        vhd = torch.where(surge, torch.zeros_like(vhd), vhd)
    selected = vhd > vhd.median(dim=-1, keepdim=True).values
    return torch.where(selected, torch.full_like(vhd, cfg.alpha), torch.ones_like(vhd))


@register_method
class VHR(AttentionMethod):
    name = "vhr"
    Config = VHRConfig

    def attach(self, context) -> None:
        self._layers = self.config.layer_set(context.num_layers)
        bad = sorted(layer for layer in self._layers if not 0 <= layer < context.num_layers)
        if bad:
            raise ValueError(f"VHR layers {bad} do not exist; the text model has {context.num_layers} layers")
        self._decoder_layers = list(context.language_model.layers)
        self._language_model = context.language_model

    def begin_request(self, context) -> None:
        self.head_scales: dict[int, torch.Tensor] = {}
        self._text = None  # the image-free branch's running state during prefill

    # -- the image-free branch --------------------------------------------------------------------------------
    def _start_text_branch(self, context, device) -> None:
        layout = context.layout
        ids = context.prompt_ids.to(device)
        keep = (layout.valid & ~layout.image).to(device)
        rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
        width = max(int(r.numel()) for r in rows)
        text_ids = torch.zeros(len(rows), width, dtype=ids.dtype, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            text_ids[b, width - row.numel():] = row
            mask[b, width - row.numel():] = True
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden = self._language_model.embed_tokens(text_ids)
        rope = self._language_model.rotary_emb(hidden, position_ids=positions)
        self._text = {"hidden": hidden, "mask": mask, "positions": positions, "rope": rope, "heads": None}

    def _advance_text_branch(self, context, layer_idx: int) -> None:
        """Run decoder layer ``layer_idx`` on the text-only hidden states (re-enters the attention function)."""
        text = self._text
        context.branch, context.branch_owner = "text", self
        try:
            text["hidden"] = self._decoder_layers[layer_idx](
                text["hidden"], attention_mask=text["mask"], position_ids=text["positions"],
                position_embeddings=text["rope"], use_cache=False,
            )
        finally:
            context.branch, context.branch_owner = "image", None

    # -- edits -----------------------------------------------------------------------------------------------
    def edit(self, context, call):
        layer = call.layer_idx
        if context.branch == "text":
            return self._edit_text_branch(context, call)
        if call.is_prefill:
            if context.layout is None or context.prompt_ids is None:
                raise RuntimeError("VHR needs the prompt's input_ids at prefill (to build the image-free branch)")
            if layer == 0:
                self._start_text_branch(context, call.device)
            if layer in self._layers:
                self.head_scales[layer] = None
                last = context.layout_at(layer).last_prompt_position.to(call.device)
                self._image_heads = call.attend_rows(last)[0]
            self._advance_text_branch(context, layer)  # decides self.head_scales[layer] on the way
        scale = self.head_scales.get(layer)
        if scale is None:
            return None
        return AttentionEdit(head_scale=scale)

    def _edit_text_branch(self, context, call):
        layer = call.layer_idx
        if layer not in self._layers:
            return None
        last = torch.full((call.batch_size,), call.kv_len - 1, device=call.device)  # left-padded
        text_heads = call.attend_rows(last)[0]
        self.head_scales[layer] = head_divergence_scale(self._image_heads, text_heads, self.config)
        return AttentionEdit(head_scale=self.head_scales[layer]) if self.config.scale_text_branch else None
