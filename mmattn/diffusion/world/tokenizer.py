"""A real ``CLIPTokenizer`` for the video world, built without downloads.

CLIP's tokenizer is a byte-level BPE whose words end in ``</w>``. Its vocabulary here is CLIP's 512 byte symbols
(each byte alone and with ``</w>``, so any text still tokenizes, letter by letter) plus, for every word of the
world's prompts, merges that grow the word left to right (``r e``, ``re d</w>``) and their results. Known
words therefore become one token, unknown words fall back to letters, and the files are ordinary ``vocab.json`` /
``merges.txt`` that ``CLIPTokenizer.from_pretrained`` reads (the pipeline loads it like any other).
"""

from __future__ import annotations

from transformers import CLIPTokenizer

from . import generate as gen

__all__ = ["BOS", "EOS", "MAX_LENGTH", "prompt_words", "vocabulary_and_merges", "build_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # BOS + the longest prompt (5 words) + EOS fit with room for user prompts of a few more words


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: 256 printable stand-ins, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def prompt_words() -> list[str]:
    """Every word the world's prompts use, in a fixed order (plus "an", "the" for paraphrases)."""
    words: list[str] = ["a", "an", "the"]
    for text in [*gen.COLOURS, *gen.SHAPES, *gen.MOTIONS]:
        for word in text.split():
            if word not in words:
                words.append(word)
    return words


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def vocabulary_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` in CLIP's format for ``words`` (default: :func:`prompt_words`), every word one token.

    Merges of different words interact (``c i`` from "circle" is applied to "bouncing" before ``bounc i``), so
    a word that BPE does not yet join gets a merge of its first two current pieces, until every word is whole.
    """
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words or prompt_words():
            pieces = _bpe(word, ranks)
            while len(pieces) > 1:
                merge = (pieces[0], pieces[1])
                ranks[merge] = len(merges)
                merges.append(merge)
                if merge[0] + merge[1] not in tokens:
                    tokens.append(merge[0] + merge[1])
                pieces = _bpe(word, ranks)
                changed = True
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_tokenizer(words: list[str] | None = None, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` (BOS ... EOS, padded with EOS like CLIP's) over the world's words."""
    vocab, merges = vocabulary_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
