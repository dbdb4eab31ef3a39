"""Pipeline glue: load a local Stable Diffusion directory, save/load what AttenCraft learns, generate with it.

What training produces (one directory, also inside every checkpoint):

* ``learned_embeds.safetensors``: ``{placeholder: embedding}`` (one new token per concept, float32);
* ``pytorch_custom_diffusion_weights.safetensors``: the cross-attention K/V copies under diffusers' Custom Diffusion
  keys (``<attn2 module>.processor.to_k_custom_diffusion.weight``), and ``pytorch_custom_diffusion_weights.bin``,
  the same plus the empty entries of the other attention layers, which stock ``unet.load_attn_procs(dir,
  weight_name="pytorch_custom_diffusion_weights.bin")`` needs (spec §3.6: inference needs no custom code);
* ``attencraft.json``: placeholders, initializer words, configuration, step, mask areas.

:func:`load_learned_concepts` puts them into any SD pipeline built from the same base model: it adds the
placeholders to the tokenizer, writes their rows into the text encoder's embedding matrix, and installs
``CustomDiffusionAttnProcessor2_0`` with the learned K/V on the cross-attention modules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .masks import AttenCraftError

__all__ = [
    "EMBEDS_FILE",
    "KV_FILE",
    "KV_FILE_BIN",
    "META_FILE",
    "load_stable_diffusion",
    "save_safetensors_atomic",
    "save_learned_concepts",
    "load_learned_concepts",
    "custom_diffusion_state_dict",
    "generate",
]

EMBEDS_FILE = "learned_embeds.safetensors"
KV_FILE = "pytorch_custom_diffusion_weights.safetensors"
KV_FILE_BIN = "pytorch_custom_diffusion_weights.bin"
META_FILE = "attencraft.json"
_MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_stable_diffusion(path: str | os.PathLike[str], torch_dtype: torch.dtype | None = None, device=None):
    """A ``StableDiffusionPipeline`` from a local diffusers directory; never downloads.

    Raises :class:`AttenCraftError` naming what is missing when ``path`` is not such a directory.
    """
    from diffusers import StableDiffusionPipeline

    root = Path(path).expanduser()
    if not root.is_dir():
        raise AttenCraftError(
            f"--model {path}: no such directory. AttenCraft needs a local diffusers Stable Diffusion directory "
            f"(model_index.json with {', '.join(_MODEL_PARTS)}), e.g. a saved stabilityai/stable-diffusion-2-1-base; "
            "weights are never downloaded"
        )
    missing = [p for p in ("model_index.json", *_MODEL_PARTS) if not (root / p).exists()]
    if missing:
        raise AttenCraftError(
            f"--model {path} is not a diffusers Stable Diffusion directory: missing {', '.join(missing)} "
            "(save one with StableDiffusionPipeline.save_pretrained)"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "safety_checker": None, "requires_safety_checker": False}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    pipe = StableDiffusionPipeline.from_pretrained(str(root), **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file via a temporary file in the same directory and ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def _torch_save_atomic(obj: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def custom_diffusion_state_dict(unet) -> dict[str, torch.Tensor]:
    """K/V copies of every Custom Diffusion processor, under diffusers' keys, looking through capture wrappers."""
    from diffusers.models.attention_processor import Attention

    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        processor = module.processor
        processor = getattr(processor, "inner", processor)
        if getattr(processor, "train_kv", False):
            state[f"{name}.processor.to_k_custom_diffusion.weight"] = processor.to_k_custom_diffusion.weight
            state[f"{name}.processor.to_v_custom_diffusion.weight"] = processor.to_v_custom_diffusion.weight
    return state


def save_learned_concepts(
    directory: str | os.PathLike[str],
    placeholders: Sequence[str],
    embeddings: torch.Tensor,
    unet=None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the learned tokens (and the K/V copies found in ``unet``) to ``directory``; see the module docstring."""
    from ...eval.io import write_text_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic({p: embeddings[i].float() for i, p in enumerate(placeholders)},
                            directory / EMBEDS_FILE, metadata={"format": "pt"})
    kv = custom_diffusion_state_dict(unet) if unet is not None else {}
    if kv:
        save_safetensors_atomic({k: v.float() for k, v in kv.items()}, directory / KV_FILE, metadata={"format": "pt"})
        # stock load_attn_procs(.bin) needs an (empty) entry for every attention processor
        full: dict[str, Any] = {k: v.detach().float().cpu() for k, v in kv.items()}
        for key in unet.attn_processors:
            if not any(k.startswith(key + ".") for k in kv):
                full[key] = {}
        _torch_save_atomic(full, directory / KV_FILE_BIN)
    meta = {"placeholders": list(placeholders), "kv_layers": len(kv) // 2, **(metadata or {})}
    write_text_atomic(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def load_learned_concepts(pipe, directory: str | os.PathLike[str]) -> list[str]:
    """Add the learned placeholders to ``pipe``'s tokenizer/text encoder and load the K/V copies; returns the tokens.

    The pipeline must come from the base model the concepts were trained on (same text encoder width and UNet).
    """
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
    from safetensors.torch import load_file

    directory = Path(directory)
    embeds_path = directory / EMBEDS_FILE
    if not embeds_path.is_file():
        raise AttenCraftError(f"{directory}: no {EMBEDS_FILE}; expected the output directory of 'mmattn attencraft train'"
                              " (or one of its checkpoints)")
    embeds = load_file(str(embeds_path))
    meta_path = directory / META_FILE
    order = json.loads(meta_path.read_text())["placeholders"] if meta_path.is_file() else sorted(embeds)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    table = text_encoder.get_input_embeddings()
    for token in order:
        vector = embeds[token]
        if vector.shape[-1] != table.weight.shape[1]:
            raise AttenCraftError(
                f"{token} has width {vector.shape[-1]} but this text encoder's embeddings have {table.weight.shape[1]}:"
                " load the concepts into a pipeline of the base model they were trained on"
            )
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([token])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for token in order:
            table.weight[tokenizer.convert_tokens_to_ids(token)] = embeds[token].to(table.weight)
    kv_path = directory / KV_FILE
    if kv_path.is_file():
        kv = load_file(str(kv_path))
        modules = dict(pipe.unet.named_modules())
        for key in [k for k in kv if k.endswith(".processor.to_k_custom_diffusion.weight")]:
            name = key[: -len(".processor.to_k_custom_diffusion.weight")]
            if name not in modules:
                raise AttenCraftError(f"{kv_path}: {name} is not an attention module of this UNet (another base model?)")
            attn, k_weight = modules[name], kv[key]
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=k_weight.shape[0], cross_attention_dim=k_weight.shape[1]
            )
            processor.load_state_dict({"to_k_custom_diffusion.weight": k_weight,
                                       "to_v_custom_diffusion.weight": kv[f"{name}.processor.to_v_custom_diffusion.weight"]})
            attn.set_processor(processor.to(pipe.unet.device, pipe.unet.dtype))
    return list(order)


def generate(pipe, prompts: Sequence[str], *, num_images: int = 10, steps: int = 50, guidance: float = 7.5,
             seeds: Sequence[int] = (42,), **kwargs):
    """Images per (prompt, seed), as the reference's ``inference.py`` (50 steps, CFG 7.5, 10 images per prompt and
    seed, seed list [42]). Yields ``(prompt, seed, index, PIL image)``."""
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                          num_images_per_prompt=num_images, generator=generator, **kwargs).images
            for index, image in enumerate(images):
                yield prompt, seed, index, image
