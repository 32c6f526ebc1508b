"""Typed pass options: one frozen dataclass per pass, whose fields are its recipe keys.

A pass declares its options as a frozen dataclass (a :class:`PassOptions`) and points to
it from the class (``Options: ClassVar[type] = SmoothOptions``)::

    @dataclasses.dataclass(frozen=True)
    class SmoothOptions(PassOptions):
        alpha: float | None = option(None, "migration strength; None searches alpha_grid per group")
        max_rows: int = option(512, "calibration rows per group the search quantizes")

        def __post_init__(self) -> None:
            self.require(self.max_rows >= 1, "max_rows", "must be positive")

Each field carries its default and its help text (``lowbit passes`` shows both). Types
are checked against the annotation before a pass is built (:func:`check_value`: an int
is a float, a bool is neither; lists element by element; ``X | None``), values by the
dataclass's ``__post_init__``; both raise :class:`~lowbit.compiler.core.errors.OptionError`,
which names the pass, the option and the value.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
import types
import typing
from typing import Any, Union

import numpy as np

from lowbit.compiler.core.errors import OptionError


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a default (or ``default_factory``) and its help text in the metadata."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Base of the options dataclasses: helpers for ``__post_init__``."""

    def require(self, ok: bool, name: str, problem: str) -> None:
        """Raise an ``OptionError`` for option ``name`` unless ``ok`` (``problem``: "must be in [0, 1]")."""
        if not ok:
            raise OptionError(None, name, getattr(self, name), problem)

    def normalize(self, name: str, value: Any) -> None:
        """Store the normalised ``value`` of option ``name`` (e.g. None -> [])."""
        object.__setattr__(self, name, value)


@dataclasses.dataclass(frozen=True)
class NoOptions(PassOptions):
    """The options of a pass that has none."""


def is_options_class(obj: Any) -> bool:
    return isinstance(obj, type) and dataclasses.is_dataclass(obj)


def type_hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations of a dataclass or function ({} when they cannot be resolved)."""
    try:
        return typing.get_type_hints(obj)
    except (NameError, TypeError, AttributeError):  # an annotation the module cannot resolve: left unchecked
        return {}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def check_value(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (unknown annotations accept anything)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if _is_union(tp):
        return any(check_value(value, t) for t in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return all(check_value(v, item) for v in value)
    if tp is bool:
        return isinstance(value, (bool, np.bool_))
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


_NAMES = {bool: ("a bool", "bools"), int: ("an int", "ints"), float: ("a float", "floats"), str: ("a string", "strings")}


def describe_type(tp: Any, plural: bool = False) -> str:
    """``float | None`` -> "a float or None"; ``list[str]`` -> "a list of strings"."""
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " or ".join(describe_type(t, plural) for t in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        args = typing.get_args(tp)
        return ("lists" if plural else "a list") + (f" of {describe_type(args[0], True)}" if args else "")
    if tp in _NAMES:
        return _NAMES[tp][1 if plural else 0]
    return getattr(tp, "__name__", str(tp))


def type_text(tp: Any) -> str:
    """An annotation as it reads in source (``float | None``)."""
    if isinstance(tp, str):
        return tp
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(type_text(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return f"{typing.get_origin(tp).__name__}[{', '.join(type_text(t) for t in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def check_options(pass_name: str | None, hints: dict[str, Any], values: dict[str, Any]) -> None:
    """Raise an ``OptionError`` for the first value that does not fit its option's annotation."""
    for name, value in values.items():
        tp = hints.get(name)
        if tp is not None and not check_value(value, tp):
            raise OptionError(pass_name, name, value, f"is not {describe_type(tp)}")


def build_options(pass_name: str | None, options_cls: type, values: dict[str, Any]) -> Any:
    """``options_cls(**values)`` with types and values checked; errors name ``pass_name``."""
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{pass_name or options_cls.__name__} has no option {', '.join(map(repr, unknown))}"
                        f" (options: {', '.join(sorted(known)) or 'none'})")
    check_options(pass_name, type_hints(options_cls), values)
    try:
        return options_cls(**values)
    except OptionError as e:
        raise (e.named(pass_name) if pass_name else e) from None
