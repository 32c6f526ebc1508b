"""Recipes: named pipelines as TOML files.

A recipe is a file a user can copy and edit::

    name = "w8a8"
    description = "int8 weights and activations"

    [calibration]          # how much data the calibrate pass sees
    samples = 32
    seq_len = 128

    [evaluation]           # held-out data the artifact is measured on
    samples = 16
    seq_len = 128

    [[passes]]
    pass = "canonicalize"

    [[passes]]
    pass = "plan"          # registry name, entry point, or "pkg.mod:Class"
    activations = "dynamic"

Every key besides ``pass`` is an option of that pass; ``build()`` checks each
one's name and type (``lowbit.compiler.core.registry``), so a wrong key or value
fails before any pass runs. ``samples`` and ``seq_len`` of ``[calibration]`` and
``[evaluation]`` are integers. An option of
``LINKED_OPTIONS`` that the recipe leaves out follows the option it is linked
to (the rotation is learned against the group size the plan quantizes to).
``resolved()`` gives the recipe with every option filled in (defaults and
links included), which the manifest records.
"""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.registry import (
    check_pass_options,
    instantiate,
    pass_options,
    resolve_pass,
)

DEFAULT_CALIBRATION = {"samples": 32, "seq_len": 128}
DEFAULT_EVALUATION = {"samples": 16, "seq_len": 128}
#: the keys of [calibration] / [evaluation] and their types
DATA_KEYS = {"samples": int, "seq_len": int}
#: their smallest values (a window of a language model holds BOS and at least one token)
DATA_MINIMUM = {"samples": 1, "seq_len": 2}
# (pass, option) -> (pass, option) it takes its value from when the recipe does not set it
LINKED_OPTIONS = {("rotate", "learn_group_size"): ("plan", "group_size")}


@dataclasses.dataclass
class PassSpec:
    name: str
    options: dict[str, Any]


@dataclasses.dataclass
class Recipe:
    name: str
    description: str
    passes: list[PassSpec]
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    source: str = ""

    def build(self) -> list:
        """Instantiate the passes (validates every option name, type and value).

        The options the recipe gives are checked first, every pass's, so an error names
        the option a user set rather than one linked to it (``LINKED_OPTIONS``)."""
        for i, p in enumerate(self.passes):
            self._resolve(i, p)
        for p in self.passes:
            check_pass_options(p.name, p.options)
        return [instantiate(p.name, self.options(p)) for p in self.passes]

    def _resolve(self, index: int, spec: PassSpec) -> type:
        """The class of entry ``index``; a pass that cannot be found or imported names the recipe entry."""
        try:
            return resolve_pass(spec.name)
        except InputError as e:
            raise InputError(f"recipe {self.source or self.name}, [[passes]] entry {index + 1} ({spec.name!r}): {e}") from e

    def options(self, spec: PassSpec) -> dict[str, Any]:
        """``spec``'s options as given, with the ``LINKED_OPTIONS`` it leaves out filled in."""
        opts = dict(spec.options)
        for (name, option), (source, source_option) in LINKED_OPTIONS.items():
            if spec.name == name and option not in opts:
                given = [p.options[source_option] for p in self.passes
                         if p.name == source and source_option in p.options]
                if given:
                    opts[option] = given[0]
        return opts

    def set_option(self, key: str, value: Any) -> None:
        """Apply ``PASS.OPTION=value`` (or ``calibration.samples=...``) from the command line."""
        head, _, opt = key.partition(".")
        if not opt:
            raise InputError(f"--set {key}: expected PASS.OPTION=VALUE")
        if head in ("calibration", "evaluation"):
            check_data_section(head, {opt: value}, f"--set {key}")
            getattr(self, head)[opt] = value
            return
        matches = [p for p in self.passes if p.name == head]
        if not matches:
            raise InputError(f"--set {key}: recipe {self.name!r} has no pass {head!r}")
        for p in matches:
            p.options[opt] = value

    def resolved(self) -> dict[str, Any]:
        """The recipe with every pass option, defaults included."""
        passes = []
        for spec in self.passes:
            opts = {o.name: o.default for o in pass_options(resolve_pass(spec.name))}
            opts.update(self.options(spec))
            passes.append({"pass": spec.name, **opts})
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "passes": passes,
        }


def check_data_section(section: str, values: dict[str, Any], where: str) -> None:
    """Raise an ``InputError`` naming section, key and value for a ``[calibration]`` / ``[evaluation]``
    key that does not exist (``sampels``), a value of the wrong type (``samples = "lots"``) or below its
    minimum (``samples = 0``: a compile needs a sample to calibrate and one to verify on)."""
    for key, value in values.items():
        kind = DATA_KEYS.get(key)
        if kind is None:
            raise InputError(f"{where}: [{section}] has no key {key!r} (keys: {', '.join(DATA_KEYS)})")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"{where}: [{section}] {key} = {value!r} is not an int")
        if value < DATA_MINIMUM[key]:
            raise InputError(f"{where}: [{section}] {key} = {value!r} must be at least {DATA_MINIMUM[key]}")


def builtin_recipes() -> dict[str, Path]:
    folder = resources.files("lowbit.compiler") / "recipes"
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".toml")}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe file by path."""
    path = Path(name_or_path)
    builtins = builtin_recipes()
    if str(name_or_path) in builtins:
        path = builtins[str(name_or_path)]
    elif not path.is_file():
        raise InputError(
            f"no recipe {str(name_or_path)!r}: not a built-in ({', '.join(sorted(builtins))}) and not a file"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"recipe {path}: not valid TOML: {e}") from e
    except OSError as e:
        raise InputError(f"recipe {path}: cannot read it: {e.strerror or e}") from e
    return parse_recipe(data, source=str(path))


def parse_recipe(data: dict[str, Any], *, source: str = "") -> Recipe:
    where = source or str(data.get("name", "?"))
    entries = data.get("passes")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"recipe {where}: needs a non-empty [[passes]] list")
    passes = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise InputError(f"recipe {where}: [[passes]] entry {i} is {entry!r}, not a table (pass = \"NAME\" ...)")
        entry = dict(entry)
        name = entry.pop("pass", None)
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"recipe {where}: [[passes]] entry {i} has no 'pass' name")
        passes.append(PassSpec(name, entry))
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise InputError(f"recipe {where}: {key} = {data[key]!r} is not a string")
    unknown = set(data) - {"name", "description", "passes", "calibration", "evaluation"}
    if unknown:
        raise InputError(f"recipe {where}: unknown top-level keys {sorted(unknown)}")
    for section in ("calibration", "evaluation"):
        if not isinstance(data.get(section, {}), dict):
            raise InputError(f"recipe {where}: [{section}] must be a table")
        check_data_section(section, data.get(section, {}), f"recipe {where}")
    return Recipe(
        name=data.get("name", Path(source).stem if source else "custom"),
        description=data.get("description", ""),
        passes=passes,
        calibration={**DEFAULT_CALIBRATION, **data.get("calibration", {})},
        evaluation={**DEFAULT_EVALUATION, **data.get("evaluation", {})},
        source=source,
    )
