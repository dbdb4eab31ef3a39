"""The tiny world model's parts: word-level tokenizer, LLaVA-1.5 chat template, processor and model config.

The model is a plain ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama language model), its tokenizer a
``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model (lower-casing, splitting on whitespace and
punctuation, BOS added like LLaVA's), its processor a ``LlavaProcessor`` with a ``CLIPImageProcessor`` at the
world's 64 px. Everything here is deterministic: the vocabulary is built from fixed text plus a fixed-seed sample
of captions.
"""

from __future__ import annotations

import re

from . import generate as gen

__all__ = [
    "SPECIAL_TOKENS",
    "IMAGE_TOKEN",
    "CHAT_TEMPLATE",
    "DESCRIBE_PROMPT",
    "CAPTION_PROMPTS",
    "pope_question",
    "QUESTION_SUFFIXES",
    "vocabulary",
    "build_tokenizer",
    "build_processor",
    "build_config",
    "prompt_text",
]

PAD, BOS, EOS, UNK, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE_TOKEN]  # ids 0..4

# LLaVA-1.5 (llava-hf) template: "USER: <image>\n{prompt} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

DESCRIBE_PROMPT = "Please describe this image in detail."
# (prompt, weight) for the description task
CAPTION_PROMPTS = [
    (DESCRIBE_PROMPT, 0.7),
    ("Please help me describe the image in detail.", 0.1),
    ("Describe this image.", 0.1),
    ("What is in this image?", 0.1),
]
QUESTION_SUFFIXES = [
    ("", 0.5),
    ("\nAnswer the question using a single word or phrase.", 0.3),
    (" Please answer this question with one word.", 0.2),
]


def pope_question(obj: str, typo: bool = False) -> str:
    """POPE's template; ``typo`` reproduces the original files' a->an replacement ('an ... imange')."""
    if typo and obj[0] in "aeiou":
        return f"Is there an {obj} in the imange?"
    return f"Is there {'an' if obj[0] in 'aeiou' else 'a'} {obj} in the image?"


def prompt_text(prompt: str) -> str:
    """The chat-templated user turn with one image and the generation prompt."""
    return f"USER: {IMAGE_TOKEN}\n{prompt} ASSISTANT:"


_SPLIT = re.compile(r"\w+|[^\w\s]+")


def _words(text: str) -> list[str]:
    return _SPLIT.findall(text.lower())


def vocabulary(seed: int = 0, sample: int = 2000) -> list[str]:
    """Sorted word list: prompts, questions (all category words), template words, and a caption sample."""
    texts = [p for p, _ in CAPTION_PROMPTS] + [s for s, _ in QUESTION_SUFFIXES]
    texts += ["USER: ASSISTANT: yes no Yes No", "Is there a an in the image imange ?"]
    for c in gen.CATEGORIES:
        texts += c["words"] + [c["name"]]
    for scene in gen.SCENES.values():
        texts += scene["phrases"]
    texts += ["the image shows in a photo of with in this there is an empty a view of can be seen here picture pair"]
    for i in range(sample):
        texts += gen.generate_sample(seed, "train", i).captions
    vocab = sorted({w for t in texts for w in _words(t)})
    return vocab


def build_tokenizer(vocab: list[str]):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in vocab:
        table.setdefault(w, len(table))
    tok = Tokenizer(WordLevel(vocab=table, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, table[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ." etc.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left", model_max_length=256,
        clean_up_tokenization_spaces=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, patch_size: int = 8):
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = gen.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_convert_rgb=True)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_config(vocab_size: int, patch_size: int = 8):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=gen.IMAGE_SIZE, patch_size=patch_size, projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    n_img = (gen.IMAGE_SIZE // patch_size) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=n_img,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
