"""Choose one candidate per layer: an integer linear program over measured sensitivities and costs.

Variables ``x[l, c]`` in {0, 1}, one per (layer, candidate), with ``sum_c x[l, c] = 1``
for every layer (one-hot; a candidate not offered to a layer, e.g. a pinned one's
alternatives, has upper bound 0). Two forms, both solved with
``scipy.optimize.milp`` (HiGHS branch and bound, exact for these sizes):

* **budget**: minimise ``sum s[l, c] x[l, c]`` (predicted final-output error, the
  per-layer sensitivities added) subject to ``sum cost_k[l, c] x[l, c] <= B_k`` for
  each budget ``k`` given (size, latency, or both);
* **accuracy target** (the dual): minimise ``sum size[l, c] x[l, c]`` subject to
  ``sum s[l, c] x[l, c] <= target``.

An infeasible problem is an ``InputError`` naming the nearest feasible value: the
smallest budget (or largest error target) the candidates can meet.

Budgets are written as text (:func:`parse_budget`): ``"5.0bits"`` (average bits per
linear weight, **scales and zero points included**: the bytes each lowered layer
stores, times 8, over the number of weights of every planned linear), ``"60MB"``
(bytes of every weight of the artifact: ``KB``/``MB``/``GB`` are powers of 1000,
``KiB``/``MiB``/``GiB`` of 1024), ``"0.5x"`` (latency, a fraction of fp32's).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

from lowbit.compiler.core.errors import InputError

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclasses.dataclass(frozen=True)
class Budget:
    """A size budget: ``kind`` "bits" (average bits per linear weight) or "bytes" (artifact bytes)."""

    kind: str
    value: float
    text: str

    def describe(self) -> str:
        return f"{self.value:g} bits per linear weight" if self.kind == "bits" else f"{_fmt_bytes(self.value)} of weights"


def parse_budget(text: str) -> Budget:
    """``"5.0bits"`` / ``"5 bits"`` / ``"60MB"`` / ``"1.5GiB"`` / ``"123456B"`` -> Budget."""
    t = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]+)", t)
    if not m:
        raise InputError(f"--budget {text!r}: expected a number and a unit, e.g. 5.0bits (average bits per linear "
                         "weight) or 60MB (artifact bytes)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value):
        raise InputError(f"--budget {text!r}: the number is out of range")
    if unit in ("bit", "bits", "b/w", "bpw"):
        if not 0 < value <= 32:
            raise InputError(f"--budget {text!r}: average bits per weight must be in (0, 32]")
        return Budget("bits", value, t)
    if unit in _UNITS:
        if value <= 0:
            raise InputError(f"--budget {text!r}: a size budget must be positive")
        return Budget("bytes", value * _UNITS[unit], t)
    raise InputError(f"--budget {text!r}: unknown unit {m.group(2)!r} (bits, B, KB, MB, GB, KiB, MiB, GiB)")


def parse_latency(text: str) -> float:
    """``"0.5x"`` (or ``"0.5"``, ``"50%"``) -> 0.5: a fraction of the fp32 model's latency."""
    t = str(text).strip().lower()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t.removesuffix("x"))
    except ValueError:
        raise InputError(f"--budget-latency {text!r}: expected a fraction of fp32's latency, e.g. 0.5x") from None
    if not value > 0 or not math.isfinite(value):  # NaN fails both
        raise InputError(f"--budget-latency {text!r}: must be a positive, finite fraction")
    return value


def parse_fraction(value: float | str, what: str) -> float:
    """``"2%"`` -> 0.02, ``0.02`` -> 0.02."""
    t = str(value).strip()
    try:
        out = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise InputError(f"{what} {value!r}: expected a number or a percentage") from None
    if not out >= 0 or not math.isfinite(out):  # NaN fails both
        raise InputError(f"{what} {value!r}: must be a finite number, not negative")
    return out


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n:,.0f} B"


@dataclasses.dataclass
class Constraint:
    """``sum cost[l, c] x[l, c] <= limit``; ``name`` and ``unit`` for messages."""

    name: str
    cost: np.ndarray  # [L, C]
    limit: float
    unit: str = ""
    #: (value, unit) -> text, for a message in the user's unit
    show: object = None


def _mask(allowed: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.where(allowed, values, np.inf)


def _fmt(con: Constraint, value: float) -> str:
    return con.show(value) if callable(con.show) else f"{value:.6g}{con.unit}"


def minimum_total(cost: np.ndarray, allowed: np.ndarray) -> float:
    """The smallest ``sum cost`` any one-hot assignment reaches (each layer at its cheapest)."""
    return float(_mask(allowed, cost).min(axis=1).sum())


def solve(
    objective: np.ndarray,
    allowed: np.ndarray,
    constraints: Sequence[Constraint],
    *,
    time_limit: float = 60.0,
) -> np.ndarray:
    """The one-hot assignment (candidate index per layer) minimising ``sum objective`` under ``constraints``.

    ``objective``, every ``constraint.cost``: ``[L, C]`` floats; ``allowed``: ``[L, C]`` bools
    (each row holds at least one True). Raises ``InputError`` when no assignment meets the
    constraints, naming the nearest feasible limit of each one violated.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    L, C = objective.shape
    if allowed.shape != (L, C) or not allowed.any(axis=1).all():
        raise ValueError("every layer needs at least one allowed candidate")
    for con in constraints:
        floor = minimum_total(con.cost, allowed)
        if floor > con.limit * (1 + 1e-9) + 1e-12:
            raise InputError(
                f"{con.name} {_fmt(con, con.limit)} cannot be met: the smallest plan the candidates allow needs "
                f"{_fmt(con, floor)} (every layer at its cheapest candidate); the nearest feasible {con.name} is "
                f"{_fmt(con, floor)}"
            )
    c = np.where(allowed, np.nan_to_num(objective, posinf=0.0), 0.0).ravel()
    rows, lo, hi = [], [], []
    onehot = np.zeros((L, L * C))
    for i in range(L):
        onehot[i, i * C:(i + 1) * C] = 1.0
    rows.append(onehot)
    lo.append(np.ones(L))
    hi.append(np.ones(L))
    for con in constraints:
        rows.append(np.where(allowed, con.cost, 0.0).reshape(1, -1))
        lo.append(np.array([-np.inf]))
        hi.append(np.array([con.limit]))
    res = milp(
        c,
        integrality=np.ones(L * C),
        bounds=Bounds(np.zeros(L * C), allowed.ravel().astype(float)),
        constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi)),
        options={"time_limit": time_limit, "mip_rel_gap": 1e-9},
    )
    if res.x is None:
        # the floors above passed, so only the constraints together can be infeasible
        names = " and ".join(f"{con.name} {_fmt(con, con.limit)}" for con in constraints)
        raise InputError(f"no plan meets {names} together; relax one of them ({res.message})")
    x = res.x.reshape(L, C)
    return np.argmax(np.where(allowed, x, -1.0), axis=1)


def total(values: np.ndarray, choice: np.ndarray) -> float:
    return float(values[np.arange(len(choice)), choice].sum())


def pareto_limits(cost: np.ndarray, allowed: np.ndarray, points: int) -> list[float]:
    """``points`` limits spread from the cheapest plan to the most expensive one worth paying for."""
    floor = minimum_total(cost, allowed)
    ceil = float(np.where(allowed, cost, -np.inf).max(axis=1).sum())
    if points <= 1 or ceil <= floor:
        return [floor]
    return [float(v) for v in np.linspace(floor, ceil, points)]
