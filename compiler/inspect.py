"""Render a manifest as readable tables (``lowbit inspect``).

``lowbit inspect`` also checks every file the manifest lists against its sha256 (unless
``--no-verify``): a missing or changed file is a warning on stderr, above the tables, and
the last line says what was verified; it does not refuse, as ``lowbit run`` does, since it
reads only the manifest.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from lowbit.compiler.verification import generation_label, generation_line


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def render(m: dict[str, Any], console: Console | None = None, *, verified: str | None = None) -> None:
    """The manifest's tables; ``verified``: what the check of the files against their sha256 found."""
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
            t.add_row(generation_label(v), generation_line(v, short=True))
            t.add_row("  fp32's text", v.get("fp32_text", "-"))
            t.add_row("  artifact's text", v["text"])
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
    lt.add_column("layer", overflow="fold", min_width=32)
    measured = any("sensitivity" in lp for lp in plan.values())  # a mixed-precision plan
    for col in ("precision", "activations", "weights", "weight scale (min/max)", "weight rel. error",
                *(("sensitivity", "bits/weight", "latency ms") if measured else ()), "reason"):
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
            *(_measured_cells(lp) if measured else ()),
            lp.get("reason", ""),
        )
    console.print(lt)
    rotation = _rotation_summary(m.get("notes") or {})
    if rotation:
        console.print(rotation)
    mixed = (m.get("notes") or {}).get("plan-mixed")
    if mixed:
        console.print(_mixed_summary(mixed))
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
                  + ", ".join(f"{k} ({v['bytes'] / 1e6:.2f} MB)" for k, v in m.get("files", {}).items())
                  + (f" — {verified}" if verified else ""))


def _measured_cells(lp: dict[str, Any]) -> tuple[str, str, str]:
    """Sensitivity (KL or 1 - cosine), bits per weight and latency of a mixed plan's layer."""
    sens, cost = lp.get("sensitivity") or {}, lp.get("cost") or {}
    value = sens.get("kl", sens.get("1-cosine"))
    return (
        "-" if value is None else f"{value:.3g}",
        "-" if "bits_per_weight" not in cost else f"{cost['bits_per_weight']:.2f}",
        "-" if cost.get("latency_ms") is None else f"{cost['latency_ms']:.3f} (T={cost.get('seq_len')})",
    )


def _rotation_summary(notes: dict[str, Any]) -> str:
    """One line on the residual-stream rotation: which one, or why there is none; a learned one's loss."""
    rot = notes.get("rotate")
    if not rot:
        return ""
    if rot.get("refused"):
        return f"rotation: none ({rot['refused']})"
    line = f"rotation of the {rot.get('width')}-wide residual stream: {rot.get('rotation')} (seed {rot.get('seed')})"
    learned = rot.get("learned")
    if learned and learned.get("objective") == "incoherence":
        line += (f"; learning ({learned['steps']} steps, weight incoherence): mean kurtosis of the rotated weights "
                 f"{learned['kurtosis_start']:.4g} -> {learned['kurtosis_learned']:.4g}, kept the {learned['kept']}")
    elif learned:
        line += (f"; learning ({learned['steps']} steps, {learned['bits']}-bit weights, group "
                 f"{learned['group_size'] or 'per channel'}): fake-quantized KL {learned['fake_quant_kl_start']:.4g} "
                 f"-> {learned['fake_quant_kl_learned']:.4g}, kept the {learned['kept']}")
    return line


def _mixed_summary(n: dict[str, Any]) -> str:
    """One paragraph on a mixed-precision plan: budget, what it reached, predicted vs measured error."""
    if n.get("analysis"):
        return f"mixed precision: plan from {n.get('source')}; analysis {n['analysis']}"
    b = n.get("budget") or {}
    asked = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in b.items() if v) or "default"
    a = n.get("achieved", {})
    metric = n.get("metric", "kl").upper()
    meas = (n.get("measured_calibration") or {}).get("metric")
    lines = [
        f"mixed precision: {asked}; reached {a.get('bits_per_weight', 0):.3f} bits per linear weight, "
        f"{a.get('weight_bytes', 0) / 1e6:.3f} MB of weights"
        + (f", predicted latency {a['predicted_latency_ratio']:.3f}x of fp32" if "predicted_latency_ratio" in a else ""),
        f"  {metric} on calibration data: predicted (sum of per-layer sensitivities) {n['predicted']['metric']:.4g}, "
        f"measured for the whole plan {meas:.4g}" if meas is not None else "",
        "  " + ", ".join(f"{c}: {k}" for c, k in sorted(n.get("counts", {}).items())),
        f"  analysis: {n['sensitivity']['layers']} layers x {n['sensitivity']['candidates']} candidates, "
        f"{n['sensitivity']['runs']} runs measured, {n['sensitivity']['cached']} from the cache; "
        f"{n['timings'].get('total', 0):.1f} s" if n.get("sensitivity") else "",
    ]
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------
# lowbit inspect --layers: one row per linear, everything known about it
# ---------------------------------------------------------------------------
def _smoothing(notes: dict[str, Any]) -> dict[str, str]:
    """Layer -> smoothing alpha (or why it was skipped), from the smooth pass's notes."""
    out = {}
    for key, rec in ((notes.get("smooth") or {}).get("groups") or {}).items():
        if not isinstance(rec, dict):
            continue
        text = f"α={rec['alpha']:.2g}" if "alpha" in rec else "skipped"
        for layer in str(key).split("+"):
            out[layer] = text
    return out


def _rotation(notes: dict[str, Any]) -> dict[str, str]:
    """Layer -> how the rotate pass transformed it ("in", "out", "online"), from its notes."""
    rot = notes.get("rotate") or {}
    if not rot or rot.get("refused"):
        return {}
    out: dict[str, list[str]] = {}
    for kind, label in (("readers", "in"), ("writers", "out")):
        for layer in rot.get(kind) or []:
            out.setdefault(layer, []).append(label)
    for layer in rot.get("online_down_proj") or {}:
        out.setdefault(layer, []).append("online")
    for layer in rot.get("per_head_v") or {}:
        out.setdefault(layer, []).append("per-head")
    return {k: "+".join(v) for k, v in out.items()}


def layer_rows(m: dict[str, Any], explain: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per planned linear: precision, granularity, algorithms, transforms, input statistics, measured error."""
    plan = (m.get("plan") or {}).get("layers", {})
    table = m.get("layers", {})
    acts = (m.get("calibration") or {}).get("activations", {})
    notes = m.get("notes") or {}
    smooth, rotate = _smoothing(notes), _rotation(notes)
    sens = m.get("sensitivity") or (notes.get("plan-mixed") or {}).get("sensitivity") or {}
    measured = {r["name"]: r for r in (explain or {}).get("layers", [])}
    # graph order: explain's, else the quantize pass's table (the plan's JSON is sorted by name)
    order = {n: i for i, n in enumerate(sorted(measured, key=lambda n: measured[n]["order"]) if measured else table)}
    rows = []
    for name, lp in sorted(plan.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        info, ex = table.get(name, {}), measured.get(name, {})
        tensor = info.get("input") or ex.get("input")
        stats = acts.get(tensor) if tensor else None
        rows.append({
            "layer": name,
            "precision": lp.get("precision"),
            "granularity": lp.get("granularity", "-") if lp.get("precision") != "fp32" else "-",
            "group_size": lp.get("group_size"),
            "weight_algorithm": lp.get("weight_algorithm") if lp.get("precision") != "fp32" else "-",
            "activations": lp.get("activations") if "activations" in info else "-",
            "smoothing": smooth.get(name, "-"),
            "rotation": rotate.get(name, "-"),
            "input": tensor,
            "input_absmax_max": stats.get("absmax_max") if stats else ex.get("input_absmax_max"),
            "input_absmax_median": stats.get("absmax_median") if stats else ex.get("input_absmax_median"),
            "input_outlier_ratio": stats.get("outlier_ratio") if stats else ex.get("input_outlier_ratio"),
            "sensitivity": _sensitivity_value(lp.get("sensitivity", sens.get(name))),
            "weight_rel_error": info.get("weight_rel_error"),
            "sqnr_local_db": ex.get("sqnr_local_db"),
            "error_contribution": ex.get("contribution"),
            "reason": lp.get("reason", ""),
        })
    return rows


def _sensitivity_value(value: Any) -> Any:
    """A mixed plan records ``{"kl": ..., "dnll": ...}``: the table shows the KL (or 1 - cosine)."""
    if isinstance(value, dict):
        return value.get("kl", value.get("1-cosine"))
    return value


def render_layers(m: dict[str, Any], explain: dict[str, Any] | None = None, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
    rows = layer_rows(m, explain)
    title = f"linear layers ({len(rows)})"
    if explain is None:
        title += " — error columns need `lowbit explain` (not run yet)"
    t = Table(title=title)
    cols = ("layer", "precision", "granularity", "weights", "acts", "smooth", "rotate", "input absmax max / median",
            "outlier ratio", "sensitivity", "weight rel. err", "local SQNR dB", "error share", "reason")
    for col in cols:
        t.add_column(col, overflow="fold", no_wrap=col == "layer")
    fmt = lambda v, f=".3g": "-" if v is None else format(v, f) if isinstance(v, (int, float)) else str(v)  # noqa: E731
    for r in rows:
        rng = "-" if r["input_absmax_max"] is None else f"{r['input_absmax_max']:.3g} / {r['input_absmax_median']:.3g}"
        t.add_row(
            r["layer"], r["precision"], f"group {r['group_size']}" if r["group_size"] else r["granularity"], r["weight_algorithm"], r["activations"],
            r["smoothing"], r["rotation"], rng, fmt(r["input_outlier_ratio"], ".2f"), fmt(r["sensitivity"]),
            fmt(r["weight_rel_error"], ".2e"), fmt(r["sqnr_local_db"], ".1f"),
            "-" if r["error_contribution"] is None else f"{r['error_contribution']:.1%}", r["reason"],
        )
    console.print(t)
