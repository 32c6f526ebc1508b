"""Find passes by name.

A recipe names a pass in one of three ways:

* an entry-point name in the ``lowbit.passes`` group (``"quantize-weights"``).
  lowbit's own passes are declared there in its ``pyproject.toml``, and an
  installed package adds passes the same way, without lowbit importing it by
  hand::

      [project.entry-points."lowbit.passes"]
      my-pass = "my_pkg.passes:MyPass"

* a name a running program registered with :func:`register_pass`;
* a dotted path ``package.module:Class``.

The registry is part of the core: it finds passes by name and never imports
a pass module itself.

A pass's options are its keyword-only constructor arguments; ``pass_options``
reads them (name, type, default, help from the docstring's ``Options:``
section) for ``lowbit passes`` and for recipe validation.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import re
from typing import Any

import onnx_ir as ir
from lowbit.compiler.core.errors import InputError

ENTRY_POINT_GROUP = "lowbit.passes"
_REGISTRY: dict[str, type] = {}


def register_pass(cls: type) -> type:
    """Class decorator: make ``cls`` findable by its ``name`` attribute."""
    name = getattr(cls, "name", "") or cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"pass name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if "canonicalize" not in found:
        raise InputError("lowbit's built-in passes are not registered: install lowbit (pip install -e .) "
                         "so its entry points are declared")
    return found


def resolve_pass(spec: str) -> type:
    """The pass class a recipe names (registry name, entry point, or dotted path)."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"cannot import pass {spec!r}: {e}") from e
        return _check_pass_class(obj, spec)
    eps = _entry_points()
    if spec in eps:
        try:
            obj = eps[spec].load()
        except Exception as e:  # a broken plugin must not look like a typo
            raise InputError(f"entry point {spec!r} ({eps[spec].value}) failed to load: {e}") from e
        return _check_pass_class(obj, spec)
    known = ", ".join(sorted(set(_REGISTRY) | set(eps)))
    raise InputError(f"unknown pass {spec!r} (known: {known}; or give a dotted path 'package.module:Class')")


def _check_pass_class(obj: Any, spec: str) -> type:
    if not (isinstance(obj, type) and issubclass(obj, ir.passes.PassBase)):
        raise InputError(f"{spec!r} is not a pass class (expected a subclass of onnx_ir.passes.PassBase)")
    return obj


def all_passes() -> dict[str, type]:
    """Registered passes plus installed entry points, by name."""
    found = dict(_REGISTRY)
    for name, ep in _entry_points().items():
        try:
            found.setdefault(name, ep.load())
        except Exception:  # listed as unloadable rather than hiding the others
            continue
    return found


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: str
    default: Any
    help: str


def pass_options(cls: type) -> list[Option]:
    """The keyword-only constructor options of a pass class."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return []
    helps = _option_help(inspect.getdoc(cls) or "")
    opts = []
    for p in sig.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        ann = p.annotation
        type_name = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        default = None if p.default is inspect.Parameter.empty else p.default
        opts.append(Option(p.name, type_name, default, helps.get(p.name, "")))
    return opts


def _option_help(doc: str) -> dict[str, str]:
    """Parse ``name: text`` lines under an ``Options:`` heading."""
    helps: dict[str, str] = {}
    in_options = False
    for line in doc.splitlines():
        if line.strip() == "Options:":
            in_options = True
            continue
        if in_options:
            m = re.match(r"\s+(\w+):\s*(.*)", line)
            if m:
                helps[m.group(1)] = m.group(2)
            elif line and not line.startswith(" "):
                in_options = False
    return helps


def instantiate(spec: str, options: dict[str, Any]) -> ir.passes.PassBase:
    """Build the pass a recipe entry describes, validating its option names."""
    cls = resolve_pass(spec)
    known = {o.name for o in pass_options(cls)}
    unknown = set(options) - known
    if unknown:
        raise InputError(
            f"pass {spec!r} has no option {', '.join(sorted(map(repr, unknown)))}"
            f" (options: {', '.join(sorted(known)) or 'none'})"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise InputError(f"pass {spec!r}: bad options: {e}") from e
