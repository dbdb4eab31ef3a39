"""LVLM methods, one file each; importing this package fills the registry."""

from .base import METHODS, AttentionMethod, create_method, parse_method_spec, register_method
from .gift import GIFT, GIFTConfig
from .paint import PAINT, PAINTConfig
from .role_bias import RoleBias, RoleBiasConfig
from .transprune import TransPrune, TransPruneConfig, transprune_tflops
from .var import VAR, VARConfig
from .vhr import VHR, VHRConfig

__all__ = [
    "METHODS",
    "AttentionMethod",
    "create_method",
    "parse_method_spec",
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
