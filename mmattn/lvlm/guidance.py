"""Image-free classifier-free guidance (PAI's CFG), usable by any method.

A second, unconditional stream runs the same prompts without their images, with its own KV cache and with every
attention edit off. The final next-token scores are
``gamma * log p_img - (gamma - 1) * log p_noimg``, and tokens whose ``log p_img`` is below
``max log p_img + log(cutoff)`` get ``-inf`` (PAI's adaptive plausibility constraint).

Implemented as a forward hook on the multimodal model that rewrites the last position's logits, so it works
with ``generate()`` (greedy or sampling) and with plain forwards alike.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ImageFreeGuidance"]


class ImageFreeGuidance:
    def __init__(self, context, gamma: float, cutoff: float = 0.1) -> None:
        if gamma < 1.0:
            raise ValueError(f"guidance gamma must be >= 1 (1 disables it), got {gamma}")
        if not 0.0 < cutoff <= 1.0:
            raise ValueError(f"plausibility cutoff must lie in (0, 1], got {cutoff}")
        self.context = context
        self.gamma = gamma
        self.log_cutoff = math.log(cutoff)
        self._cache = None
        self._mask = None
        self._hook = context.model.register_forward_hook(self._after_forward, with_kwargs=True)

    def remove(self) -> None:
        self._hook.remove()
        self._cache = self._mask = None

    def _unconditional_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts with every image token (and newline token) removed, left-padded again."""
        layout = self.context.layout
        ids = self.context.prompt_ids
        keep = layout.valid & ~layout.image
        rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
        width = max(int(r.numel()) for r in rows)
        pad = self.context.model.generation_config.pad_token_id or 0
        out = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
        mask = torch.zeros_like(out)
        for b, row in enumerate(rows):
            out[b, width - row.numel():] = row
            mask[b, width - row.numel():] = 1
        return out, mask

    @torch.no_grad()
    def _after_forward(self, module, args, kwargs, output):
        context = self.context
        if context.bypass or context.layout is None or self.gamma == 1.0:
            return None
        model = context.model
        context.bypass = True
        try:
            if context.step == 0:
                ids, mask = self._unconditional_prompt()
                positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() derives them
                result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
                self._mask = mask
            else:
                new_ids = kwargs.get("input_ids")
                if new_ids is None:
                    new_ids = args[0]
                new_ids = new_ids[:, -1:]
                self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
                positions = self._mask.long().cumsum(-1)[:, -1:] - 1
                result = model(input_ids=new_ids, attention_mask=self._mask, cache=self._cache, use_cache=True,
                               position_ids=positions)
            self._cache = result.cache if hasattr(result, "cache") else result.past_key_values
        finally:
            context.bypass = False
        conditional = output.logits[:, -1].float().log_softmax(-1)
        unconditional = result.logits[:, -1].float().log_softmax(-1)
        guided = self.gamma * conditional - (self.gamma - 1.0) * unconditional
        implausible = conditional < conditional.amax(-1, keepdim=True) + self.log_cutoff
        guided = guided.masked_fill(implausible, float("-inf"))
        output.logits[:, -1] = guided.to(output.logits.dtype)
        return output

