"""The ``Backend`` interface, and backends found by name.

A backend is an object that knows what it supports, how its lowering pass is
named, how it builds an artifact from the lowered IR, and how an artifact is
loaded to run. The driver, the CLI and the mixed-precision planner ask the
backend object; none of them tests a backend's name.

Backends are found like passes (``lowbit.compiler.core.registry``): through the
``lowbit.backends`` entry-point group, where lowbit declares its own in
``pyproject.toml`` and a plugin package adds one the same way::

    [project.entry-points."lowbit.backends"]
    my-backend = "my_pkg.backend:MyBackend"

or by :func:`register_backend` in a running program. A backend's ``aliases``
(``ort`` for ``onnxruntime``) are resolved here. The core never imports a
backend module itself.

What a backend declares for the planner is deliberately small: which layer
plans it runs (:meth:`Backend.supports`, a reason when it does not), which
lowering pass gives its kernels (``lowering``: the analysis code lowers each
candidate with it to count the bytes an artifact stores), and whether that
lowered linear runs in ONNX Runtime so that its latency can be measured there
(``measures_latency``). The measuring itself is analysis code
(``lowbit.compiler.analysis.costs``), above the backends.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.metadata
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.recipe import PassSpec
from lowbit.compiler.core.registry import pass_options, resolve_pass

logger = logging.getLogger("lowbit")
ENTRY_POINT_GROUP = "lowbit.backends"
DEFAULT_BACKEND = "onnxruntime"
_REGISTRY: dict[str, type[Backend]] = {}


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The command line's backend flags; a backend takes the fields it names in ``Backend.options``.

    Attributes:
        target / arch: code generation target ("llvm", "cuda") and GPU architecture ("sm_80").
        tune / tune_seq_lens / tuning_db: kernel tuning trials per kernel, the sequence lengths
            to tune at, and a tuning database folder to reuse and extend.
    """

    target: str = "llvm"
    arch: str | None = None
    tune: int = 0
    tune_seq_lens: Sequence[int] | None = None
    tuning_db: str | Path | None = None

    def given(self) -> list[str]:
        """The fields set to something other than their default (in declaration order)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) not in (f.default, None, (), [])]


#: how the flags behind BackendOptions are named in messages, grouped as the command line documents them
FLAG_GROUPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("target", "arch"), "--target and --arch"),
    (("tune", "tune_seq_lens", "tuning_db"), "--tune, --tune-seq-len and --tuning-db"),
)


@dataclasses.dataclass
class Built:
    """What :meth:`Backend.build` gives the compile.

    Attributes:
        info: the backend's section of the manifest (written under the backend's name), or None.
        session: an ``onnxruntime.InferenceSession`` look-alike running the artifact, to verify it
            against fp32; None when the artifact cannot run on this machine (then ``note`` says why).
    """

    info: dict[str, Any] | None
    session: Any
    note: str | None = None


class Backend(abc.ABC):
    """A compilation target: what it runs, how it lowers, builds and loads.

    Subclasses set ``name`` (the entry-point name), ``aliases``, ``lowering`` (the name of
    their lowering pass in the pass registry) and ``options`` (the ``BackendOptions`` fields
    they take), and implement :meth:`build` and :meth:`load`.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the registry name of the pass that rewrites planned linears into this backend's kernels
    lowering: ClassVar[str] = ""
    #: the BackendOptions fields this backend takes (others given are an error)
    options: ClassVar[tuple[str, ...]] = ()
    #: a lowered candidate linear runs in ONNX Runtime, so the planner can time it there
    measures_latency: ClassVar[bool] = False
    #: a recipe without any lowering pass is an error (else: the model stays float for this backend)
    needs_lowering: ClassVar[bool] = False
    description: ClassVar[str] = ""

    # -- before the passes ------------------------------------------------
    def check(self, options: BackendOptions) -> None:
        """Fail early (before any pass runs) on options this backend cannot honour."""
        unused = [f for f in options.given() if f not in self.options]
        for fields, flags in FLAG_GROUPS:
            if any(f in unused for f in fields):
                takers = [n for n, cls in all_backends().items() if any(f in cls.options for f in fields)]
                where = f"--backend {' / '.join(takers)} only" if takers else "no installed backend"
                raise InputError(f"{flags} apply to {where}")

    def prepare_recipe(self, recipe) -> None:
        """Make the recipe lower for this backend (in place): another backend's lowering pass is
        replaced by ours, keeping the options both passes have."""
        names = [p.name for p in recipe.passes]
        if self.lowering in names:
            return
        others = {cls.lowering for cls in all_backends().values() if cls.lowering and cls.lowering != self.lowering}
        if not any(n in others for n in names):
            if self.needs_lowering:
                known = ", ".join(sorted(others | {self.lowering}))
                raise InputError(f"recipe {recipe.name!r} has no lowering pass ({known}) for --backend {self.name} to replace")
            return
        ours = {o.name for o in pass_options(resolve_pass(self.lowering))}
        for i, spec in enumerate(recipe.passes):
            if spec.name in others:
                dropped = sorted(set(spec.options) - ours)
                if dropped:
                    logger.info("--backend %s: %s options %s have no %s counterpart and are ignored",
                                self.name, spec.name, dropped, self.lowering)
                recipe.passes[i] = PassSpec(self.lowering, {k: v for k, v in spec.options.items() if k in ours})

    # -- the planner ------------------------------------------------------
    def supports(self, layer_plan) -> str | None:
        """None if this backend's lowering runs ``layer_plan`` (a ``core.plan.LayerPlan``), else why not."""
        return None

    def cost_key(self) -> str:
        """Identifies the kernels a cost-table entry was measured for (with their versions)."""
        return self.name

    # -- after the passes -------------------------------------------------
    @abc.abstractmethod
    def build(self, model: ir.Model, folder: Path, options: BackendOptions, *, threads: int | None = None) -> Built:
        """Write the artifact's model files for the lowered ``model`` into ``folder``."""

    @abc.abstractmethod
    def load(self, folder: str | Path, *, threads: int | None = None, verify: bool = True) -> Any:
        """The runtime artifact of ``folder`` (``generate``, ``run``, ``run_npz``: what ``lowbit run`` uses).

        ``verify``: check the files it reads against the sha256 of the manifest's ``files`` table and
        refuse a missing, changed or unlisted one (``core.artifact.check_files``); ``generate(prompt, *,
        max_new_tokens, truncate, notify)`` refuses more tokens than the model's context."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------
def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` findable by its ``name`` (and aliases)."""
    if not cls.name:
        raise ValueError(f"backend {cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"backend name {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """The known backends' names (registered and installed), without loading them."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _load(name: str, ep: importlib.metadata.EntryPoint) -> type[Backend]:
    try:
        obj = ep.load()
    except Exception as e:  # a broken plugin must not look like a typo
        raise InputError(f"backend entry point {name!r} ({ep.value}) failed to load: {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise InputError(f"backend entry point {name!r} ({ep.value}) is not a lowbit Backend class")
    return obj


def all_backends() -> dict[str, type[Backend]]:
    """Registered and installed backend classes, by name (one that fails to load is left out)."""
    found = dict(_REGISTRY)
    for name, ep in _entry_points().items():
        if name not in found:
            try:
                found[name] = _load(name, ep)
            except InputError:
                continue
    return found


def resolve_backend(name: str) -> type[Backend]:
    """The backend class ``name`` (or one of its aliases) names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        return _load(name, eps[name])
    backends = all_backends()
    for cls in backends.values():
        if name in cls.aliases:
            return cls
    known = ", ".join(f"{n} ({', '.join(c.aliases)})" if c.aliases else n for n, c in sorted(backends.items()))
    raise InputError(f"unknown backend {name!r} (known: {known or 'none installed: pip install -e .'})")


def get_backend(name: str | Backend | None = None) -> Backend:
    """A backend instance by name or alias (None: the default, ONNX Runtime); a Backend is returned as is."""
    if isinstance(name, Backend):
        return name
    return resolve_backend(name or DEFAULT_BACKEND)()
