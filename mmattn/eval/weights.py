"""Local weight files for the evaluators' backbones (CLIP, DINO, RAFT): never downloaded, only found.

Weights come from an explicit path or from the Hugging Face hub cache; a missing file is reported with the name
and place expected by the caller.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch


def hub_cached_file(repo: str, filenames: Sequence[str]) -> str | None:
    """The first of ``filenames`` already in the hub cache for ``repo`` (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hub_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"


def load_state_dict(path: str, error: type[Exception]) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch checkpoint; common wrappers (``state_dict``, ``model``, ``teacher``)
    and prefixes (``module.``, ``backbone.``) are unwrapped. A missing file raises ``error``."""
    if not os.path.isfile(path):
        raise error(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def timm_backbone(name: str, weights: str | None, torch_hub_file: str, error: type[Exception], **create_kwargs):
    """A headless timm ViT (DINO features) with local weights: ``weights`` is a file path, "hub" (the timm repo in
    the hub cache, else facebookresearch/dino's ``torch_hub_file`` in torch.hub's checkpoints), or None (random,
    for tests). Returns (model, path used)."""
    import timm

    path = None
    if weights == "hub":
        repo = f"timm/{name}" if "." in name else None
        path = hub_cached_file(repo, ("model.safetensors", "pytorch_model.bin")) if repo else None
        fallback = os.path.join(torch.hub.get_dir(), "checkpoints", torch_hub_file)
        if path is None and os.path.isfile(fallback):
            path = fallback
        if path is None:
            raise error(
                f"DINO weights for {name} not found: expected {repo or 'timm/' + name}/model.safetensors in the Hugging "
                f"Face hub cache {hub_cache_dir()}, or {fallback} (facebookresearch/dino's {torch_hub_file}); "
                "pass a local checkpoint file as the DINO weights"
            )
    elif weights is not None:
        path = weights
    model = timm.create_model(name, pretrained=False, num_classes=0, **create_kwargs)
    if path is not None:
        state = {k: v for k, v in load_state_dict(path, error).items() if not k.startswith("head")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise error(f"{path} does not fit timm's {name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model, path
