"""Tiny config-built LLaVA / LLaVA-NeXT models and inputs, for tests, examples and benchmarks (no downloads)."""

from __future__ import annotations

import torch

__all__ = ["tiny_llava", "tiny_llava_next", "llava_inputs", "llava_next_inputs", "llava_7b", "llava_next_7b",
           "IMAGE_TOKEN_ID", "PAD_TOKEN_ID"]

IMAGE_TOKEN_ID = 98
PAD_TOKEN_ID = 0
VOCAB = 100


def _text_config(layers: int, heads: int, kv_heads: int, hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 5, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
    )


def _vision_config(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )


def tiny_llava(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2, hidden: int = 32,
               attn_implementation: str = "sdpa"):
    """A random ``LlavaForConditionalGeneration``: 30x30 images, 6x6 patches -> 25 image tokens per image."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=_vision_config(30, 6), text_config=_text_config(layers, heads, kv_heads, hidden),
        image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_llava_next(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2, hidden: int = 32,
                    attn_implementation: str = "sdpa"):
    """A random ``LlavaNextForConditionalGeneration``: 16x16 tiles, 4x4 patches, anyres pinpoints up to 32x32."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=_vision_config(16, 4), text_config=_text_config(layers, heads, kv_heads, hidden),
        image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def random_model(model_class, config, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0):
    """A randomly initialised model built directly on ``device`` in ``dtype`` (7B-shaped benchmarks), sdpa, eval,
    generating exactly the tokens asked for (no EOS)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model


def pad_left(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows with PAD_TOKEN_ID: (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids, mask


def _prompt(generator: torch.Generator, system: int, image_tokens: list[int], text: int) -> list[int]:
    def words(n: int) -> list[int]:
        return torch.randint(3, IMAGE_TOKEN_ID - 1, (n,), generator=generator).tolist()

    row = [1] + words(system)
    for count in image_tokens:
        row += [IMAGE_TOKEN_ID] * count + words(1)
    return row + words(text)


def llava_inputs(model, text_lengths=(5, 9, 2), images_per_prompt: int = 1, seed: int = 0) -> dict:
    """A left-padded batch: BOS, a few words, images, then instructions of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    rows = [_prompt(generator, 2 + b, [per_image] * images_per_prompt, n) for b, n in enumerate(text_lengths)]
    ids, mask = pad_left(rows)
    pixels = torch.randn(len(rows) * images_per_prompt, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def llava_next_inputs(model, image_sizes=((16, 32), (32, 24), (20, 20)), text_lengths=(4, 7, 2), seed: int = 0) -> dict:
    """A left-padded LLaVA-NeXT batch, one image per prompt, with different anyres grids (so different counts)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from .layout import llava_next_newline_offsets

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    strategy = config.vision_feature_select_strategy
    counts = [llava_next_newline_offsets(config, size, strategy)[0] for size in image_sizes]
    rows = [_prompt(generator, 1 + b, [c], n) for b, (c, n) in enumerate(zip(counts, text_lengths))]
    ids, mask = pad_left(rows)
    tile = config.vision_config.image_size
    num_patches = [image_size_to_num_patches(size, config.image_grid_pinpoints, tile) for size in image_sizes]
    pixels = torch.zeros(len(rows), max(num_patches), 3, tile, tile)
    for b, n in enumerate(num_patches):
        pixels[b, :n] = torch.randn(n, 3, tile, tile, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": torch.tensor(image_sizes)}


def select_sample(inputs: dict, b: int, images_per_prompt: int = 1) -> dict:
    """Sample ``b`` of a batch built above, with its padding stripped."""
    keep = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, keep], "attention_mask": inputs["attention_mask"][b : b + 1, keep]}
    out["pixel_values"] = inputs["pixel_values"][b * images_per_prompt : (b + 1) * images_per_prompt]
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][b : b + 1]
    return out


TINY_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "\n", "a", "the", "is", "there", "in", "image",
              "yes", "no", "dog", "cat", "person", "car", "cup", "dining", "table", "fork", "knife", "please",
              "describe", "this", "detail.", "answer", "question", "using", "single", "word", "or", "phrase.", "?"]


def _clip_l_336_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768)


def _vicuna_7b_config(layers: int | None, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=max_positions, pad_token_id=0)


def llava_7b(layers: int | None = None, device: str = "cuda"):
    """LLaVA-1.5-7B's shapes with random weights (bf16, sdpa): CLIP-L/336 vision tower, 576 image tokens, Vicuna-7B."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=_clip_l_336_config(), text_config=_vicuna_7b_config(layers, 4096),
                         image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return random_model(LlavaForConditionalGeneration, config, device=device)


def llava_next_7b(layers: int | None = None, device: str = "cuda"):
    """LLaVA-NeXT-7B's shapes with random weights (bf16, sdpa): anyres up to 672 px (2,928 image tokens)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=_clip_l_336_config(), text_config=_vicuna_7b_config(layers, 8192),
                             image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    return random_model(LlavaNextForConditionalGeneration, config, device=device)


def save_tiny_llava_checkpoint(path, seed: int = 0, layers: int = 2) -> None:
    """Save a random tiny LLaVA with a working word-level processor, loadable with ``from_pretrained``.

    For harness and CLI tests: the answers are noise, the whole loading / prompting / decoding path is real."""
    save_word_level_llava(path, tiny_llava(seed=seed, layers=layers))


def save_word_level_llava(path, model) -> None:
    """Save ``model`` (a LLaVA-1.5-style model) with a word-level processor covering its whole vocabulary.

    The tokenizer knows ``TINY_WORDS`` plus filler words ``w{i}`` up to the model's vocabulary size, so any
    generated id decodes; the image processor and patch size follow the model's vision config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    config = model.config
    vocab = {word: i for i, word in enumerate(TINY_WORDS)}
    for i in range(len(vocab), config.text_config.vocab_size):
        vocab[f"w{i}" if i != config.image_token_id else "<image>"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    chat_template = (
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
        "{% endif %}{% endfor %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               chat_template=chat_template, num_additional_image_tokens=1)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    processor.save_pretrained(path)
