"""The allocation solver and budget parsing (compiler/analysis/allocate.py), on synthetic sensitivities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lowbit.compiler.analysis import allocate
from lowbit.compiler.core.errors import InputError


def brute_force(objective, allowed, costs, limits):
    """The optimum by enumeration (small problems only)."""
    L, C = objective.shape
    best, best_choice = np.inf, None
    for choice in itertools.product(range(C), repeat=L):
        idx = np.array(choice)
        if not allowed[np.arange(L), idx].all():
            continue
        if any(cost[np.arange(L), idx].sum() > lim + 1e-9 for cost, lim in zip(costs, limits)):
            continue
        value = objective[np.arange(L), idx].sum()
        if value < best - 1e-12:
            best, best_choice = value, idx
    return best, best_choice


def test_parse_budget_units():
    assert allocate.parse_budget("5.0bits") == allocate.Budget("bits", 5.0, "5.0bits")
    assert allocate.parse_budget("4.5 bits").value == 4.5
    assert allocate.parse_budget("60MB") == allocate.Budget("bytes", 60e6, "60MB")
    assert allocate.parse_budget("1.5GiB").value == 1.5 * 2**30
    assert allocate.parse_budget("123456B").value == 123456
    assert allocate.parse_latency("0.5x") == 0.5
    assert allocate.parse_latency("50%") == 0.5
    assert allocate.parse_fraction("2%", "--max-ppl-increase") == pytest.approx(0.02)


@pytest.mark.parametrize("text, fragment", [
    ("five bits", "expected a number and a unit"),
    ("5parsecs", "unknown unit 'parsecs'"),
    ("40bits", "must be in (0, 32]"),
    ("0MB", "must be positive"),
])
def test_parse_budget_rejects(text, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        allocate.parse_budget(text)


def test_parse_latency_rejects():
    with pytest.raises(InputError, match="fraction of fp32"):
        allocate.parse_latency("fast")
    with pytest.raises(InputError, match="positive"):
        allocate.parse_latency("-1x")


def test_solve_picks_the_known_optimum():
    # 3 layers x 3 candidates (fp32, 8-bit, 4-bit); a bits budget that forces one 4-bit layer:
    # the layer least hurt by 4 bits (layer 1) must take it, the others 8 bits
    sens = np.array([[0.0, 0.01, 0.50],
                     [0.0, 0.02, 0.05],
                     [0.0, 0.01, 0.90]])
    bits = np.array([[32.0, 8.0, 4.0]] * 3) / 3  # average over three equal layers
    allowed = np.ones_like(sens, bool)
    choice = allocate.solve(sens, allowed, [allocate.Constraint("budget", bits, 20 / 3)])
    assert choice.tolist() == [1, 2, 1]
    assert allocate.total(bits, choice) <= 20 / 3 + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_solve_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    L, C = 5, 4
    sens = rng.random((L, C)) * np.array([0.0, 0.1, 0.5, 1.0])  # cheaper candidates hurt more
    cost = rng.random((L, C)) * np.array([8.0, 3.0, 2.0, 1.0]) + 0.1
    allowed = rng.random((L, C)) > 0.2
    allowed[:, 0] = True
    limit = float(np.where(allowed, cost, np.inf).min(axis=1).sum()) * 1.6
    best, _ = brute_force(sens, allowed, [cost], [limit])
    choice = allocate.solve(sens, allowed, [allocate.Constraint("budget", cost, limit)])
    assert allowed[np.arange(L), choice].all()
    assert allocate.total(cost, choice) <= limit + 1e-9
    assert allocate.total(sens, choice) == pytest.approx(best, abs=1e-9)


def test_two_budgets_together():
    rng = np.random.default_rng(7)
    L, C = 5, 3
    sens = rng.random((L, C)) * np.array([0.0, 0.3, 1.0])
    size = rng.random((L, C)) * np.array([4.0, 2.0, 1.0]) + 0.5
    time_ = rng.random((L, C)) * np.array([1.0, 3.0, 2.0]) + 0.5
    allowed = np.ones((L, C), bool)
    lims = [float(size.min(axis=1).sum() * 1.5), float(time_.min(axis=1).sum() * 1.5)]
    best, _ = brute_force(sens, allowed, [size, time_], lims)
    choice = allocate.solve(sens, allowed, [allocate.Constraint("budget", size, lims[0]),
                                            allocate.Constraint("latency budget", time_, lims[1])])
    assert allocate.total(sens, choice) == pytest.approx(best, abs=1e-9)


def test_dual_smallest_plan_meeting_a_target():
    # minimise size subject to summed sensitivity <= target
    sens = np.array([[0.0, 0.01, 0.3], [0.0, 0.02, 0.04], [0.0, 0.1, 0.2]])
    size = np.array([[4.0, 1.0, 0.5]] * 3)
    allowed = np.ones_like(sens, bool)
    best, _ = brute_force(size, allowed, [sens], [0.1])
    choice = allocate.solve(size, allowed, [allocate.Constraint("--max-kl", sens, 0.1)])
    assert allocate.total(sens, choice) <= 0.1 + 1e-12
    assert allocate.total(size, choice) == pytest.approx(best)


def test_pinned_layer_keeps_its_candidate():
    sens = np.array([[0.0, 0.01], [0.0, 0.5]])
    cost = np.array([[4.0, 1.0], [4.0, 1.0]])
    allowed = np.array([[True, True], [False, True]])  # layer 1 pinned to candidate 1
    choice = allocate.solve(sens, allowed, [allocate.Constraint("budget", cost, 10.0)])
    assert choice.tolist() == [0, 1]


def test_infeasible_budget_names_the_nearest_feasible_one():
    cost = np.array([[32.0, 8.0, 4.5], [32.0, 8.0, 4.5]]) / 2
    sens = np.zeros_like(cost)
    with pytest.raises(InputError) as e:
        allocate.solve(sens, np.ones_like(cost, bool),
                       [allocate.Constraint("budget", cost, 4.0, show=lambda v: f"{v:.4g} bits per linear weight")])
    msg = str(e.value)
    assert "budget 4 bits per linear weight cannot be met" in msg
    assert "nearest feasible budget is 4.5 bits per linear weight" in msg


def test_pareto_limits_span_cheapest_to_dearest():
    cost = np.array([[4.0, 1.0], [2.0, 1.0]])
    lims = allocate.pareto_limits(cost, np.ones_like(cost, bool), 4)
    assert lims[0] == pytest.approx(2.0) and lims[-1] == pytest.approx(6.0) and len(lims) == 4
