"""transformers integration: one registered attention function, a matching mask function, and ``patch``.

``mmattn.patch(model, *methods)`` switches only the text model of a LLaVA-family model to the ``"mmattn"``
attention implementation and returns a :class:`PatchHandle` (also a context manager). Per-request state (the
token layout, decode step, method state) lives on the handle's :class:`PatchContext`, never in ``generate()``
kwargs. ``handle.remove()`` restores the previous implementation and removes every hook.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from .. import kernels
from ..edits import AttentionEdit, AttentionStats, combine_edits
from ..layout import NextImageGeometry, TokenLayout
from .methods.base import AttentionMethod

__all__ = ["ATTENTION_NAME", "patch", "PatchHandle", "PatchContext", "AttentionCall", "SUPPORTED_MODELS"]

ATTENTION_NAME = "mmattn"
SUPPORTED_MODELS = (
    "LlavaForConditionalGeneration",
    "LlavaModel",
    "LlavaNextForConditionalGeneration",
    "LlavaNextModel",
)
# Implementations we can switch away from and back to.
SUPPORTED_PREVIOUS_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

# Attention module -> context of the handle that patched it. Weak keys: a deleted model leaves nothing behind.
_CONTEXT_BY_MODULE: "weakref.WeakKeyDictionary[torch.nn.Module, PatchContext]" = weakref.WeakKeyDictionary()
_REGISTRATION_LOCK = threading.Lock()
_registered = False


@dataclass
class AttentionCall:
    """What a method knows about one attention call when it builds its edit."""

    layer_idx: int
    num_layers: int
    batch_size: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    device: torch.device
    is_prefill: bool
    step: int  # 0 at prefill, k at the k-th decode step
    roles: torch.Tensor | None  # long [B, kv_len] (see mmattn.layout.Role); None when the prompt was not seen
    key_padding: torch.Tensor | None  # bool [B, kv_len], True on real keys; None = no padding
    query: torch.Tensor  # [B, H, q_len, D], RoPE applied; read-only
    key: torch.Tensor  # [B, Hkv, kv_len, D]; read-only
    value: torch.Tensor  # [B, Hkv, kv_len, D]; read-only
    scale: float  # the layer's score scale
    branch: str = "image"  # "image" for the request itself; another name while a method runs an auxiliary branch

    @property
    def query_positions(self) -> torch.Tensor:
        """Absolute key position of each query row ([q_len])."""
        return torch.arange(self.kv_len - self.q_len, self.kv_len, device=self.device)

    def attend_rows(self, positions: torch.Tensor, with_probs: bool = False):
        """Plain (unedited) attention of one query row per sample, at absolute ``positions`` ([B]), over the keys
        that row sees: ``(output [B, H, D], probabilities [B, H, kv_len] or None)``, on the shared kernels.

        Methods use it for statistics of the row they are about to edit (VHR's head outputs, GIFT's head gates)."""
        batch = torch.arange(self.batch_size, device=self.device)
        query = self.query[batch, :, self.q_len - (self.kv_len - positions)][:, :, None]  # [B, H, 1, D]
        visible = torch.arange(self.kv_len, device=self.device)[None, :] <= positions[:, None]
        if self.key_padding is not None:
            visible = visible & self.key_padding
        edit = AttentionEdit(key_mass_rows=torch.ones(self.batch_size, 1, dtype=torch.bool, device=self.device)) \
            if with_probs else None
        output, stats = kernels.attention(query, self.key, self.value, scale=self.scale, causal=False,
                                          key_padding=visible, edit=edit)
        return output[:, 0], (stats.key_mass if with_probs else None)


@dataclass
class PatchContext:
    """Per-model, per-request state shared by the attention function and the methods."""

    model: torch.nn.Module
    language_model: torch.nn.Module
    methods: list[AttentionMethod]
    processor: Any = None
    layout: TokenLayout | None = None
    step: int = 0
    num_layers: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # free per-method storage, reset by the methods
    model_kind: str = "llava"
    prompt_ids: torch.Tensor | None = None  # input_ids of the current request's prompt
    request_kwargs: dict[str, Any] = field(default_factory=dict)  # the prefill forward's arguments
    image_geometry: list | None = None  # LLaVA-NeXT: per sample, per image, its NextImageGeometry
    sequence_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    _roles_cache: dict = field(default_factory=dict)  # (layer map or None, kv_len) -> roles, for the current forward  # layer -> [B, L'] prompt positions (-1: pad)
    branch: str = "image"  # set by a method while it runs an auxiliary branch through the decoder layers
    branch_owner: Any = None  # that method: the only one asked for edits on the auxiliary branch
    bypass: bool = False  # True while a method runs an auxiliary forward that must see plain attention

    def __post_init__(self) -> None:
        # The methods that edit or observe attention calls. Methods that only rewrite the sequence (TransPrune)
        # keep the base class's ``edit``; leaving them out lets every call take the direct kernel path.
        self._attention_methods = [m for m in self.methods if type(m).edit is not AttentionMethod.edit]

    @property
    def config(self):
        return self.model.config

    @property
    def in_request(self) -> bool:
        """True while the model runs the user's request itself (not a method's auxiliary branch or stream):
        the condition under which method hooks may read or rewrite hidden states."""
        return not self.bypass and self.branch == "image"

    def layout_at(self, layer_idx: int) -> TokenLayout | None:
        """The prompt layout as layer ``layer_idx`` sees it (after any token pruning before that layer)."""
        index = self.sequence_maps.get(layer_idx)
        if self.layout is None or index is None:
            return self.layout
        return self.layout.select(index)

    def at_layer(self, values: torch.Tensor, layer_idx: int, fill) -> torch.Tensor:
        """Map a per-prompt-position tensor [B, N, ...] to layer ``layer_idx``'s (possibly pruned) positions."""
        index = self.sequence_maps.get(layer_idx)
        if index is None:
            return values
        index = index.to(values.device)
        gathered = torch.gather(values, 1, index.clamp_min(0).view(*index.shape, *([1] * (values.dim() - 2))).expand(
            *index.shape, *values.shape[2:]))
        pad = (index < 0).view(*index.shape, *([1] * (values.dim() - 2)))
        return torch.where(pad, torch.as_tensor(fill, dtype=values.dtype, device=values.device), gathered)

    # Called by the forward pre-hook on the multimodal model.
    def _on_forward(self, kwargs: dict[str, Any]) -> None:
        if self.bypass:
            return
        self._roles_cache = {}
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            self.step += 1
            return
        self.step = 0
        self.sequence_maps = {}
        self.prompt_ids = kwargs.get("input_ids")
        self.request_kwargs = kwargs
        self.layout = self._build_layout(kwargs)
        for method in self.methods:
            method.begin_request(self)

    def _build_layout(self, kwargs: dict[str, Any]) -> TokenLayout | None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            return None
        attention_mask = kwargs.get("attention_mask")
        config = self.config
        image_token_id = config.image_token_id
        counts = newlines = None
        is_image = input_ids == image_token_id
        if attention_mask is not None:
            is_image &= attention_mask.bool()
        per_sample = is_image.sum(dim=1).tolist()
        self.image_geometry = None
        geometries = self._llava_next_geometries(kwargs) if self.model_kind == "llava_next" and any(per_sample) else None
        if geometries is not None:
            counts, newlines, cursor = [], [], 0
            self.image_geometry = []
            for b, total in enumerate(per_sample):
                counts.append([])
                newlines.append([])
                self.image_geometry.append([])
                while sum(counts[b]) < total:
                    if cursor >= len(geometries):
                        raise ValueError(f"sample {b} has {total} image tokens but only {len(geometries)} images were given")
                    geometry = geometries[cursor]
                    counts[b].append(geometry.num_tokens)
                    newlines[b].append(geometry.newline_offsets)
                    self.image_geometry[b].append(geometry)
                    cursor += 1
        elif self.model_kind == "llava" and any(per_sample):
            vision = config.vision_config
            per_image = (vision.image_size // vision.patch_size) ** 2
            if getattr(config, "vision_feature_select_strategy", "default") == "full":
                per_image += 1
            counts = []
            for b in range(input_ids.shape[0]):
                runs = []
                for run in _runs(is_image[b]):
                    runs += [per_image] * (run // per_image) if run % per_image == 0 else [run]
                counts.append(runs)
        return TokenLayout.from_input_ids(
            input_ids, image_token_id, attention_mask, image_token_counts=counts, newline_offsets=newlines
        )

    def _llava_next_geometries(self, kwargs: dict[str, Any]) -> list[NextImageGeometry] | None:
        """Per image (in batch order), where its features sit; None when neither sizes nor features are at hand."""
        config = self.config
        strategy = kwargs.get("vision_feature_select_strategy") or getattr(config, "vision_feature_select_strategy", "default")
        if kwargs.get("image_sizes") is not None:
            return [NextImageGeometry.from_image_size(config, tuple(s), strategy) for s in kwargs["image_sizes"].tolist()]
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        features = getattr(encoded, "pooler_output", None)
        if isinstance(features, (list, tuple)):
            newline = self.model.model.image_newline if hasattr(self.model, "model") else self.model.image_newline
            result = []
            for feature in features:
                is_newline = (feature == newline.to(feature)).all(dim=-1).nonzero().flatten().tolist()
                result.append(NextImageGeometry.from_packed_features(config, feature.shape[0], is_newline, strategy))
            return result
        return None

    def _call_for(self, module, query, key, value, key_padding, scale) -> AttentionCall:
        batch, num_heads, q_len, _ = query.shape
        kv_len = key.shape[2]
        roles = None
        if self.layout is not None and self.branch == "image":
            if self.layout.roles.device != query.device:
                self.layout = self.layout.to(query.device)
            index = self.sequence_maps.get(module.layer_idx)
            cache_key = (id(index) if index is not None else None, kv_len)
            roles = self._roles_cache.get(cache_key)
            if roles is None:
                roles = self._roles_cache[cache_key] = self.layout_at(module.layer_idx).roles_for(kv_len)
            if roles.shape[0] != batch:
                raise RuntimeError(
                    f"the prompt layout has batch {roles.shape[0]} but attention sees batch {batch}; "
                    "mmattn does not support beam search or num_return_sequences > 1 yet"
                )
        return AttentionCall(
            layer_idx=module.layer_idx,
            num_layers=self.num_layers,
            batch_size=batch,
            num_heads=num_heads,
            num_kv_heads=key.shape[1],
            q_len=q_len,
            kv_len=kv_len,
            device=query.device,
            is_prefill=self.step == 0,
            step=self.step,
            roles=roles,
            key_padding=key_padding,
            query=query,
            key=key,
            value=value,
            scale=scale,
            branch=self.branch,
        )

    def run_attention(self, module, query, key, value, key_padding, dense_mask, scale, causal):
        call = self._call_for(module, query, key, value, key_padding, scale)
        edit, projections, askers = None, [], []
        methods = self._attention_methods if self.branch == "image" else [self.branch_owner]
        output_scales = []  # head scales of other methods' row ranges, applied to the output (same math)
        for method in methods:
            method_edit = method.edit(self, call)
            if method_edit is None:
                continue
            if edit is not None and _is_head_scale_only(method_edit) and _rows_differ(edit, method_edit):
                output_scales.append(method_edit)
                continue
            if edit is not None and _is_head_scale_only(edit) and _rows_differ(edit, method_edit):
                output_scales.append(edit)
                edit = None
            projections = _project_groups(projections, edit, method_edit)
            try:
                edit = combine_edits(edit, method_edit)
            except ValueError as error:
                names = ", ".join(m.name for m in askers + [method])
                raise ValueError(f"methods {names} cannot be combined in layer {call.layer_idx}: {error}") from None
            askers.append(method)
        output, stats = kernels.attention(
            query, key, value, scale=scale, causal=causal, key_padding=key_padding, dense_mask=dense_mask, edit=edit
        )
        for scale_edit in output_scales:
            output = _scale_rows(output, scale_edit, call)
        for method, projection in zip(askers, projections):
            method.observe(self, call, _marginal_stats(stats, projection))
        return output


def _is_head_scale_only(edit: AttentionEdit) -> bool:
    return edit.head_scale is not None and not edit.modifies_scores and not (
        edit.return_lse or edit.return_group_mass or edit.key_mass_rows is not None
    )


def _rows_differ(a: AttentionEdit, b: AttentionEdit) -> bool:
    def same(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return not (same(a.row_start, b.row_start) and same(a.row_end, b.row_end))


def _scale_rows(output: torch.Tensor, edit: AttentionEdit, call: AttentionCall) -> torch.Tensor:
    """Apply a head-scale edit to the attention output ([B, Nq, H, D]) on its own rows."""
    positions = call.query_positions[None, :]
    selected = torch.ones(call.batch_size, call.q_len, dtype=torch.bool, device=call.device)
    if edit.row_start is not None:
        selected &= positions >= edit.row_start.to(call.device)[:, None]
    if edit.row_end is not None:
        selected &= positions < edit.row_end.to(call.device)[:, None]
    factor = torch.where(selected[:, :, None], edit.head_scale.to(call.device, torch.float32)[:, None, :], 1.0)
    return (output.float() * factor[..., None]).to(output.dtype)


def _bind_forward_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by name, whether passed positionally or by keyword."""
    if not args:
        return kwargs
    import inspect

    names = [p for p in inspect.signature(module.forward).parameters]
    return {**dict(zip(names, args)), **kwargs}


def _runs(mask: torch.Tensor) -> list[int]:
    positions = mask.nonzero().flatten()
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] - positions[:-1] != 1).nonzero().flatten().tolist()
    bounds = [0] + [i + 1 for i in breaks] + [positions.numel()]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def _project_groups(projections: list, combined: AttentionEdit | None, new: AttentionEdit) -> list:
    """Track, for every method folded so far, which of its own groups each combined key group belongs to."""
    if combined is None or combined.key_groups is None or new.key_groups is None:
        own = torch.arange(new.num_groups) if new.key_groups is not None else None
        return projections + [own]
    gb = new.num_groups
    updated = [p.repeat_interleave(gb) if p is not None else None for p in projections]
    return updated + [torch.arange(gb).repeat(combined.num_groups)]


def _marginal_stats(stats: AttentionStats, projection: torch.Tensor | None) -> AttentionStats:
    if stats.group_mass is None or projection is None or projection.numel() == stats.group_mass.shape[-1] and torch.equal(
        projection, torch.arange(projection.numel())
    ):
        return stats
    mass = stats.group_mass
    own = torch.zeros(*mass.shape[:-1], int(projection.max()) + 1, dtype=mass.dtype, device=mass.device)
    own.index_add_(-1, projection.to(mass.device), mass)
    return AttentionStats(lse=stats.lse, group_mass=own, key_mass=stats.key_mass)


def _interpret_mask(attention_mask, batch: int, kv_len: int):
    """Our mask function yields FlashAttention-style masks: None or a 2D key-padding mask. A user-supplied 4D
    mask is passed through as a dense mask."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:
        return attention_mask[:, -kv_len:].bool(), None
    if attention_mask.dim() == 4:
        return None, attention_mask[..., :kv_len]
    raise ValueError(f"mmattn attention got a mask of shape {list(attention_mask.shape)}; expected 2D or 4D")


def mmattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``AttentionInterface["mmattn"]``; returns (B, Nq, H, D) like sdpa."""
    if dropout:
        raise ValueError("mmattn attention does not implement attention dropout; call model.eval() first")
    batch, kv_len = query.shape[0], key.shape[2]
    key_padding, dense_mask = _interpret_mask(attention_mask, batch, kv_len)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
    context = _CONTEXT_BY_MODULE.get(module)
    if context is None or context.bypass or (not context._attention_methods and context.branch == "image"):
        output, _ = kernels.attention(query, key, value, scale=scale, causal=causal, key_padding=key_padding, dense_mask=dense_mask)
        return output, None
    return context.run_attention(module, query, key, value, key_padding, dense_mask, scale, causal), None


def mmattn_mask(*args: Any, **kwargs: Any):
    """Mask function registered under the same name: a 2D key-padding mask or None (causality is implied)."""
    from transformers.masking_utils import flash_attention_mask

    return flash_attention_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    global _registered
    with _REGISTRATION_LOCK:
        if not _registered:
            AttentionInterface.register(ATTENTION_NAME, mmattn_attention_forward)
            AttentionMaskInterface.register(ATTENTION_NAME, mmattn_mask)
            _registered = True


def _resolve_models(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(multimodal model whose forward sees input_ids, language model, kind) or a clear error."""
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise TypeError(f"mmattn.patch does not support {name}; supported model classes: {', '.join(SUPPORTED_MODELS)}")
    inner = model.model if name.endswith("ForConditionalGeneration") else model
    kind = "llava_next" if "Next" in name else "llava"
    return inner, inner.language_model, kind


class PatchHandle:
    """Returned by :func:`patch`: ``remove()`` undoes everything; usable as a context manager."""

    def __init__(self, model: torch.nn.Module, methods: Iterable[AttentionMethod], processor: Any = None) -> None:
        register()
        methods = list(methods)
        for method in methods:
            if not isinstance(method, AttentionMethod):
                raise TypeError(f"mmattn.patch takes method instances (e.g. mmattn.RoleBias()), got {method!r}")
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"each method may appear once per patch, got {names}")
        inner, language_model, kind = _resolve_models(model)
        text_config = model.config.text_config
        previous = text_config._attn_implementation
        if previous == ATTENTION_NAME:
            raise RuntimeError(
                "this model's text attention is already 'mmattn' (patched by another handle, or loaded with "
                "attn_implementation='mmattn'); remove the other handle, or pass all methods to one mmattn.patch call"
            )
        if previous not in SUPPORTED_PREVIOUS_IMPLEMENTATIONS:
            raise ValueError(
                f"cannot patch a text model running attention implementation {previous!r}; supported: "
                f"{', '.join(SUPPORTED_PREVIOUS_IMPLEMENTATIONS)}"
            )
        attention_modules = [layer.self_attn for layer in getattr(language_model, "layers", [])]
        if not attention_modules or not all(hasattr(m, "layer_idx") for m in attention_modules):
            raise TypeError(
                f"text model {type(language_model).__name__} has no decoder layers with `self_attn.layer_idx`; "
                "supported text models are those using transformers' attention interface (Llama, Mistral, Qwen2, ...)"
            )
        self.model = model
        self.previous_implementation = previous
        self.context = PatchContext(
            model=model, language_model=language_model, methods=methods, processor=processor,
            num_layers=len(attention_modules), model_kind=kind,
        )
        attached = []
        try:
            for method in methods:
                method.attach(self.context)
                attached.append(method)
        except Exception:
            for method in attached:  # leave the model exactly as it was
                method.detach(self.context)
            raise
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
        if language_model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation({"text_config": previous})
            raise TypeError(
                f"transformers refused to switch {type(language_model).__name__} to a custom attention function; "
                "mmattn supports text models that use transformers' AttentionInterface"
            )
        self._attention_modules = attention_modules
        for module in attention_modules:
            _CONTEXT_BY_MODULE[module] = self.context
        context = self.context
        self._hook = inner.register_forward_pre_hook(
            lambda module, args, kwargs: context._on_forward(_bind_forward_arguments(module, args, kwargs)),
            with_kwargs=True,
        )
        self._guards_generate = bool(methods) and hasattr(model, "generate")
        if self._guards_generate:
            model.generate = _one_sequence_per_prompt(model.generate, names)
        self.active = True

    @property
    def methods(self) -> list[AttentionMethod]:
        return self.context.methods

    def remove(self) -> None:
        """Restore the previous attention implementation and drop all hooks and state. Idempotent."""
        if not self.active:
            return
        self._hook.remove()
        if self._guards_generate and "generate" in vars(self.model):
            del self.model.generate  # back to the class's method
        for module in self._attention_modules:
            if _CONTEXT_BY_MODULE.get(module) is self.context:
                del _CONTEXT_BY_MODULE[module]
        self.model.set_attn_implementation({"text_config": self.previous_implementation})
        for method in self.context.methods:
            method.detach(self.context)
        self.context.layout = None
        self.context.prompt_ids = None
        self.context.request_kwargs = {}
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PatchHandle({type(self.model).__name__}, methods={[m.name for m in self.methods]}, {state})"


def _one_sequence_per_prompt(generate, method_names: list[str]):
    """Wrap ``model.generate`` to refuse beam search and several sequences per prompt: the methods keep
    per-sample state for the prompt's rows, which beam reordering and batch expansion would silently misalign."""
    import functools

    @functools.wraps(generate)
    def guarded(*args: Any, **kwargs: Any):
        config = kwargs.get("generation_config") or getattr(generate.__self__, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
        if beams > 1 or sequences > 1:
            raise ValueError(
                f"mmattn methods ({', '.join(method_names)}) support one sequence per prompt: got num_beams={beams}, "
                f"num_return_sequences={sequences}. Use greedy decoding or sampling with one sequence per prompt "
                "(repeat a prompt in the batch for several samples)."
            )
        return generate(*args, **kwargs)

    return guarded


def patch(model: torch.nn.Module, *methods: AttentionMethod, processor: Any = None) -> PatchHandle:
    """Patch a LLaVA-family model with attention methods; see :class:`PatchHandle`.

    Example::

        with mmattn.patch(model, mmattn.RoleBias(image=1.0)):
            out = model.generate(**inputs, max_new_tokens=32)
    """
    return PatchHandle(model, methods, processor=processor)
