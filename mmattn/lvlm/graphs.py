"""CUDA graphs for a run of decoder layers at prefill.

At batch 1 a 7B decoder layer over a few hundred tokens takes less GPU time than Python takes to issue its ~60
kernels, so once a method has shrunk the sequence (TransPrune keeps 12.5 % of the image tokens after layer 12) the
prefill waits on the host. :class:`PrefillLayerGraphs` captures ``layers[start:]`` once per input signature (shapes,
dtypes and the non-tensor arguments) and replays it: one launch instead of ~1,200.

How it plugs in, in the style of accelerate's module hooks: the owner calls :meth:`PrefillLayerGraphs.replay` from
a forward pre-hook of ``layers[start]`` with the arguments that layer is about to get (or lets
:meth:`~PrefillLayerGraphs.replay_at_prefill` register one that does so whenever the cache is still empty); the
wrapped ``forward`` of each graphed layer then hands the graph's output on instead of recomputing it. Only calls that
receive exactly the tensor that was replayed are passed through, so every other call (decode steps, other requests)
runs eagerly.

The KV cache: inside the graph each layer's ``cache.update`` goes to a recorder, so the graph holds the prompt's
keys and values in static buffers; each graphed layer's call, as it passes the output on, copies its own keys and
values into the request's cache. A graphed layer that receives anything but the replayed tensor (a hook changed the
hidden states) raises: its cache and output could no longer be the eager ones.

Limits, each refused with an error: CUDA only, no autograd, no ``torch.autocast`` (its cached weight casts are freed
when the block exits, while a graph would keep reading them), transformers' ``DynamicCache`` only, no hooks on the
graphed layers' submodules (they would not run) and no forward hooks on the graphed layers. One request at a time
per model, like the methods' own state.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 says `cache`, earlier 5.x `past_key_values`


class _KeyValueRecorder:
    """Stands in for the cache inside a capture: at prefill a layer's cache is exactly its new keys and values."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.entries[layer_idx] = (key_states, value_states)
        return key_states, value_states


def _signature(value: Any) -> Any:
    """What a captured graph is specialised on: tensor shapes/dtypes/devices and the values of everything else."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", type(value).__qualname__, id(value))


def _clone_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    return value


def _copy_tree(destination: Any, source: Any) -> None:
    if isinstance(destination, torch.Tensor):
        destination.copy_(source)
    elif isinstance(destination, (tuple, list)):
        for d, s in zip(destination, source):
            _copy_tree(d, s)
    elif isinstance(destination, dict):
        for key in destination:
            _copy_tree(destination[key], source[key])


def _foreign_hooks(hooks: dict) -> bool:
    """Hooks other than transformers' output-capturing ones (inert unless per-layer outputs are requested, which
    the owner refuses)."""
    return any(getattr(hook, "__module__", "") != "transformers.utils.output_capturing" for hook in hooks.values())


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    static_hidden: torch.Tensor
    static_kwargs: dict[str, Any]
    output: torch.Tensor
    recorder: _KeyValueRecorder


class PrefillLayerGraphs:
    """Replays ``layers[start:]`` of a transformers decoder as CUDA graphs, one per input signature.

    Args:
        layers: the decoder's layers (``language_model.layers``); each must return its hidden states as a tensor
            (transformers 5).
        start: index of the first graphed layer; the graphed run goes to the last layer.
        max_graphs: graphs kept (least recently used dropped first). They share one memory pool, but each keeps its
            prompt's keys and values for every graphed layer (about 50 MB per layer at batch 8 and ~400 tokens on
            a 7B model).
    """

    def __init__(self, layers: Sequence[torch.nn.Module], start: int, max_graphs: int = 4) -> None:
        layers = list(layers)
        if not 0 <= start < len(layers):
            raise ValueError(f"graphed layers must start at one of the {len(layers)} layers, got {start}")
        self.layers = layers[start:]
        self.start = start
        self.max_graphs = max_graphs
        self.captures = 0  # graphs captured so far (a new input signature each)
        self._graphs: OrderedDict[Any, _Captured] = OrderedDict()
        self._originals: list = []
        self._armed: tuple[torch.Tensor, torch.Tensor] | None = None  # (replayed input, graph output)
        self._pending: tuple[Any, _Captured, int] | None = None  # (request cache or None, replayed graph, cache_from)
        self._pool = None  # one memory pool for all captures (outputs are copied out right after each replay)
        self._prefill_hook = None

    # ------------------------------------------------------------------------------------------ install
    def install(self) -> "PrefillLayerGraphs":
        if self._originals:
            return self
        for layer in self.layers:
            if hasattr(layer, "_hf_hook"):
                raise ValueError("CUDA graphs need every graphed layer on one GPU; this model has accelerate hooks "
                                 "(device_map offloading or several devices). Load it on a single GPU.")
        self._layer_indices = [getattr(getattr(layer, "self_attn", None), "layer_idx", self.start + position)
                               for position, layer in enumerate(self.layers)]
        for position, layer in enumerate(self.layers):
            original = layer.forward
            self._originals.append(original)
            layer.forward = functools.partial(self._forward, position, original)
        return self

    def replay_at_prefill(self) -> "PrefillLayerGraphs":
        """Replay at every forward whose cache is still empty (a plain model's prefill), from a pre-hook on
        ``layers[start]`` that :meth:`remove` takes off again. Owners that rewrite the layers' arguments (TransPrune)
        call :meth:`replay` from their own hook instead."""
        self.install()
        if self._prefill_hook is None:
            def pre_hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                cache = next((kwargs[n] for n in _CACHE_ARGUMENTS if kwargs.get(n) is not None), None)
                if cache is None or cache.get_seq_length(self._layer_indices[0]) == 0:
                    self.replay(hidden, kwargs)

            self._prefill_hook = self.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._prefill_hook is not None:
            self._prefill_hook.remove()
            self._prefill_hook = None
        for layer, original in zip(self.layers, self._originals):
            wrapped = layer.__dict__.get("forward")
            if isinstance(wrapped, functools.partial) and wrapped.func == self._forward:
                del layer.forward
        self._originals = []
        self._graphs.clear()
        self._armed = self._pending = None
        self._pool = None

    def _forward(self, position: int, original, *args: Any, **kwargs: Any):
        armed = self._armed
        if armed is None:
            return original(*args, **kwargs)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not (armed[0] if position == 0 else armed[1]):
            self._armed = self._pending = None
            raise RuntimeError(
                f"CUDA-graphed prefill: decoder layer {self.start + position} received hidden states other than the "
                "ones the graph ran on (a forward hook or pre-hook replaced them); such hooks cannot be combined "
                "with the graphs")
        cache, captured, cache_from = self._pending
        if cache is not None:
            layer_idx = self._layer_indices[position]
            if layer_idx in captured.recorder.entries:
                keys, values = captured.recorder.entries[layer_idx]
                # Copies: the static buffers are overwritten by the next replay.
                cache.update(keys[..., cache_from:, :].clone(), values[..., cache_from:, :].clone(), layer_idx)
        if position == len(self.layers) - 1:
            self._armed = self._pending = None
        return armed[1]

    # ------------------------------------------------------------------------------------------- replay
    def replay(self, hidden: torch.Tensor, kwargs: dict[str, Any], cache_from: int = 0) -> None:
        """Run the graphed layers on ``hidden`` with the keyword arguments ``layers[start]`` is about to get.

        The output is handed on by the layers' own calls (pass ``hidden`` itself to ``layers[start]``); the cache
        in ``kwargs`` receives every graphed layer's keys and values from sequence position ``cache_from`` on
        (an owner that left-padded the sequence for the graph's sake drops that padding from the cache)."""
        self._armed = self._pending = None
        if not self._originals:
            raise RuntimeError("PrefillLayerGraphs.replay needs install() first")
        if not hidden.is_cuda:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got hidden states on {hidden.device}")
        if torch.is_grad_enabled():
            raise RuntimeError("CUDA-graphed prefill runs under torch.no_grad() or torch.inference_mode() only "
                               "(generate() does this); call the model inside one of them")
        if torch.is_autocast_enabled("cuda"):
            raise RuntimeError("CUDA-graphed prefill cannot run under torch.autocast (the graph would keep reading "
                               "autocast's freed weight copies); load the model in the dtype you want instead")
        # Inside a graphed layer no hook runs, and a forward hook on a graphed layer would see the run's final
        # output. Pre-hooks on the layers themselves are the owner's business (TransPrune's rewrite the arguments
        # and hand the same hidden states on; one that replaces them makes the layer raise, see _forward).
        hooked = [f"layers.{self.start + position}{'.' + name if name else ''}"
                  for position, layer in enumerate(self.layers) for name, module in layer.named_modules()
                  if _foreign_hooks(module._forward_hooks) or (name and _foreign_hooks(module._forward_pre_hooks))]
        if hooked:
            raise RuntimeError(f"CUDA-graphed prefill cannot run hooks inside the graphed layers, found some on "
                               f"{', '.join(hooked[:4])}; remove them or turn the graphs off")
        names = [n for n in _CACHE_ARGUMENTS if n in kwargs]
        cache = kwargs[names[0]] if names else None
        if cache is not None:
            from transformers import DynamicCache

            if not isinstance(cache, DynamicCache):
                raise TypeError(f"CUDA-graphed prefill supports transformers' DynamicCache (generate's default), got "
                                f"{type(cache).__name__}")
            # Inside the graph a layer attends only to the keys it has just made: right for a prefill only.
            held = cache.get_seq_length(self._layer_indices[0])
            if held:
                raise RuntimeError(f"CUDA-graphed prefill runs on an empty cache only; layer {self._layer_indices[0]}'s "
                                   f"already holds {held} tokens (decode steps and chunked prefill stay eager)")
        inputs = {k: v for k, v in kwargs.items() if k not in _CACHE_ARGUMENTS}
        key = _signature((hidden, inputs, names[0] if names else None))
        with torch.cuda.device(hidden.device):
            captured = self._graphs.get(key)
            if captured is None:
                captured = self._capture(hidden, inputs, names[0] if names else None)
                self._graphs[key] = captured
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
                captured.static_hidden.copy_(hidden)
                _copy_tree(captured.static_kwargs, inputs)
            captured.graph.replay()
            output = captured.output.clone()
        self._pending = (cache, captured, cache_from)
        self._armed = (hidden, output)

    def _capture(self, hidden: torch.Tensor, inputs: dict[str, Any], cache_name: str | None) -> _Captured:
        # Ordinary tensors even under inference_mode: a later replay under no_grad copies into them.
        with torch.inference_mode(False), torch.no_grad():
            static_hidden = hidden.clone()
            static_kwargs = _clone_tree(inputs)
        recorder = _KeyValueRecorder()
        call_kwargs = dict(static_kwargs)
        if cache_name is not None:
            call_kwargs[cache_name] = recorder

        def run() -> torch.Tensor:
            states = static_hidden
            for original in self._originals:  # the layers' own forwards: no module hooks inside the graph
                states = original(states, **call_kwargs)
                if not isinstance(states, torch.Tensor):
                    raise TypeError("CUDA-graphed prefill needs decoder layers that return a tensor (transformers 5), "
                                    f"got {type(states).__name__}")
            return states

        device = hidden.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()  # warm-up: one-off work (cuBLAS workspaces, Triton compilation) must not land in the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: CUDA calls of other threads (e.g. a DataLoader pinning memory) must not break the capture.
        with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
            output = run()
        self.captures += 1
        return _Captured(graph, static_hidden, static_kwargs, output, recorder)


__all__ = ["PrefillLayerGraphs"]
