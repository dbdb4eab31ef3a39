"""TransPrune: token-transition pruning of image tokens inside the LLM (arXiv 2507.20630), batched.

At prefill, *token transition variation* (TTV) is accumulated over ``accumulation_layers``: per token and per
sub-block (attention, FFN) with input ``x`` (after the RMSNorm) and output ``y``,
``m = |y| / |x|`` times a softmax over the sample's tokens of ``exp(1 - cos(x, y))``. After each layer of
``prune_layers`` the image tokens are ranked by ``alpha * TTV + (1 - alpha) * IGA`` (both normalised over the
current image tokens), where IGA (*instruction-guided attention*) is the head- and row-averaged attention mass
that the tokens after the image put on each image token, computed with the *next* layer's Q/K on the pre-prune
states — the edit contract's per-key mass statistic, no eager attention. The top ``keep_ratios[k]`` of the
original image tokens stay, in their order; hidden states, 2D masks, position ids (re-indexed contiguously) and
RoPE tensors of every later layer are compacted, so later layers' KV caches hold only kept tokens. During decode
each later layer gets its own RoPE offset and mask.

Layer numbers are 1-indexed as in the paper and its code (``prune after layer 7`` = before ``layers[7]``).

Differences from the released code (spec ``methods-transprune-var.md`` §1.7), on purpose: batched, with per-sample
keep counts (``floor(N_b * r)`` of each sample's own image tokens), left padding and per-sample masks (T1); the
TTV softmax runs over each sample's real tokens (the code sums over the whole batch tensor; identical at batch 1);
several images per sample form one pool (T3); fp32 scores (the code uses fp16); nothing is computed during decode
(T11). ``direction="one_minus_abs_cos"`` gives the paper's Eq. 2 instead of the code's ``1 - cos`` (T9).
The final hidden states, and so ``model(...).logits``, cover the compacted sequence.

Speed: ``cuda_graphs=True`` replays the layers after the last pruning (and accumulation) layer as CUDA graphs at
prefill (:class:`mmattn.lvlm.graphs.PrefillLayerGraphs`), one graph per padded prompt shape: the compacted sequence
is left-padded to a multiple of ``pad_multiple`` tokens (masked, same results) so prompts of nearby lengths share a
graph. At batch 1 a 7B layer over the ~400 kept tokens takes less GPU time than Python needs to launch it; the graphs
make the LLM prefill 1.9-2.0x faster than unpruned sdpa independently of the host's speed (benchmarks/RESULTS.md).
It needs a CUDA model, no attention-editing method alongside, and no per-layer outputs; otherwise it raises.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ... import kernels
from ...edits import AttentionEdit
from ..graphs import PrefillLayerGraphs
from .base import AttentionMethod, register_method


@dataclass
class TransPruneConfig:
    accumulation_layers: tuple[int, ...] = (7, 8, 9, 10, 11, 12)  # 1-indexed (reference scripts)
    prune_layers: tuple[int, ...] = (7, 9, 12)  # prune after these layers, 1-indexed
    keep_ratios: tuple[float, ...] = (0.875, 0.625, 0.125)  # of the ORIGINAL image tokens ("TransPrune-High")
    alpha: float = 0.5  # weight of TTV against IGA (paper: 0.5)
    direction: str = "one_minus_cos"  # the code; "one_minus_abs_cos" is the paper's Eq. 2
    # Speed only, same math: replay the layers after the last pruning/accumulation layer as CUDA graphs at prefill
    # (batch-1 prefill is host-bound once the sequence is short). Needs a CUDA model, no attention-editing method
    # alongside, and no output_hidden_states / output_attentions.
    cuda_graphs: bool = False
    # Left-pad the sequence after the last pruning layer to a multiple of this many tokens (masked, so the result is
    # unchanged) so that one graph serves many prompt lengths; None: 32 with cuda_graphs, else 1 (no padding).
    pad_multiple: int | None = None
    max_graphs: int = 4  # graphs kept, least recently used dropped first (each holds its prompt's KV for its layers)

    def __post_init__(self) -> None:
        self.accumulation_layers = tuple(int(x) for x in self.accumulation_layers)
        self.prune_layers = tuple(int(x) for x in self.prune_layers)
        self.keep_ratios = tuple(float(x) for x in self.keep_ratios)
        if len(self.prune_layers) != len(self.keep_ratios):
            raise ValueError(f"TransPrune needs one keep ratio per pruning layer, got {self.prune_layers} and {self.keep_ratios}")
        if list(self.prune_layers) != sorted(set(self.prune_layers)) or min(self.prune_layers, default=1) < 1:
            raise ValueError(f"TransPrune prune_layers must be increasing 1-indexed layers, got {self.prune_layers}")
        if any(not 0 < r <= 1 for r in self.keep_ratios) or list(self.keep_ratios) != sorted(self.keep_ratios, reverse=True):
            raise ValueError(f"TransPrune keep_ratios must be non-increasing fractions in (0, 1], got {self.keep_ratios}")
        if self.direction not in ("one_minus_cos", "one_minus_abs_cos"):
            raise ValueError(f"TransPrune direction must be 'one_minus_cos' or 'one_minus_abs_cos', got {self.direction!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TransPrune alpha must lie in [0, 1], got {self.alpha}")
        if self.pad_multiple is not None:  # None is resolved by padding(), so that replace(cuda_graphs=...) works
            if int(self.pad_multiple) != self.pad_multiple or self.pad_multiple < 1:
                raise ValueError(f"TransPrune pad_multiple must be a positive integer, got {self.pad_multiple}")
            self.pad_multiple = int(self.pad_multiple)
        if int(self.max_graphs) != self.max_graphs or self.max_graphs < 1:
            raise ValueError(f"TransPrune max_graphs must be a positive integer, got {self.max_graphs}")
        self.max_graphs = int(self.max_graphs)

    def padding(self) -> int:
        """The multiple the sequence after the last pruning layer is padded to."""
        if self.pad_multiple is not None:
            return self.pad_multiple
        return 32 if self.cuda_graphs else 1


def transition_score(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, direction: str) -> torch.Tensor:
    """One sub-block's TTV term per token: |y|/|x| times a per-sample softmax of exp(1 - cos) over real tokens."""
    # fp32 throughout, in few passes over the [B, L, D] states: two norms and one batched row dot product
    # (cosine_similarity would materialise several more fp32 tensors of that size).
    x, y = x.float(), y.float()
    x_norm, y_norm = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
    magnitude = y_norm / x_norm.clamp_min(1e-12)
    cos = torch.einsum("...d,...d->...", x, y) / (x_norm * y_norm).clamp_min(1e-12)
    change = 1.0 - (cos.abs() if direction == "one_minus_abs_cos" else cos)
    share = torch.softmax(change.masked_fill(~valid, float("-inf")), dim=-1)
    return magnitude * share


def transprune_tflops(num_image_tokens: int, config: TransPruneConfig | None = None, *, prune: bool = True,
                      num_layers: int = 32, hidden: int = 4096, intermediate: int = 11008) -> float:
    """The paper's FLOP accounting (FastV-style, image tokens only): per layer 4nd^2 + 2n^2d + 3ndm, in TFLOPs.

    With the defaults: 3.82 / 1.56 for LLaVA-1.5-7B (576 tokens) and 20.83 / 8.33 for LLaVA-NeXT-7B (2880)."""
    config = config or TransPruneConfig()
    total = 0.0
    for layer in range(1, num_layers + 1):
        n = num_image_tokens
        if prune:
            for after, ratio in zip(config.prune_layers, config.keep_ratios):
                if layer > after:
                    n = int(num_image_tokens * ratio)
        total += 4 * n * hidden**2 + 2 * n * n * hidden + 3 * n * hidden * intermediate
    return total / 1e12


@register_method
class TransPrune(AttentionMethod):
    name = "transprune"
    Config = TransPruneConfig

    def attach(self, context) -> None:
        cfg = self.config
        layers = list(context.language_model.layers)
        if max(cfg.prune_layers) >= len(layers):
            raise ValueError(f"TransPrune prunes after layer {max(cfg.prune_layers)} but the text model has {len(layers)} "
                             "layers (pruning needs a later layer to score with)")
        if max(cfg.accumulation_layers, default=0) > len(layers):
            raise ValueError(f"TransPrune accumulation layers {cfg.accumulation_layers} exceed {len(layers)} layers")
        self._graphs = self._make_graphs(context, layers) if cfg.cuda_graphs else None  # validates before any hook
        self._context = context
        self._layers = layers
        self._rotary = context.language_model.rotary_emb
        self._prune_index = {p: k for k, p in enumerate(cfg.prune_layers)}  # layers[p] is the first pruned layer
        self._first = min(cfg.prune_layers)
        self._hooks = [layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True, prepend=True)
                       for i, layer in enumerate(layers) if i >= self._first]
        for number in cfg.accumulation_layers:
            layer = layers[number - 1]
            for name, module in (("x_a", layer.input_layernorm), ("y_a", layer.self_attn),
                                 ("x_f", layer.post_attention_layernorm), ("y_f", layer.mlp)):
                self._hooks.append(module.register_forward_hook(self._make_capture(number, name)))
        if self._graphs is not None:
            self._graphs.install()

    def _make_graphs(self, context, layers) -> PrefillLayerGraphs:
        cfg = self.config
        # After the last pruning layer the sequence no longer changes; after the last accumulation layer no capture
        # hook has to run: from there to the end the prefill is a fixed stack of layers.
        start = max(max(cfg.prune_layers), max(cfg.accumulation_layers, default=0))
        if start >= len(layers):
            raise ValueError(f"TransPrune(cuda_graphs=True) graphs the layers after layer {start}, but the text model "
                             f"has {len(layers)} layers")
        editing = [m.name for m in context.methods if m is not self and type(m).edit is not AttentionMethod.edit]
        if editing:
            raise ValueError(f"TransPrune(cuda_graphs=True) cannot be combined with attention-editing methods "
                             f"({', '.join(editing)}): their per-call edits would be frozen into the graph. Use "
                             "cuda_graphs=False with them.")
        device = next(layers[start].parameters()).device
        if device.type != "cuda":
            raise ValueError(f"TransPrune(cuda_graphs=True) needs the model on a CUDA GPU; it is on {device}")
        return PrefillLayerGraphs(layers, start, max_graphs=cfg.max_graphs)

    def detach(self, context) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if getattr(self, "_graphs", None) is not None:
            self._earlier_captures = self.graph_captures
            self._graphs.remove()
            self._graphs = None

    @property
    def graph_captures(self) -> int:
        """How many CUDA graphs this method has captured (one per new padded prompt shape), across patches."""
        live = 0 if getattr(self, "_graphs", None) is None else self._graphs.captures
        return getattr(self, "_earlier_captures", 0) + live

    def begin_request(self, context) -> None:
        self._state = None
        layout = context.layout
        if layout is None or not bool(layout.image.any()):
            return  # text-only prompts are not pruned (reference D)
        valid = layout.valid
        # Per-sample counts on the host, read once per request: every later shape (compacted widths, the first
        # instruction row, whether a mask is needed) follows from them, so no layer has to wait for the GPU.
        image = layout.image & valid
        positions = torch.arange(layout.prompt_length, device=valid.device)
        image_end = torch.where(image, positions, -1).amax(1) + 1
        image_start = torch.where(image, positions, layout.prompt_length).amin(1)
        blocks = (image & ~torch.nn.functional.pad(image[:, :-1], (1, 0))).sum(1)  # separate runs of image tokens
        n_valid, n_image, after, before, n_blocks = torch.stack(
            [valid.sum(1), image.sum(1), (valid & (positions >= image_end[:, None])).sum(1),
             (valid & (positions < image_start[:, None])).sum(1), blocks]).tolist()
        keep = [[int(n * ratio) for n in n_image] for ratio in self.config.keep_ratios]  # floor(N_b * r)
        self._state = {
            "host": {"text": [v - i for v, i in zip(n_valid, n_image)], "keep": keep, "after": after,
                     "before": before, "blocks": n_blocks, "n_image": n_image, "valid_now": n_valid},
            # Device copies made now, while the request waits for the GPU anyway (a copy later would stall a layer).
            "keep_counts": torch.tensor(keep, device=valid.device),
            "mask": None if all(v == layout.prompt_length for v in n_valid) else valid.clone(),
            "map": torch.arange(layout.prompt_length, device=valid.device).expand(layout.batch_size, -1).clone(),
            "valid": valid.clone(),
            "ttv": torch.zeros(valid.shape, device=valid.device),
            "captured": {},
            "removed": {},  # layer index -> [B] tokens removed before it
            "widths": {},  # layer index -> prompt length at that layer
            "masks": {},  # layer index -> [B, L'] prompt mask at that layer, None when nothing is padded
            "kept": [],  # per stage: [B, N] bool over prompt positions, the image tokens still present
            "position_ids": None,
            "rope": None,
        }

    # ---------------------------------------------------------------------------------------------- TTV
    def _make_capture(self, number: int, name: str):
        def hook(module, args, output):
            state = self._state
            context = self._context
            if state is None or context.step != 0 or not context.in_request:
                return None
            value = output[0] if isinstance(output, tuple) else output
            captured = state["captured"].setdefault(number, {})
            captured[name] = value.detach()
            if name == "y_f":
                valid = state["valid"].to(value.device)
                ttv = transition_score(captured["x_a"], captured["y_a"], valid, self.config.direction)
                ttv = ttv + transition_score(captured["x_f"], value, valid, self.config.direction)
                state["ttv"] = state["ttv"].to(value.device) + ttv.masked_fill(~valid, 0.0)
                state["captured"].pop(number)
            return None

        return hook

    # -------------------------------------------------------------------------------------- layer hooks
    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            state = self._state
            context = self._context
            if state is None or not context.in_request:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if context.step == 0:
                if index in self._prune_index:
                    hidden = self._prune(index, hidden, kwargs)
                kwargs = {**kwargs, "attention_mask": state["mask"],
                          "position_ids": state["position_ids"], "position_embeddings": state["rope"]}
                if self._graphs is not None and index == self._graphs.start:
                    self._replay_graph(hidden, kwargs)
            else:
                kwargs = self._decode_kwargs(index, hidden, kwargs)
            if context.step == 0:
                # Graphed layers keep no padding columns in their KV cache (the graph drops the ones it added),
                # so their decode steps see exactly the eager, unpadded cache.
                trim = state["cache_trim"] if self._graphs is not None and index >= self._graphs.start else 0
                context.sequence_maps[index] = state["map"][:, trim:] if trim else state["map"]
                state["removed"][index] = state["removed_now"]
                state["masks"][index] = state["cache_mask"] if trim else state["mask"]
                state["widths"][index] = hidden.shape[1] - trim
            args = (hidden, *args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _replay_graph(self, hidden: torch.Tensor, kwargs: dict) -> None:
        # transformers collects per-layer outputs when the call or the config asks for them.
        context = self._context
        names = ("output_hidden_states", "output_attentions")
        wanted = sorted({name for name in names if context.request_kwargs.get(name) or any(
            getattr(config, name, False) for config in (context.language_model.config, context.model.config))})
        if wanted:
            raise ValueError(f"TransPrune(cuda_graphs=True) cannot return per-layer outputs ({', '.join(wanted)}); "
                             "use cuda_graphs=False for them")
        self._graphs.replay(hidden, kwargs, cache_from=self._state["cache_trim"])

    def _scores(self, index: int, hidden: torch.Tensor, kwargs: dict, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """alpha * TTV + (1 - alpha) * IGA over the current image tokens ([B, L], zero elsewhere)."""
        layer = self._layers[index]
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        positions = torch.arange(length, device=hidden.device)
        # Rows after the last image token still present (instruction + template tokens, reference T10); left
        # padding makes them a suffix of every row of the batch, so only that suffix is projected. Its start comes
        # from host counts, a bound at or before every sample's image end: pruning removes image tokens only, so a
        # single image block still ends `after[b]` tokens before the end of the row; with several blocks, a stage
        # may remove the last one entirely, and the bound falls back to the sample's first image token.
        host = self._state["host"]
        bounds = [length - a if k == 1 else length - v + b + 1 for n, k, a, b, v in zip(
            host["n_image"], host["blocks"], host["after"], host["before"], host["valid_now"]) if n]
        first_row = min(bounds, default=0)
        image_end = torch.where(image, positions, -1).amax(1) + 1
        rows = (positions[None, first_row:] >= image_end[:, None]) & valid[:, first_row:]
        z = layer.input_layernorm(hidden)
        head_dim = attn.head_dim
        q = attn.q_proj(z[:, first_row:]).view(batch, length - first_row, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(z).view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, _ = rotate(q, q, cos[:, first_row:], sin[:, first_row:])
        k, _ = rotate(k, k, cos, sin)
        _, stats = kernels.attention(q, k, k, scale=attn.scaling, causal=True, key_padding=valid,
                                     edit=AttentionEdit(key_mass_rows=rows))
        iga = stats.key_mass.float().mean(dim=1) / rows.sum(1, keepdim=True).clamp_min(1)
        ttv = self._state["ttv"].to(hidden.device)

        def normalise(x: torch.Tensor) -> torch.Tensor:
            x = torch.where(image, x, torch.zeros_like(x))
            return x / (x.sum(1, keepdim=True) + 1e-8)

        return self.config.alpha * normalise(ttv) + (1 - self.config.alpha) * normalise(iga)

    def _prune(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        state = self._state
        device = hidden.device
        valid = state["valid"].to(device)
        layout = self._context.layout
        image = torch.gather(layout.image.to(device), 1, state["map"].clamp_min(0).to(device)) & valid
        if state["position_ids"] is None:
            kwargs_rope = kwargs
        else:
            kwargs_rope = {"position_embeddings": state["rope"]}
        scores = self._scores(index, hidden, kwargs_rope, image, valid)
        stage = self._prune_index[index]
        host = state["host"]
        host_keep = host["keep"][stage]  # floor(N_b * r) of the sample's original image tokens
        keep_counts = state["keep_counts"][stage].to(device)
        ranked = scores.masked_fill(~image, float("-inf")).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(ranked.shape[1], device=device).expand_as(ranked))
        keep = valid & (~image | (rank < keep_counts[:, None]))
        counts = keep.sum(1)
        host_counts = [t + k for t, k in zip(host["text"], host_keep)]
        width = longest = max(host_counts)
        if stage == len(self.config.prune_layers) - 1:
            multiple = self.config.padding()
            width = -(-longest // multiple) * multiple
        # Left-padded compaction: sample b's kept positions, in order, right-aligned.
        order = torch.where(keep, torch.arange(keep.shape[1], device=device), keep.shape[1] + torch.arange(keep.shape[1], device=device))
        kept_sorted = order.sort(dim=1).values[:, :width]  # kept first, in order
        slot = torch.arange(width, device=device)[None, :]
        shift = width - counts[:, None]
        source = torch.gather(kept_sorted, 1, (slot - shift).clamp_min(0))
        new_valid = slot >= shift
        source = torch.where(new_valid, source, torch.zeros_like(source))
        hidden = torch.gather(hidden, 1, source[..., None].expand(-1, -1, hidden.shape[-1]))
        hidden = hidden * new_valid[..., None].to(hidden.dtype)
        state["map"] = torch.where(new_valid, torch.gather(state["map"].to(device), 1, source), torch.full_like(source, -1))
        state["ttv"] = torch.where(new_valid, torch.gather(state["ttv"].to(device), 1, source), torch.zeros_like(source, dtype=torch.float32))
        state["valid"] = new_valid
        state["mask"] = None if all(c == width for c in host_counts) else new_valid
        state["cache_trim"] = width - longest  # padding columns added only for the graphs' sake
        state["cache_mask"] = None if all(c == longest for c in host_counts) else new_valid[:, width - longest:]
        host["valid_now"] = host_counts
        positions = (new_valid.long().cumsum(1) - 1).clamp_min(0)
        state["position_ids"] = positions
        state["rope"] = self._rotary(hidden, position_ids=positions)
        state["removed_now"] = valid.sum(1) - counts + state.get("removed_before", torch.zeros_like(counts))
        state["removed_before"] = state["removed_now"]
        # Scatter into one spare column that absorbs the padding slots (map -1), then drop it.
        prompt_length = layout.roles.shape[1]
        kept_prompt = torch.zeros(layout.roles.shape[0], prompt_length + 1, dtype=torch.bool, device=device)
        kept_prompt.scatter_(1, torch.where(new_valid, state["map"], prompt_length), True)
        state["kept"].append(kept_prompt[:, :prompt_length] & layout.image.to(device))
        return hidden

    def _decode_kwargs(self, index: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        # The layers of one pruning stage share their position shift and prompt mask (the same tensors), so a
        # decode step computes positions, RoPE and mask once per stage rather than once per layer.
        state = self._state
        key = (self._context.step, id(state["removed"][index]), id(state["masks"][index]))
        cached = state.get("decode_cache")
        if cached is None or cached[0][0] != key[0]:
            cached = state["decode_cache"] = [(key[0], None, None), {}]
        if key not in cached[1]:
            cached[1][key] = self._decode_inputs(index, hidden, kwargs)
        return {**kwargs, **cached[1][key]}

    def _decode_inputs(self, index: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        state = self._state
        removed = state["removed"][index].to(hidden.device)
        positions = kwargs["position_ids"] - removed[:, None]
        prompt_mask = state["masks"][index]
        full = kwargs.get("attention_mask")
        if full is not None and full.dim() == 2:
            generated = full[:, self._context.layout.prompt_length:].bool()
            if prompt_mask is None:
                prompt_mask = torch.ones(full.shape[0], state["widths"][index], dtype=torch.bool, device=hidden.device)
            mask = torch.cat([prompt_mask.to(hidden.device), generated], dim=1)
        elif full is None:
            mask = None
            if prompt_mask is not None:
                past = self._context.step  # tokens generated before this step, plus this one
                mask = torch.cat([prompt_mask.to(hidden.device),
                                  torch.ones(prompt_mask.shape[0], past, dtype=torch.bool, device=hidden.device)], 1)
        else:
            raise RuntimeError("TransPrune needs 2D padding masks (the mmattn attention implementation provides them)")
        return {"position_ids": positions, "position_embeddings": self._rotary(hidden, position_ids=positions),
                "attention_mask": mask}

    @property
    def kept_image_tokens(self) -> list[torch.Tensor]:
        """Per pruning stage, [B, N] bool over prompt positions: the image tokens kept after that stage."""
        return [] if self._state is None else list(self._state["kept"])


__all__ = ["TransPrune", "TransPruneConfig", "transprune_tflops", "transition_score"]
