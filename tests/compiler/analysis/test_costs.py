"""The cost table (compiler/analysis/costs.py): bytes and latency of lowered linears, measured and reused."""

from __future__ import annotations

import json

import pytest

from lowbit.compiler.analysis.candidates import Candidate
from lowbit.compiler.analysis.costs import CostTable, layer_costs


def test_bytes_are_what_the_lowered_layer_stores(tmp_path):
    table = CostTable(tmp_path / "costs.json", threads=1)
    k, n = 128, 96
    b = {c: table.get((k, n), Candidate.parse(c), 8, latency=False)["bytes"]
         for c in ("fp32", "w8a8", "w8a16", "w4a16-g32", "w4a16-g128")}
    assert b["fp32"] == 4 * k * n
    assert k * n < b["w8a8"] < 1.1 * k * n and k * n < b["w8a16"] < 1.1 * k * n
    assert b["w4a16-g32"] == k * n // 2 + 4 * n * (k // 32)  # packed codes + a float scale per group
    assert b["w4a16-g128"] == k * n // 2 + 4 * n


def test_latencies_are_measured_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr("lowbit.compiler.analysis.costs.STALE_FACTOR", 1e9)  # a 10-microsecond probe is noise
    path = tmp_path / "costs.json"
    table = CostTable(path, threads=1)
    cands = [Candidate("fp32"), Candidate("w8a8")]
    costs = layer_costs(table, [(64, 64), (64, 64)], cands, 4, latency=True)
    assert table.measured == 2 and len(costs) == 2
    assert all(v["ms"] >= 0 and v["ms_raw"] > 0 for v in costs.values())
    table.save()
    data = json.loads(path.read_text())
    assert all(table.device in key for key in data["entries"])
    again = CostTable(path, threads=1)
    costs2 = layer_costs(again, [(64, 64)], cands, 4, latency=True)
    assert again.measured == 0 and again.reused == 2
    assert costs2[((64, 64), "w8a8")]["ms_raw"] == pytest.approx(costs[((64, 64), "w8a8")]["ms_raw"])
    # another thread count is another machine setting: measured afresh
    other = CostTable(path, threads=2)
    other.get((64, 64), Candidate("fp32"), 4)
    assert other.measured == 1


def test_a_stale_table_is_measured_again(tmp_path):
    """Latencies stored under another load (here: 20x too slow) are re-measured, not trusted."""
    path = tmp_path / "costs.json"
    cands = [Candidate("fp32"), Candidate("w8a8")]
    table = CostTable(path, threads=1)
    layer_costs(table, [(256, 512)], cands, 32, latency=True)
    fresh = {k: dict(v) for k, v in table.entries.items()}
    for v in table.entries.values():
        v["ms"] *= 20
    table.save()
    again = CostTable(path, threads=1)
    costs = layer_costs(again, [(256, 512)], cands, 32, latency=True)
    assert again.remeasured is not None and again.remeasured["probe"] == "256x512 fp32"
    assert again.measured == 2
    key = next(k for k in fresh if k.endswith("256x512|fp32"))
    assert costs[((256, 512), "fp32")]["ms_raw"] < 5 * fresh[key]["ms"]
