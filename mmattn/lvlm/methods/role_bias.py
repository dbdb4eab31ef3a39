"""RoleBias: a fixed logit bias per token role (image, system, instruction, generated).

Not a paper method: the smallest real edit, used to test the patching machinery end to end, and a handy
knob ("how much does the answer change if every head looks more at the image?").
"""

from __future__ import annotations

from dataclasses import dataclass

from ...edits import AttentionEdit
from ...layout import Role
from .base import AttentionMethod, group_table, register_method


@dataclass
class RoleBiasConfig:
    image: float = 0.0  # added to the logits of image keys (newline tokens included)
    system: float = 0.0
    instruction: float = 0.0
    generated: float = 0.0
    layers: tuple[int, ...] | None = None  # decoder layer indices (None: every layer)


@register_method
class RoleBias(AttentionMethod):
    name = "role_bias"
    Config = RoleBiasConfig

    def edit(self, context, call):
        cfg = self.config
        if cfg.layers is not None and call.layer_idx not in cfg.layers:
            return None
        values = {Role.IMAGE: cfg.image, Role.IMAGE_NEWLINE: cfg.image, Role.SYSTEM: cfg.system,
                  Role.INSTRUCTION: cfg.instruction, Role.GENERATED: cfg.generated}
        if not any(values.values()):
            return None
        return AttentionEdit(
            key_groups=call.roles,
            num_groups=Role.COUNT,
            group_bias=group_table(values, Role.COUNT, call.batch_size, call.num_heads, call.device),
        )
