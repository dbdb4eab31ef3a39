"""Base class and registry of LVLM attention methods.

A method is a small ``Config`` dataclass plus a class that turns it into :class:`~mmattn.edits.AttentionEdit`
objects, one per attention call. Methods never run attention themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...edits import AttentionEdit, AttentionStats

if TYPE_CHECKING:
    from ..patch import AttentionCall, PatchContext

__all__ = ["AttentionMethod", "METHODS", "register_method", "create_method", "parse_method_spec"]

METHODS: dict[str, type["AttentionMethod"]] = {}


def register_method(cls: type["AttentionMethod"]) -> type["AttentionMethod"]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    name = cls.name
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = cls
    return cls


class AttentionMethod:
    """Base of every LVLM method. Subclasses set ``name`` and ``Config`` and override the hooks they need."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = dataclass(type("Config", (), {}))

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        if config is None:
            config = self.Config(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__qualname__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def attach(self, context: "PatchContext") -> None:
        """Called once by ``mmattn.patch``: check the model is supported, raise otherwise."""

    def begin_request(self, context: "PatchContext") -> None:
        """Called at every prefill, after ``context.layout`` is built: reset per-request state here."""

    def edit(self, context: "PatchContext", call: "AttentionCall") -> AttentionEdit | None:
        """The edit for one attention call (one layer, prefill or one decode step); None leaves it untouched."""
        return None

    def observe(self, context: "PatchContext", call: "AttentionCall", stats: AttentionStats) -> None:
        """Receives the statistics this method asked for in :meth:`edit`."""

    def detach(self, context: "PatchContext") -> None:
        """Called on ``handle.remove()``."""


def _coerce(value: str, target: Any) -> Any:
    if isinstance(target, bool):
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(target, int):
        return int(value)
    if isinstance(target, float):
        return float(value)
    if isinstance(target, (tuple, list)) or target is None:
        if value.lower() in ("none", ""):
            return None
        parts = [p for p in value.replace("/", " ").replace(";", " ").split()]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            return tuple(float(p) for p in parts)
    return value


def create_method(name: str, **options: Any) -> AttentionMethod:
    """Instantiate a registered method by name with config overrides."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}") from None
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(known)}")
    return cls(**options)


def parse_method_spec(spec: str) -> AttentionMethod:
    """``"name"`` or ``"name:key=value,key=value"`` (the CLI's ``--method``) -> a method instance.

    Tuple options take space- or slash-separated values: ``layers=2/3/4``.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    defaults = {f.name: getattr(METHODS[name].Config(), f.name) for f in dataclasses.fields(METHODS[name].Config)}
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r} is not of the form key=value")
        if key not in defaults:
            raise ValueError(f"method {name!r} has no option {key!r}; its options are {sorted(defaults)}")
        try:
            options[key] = _coerce(value.strip(), defaults[key])
        except ValueError as error:
            raise ValueError(f"method {name!r} option {key!r}: {error}") from None
    return create_method(name, **options)


def group_table(values: dict[int, float], num_groups: int, batch: int, num_heads: int, device: torch.device) -> torch.Tensor:
    """A [B, H, G] float table with ``values[g]`` in every (batch, head) for each listed group."""
    table = torch.zeros(batch, num_heads, num_groups, device=device)
    for group, value in values.items():
        table[:, :, group] = value
    return table
