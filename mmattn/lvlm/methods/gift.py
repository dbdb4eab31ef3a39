"""GIFT: Gaze Shift-Guided Cross-modal Fusion Enhancement (arXiv 2510.22067), as its released code implements it.

Stage A (once per request, at prefill, in ``saliency_layers``): the *gaze shift* of informative query tokens,
``D[i, j] = max(0, P[i, j] - P[i-1, j])`` over image keys j, scored per head; the top half of heads are averaged
into a saliency vector ``s`` over the image tokens, clamped to mean +- 3 std, min-max scaled to ``s_hat`` in
[0, 1]: the multiplier is ``w = exp(alpha * s_hat)``.

Stage B (``enhancement_layers``, on the last prompt row and every decode row): the top half of heads by image
mass (``Hv``) get image probabilities multiplied by ``w``; the top half by query mass (``Hq``) get query
probabilities multiplied by ``beta * r``, with ``r = sum_{Hv,V} p w / sum_{Hv,V} p``; rows renormalised. This is a
per-(head, key) logit bias (``alpha * s_hat`` and ``log(beta * r)``), i.e. a ``key_bias`` in the edit contract;
the head sets and ``r`` come from the same row's unmodified statistics, computed for the one edited row per sample.

Differences from the released code (spec ``methods-gift-vhr-paint.md`` §2.6): batched with per-sample spans,
saliency, head sets and ``r`` (the code uses batch element 0); the saliency comes from the real prefill instead of
an extra ``generate(max_new_tokens=1, output_attentions=True)`` (exact: stage A reads rows before the last one);
informative words are tagged with NLTK's perceptron tagger (the code uses spaCy ``en_core_web_sm``, which cannot
be installed offline), mapping Penn tags to {NOUN, PROPN, VERB, ADJ, ADV, NUM}; the query span is found from the
``assistant_marker`` text rather than fixed token offsets; empty informative sets fall back to every query token
and a flat saliency to ``w = 1`` (the code produces NaN); LLaVA-NeXT newline tokens are left out of the image set;
fp32 log-bias instead of fp16 post-softmax products (greedy decodes may differ after a while, as the spec notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...edits import AttentionEdit
from ...layout import Role
from .base import AttentionMethod, register_method

INFORMATIVE_PENN_PREFIXES = ("NN", "VB", "JJ", "RB", "CD")  # NOUN/PROPN, VERB, ADJ, ADV, NUM


@dataclass
class GIFTConfig:
    alpha: float = 5.0  # saliency strength (configs/*.yaml: 5.0 for LLaVA-1.5 7B/13B)
    beta: float = 1.0  # query multiplier scale (paper note; absent from the code, i.e. 1)
    saliency_layers: tuple[int, ...] | None = None  # None: per-model default (see resolve)
    enhancement_layers: tuple[int, ...] | None = None
    head_fraction: float = 0.5
    informative_tokens: str = "pos"  # "pos": content words by POS tag (needs a processor); "all": every query token
    assistant_marker: str = "ASSISTANT:"  # where the user's query ends in the prompt template

    def __post_init__(self) -> None:
        if self.informative_tokens not in ("pos", "all"):
            raise ValueError(f"GIFT informative_tokens must be 'pos' or 'all', got {self.informative_tokens!r}")
        if not 0.0 < self.head_fraction <= 1.0:
            raise ValueError(f"GIFT head_fraction must lie in (0, 1], got {self.head_fraction}")

    def resolve(self, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Layer defaults of configs/*.yaml: LLaVA-1.5-7B (32 layers) [11] / 12-22, LLaVA-1.5-13B (40) [10] / 14-20;
        other depths scale the 7B choice proportionally (an extrapolation, not from the paper)."""
        if self.saliency_layers is not None and self.enhancement_layers is not None:
            return tuple(self.saliency_layers), tuple(self.enhancement_layers)
        if num_layers == 32:
            default = ((11,), tuple(range(12, 23)))
        elif num_layers == 40:
            default = ((10,), tuple(range(14, 21)))
        else:
            scale = num_layers / 32
            saliency = min(num_layers - 1, round(11 * scale))
            default = ((saliency,), tuple(range(min(num_layers - 1, saliency + 1), min(num_layers, round(23 * scale)))))
        return tuple(self.saliency_layers or default[0]), tuple(self.enhancement_layers or default[1])


def informative_mask(tokenizer, ids: list[int], marker: str) -> list[bool]:
    """Which of ``ids`` (the query tokens after the image) belong to content words of the user's query."""
    from nltk.tokenize import TreebankWordTokenizer

    text, spans = token_spans(tokenizer, ids)
    cut = text.rfind(marker) if marker else -1
    query_end = cut if cut >= 0 else len(text)
    word_spans = list(TreebankWordTokenizer().span_tokenize(text[:query_end]))
    words = [text[a:b] for a, b in word_spans]
    try:
        tags = _pos_tags(words)
    except LookupError as error:
        raise RuntimeError(
            "GIFT's informative-word selection needs NLTK's tagger data: run "
            "`python -m nltk.downloader averaged_perceptron_tagger_eng` (or point NLTK_DATA at a copy), "
            "or use informative_tokens='all'"
        ) from error
    keep = [(a, b) for (a, b), (_, tag) in zip(word_spans, tags) if tag.startswith(INFORMATIVE_PENN_PREFIXES)]
    return [s < query_end and any(s < b and a < e for a, b in keep) for s, e in spans]


def _pos_tags(words: list[str]) -> list[tuple[str, str]]:
    """NLTK POS tags; when NLTK's own search path lacks the tagger, the project's shared offline copy is tried."""
    import nltk
    from nltk import pos_tag

    if not words:
        return []
    try:
        return pos_tag(words, lang="eng")
    except LookupError:
        from ...eval.paths import nltk_data_dir

        shared = str(nltk_data_dir())
        if shared in nltk.data.path:
            raise
        nltk.data.path.append(shared)
        return pos_tag(words, lang="eng")


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it, from decoded prefixes (works for
    SentencePiece, byte-level and word-level tokenizers alike, whatever they do with spaces)."""
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    starts = [0] + ends[:-1]
    return tokenizer.decode(ids), list(zip(starts, ends))


def normalised_saliency(raw: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Clamp to mean +- 3 std over the image tokens, min-max to [0, 1]; 0 where flat or off the image."""
    values = raw[on]
    if values.numel() < 2:
        return torch.zeros_like(raw)
    mean, std = values.mean(), values.std()
    clipped = raw.clamp(float(mean - 3 * std), float(mean + 3 * std))
    low, high = clipped[on].min(), clipped[on].max()
    if float(high - low) <= 0:
        return torch.zeros_like(raw)
    return torch.where(on, (clipped - low) / (high - low), torch.zeros_like(raw))


def _sample_row_probs(call, b: int, positions: torch.Tensor) -> torch.Tensor:
    """Unmodified attention probabilities of sample ``b``'s query rows at absolute ``positions``: [R, H, kv_len]."""
    q = call.query[b, :, call.q_len - (call.kv_len - positions)].float()  # [H, R, D]
    k = call.key[b].float().repeat_interleave(call.num_heads // call.num_kv_heads, dim=0)  # [H, K, D]
    scores = torch.einsum("hrd,hkd->rhk", q, k) * call.scale
    allowed = torch.arange(call.kv_len, device=call.device)[None, :] <= positions[:, None]  # [R, K]
    if call.key_padding is not None:
        allowed = allowed & call.key_padding[b][None, :]
    return torch.softmax(scores.masked_fill(~allowed[:, None, :], float("-inf")), dim=-1)


def _row_probs(call, rows: torch.Tensor) -> torch.Tensor:
    """Unmodified attention probabilities of one query row per sample at absolute ``rows``: [B, H, kv_len]."""
    return call.attend_rows(rows, with_probs=True)[1]


@register_method
class GIFT(AttentionMethod):
    name = "gift"
    Config = GIFTConfig

    def attach(self, context) -> None:
        self._saliency_layers, self._enhancement_layers = self.config.resolve(context.num_layers)
        bad = sorted(l for l in (*self._saliency_layers, *self._enhancement_layers) if not 0 <= l < context.num_layers)
        if bad:
            raise ValueError(f"GIFT layers {bad} do not exist; the text model has {context.num_layers} layers")
        if self.config.informative_tokens == "pos":
            tokenizer = getattr(context.processor, "tokenizer", context.processor)
            if tokenizer is None or not hasattr(tokenizer, "decode"):
                raise ValueError("GIFT with informative_tokens='pos' needs mmattn.patch(..., processor=processor); "
                                 "pass it, or use informative_tokens='all'")
            self._tokenizer = tokenizer

    def begin_request(self, context) -> None:
        self._raw_saliency = []
        self.saliency = None  # s_hat, [B, prompt_len]
        self._spans = None

    def _prepare_spans(self, context, device) -> None:
        layout = context.layout
        roles = layout.roles.to(device)
        image = roles == Role.IMAGE
        query = (roles == Role.INSTRUCTION) & (torch.arange(roles.shape[1], device=device)[None] >= layout.image_end.to(device)[:, None])
        informative = query.clone()
        if self.config.informative_tokens == "pos":
            ids = context.prompt_ids.to(device)
            for b in range(roles.shape[0]):
                positions = query[b].nonzero().flatten()
                flags = informative_mask(self._tokenizer, ids[b, positions].tolist(), self.config.assistant_marker)
                chosen = torch.tensor(flags, dtype=torch.bool, device=device)
                cut = self._query_end(ids[b, positions].tolist())
                query[b, positions[cut:]] = False
                informative[b] = False
                if chosen.any():
                    informative[b, positions[chosen]] = True
                else:
                    informative[b] = query[b]  # no content word: every query token (the code would give NaN)
        self._spans = {"image": image, "query": query, "informative": informative}

    def _query_end(self, ids: list[int]) -> int:
        text, spans = token_spans(self._tokenizer, ids)
        cut = text.rfind(self.config.assistant_marker) if self.config.assistant_marker else -1
        if cut < 0:
            return len(ids)
        return next((index for index, (_, end) in enumerate(spans) if end > cut), len(ids))

    def _accumulate_saliency(self, context, call) -> None:
        layer = call.layer_idx
        image_at = context.at_layer(self._spans["image"], layer, False)
        informative_at = context.at_layer(self._spans["informative"], layer, False)
        prompt_positions = torch.arange(self._spans["image"].shape[1], device=call.device).expand(call.batch_size, -1)
        positions = context.at_layer(prompt_positions.contiguous(), layer, -1)
        heads_keep = max(1, int(call.num_heads * self.config.head_fraction))
        for b in range(call.batch_size):
            rows = informative_at[b].nonzero().flatten()
            image = image_at[b]
            if rows.numel() == 0 or not image.any():
                self._raw_saliency.append((b, None, None))
                continue
            current = _sample_row_probs(call, b, rows)[..., : image.shape[0]][..., image]  # [R, H, V]
            previous = _sample_row_probs(call, b, rows - 1)[..., : image.shape[0]][..., image]
            shift = (current - previous).clamp_min(0)
            top_heads = shift.sum(dim=(0, 2)).topk(heads_keep).indices
            raw = torch.zeros(self._spans["image"].shape[1], device=call.device)
            raw[positions[b][image]] = shift[:, top_heads].mean(dim=(0, 1))  # back to prompt positions
            self._raw_saliency.append((b, raw, positions[b][image]))

    def _finish_saliency(self, context, device) -> None:
        roles = context.layout.roles
        saliency = torch.zeros(roles.shape, device=device)
        image = self._spans["image"]
        for b in range(roles.shape[0]):
            parts = [(raw, kept) for sample, raw, kept in self._raw_saliency if sample == b and raw is not None]
            if not parts:
                continue
            on = torch.zeros(roles.shape[1], dtype=torch.bool, device=device)
            on[parts[-1][1]] = True  # image tokens still present at the last saliency layer
            saliency[b] = normalised_saliency(torch.stack([raw for raw, _ in parts]).mean(0), on & image[b])
        self.saliency = saliency

    def edit(self, context, call):
        layer = call.layer_idx
        if context.layout is None:
            if call.is_prefill and (layer in self._saliency_layers or layer in self._enhancement_layers):
                raise RuntimeError("GIFT needs the prompt's input_ids at prefill to find the image and query tokens")
            return None
        if call.is_prefill and self._spans is None:
            self._prepare_spans(context, call.device)
        if call.is_prefill and layer in self._saliency_layers:
            self._accumulate_saliency(context, call)
            if layer == max(self._saliency_layers):
                self._finish_saliency(context, call.device)
        if layer not in self._enhancement_layers:
            return None
        if self.saliency is None:
            raise RuntimeError("GIFT enhancement layers must come after its saliency layers")
        return self._enhancement(context, call)

    def _enhancement(self, context, call) -> AttentionEdit:
        cfg = self.config
        layer = call.layer_idx
        last = context.layout_at(layer).last_prompt_position.to(call.device)
        rows = last if call.is_prefill else torch.full_like(last, call.kv_len - 1)
        probs = _row_probs(call, rows)  # [B, H, K]
        image = _pad(context.at_layer(self._spans["image"], layer, False), call.kv_len)
        query = _pad(context.at_layer(self._spans["query"], layer, False), call.kv_len)
        log_w = cfg.alpha * _pad(context.at_layer(self.saliency, layer, 0.0), call.kv_len)  # [B, K]
        w = torch.exp(log_w)
        mass_image = (probs * image[:, None].float()).sum(-1)
        mass_query = (probs * query[:, None].float()).sum(-1)
        k = max(1, int(call.num_heads * cfg.head_fraction))
        visual_heads = torch.zeros_like(mass_image, dtype=torch.bool).scatter(1, mass_image.topk(k, dim=1).indices, True)
        query_heads = torch.zeros_like(mass_query, dtype=torch.bool).scatter(1, mass_query.topk(k, dim=1).indices, True)
        weighted = (probs * (image.float() * w)[:, None]).sum(-1)
        numerator = (weighted * visual_heads).sum(-1)
        denominator = (mass_image * visual_heads).sum(-1)
        ratio = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(numerator))
        log_r = torch.log(cfg.beta * ratio)  # [B]
        key_bias = torch.where(visual_heads[:, :, None] & image[:, None, :], log_w[:, None, :], torch.zeros_like(probs))
        key_bias = key_bias + torch.where(query_heads[:, :, None] & query[:, None, :], log_r[:, None, None], torch.zeros_like(probs))
        return AttentionEdit(key_bias=key_bias, row_start=last)


def _pad(values: torch.Tensor, length: int) -> torch.Tensor:
    if values.shape[1] >= length:
        return values[:, :length]
    return torch.cat([values, values.new_zeros(values.shape[0], length - values.shape[1])], dim=1)
