"""mmattn: training-free attention interventions for LVLMs (transformers) and video/image diffusion (diffusers).

    import mmattn
    with mmattn.patch(model, mmattn.RoleBias(image=0.5)):
        out = model.generate(**inputs)
"""

__version__ = "0.1.0"

from .edits import AttentionEdit, AttentionStats, MassTransfer, combine_edits
from .layout import Role, TokenLayout
from .lvlm import METHODS, AttentionMethod, PatchHandle, create_method, parse_method_spec, patch, register_method
from .lvlm.methods import GIFT, PAINT, VAR, VHR, GIFTConfig, PAINTConfig, RoleBias, RoleBiasConfig, TransPrune, TransPruneConfig, VARConfig, VHRConfig, transprune_tflops

__all__ = [
    "__version__",
    "AttentionEdit",
    "AttentionStats",
    "MassTransfer",
    "combine_edits",
    "Role",
    "TokenLayout",
    "METHODS",
    "AttentionMethod",
    "PatchHandle",
    "create_method",
    "parse_method_spec",
    "patch",
    "register_method",
    "GIFT",
    "GIFTConfig",
    "PAINT",
    "PAINTConfig",
    "RoleBias",
    "RoleBiasConfig",
    "TransPrune",
    "TransPruneConfig",
    "transprune_tflops",
    "VAR",
    "VARConfig",
    "VHR",
    "VHRConfig",
]
