"""LVLM methods, one file each; importing this package fills the registry."""

from .base import METHODS, AttentionMethod, create_method, parse_method_spec, register_method
from .role_bias import RoleBias, RoleBiasConfig
from .var import VAR, VARConfig

__all__ = [
    "METHODS",
    "AttentionMethod",
    "create_method",
    "parse_method_spec",
    "register_method",
    "RoleBias",
    "RoleBiasConfig",
    "VAR",
    "VARConfig",
]
