"""The parts of the video world's tiny ``AnimateDiffPipeline``, built from configs (random weights).

The architecture is AnimateDiff's, at toy widths, so BroadWay sees what it sees on the real model:

* ``AutoencoderKL`` with three encoder stages (``vae_scale_factor`` 4): 64 x 64 frames <-> 16 x 16 x 4 latents;
  trained first, on single frames (:mod:`mmattn.diffusion.world.train`).
* ``UNet2DConditionModel`` with four stages (three cross-attention stages + one plain, as SD 1.5) and a
  ``MotionAdapter`` with the same widths; ``UNetMotionModel.from_unet2d`` joins them, so the decoder has temporal
  attention in ``up_blocks.0..3`` at 2, 4, 8 and 16 px (BroadWay edits ``up_blocks.1/2/3``, guided by
  ``up_blocks.1``), the same heads in every motion module, as AnimateDiff.
* ``CLIPTextModel`` (2 layers, width 64) with the world's ``CLIPTokenizer`` (:mod:`.tokenizer`).
* ``DDIMScheduler`` with AnimateDiff's inference settings (linear betas 0.00085-0.012, ``steps_offset`` 1).

:class:`WorldModelConfig` holds every width, so the training smoke test can build an even smaller one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from . import generate as gen
from .tokenizer import build_tokenizer

__all__ = ["WorldModelConfig", "build_vae", "build_text_encoder", "build_unet", "build_scheduler", "build_all", "count_parameters",
           "assemble_pipeline"]


@dataclass
class WorldModelConfig:
    """Widths of every part. The defaults are the shipped model (about 6.6 M parameters, ~27 MB in float32: the issue caps it at 30)."""

    vae_channels: tuple[int, ...] = (32, 48, 64)
    vae_latent_channels: int = 4
    unet_channels: tuple[int, ...] = (48, 64, 96, 96)
    unet_head_dim: int = 32  # diffusers' ``attention_head_dim`` of the spatial cross-attention
    motion_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    norm_groups: int = 16
    frames: int = gen.FRAMES
    size: int = gen.SIZE
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vae_channels, self.unet_channels = tuple(self.vae_channels), tuple(self.unet_channels)
        if len(self.unet_channels) != 4:
            raise ValueError("the UNet needs four stages: BroadWay edits up_blocks.1/2/3 and reads up_blocks.1")

    @property
    def latent_size(self) -> int:
        return self.size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(config: WorldModelConfig):
    from diffusers import AutoencoderKL

    stages = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages, block_out_channels=config.vae_channels, layers_per_block=1,
        latent_channels=config.vae_latent_channels, norm_num_groups=min(config.norm_groups, config.vae_channels[0]),
        sample_size=config.size,
    )


def build_text_encoder(config: WorldModelConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=config.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text)


def build_unet(config: WorldModelConfig):
    """A ``UNetMotionModel``: the 2D UNet joined with a fresh ``MotionAdapter`` of the same widths."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet2d = UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.vae_latent_channels,
        out_channels=config.vae_latent_channels, block_out_channels=config.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=config.text_width,
        attention_head_dim=[max(1, c // config.unet_head_dim) for c in config.unet_channels],
        norm_num_groups=config.norm_groups,
    )
    adapter = MotionAdapter(
        block_out_channels=config.unet_channels, motion_layers_per_block=1, motion_norm_num_groups=config.norm_groups,
        motion_num_attention_heads=config.motion_heads, motion_max_seq_length=32,
    )
    return UNetMotionModel.from_unet2d(unet2d, adapter)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="linspace",
    )


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """The ``AnimateDiffPipeline`` (no separate ``motion_adapter``: its trained weights live in the UNet)."""
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=None, scheduler=scheduler or build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def build_all(config: WorldModelConfig):
    """``(vae, text_encoder, tokenizer, unet)`` with random weights (seed with ``torch.manual_seed`` first)."""
    tokenizer = build_tokenizer(max_length=16)
    return build_vae(config), build_text_encoder(config, tokenizer), tokenizer, build_unet(config)
