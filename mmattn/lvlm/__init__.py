"""transformers integration for LLaVA-family models."""

from .graphs import PrefillLayerGraphs
from .methods import METHODS, AttentionMethod, create_method, parse_method_spec, register_method
from .patch import ATTENTION_NAME, SUPPORTED_MODELS, AttentionCall, PatchContext, PatchHandle, patch, register

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_MODELS",
    "AttentionCall",
    "PatchContext",
    "PatchHandle",
    "patch",
    "register",
    "METHODS",
    "AttentionMethod",
    "PrefillLayerGraphs",
    "create_method",
    "parse_method_spec",
    "register_method",
]
