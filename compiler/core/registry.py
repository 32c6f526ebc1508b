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

A pass's options are the fields of its ``Options`` dataclass
(``lowbit.compiler.core.options``: type, default, and help text in the field's
metadata); a third-party pass without one has its keyword-only constructor
arguments read instead. ``pass_options`` lists them for ``lowbit passes`` and
for recipes; ``instantiate`` checks every given option's name and type before it
builds the pass, so a recipe with a wrong key or value fails before any pass runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
from typing import Any

import onnx_ir as ir

from lowbit.compiler.core.errors import InputError, OptionError
from lowbit.compiler.core.options import (
    check_options,
    is_options_class,
    type_hints,
    type_text,
)

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
        if not module_name or module_name.startswith(".") or not attr:
            raise InputError(f"cannot import pass {spec!r}: expected an absolute dotted path 'package.module:Class'")
        try:
            module = importlib.import_module(module_name)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # not found, or the plugin's own code raised (or exited) while importing
            missing = isinstance(e, ModuleNotFoundError) and e.name is not None and (
                module_name == e.name or module_name.startswith(e.name + "."))
            if missing:
                raise InputError(f"cannot import pass {spec!r}: no module named {e.name!r}") from e
            raise InputError(f"importing {module_name} failed: {type(e).__name__}: {_first_line(e)}") from e
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise InputError(f"cannot import pass {spec!r}: module {module_name} has no attribute {attr!r}") from None
        return _check_pass_class(obj, spec)
    eps = _entry_points()
    if spec in eps:
        try:
            obj = eps[spec].load()
        except Exception as e:  # a broken plugin must not look like a typo
            raise InputError(f"entry point {spec!r} ({eps[spec].value}) failed to load: "
                             f"{type(e).__name__}: {_first_line(e)}") from e
        return _check_pass_class(obj, spec)
    known = ", ".join(sorted(set(_REGISTRY) | set(eps)))
    raise InputError(f"unknown pass {spec!r} (known: {known}; or give a dotted path 'package.module:Class')")


def _first_line(e: BaseException) -> str:
    """An exception's message on one line (a plugin's error may span several)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


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
    type: str  # the annotation as written ("float | None")
    default: Any
    help: str
    annotation: Any = None  # the resolved annotation values are checked against (None: unchecked)


def pass_options(cls: type) -> list[Option]:
    """The options of a pass class: its ``Options`` dataclass's fields, else its keyword-only constructor arguments."""
    options_cls = getattr(cls, "Options", None)
    if is_options_class(options_cls) and dataclasses.fields(options_cls):
        hints = type_hints(options_cls)
        return [
            Option(f.name, type_text(f.type), _field_default(f), f.metadata.get("help", ""), hints.get(f.name))
            for f in dataclasses.fields(options_cls)
        ]
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return []
    hints = type_hints(cls.__init__)
    opts = []
    for p in sig.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        type_name = "" if p.annotation is inspect.Parameter.empty else type_text(p.annotation)
        opts.append(Option(p.name, type_name, default, "", hints.get(p.name)))
    return opts


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def check_pass_options(spec: str, options: dict[str, Any]) -> type:
    """The pass class ``spec`` names, once every option given is one of its options and of its type."""
    cls = resolve_pass(spec)
    known = {o.name: o for o in pass_options(cls)}
    unknown = set(options) - set(known)
    if unknown:
        raise InputError(
            f"pass {spec!r} has no option {', '.join(sorted(map(repr, unknown)))}"
            f" (options: {', '.join(sorted(known)) or 'none'})"
        )
    check_options(spec, {name: o.annotation for name, o in known.items() if o.annotation is not None}, options)
    return cls


def instantiate(spec: str, options: dict[str, Any]) -> ir.passes.PassBase:
    """Build the pass a recipe entry describes, checking its option names and types first."""
    cls = check_pass_options(spec, options)
    try:
        return cls(**options)
    except OptionError as e:  # named as the recipe names the pass
        raise e.named(spec) from None
    except InputError:
        raise
    except (TypeError, ValueError) as e:
        raise InputError(f"pass {spec!r}: bad options: {_first_line(e)}") from e
    except Exception as e:  # a third-party pass whose constructor raised something else
        raise InputError(f"pass {spec!r}: creating it failed: {type(e).__name__}: {_first_line(e)}") from e
