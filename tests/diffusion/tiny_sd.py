"""A tiny config-built Stable Diffusion pipeline for the AttenCraft tests (random weights, no downloads).

The UNet keeps SD's four-stage topology (three cross-attention stages, one plain) at toy widths. With a 32x32 image
and a two-block VAE (scale factor 2) the latent is 16x16, so the resolution levels AttenCraft reads are:
level 1 = 8x8 self-attention (``down_blocks.1``, ``up_blocks.2``), level 2 = 4x4 cross-attention
(``down_blocks.2``, ``up_blocks.1``) -- the same layers as SD2.1-base's 32x32 / 16x16 at 512².
The tokenizer is a real ``CLIPTokenizer`` over a BPE vocabulary written to ``directory`` (every word of
:data:`WORDS` is one token).
"""

from __future__ import annotations

import json
import os

import torch

WORDS = "a photo of and cat dog at the beach in on red blue toy vase".split()
IMAGE_SIZE = 32


def write_clip_vocab(directory: str, words=WORDS) -> str:
    """vocab.json + merges.txt of a byte-pair vocabulary in which each word merges into one ``word</w>`` token."""
    os.makedirs(directory, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add("<|startoftext|>")
    add("<|endoftext|>")
    for char in sorted({c for w in words for c in w}):
        add(char)
        add(char + "</w>")
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            merge = f"{current} {part}"
            if merge not in merges:
                merges.append(merge)
            current += part
            add(current)
    with open(os.path.join(directory, "vocab.json"), "w") as handle:
        json.dump(vocab, handle)
    with open(os.path.join(directory, "merges.txt"), "w") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def tiny_sd_pipeline(directory: str, seed: int = 0):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_vocab(os.path.join(directory, "vocab")), model_max_length=12)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4,
    )
    # Random init leaves every attention nearly uniform (second eigenvalue of the 8x8 self-attention map ~0.03), so
    # S^4 y keeps a relative contrast of ~1e-7, below float32 resolution: masks would be rounding noise in any fp32
    # implementation, the reference's included. A trained SD's spatial attention is peaked; sharpening the logits
    # (x25) gives the toy model that regime (second eigenvalue ~0.26).
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.to_q.weight.mul_(5.0)
                module.to_k.weight.mul_(5.0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=IMAGE_SIZE,
    ).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def two_blob_image(size: int = IMAGE_SIZE):
    """A picture with two coloured squares on a grey background (something for masks to separate)."""
    from PIL import Image

    import numpy as np

    array = np.full((size, size, 3), 110, np.uint8)
    q = size // 4
    array[q // 2: q // 2 + q + 2, q // 2: q // 2 + q + 2] = (220, 40, 40)
    array[-(q + 2 + q // 2): -(q // 2), -(q + 2 + q // 2): -(q // 2)] = (40, 60, 220)
    return Image.fromarray(array)
