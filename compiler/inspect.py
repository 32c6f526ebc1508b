"""Render a manifest as readable tables (``lowbit inspect``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def render(m: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: do not squeeze tables into 80 columns
            console = Console(width=160)
    model = m.get("model", {})
    console.print(f"[bold]{model.get('name')}[/] ({model.get('task')}) — recipe [bold]{m['recipe']['name']}[/], "
                  f"backend {m.get('backend')}, lowbit {m.get('lowbit')}")

    io = Table(title="inputs / outputs")
    for col in ("", "name", "shape", "dtype"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in m.get(kind, []):
            io.add_row(kind[:-1], v["name"], str(v["shape"]), str(v["dtype"]))
    console.print(io)

    acc = m.get("accuracy", {})
    t = Table(title=f"accuracy vs fp32 ({acc.get('samples', 0)} held-out samples, {acc.get('tokens', 0)} tokens)")
    t.add_column("metric")
    t.add_column("value")
    for k, v in acc.items():
        if k == "generation":
            t.add_row("greedy tokens matching fp32", f"{v['matching_prefix']}/{v['tokens']}")
            t.add_row("generated text", v["text"])
        elif k not in ("samples", "tokens"):
            t.add_row(k, _fmt(v))
    for label, row in (m.get("latency") or {}).items():
        if isinstance(row, dict):
            t.add_row(f"latency {label}", f"{row['ms']:.2f} ms vs fp32 {row['fp32_ms']:.2f} ms ({row['speedup']:.2f}x)")
    size = m.get("size", {})
    if size:
        t.add_row("weights", f"{size['weight_bytes'] / 1e6:.2f} MB ({size['ratio']:.2f}x of fp32)")
    console.print(t)

    passes = Table(title="passes")
    for col in ("#", "pass", "seconds", "modified", "nodes before → after"):
        passes.add_column(col)
    for e in m.get("passes", []):
        passes.add_row(str(e["index"]), e["pass"], f"{e['seconds']:.3f}", str(e["modified"]), f"{e['nodes_before']} → {e['nodes_after']}")
    console.print(passes)

    plan = (m.get("plan") or {}).get("layers", {})
    layers = m.get("layers", {})
    acts = (m.get("calibration") or {}).get("activations", {})
    lt = Table(title="layers")
    lt.add_column("layer", overflow="fold")
    for col in ("precision", "activations", "weights", "weight scale (min/max)", "weight rel. error", "reason"):
        lt.add_column(col)
    for name, lp in plan.items():
        info = layers.get(name, {})
        scale = info.get("weight_scale")
        act = lp["activations"] if lp["precision"] == "w8a8" else "-"
        if "act_scale" in info:
            act += f" (scale {info['act_scale']:.3g}, zp {info['act_zero_point']})"
        lt.add_row(
            name,
            lp["precision"],
            act,
            f"{lp['granularity']}, {'sym' if lp['symmetric'] else 'asym'}, {lp['weight_algorithm']}" if lp["precision"] != "fp32" else "-",
            f"{scale['min']:.3g} / {scale['max']:.3g}" if scale else "-",
            f"{info['weight_rel_error']:.2e}" if "weight_rel_error" in info else "-",
            lp.get("reason", ""),
        )
    console.print(lt)
    skipped = (m.get("plan") or {}).get("skipped", {})
    if skipped:
        st = Table(title="not quantized")
        st.add_column("node")
        st.add_column("reason")
        for k, v in skipped.items():
            st.add_row(k, v)
        console.print(st)
    cal = m.get("calibration", {})
    console.print(f"calibration: {cal.get('samples')} samples, {cal.get('tokens')} tokens from {cal.get('source')}; "
                  f"{len(acts)} tensors observed")
    console.print(f"compiled in {m.get('compile_seconds')} s; files: "
                  + ", ".join(f"{k} ({v['bytes'] / 1e6:.2f} MB)" for k, v in m.get("files", {}).items()))
