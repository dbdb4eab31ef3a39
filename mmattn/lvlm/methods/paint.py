"""PAINT ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model",
arXiv 2501.12206, v3), as its released code (``modPAI``) implements it.

1. From the CLIP vision tower, per image: *local* tokens = the top ``local_ratio`` patches by the CLS-row
   attention of the first ViT layer (heads summed); *summary* tokens = IQR outliers (> Q3 + 1.5 IQR) of the
   CLS-row attention of the layer whose output LLaVA uses; local <- local minus summary.
2. In LLM layers ``first_layer`` .. L-1, on the last query row only (the last prompt row, then every decode
   row), pre-softmax logits become ``z + alpha*|z|`` on local keys and ``z + beta*|z|`` on summary keys: a
   per-(head, group) ``|z|`` gain in the edit contract.
3. Optionally PAI's image-free classifier-free guidance with ``cfg_gamma`` (all published CHAIR runs: 1.1).

Differences from the released code (spec ``methods-gift-vhr-paint.md`` §4): token sets are computed per image
(the code uses batch element 0 for the whole batch); several images and LLaVA-NeXT crops are supported, with each
crop's sets mapped through LLaVA-NeXT's unpadding and newline layout (not in the reference); the CLS rows are
recomputed from the vision layer's own q/k projections instead of running CLIP eagerly; the degenerate "spatial"
stream (off by default in the code) is not implemented; with guidance on, the released code leaves the first
generated token unmodified (a quirk inherited from PAI) — set ``reference_first_token_quirk=True`` to reproduce
it. The v1 paper's "head-specific modulation" has no public definition and is not claimed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...edits import AttentionEdit
from ..guidance import ImageFreeGuidance
from .base import AttentionMethod, register_method

NONE, LOCAL, SUMMARY = 0, 1, 2


@dataclass
class PAINTConfig:
    alpha: float = 0.7  # |z| gain on local tokens (code default `--alpha`)
    beta: float = 0.3  # |z| gain on summary tokens (code default `--beta`)
    local_ratio: float = 0.25  # fraction of patches that are local (code default of `update_modpai_alpha`)
    first_layer: int = 2  # `--start-layer 2 --end-layer 32`: layers 2 .. L-1
    last_layer: int | None = None  # inclusive; None = the model's last layer
    cfg_gamma: float = 1.1  # PAI image-free guidance; 1.0 switches it off
    cfg_cutoff: float = 0.1  # PAI's plausibility cutoff
    reference_first_token_quirk: bool = False  # with guidance, skip the edit until the 2nd generated token

    def __post_init__(self) -> None:
        if not 0.0 < self.local_ratio <= 1.0:
            raise ValueError(f"PAINT local_ratio must lie in (0, 1], got {self.local_ratio}")
        if self.cfg_gamma < 1.0:
            raise ValueError(f"PAINT cfg_gamma must be >= 1 (1 switches the guidance off), got {self.cfg_gamma}")
        if not 0.0 < self.cfg_cutoff <= 1.0:
            raise ValueError(f"PAINT cfg_cutoff must lie in (0, 1], got {self.cfg_cutoff}")


def cls_attention_row(attention_module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-summed attention of the CLS token (position 0) over all positions, [images, tokens]."""
    num_heads = attention_module.num_heads
    head_dim = attention_module.head_dim
    q = attention_module.q_proj(hidden[:, :1]).view(hidden.shape[0], 1, num_heads, head_dim).transpose(1, 2)
    k = attention_module.k_proj(hidden).view(hidden.shape[0], -1, num_heads, head_dim).transpose(1, 2)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attention_module.scale, dim=-1)
    return probs.sum(dim=1)[:, 0]


def token_sets(first_layer_cls: torch.Tensor, feature_layer_cls: torch.Tensor, local_ratio: float) -> torch.Tensor:
    """Per crop, the class (NONE / LOCAL / SUMMARY) of each patch; inputs exclude the CLS column."""
    num_patches = first_layer_cls.shape[-1]
    classes = torch.full(first_layer_cls.shape, NONE, dtype=torch.long, device=first_layer_cls.device)
    top = first_layer_cls.topk(int(num_patches * local_ratio), dim=-1).indices
    classes.scatter_(1, top, LOCAL)
    q1, q3 = torch.quantile(feature_layer_cls.float(), torch.tensor([0.25, 0.75], device=feature_layer_cls.device), dim=-1)
    summary = feature_layer_cls > (q3 + 1.5 * (q3 - q1))[:, None]
    classes[summary] = SUMMARY  # local minus summary: summary wins
    return classes


@register_method
class PAINT(AttentionMethod):
    name = "paint"
    Config = PAINTConfig

    def attach(self, context) -> None:
        model = context.model
        vision = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
        layers = vision.vision_model.encoder.layers if hasattr(vision, "vision_model") else vision.encoder.layers
        feature_layer = model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError("PAINT needs a single vision_feature_layer (got a list); supported: LLaVA-1.5/NeXT configs")
        feature_index = feature_layer - 1 if feature_layer > 0 else len(layers) + feature_layer
        self._cls_rows: dict[str, list[torch.Tensor]] = {"first": [], "feature": []}
        self._hooks = []
        for key, index in (("first", 0), ("feature", feature_index)):
            attn = layers[index].self_attn
            self._hooks.append(attn.register_forward_pre_hook(self._make_capture(context, key), with_kwargs=True))
        self._guidance = None
        if self.config.cfg_gamma != 1.0:
            if not type(model).__name__.endswith("ForConditionalGeneration"):
                raise ValueError("PAINT's image-free guidance needs a *ForConditionalGeneration model (it edits logits); "
                                 "set cfg_gamma=1.0 to patch a bare LlavaModel")
            self._guidance = ImageFreeGuidance(context, self.config.cfg_gamma, self.config.cfg_cutoff)

    def detach(self, context) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._guidance is not None:
            self._guidance.remove()

    def _make_capture(self, context, key: str):
        def hook(module, args, kwargs):
            if context.bypass:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                self._cls_rows[key].append(cls_attention_row(module, hidden)[:, 1:])  # drop the CLS column
            return None

        return hook

    def begin_request(self, context) -> None:
        # The vision tower may run before this (generate() can encode images ahead of the forward) or after it
        # (a plain forward): the token sets are built at the first language-model attention call instead.
        self.key_classes = None
        self._sets_pending = True

    def _build_key_classes(self, context) -> None:
        self._sets_pending = False
        first = torch.cat(self._cls_rows["first"]) if self._cls_rows["first"] else None
        feature = torch.cat(self._cls_rows["feature"]) if self._cls_rows["feature"] else None
        self._cls_rows = {"first": [], "feature": []}
        layout = context.layout
        if layout is None or not bool(layout.image.any()):
            return
        needed = self._num_crops(context)
        if first is None or first.shape[0] < needed:
            raise RuntimeError(
                f"PAINT needs the CLIP attention of {needed} image crops but saw {0 if first is None else first.shape[0]}: "
                "pass pixel_values (not precomputed image features)"
            )
        # The most recent vision passes belong to this request.
        crop_classes = token_sets(first[-needed:], feature[-needed:], self.config.local_ratio).cpu()
        classes = torch.full_like(layout.roles, NONE).cpu()
        image_index = layout.image_index.cpu()
        crop = 0
        for b in range(layout.batch_size):
            for image in range(int(image_index[b].max()) + 1):
                span = (image_index[b] == image).nonzero().flatten()
                if context.image_geometry is None:
                    if crop_classes.shape[1] != span.numel():
                        raise RuntimeError(f"PAINT: {span.numel()} image tokens but {crop_classes.shape[1]} CLIP patches")
                    classes[b, span] = crop_classes[crop]
                    crop += 1
                    continue
                geometry = context.image_geometry[b][image]
                for offsets in geometry.crop_patch_offsets():
                    keep = offsets >= 0
                    classes[b, span[offsets[keep]]] = crop_classes[crop][: offsets.numel()][keep]
                    crop += 1
        self.key_classes = classes.to(layout.roles.device)

    @staticmethod
    def _num_crops(context) -> int:
        if context.image_geometry is None:
            if context.model_kind == "llava_next":
                raise RuntimeError("PAINT on LLaVA-NeXT needs image_sizes (or generate()'s encoded image features)")
            return int((context.layout.image_index.amax(dim=1) + 1).sum())
        return sum(g.num_crops for sample in context.image_geometry for g in sample)

    def edit(self, context, call):
        cfg = self.config
        if getattr(self, "_sets_pending", False) and call.is_prefill:
            self._build_key_classes(context)
        last = call.num_layers - 1 if cfg.last_layer is None else cfg.last_layer
        if not cfg.first_layer <= call.layer_idx <= last or getattr(self, "key_classes", None) is None:
            return None
        if cfg.reference_first_token_quirk and self._guidance is not None and call.step == 0:
            return None
        classes = context.at_layer(self.key_classes.to(call.device), call.layer_idx, NONE)
        if call.kv_len > classes.shape[1]:
            classes = torch.cat([classes, classes.new_full((classes.shape[0], call.kv_len - classes.shape[1]), NONE)], 1)
        gain = torch.zeros(call.batch_size, call.num_heads, 3, device=call.device)
        gain[:, :, LOCAL] = cfg.alpha
        gain[:, :, SUMMARY] = cfg.beta
        return AttentionEdit(
            key_groups=classes[:, : call.kv_len],
            num_groups=3,
            group_gain=gain,
            row_start=context.layout_at(call.layer_idx).last_prompt_position.to(call.device),
        )

