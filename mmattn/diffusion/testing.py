"""Tiny config-built text-to-video pipelines (random weights, no downloads) for tests, examples and smoke runs.

Both pipelines keep the real block topology that BroadWay addresses (four decoder stages, temporal attention in
``up_blocks.1/2/3``) at toy widths, so every code path of the integration runs on a CPU in seconds:

* :func:`tiny_animatediff_pipeline`: ``AnimateDiffPipeline`` over a ``UNet2DConditionModel`` + ``MotionAdapter``
  (the pipeline builds the ``UNetMotionModel``), the same heads in every motion module, as in AnimateDiff.
* :func:`tiny_text_to_video_pipeline`: ``TextToVideoSDPipeline`` over a ``UNet3DConditionModel`` whose head count
  follows the channel width (``heads = C / attention_head_dim``), so ``up_blocks.1`` has more heads than
  ``up_blocks.2/3``, as in ModelScope.

The tokenizer is a word-level ``PreTrainedTokenizerFast`` (lower-cased, whitespace split), since a CLIP BPE
vocabulary cannot be downloaded here; prompts outside its vocabulary map to ``<unk>``.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_animatediff_pipeline", "tiny_text_to_video_pipeline", "tiny_tokenizer", "TINY_WORDS"]

TINY_WORDS = (
    "a the of in on and with cat dog horse bird car boat man woman child robot running walking flying swimming "
    "jumping dancing street beach forest sky river city snow field sunset night red blue green"
).split()
_TEXT_LENGTH = 16


def tiny_tokenizer(max_length: int = _TEXT_LENGTH):
    """A word-level tokenizer that pads/truncates to ``max_length`` like CLIP's (BOS ... EOS PAD*)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate(specials + list(TINY_WORDS))}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=max_length,
    )


def _text_encoder(hidden: int, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, pad_token_id=0,
        bos_token_id=2, eos_token_id=3,
    )
    return CLIPTextModel(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    # One block: vae_scale_factor 1, so a 16x16 video has a 16x16 latent and the UNet's decoder sees 2/4/8/16.
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="linear", clip_sample=False, steps_offset=1, timestep_spacing="leading")


def tiny_animatediff_pipeline(seed: int = 0, motion_heads: int = 2, dtype: torch.dtype = torch.float32):
    """An ``AnimateDiffPipeline`` with random weights: channels (8, 8, 16, 16), ``motion_heads`` heads everywhere."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

    torch.manual_seed(seed)
    channels = (8, 8, 16, 16)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    adapter = MotionAdapter(
        block_out_channels=channels, motion_layers_per_block=1, motion_norm_num_groups=4,
        motion_num_attention_heads=motion_heads, motion_max_seq_length=32,
    )
    # Random init leaves the adapter's proj_out at zero (AnimateDiff trains it from zero), which would make every
    # temporal layer an identity and any edit of its attention invisible in the output.
    for name, parameter in adapter.named_parameters():
        if "proj_out" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    pipe = AnimateDiffPipeline(
        vae=_vae(), text_encoder=_text_encoder(16, tokenizer), tokenizer=tokenizer, unet=unet,
        motion_adapter=adapter, scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def tiny_text_to_video_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``TextToVideoSDPipeline`` with random weights: channels (8, 8, 16, 16), 4 heads in ``up_blocks.1``, 2 after."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet3DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    for name, parameter in unet.named_parameters():
        if "temp_attentions" in name and "proj_out" in name:
            torch.nn.init.normal_(parameter, std=0.2)  # zero-initialised like the adapter's (see above)
    pipe = TextToVideoSDPipeline(
        vae=_vae(), text_encoder=_text_encoder(16, tokenizer), tokenizer=tokenizer, unet=unet, scheduler=_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
