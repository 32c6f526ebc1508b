"""``lowbit report``: one self-contained HTML page about an artifact.

Everything a reviewer asks about a quantized model, on one page that opens
offline (plots are PNGs inlined as base64 ``data:`` URIs, styles inline, no
script, nothing fetched):

* accuracy and speed against fp32 (the manifest's measurements);
* bit allocation per layer (weight and activation bits, from the plan);
* per-layer SQNR, local and cumulative, and each layer's share of the final
  KL (from ``lowbit explain``), with the pass-by-pass bisect and the
  suggested ``--override`` strings;
* per-channel activation ranges of the most outlier-heavy linear inputs —
  before and after smoothing / rotation where a transform changed them;
* the Pareto curve of a mixed-precision plan (manifest key ``pareto``: a list
  of points, or ``{"points": [...]}``, each with a size such as
  ``bits_per_weight`` or ``bytes`` and an error such as ``kl``; a point with
  ``"chosen": true`` is highlighted);
* the per-pass log and the per-layer table.

Without explain results the page still shows what the manifest holds (the
calibrated range of every observed tensor instead of per-channel curves).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any

from lowbit.compiler.core.artifact import load_manifest
from lowbit.compiler.core.plan import PRECISIONS
from lowbit.compiler.core.progress import duration
from lowbit.compiler.inspect import layer_rows
from lowbit.compiler.verification import generation_label, generation_line

REPORT_FILE = "report.html"
_COLORS = {"fp32": "#7f7f7f", "fp16": "#9467bd", "w8a8": "#1f77b4", "w8a16": "#2ca02c", "w4a16": "#ff7f0e", "w4a8": "#d62728"}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1150px; color: #222; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; } table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td.l, th.l { text-align: left; } tr.hl td { background: #fff3cd; } img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 1px 4px; } .note { color: #666; font-size: 13px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
"""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
def _e(v: Any) -> str:
    return html.escape(str(v))


def _f(v: Any, fmt: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "∞"
    return format(v, fmt) if isinstance(v, (int, float)) else _e(v)


def _table(header: list[str], rows: list[list[Any]], left: int = 1, highlight: set[int] | None = None) -> str:
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header)) + "</tr>"]
    for j, row in enumerate(rows):
        cls = ' class="hl"' if highlight and j in highlight else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out) + "</table>"


def bits_of(precision: str) -> tuple[float, float]:
    """(weight bits, activation bits) of a precision name; 32 for float."""
    if precision in PRECISIONS:
        w, a = PRECISIONS[precision]
        return float(w or 32), float(a or 32)
    m = re.fullmatch(r"w(\d+)a(\d+)", precision or "")
    if m:
        return float(m.group(1)), float(m.group(2))
    return (16.0, 16.0) if precision in ("fp16", "bf16") else (32.0, 32.0)


def _short(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``3.mlp.down_proj`` for axis labels."""
    return re.sub(r"^(model\.)?(layers|h|blocks|encoder\.layer)\.", "", name)


def _xticks(ax, names: list[str]) -> None:
    """Layer names under the x axis; every k-th of them when there are too many to read."""
    step = max(1, math.ceil(len(names) / 60))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [_short(names[i]) for i in ticks], rotation=90, fontsize=6 if len(ticks) > 40 else 8)


class _Figures:
    """matplotlib figures rendered to inline PNGs (Agg backend: no display needed)."""

    def __init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        self.plt = plt

    def png(self, fig) -> str:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        self.plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img alt="plot" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------
def _bits_plot(figs: _Figures, rows: list[dict[str, Any]]) -> str:
    names = [r["layer"] for r in rows]
    wb = [bits_of(r["precision"])[0] for r in rows]
    ab = [bits_of(r["precision"])[1] for r in rows]
    fig, ax = figs.plt.subplots(figsize=(12, 3.6))
    x = range(len(rows))
    colors = [_COLORS.get(r["precision"], "#17becf") for r in rows]
    ax.bar([i - 0.2 for i in x], wb, width=0.4, color=colors, label="weight bits")
    ax.bar([i + 0.2 for i in x], ab, width=0.4, color=colors, alpha=0.45, label="activation bits", hatch="//")
    ax.set_ylabel("bits")
    ax.set_yscale("log", base=2)
    ax.set_yticks([4, 8, 16, 32], ["4", "8", "16", "32"])
    _xticks(ax, names)
    handles = [figs.plt.Rectangle((0, 0), 1, 1, color=c) for c in {_COLORS.get(r["precision"], "#17becf"): 0 for r in rows}]
    labels = list(dict.fromkeys(r["precision"] for r in rows))
    ax.legend(handles, labels, title="precision (solid: weights, hatched: activations)", fontsize=8, loc="upper right")
    ax.set_title("bit allocation per layer (graph order)")
    return figs.png(fig)


def _sqnr_plot(figs: _Figures, ex: dict[str, Any]) -> str:
    rows = sorted(ex["layers"], key=lambda r: r["order"])
    x = list(range(len(rows)))
    cap = lambda v: None if v is None else min(v, 120.0)  # noqa: E731 - an exact layer is plotted at the top
    fig, (ax, ax2) = figs.plt.subplots(2, 1, figsize=(12, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(x, [cap(r["sqnr_local_db"]) for r in rows], "o-", ms=3, label="local (this layer alone, fp32 inputs)")
    ax.plot(x, [cap(r["sqnr_cumulative_db"]) for r in rows], "s-", ms=3, label="cumulative (in the quantized model)")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("per-layer SQNR of each linear's output vs fp32 (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    share = [100 * r["contribution"] if r.get("contribution") is not None else 0.0 for r in rows]
    ax2.bar(x, share, color=["#d62728" if s > 0 else "#999999" for s in share])
    ax2.set_ylabel(f"% of final {ex['metric'].upper()}")
    ax2.set_title("error contribution: share of the final KL removed by promoting the layer to fp32 (measured)", fontsize=10)
    _xticks(ax2, [r["name"] for r in rows])
    ax2.grid(alpha=0.3, axis="y")
    return figs.png(fig)


def _channel_plots(figs: _Figures, ex: dict[str, Any]) -> str:
    items = ex.get("activations") or []
    if not items:
        return ""
    cols = 2
    rows = math.ceil(len(items) / cols)
    fig, axes = figs.plt.subplots(rows, cols, figsize=(12, 2.8 * rows), squeeze=False)
    for ax, item in zip(axes.flat, items):
        ch = range(len(item["absmax"]))
        if item.get("absmax_fp32"):
            ax.bar(ch, item["absmax_fp32"], width=1.0, color="#ff7f0e", alpha=0.55, label=f"fp32 graph (ratio {item['outlier_ratio_fp32']:.1f})")
            ax.bar(ch, item["absmax"], width=1.0, color="#1f77b4", alpha=0.75, label=f"as quantized, after smoothing/rotation (ratio {item['outlier_ratio']:.1f})")
            ax.legend(fontsize=7)
        else:
            ax.bar(ch, item["absmax"], width=1.0, color="#1f77b4")
        if item["outlier_ratio"] > 30:  # a few channels orders of magnitude above the rest
            ax.set_yscale("log")
        names = ", ".join(_short(n) for n in item["layers"][:3]) + (" ..." if len(item["layers"]) > 3 else "")
        ax.set_title(f"{names}  (max/median {item['outlier_ratio']:.1f})", fontsize=9)
        ax.set_xlabel("input channel", fontsize=8)
        ax.set_ylabel("absmax", fontsize=8)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.suptitle("per-channel activation range (absmax) of the most outlier-heavy linear inputs", fontsize=11)
    return figs.png(fig)


def _calibration_plot(figs: _Figures, m: dict[str, Any]) -> str:
    acts = (m.get("calibration") or {}).get("activations") or {}
    if not acts:
        return ""
    items = sorted(acts.items(), key=lambda kv: -(kv[1].get("outlier_ratio") or 0))[:40]
    fig, ax = figs.plt.subplots(figsize=(12, 3.6))
    x = range(len(items))
    ax.bar(x, [v["absmax_max"] for _, v in items], color="#d62728", label="largest channel absmax")
    ax.bar(x, [v["absmax_median"] for _, v in items], color="#1f77b4", label="median channel absmax")
    ax.set_xticks(list(x), [k for k, _ in items], rotation=90, fontsize=7)
    ax.set_title("calibrated activation ranges of linear inputs (most outlier-heavy first)")
    ax.legend(fontsize=8)
    return figs.png(fig)


_PARETO_X = ("bits_per_weight", "avg_bits", "bits", "bytes", "weight_bytes", "size", "size_mb", "latency_ms", "cost")
_PARETO_Y = ("kl", "predicted_kl", "measured_kl", "error", "loss", "perplexity_increase", "sensitivity")


def _pareto(figs: _Figures, m: dict[str, Any]) -> str:
    raw = m.get("pareto")
    if not raw:
        return ""
    points = raw.get("points", []) if isinstance(raw, dict) else raw
    points = [p for p in points if isinstance(p, dict)]
    xk = next((k for k in _PARETO_X if points and all(isinstance(p.get(k), (int, float)) for p in points)), None)
    yk = next((k for k in _PARETO_Y if points and all(isinstance(p.get(k), (int, float)) for p in points)), None)
    if xk is None or yk is None:
        return '<p class="note">The manifest has a "pareto" entry, but not in a form this report can plot.</p>'
    pts = sorted(points, key=lambda p: p[xk])
    fig, ax = figs.plt.subplots(figsize=(7, 4))
    ax.plot([p[xk] for p in pts], [p[yk] for p in pts], "o-", color="#1f77b4")
    for p in pts:
        if p.get("chosen") or p.get("selected"):
            ax.plot([p[xk]], [p[yk]], "*", ms=16, color="#d62728", label="chosen plan")
            ax.legend()
    if all(p[yk] > 0 for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel(xk.replace("_", " "))
    ax.set_ylabel(yk.replace("_", " "))
    ax.set_title("mixed-precision Pareto curve")
    ax.grid(alpha=0.3)
    return figs.png(fig)


def _mixed(figs: _Figures, m: dict[str, Any]) -> str:
    """The mixed-precision planner's curve (manifest ``notes["plan-mixed"]["pareto"]``): for plans solved at
    several bit budgets, the predicted error (per-layer sensitivities added) and the error measured for the
    whole plan, KL and perplexity increase, on calibration data; the compiled plan marked, with the
    artifact's own held-out measurement."""
    n = (m.get("notes") or {}).get("plan-mixed") or {}
    pts = sorted((p for p in n.get("pareto") or [] if isinstance(p, dict)), key=lambda p: p["bits_per_weight"])
    if not pts:
        return ""
    metric = "KL" if n.get("metric") == "kl" else n.get("metric", "error")
    a, acc = n.get("achieved") or {}, m.get("accuracy") or {}
    lm = all(p.get("predicted_dnll") is not None and p.get("measured_dnll") is not None for p in pts)
    fig, axes = figs.plt.subplots(1, 2 if lm else 1, figsize=(11 if lm else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    xs = [p["bits_per_weight"] for p in pts]
    ax.plot(xs, [p["predicted"] for p in pts], "o--", color="#1f77b4", label="predicted (sum of sensitivities)")
    ax.plot(xs, [p["measured"] for p in pts], "s-", color="#d62728", label="measured (whole plan)")
    if a and n.get("measured_calibration"):
        ax.plot([a["bits_per_weight"]], [n["measured_calibration"]["metric"]], "*", ms=16, color="#2ca02c",
                label="compiled plan")
    if a and "kl" in acc and metric == "KL":
        ax.plot([a["bits_per_weight"]], [acc["kl"]], "D", ms=8, color="#9467bd", label="artifact, held-out data")
    if all(p["predicted"] > 0 and p["measured"] > 0 for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel("average bits per linear weight (scales included)")
    ax.set_ylabel(f"{metric} vs fp32 (calibration data)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if lm:
        ax2 = axes[0][1]
        ax2.plot(xs, [100 * math.expm1(p["predicted_dnll"]) for p in pts], "o--", color="#1f77b4", label="predicted")
        ax2.plot(xs, [100 * math.expm1(p["measured_dnll"]) for p in pts], "s-", color="#d62728", label="measured")
        if a and "perplexity_increase" in acc:
            ax2.plot([a["bits_per_weight"]], [100 * acc["perplexity_increase"]], "D", ms=8, color="#9467bd",
                     label="artifact, held-out data")
        ax2.set_xlabel("average bits per linear weight (scales included)")
        ax2.set_ylabel("perplexity increase, %")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.suptitle("mixed precision: error against budget")
    rows = [[_f(p["bits_per_weight"], ".3f"), f"{p['weight_bytes'] / 1e6:.3f}", _f(p["predicted"]), _f(p["measured"]),
             *([f"{math.expm1(p['predicted_dnll']):+.2%}", f"{math.expm1(p['measured_dnll']):+.2%}"] if lm else []),
             _e(", ".join(f"{k} {v}" for k, v in sorted(p.get("counts", {}).items())))] for p in pts]
    header = ["bits/weight", "weights MB", f"{metric} predicted", f"{metric} measured",
              *(["ppl predicted", "ppl measured"] if lm else []), "layers"]
    b = n.get("budget") or {}
    asked = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in b.items() if v) or "default budget"
    pred = (n.get("predicted") or {}).get("metric")
    meas = (n.get("measured_calibration") or {}).get("metric")
    text = (f"<p>Compiled plan ({_e(asked)}): {_f(a.get('bits_per_weight'), '.3f')} bits per linear weight, "
            f"{metric} predicted {_f(pred)}, measured for the whole plan {_f(meas)} on {n.get('tokens', '?')} calibration "
            f"tokens; the artifact measured {_f(acc.get('kl'))} on held-out data. Sensitivity analysis: "
            f"{(n.get('sensitivity') or {}).get('layers', '?')} layers x {(n.get('sensitivity') or {}).get('candidates', '?')} "
            f"candidates in {_f((n.get('timings') or {}).get('analysis'), '.1f')} s.</p>")
    return text + figs.png(fig) + _table(header, rows, left=len(header) - 1)


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------
def _summary(m: dict[str, Any]) -> str:
    acc, lat, size = m.get("accuracy") or {}, m.get("latency") or {}, m.get("size") or {}
    rows = []
    labels = {
        "kl": "KL(fp32 ‖ quantized), mean per token", "top1_agreement": "top-1 agreement", "perplexity": "perplexity",
        "perplexity_fp32": "perplexity (fp32)", "perplexity_increase": "perplexity increase",
        "cosine_mean": "cosine vs fp32 (mean)", "cosine_min": "cosine vs fp32 (min)", "relative_error": "relative error",
    }
    for k, label in labels.items():
        if k in acc:
            v = acc[k]
            rows.append([label, f"{v:.2%}" if k in ("top1_agreement", "perplexity_increase") else _f(v)])
    gen = acc.get("generation")
    if gen:
        rows.append([_e(generation_label(gen)), _e(generation_line(gen, short=True))])
        rows.append([_e("fp32's text"), _e(gen.get("fp32_text", "-"))])
        rows.append([_e("artifact's text"), _e(gen.get("text", "-"))])
    for label, row in lat.items():
        if isinstance(row, dict):
            rows.append([f"latency {label}", f"{row['ms']:.2f} ms vs fp32 {row['fp32_ms']:.2f} ms ({row['speedup']:.2f}x)"])
    if size:
        rows.append(["weights", f"{size['weight_bytes'] / 1e6:.2f} MB ({size['ratio']:.2f}x of fp32 {size['fp32_weight_bytes'] / 1e6:.2f} MB)"])
    note = f'<p class="note">measured on {acc.get("samples", "?")} held-out samples ({acc.get("tokens", "?")} tokens) of {_e(acc.get("source", "?"))}</p>'
    return _table(["metric", "value"], rows) + note


def _explain_html(figs: _Figures, ex: dict[str, Any]) -> str:
    metric = "KL" if ex["metric"] == "kl" else ex["metric"]
    rep = ex["reproduced"]
    parts = [
        f'<p>Measured on {ex["samples"]} held-out samples. Final-output {metric}: artifact {_f(rep["artifact_metric"])} '
        f'(manifest {_f(rep.get("manifest_metric"))}); the re-played compile {"reproduces the artifact" if rep["exact"] else "<b>differs from the artifact</b>"}. '
        f'With every linear in fp32 the {metric} would be {_f(ex.get("floor_metric"))}.</p>',
        _sqnr_plot(figs, ex),
    ]
    d = ex.get("depth") or {}
    if d.get("largest_drop"):
        b = d["largest_drop"]
        parts.append(f"<p>The error grows most at <b>{_e(b['block'])}</b> (mean cumulative SQNR drops {b['drop_db']:.1f} dB to "
                     f"{b['sqnr_cumulative_db']:.1f} dB); the layer injecting the most error alone is <b>{_e(d.get('most_local_error'))}</b>.</p>")
    top = ex["bisect_max"]["index"]
    parts.append("<h3>Pass-by-pass bisect</h3>")
    parts.append(_table(
        ["#", "pass", "modified", f"{metric} vs fp32", "Δ"],
        [[s["index"], _e(s["pass"]), s["modified"], _f(s.get("metric")) if s.get("runnable", True) else "not runnable", _f(s.get("delta"), "+.3g")]
         for s in ex["bisect"]],
        left=2, highlight={i for i, s in enumerate(ex["bisect"]) if s["index"] == top},
    ))
    if ex.get("suggestions"):
        parts.append(f"<h3>Suggested promotions</h3><p>Measured by re-running with the layer promoted; all together: "
                     f"{metric} {_f(rep['explain_graph_metric'])} → {_f(ex.get('metric_with_suggestions'))}.</p>")
        parts.append(_table(
            ["override", f"{metric} with it alone", "gain", "extra bytes"],
            [["<code>" + _e(f'--override "{s["override"]}"') + "</code>", _f(s["metric_after"]), _f(s["gain"], ".3g"), f"{s['extra_bytes']:,}"]
             for s in ex["suggestions"]],
        ))
    return "\n".join(parts)


def build_html(m: dict[str, Any], explain: dict[str, Any] | None = None) -> str:
    """The report page for manifest ``m`` (and explain results, when there are some)."""
    figs = _Figures()
    model = m.get("model") or {}
    rows = layer_rows(m, explain)
    sections = [
        f"<h1>{_e(model.get('name'))} — {_e((m.get('recipe') or {}).get('name'))}</h1>",
        f'<p class="sub">{_e(model.get("task"))}, backend {_e(m.get("backend"))}, lowbit {_e(m.get("lowbit"))}, compiled {_e(m.get("created"))} '
        f'from <code>{_e(m.get("source"))}</code> in {_f(m.get("compile_seconds"))} s</p>',
        "<h2>Accuracy and speed vs fp32</h2>",
        _summary(m),
    ]
    if rows:
        sections += ["<h2>Bit allocation</h2>", _bits_plot(figs, rows)]
    if explain:
        sections += ["<h2>Where the error comes from</h2>", _explain_html(figs, explain)]
    else:
        sections.append('<p class="note">No per-layer error measurements: run <code>lowbit explain</code> for SQNR plots and suggestions.</p>')
    sections.append("<h2>Activation ranges</h2>")
    chan = _channel_plots(figs, explain) if explain else ""
    sections.append(chan or _calibration_plot(figs, m) or '<p class="note">no calibration statistics</p>')
    pareto = _mixed(figs, m) or _pareto(figs, m)
    if pareto:
        sections += ["<h2>Mixed precision: Pareto curve</h2>", pareto]
    sections.append("<h2>Passes</h2>")
    sections.append(_table(
        ["#", "pass", "seconds", "modified", "nodes before → after"],
        [[e["index"], _e(e["pass"]), f"{e['seconds']:.3f}", e["modified"], f"{e['nodes_before']} → {e['nodes_after']}"] for e in m.get("passes", [])],
        left=2,
    ))
    if rows:
        sections.append("<h2>Layers</h2>")
        sections.append(_table(
            ["layer", "precision", "weights", "input absmax max / median", "outlier ratio", "weight rel. error", "local SQNR dB", "error share", "reason"],
            [[_e(r["layer"]), _e(r["precision"]), _e(r["weight_algorithm"]),
              "-" if r["input_absmax_max"] is None else f"{r['input_absmax_max']:.3g} / {r['input_absmax_median']:.3g}",
              _f(r["input_outlier_ratio"], ".2f"), _f(r["weight_rel_error"], ".2e"), _f(r["sqnr_local_db"], ".1f"),
              "-" if r["error_contribution"] is None else f"{r['error_contribution']:.1%}", _e(r["reason"])] for r in rows],
            left=1,
        ))
    body = "\n".join(sections)
    title = f"lowbit report: {model.get('name')}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


#: ``lowbit explain``'s time over the compile's (SmolLM2-135M w8a8-plain: explain 1493 s, compile 262 s; benchmarks/RESULTS.md)
EXPLAIN_TIME_RATIO = 6


def explain_estimate(artifact: str | Path) -> str:
    """How long ``lowbit explain`` may take on ``artifact``, from its compile time (a rough guide, said so)."""
    try:
        seconds = float(load_manifest(artifact).get("compile_seconds") or 0)
    except Exception:  # an unreadable manifest fails later, with its own message
        seconds = 0.0
    if seconds <= 0:
        return "it replays the compile, then measures each layer: several times the compile's time"
    guess = EXPLAIN_TIME_RATIO * seconds
    rough = f"{round(guess / 60)} min" if guess >= 120 else duration(guess)
    return (f"it replays the compile, then measures each layer: roughly {rough} "
            f"(about {EXPLAIN_TIME_RATIO}x this artifact's {duration(seconds)} compile), with progress as it goes")


def write_report(artifact: str | Path, output: str | Path | None = None, *, explain: dict[str, Any] | None = None) -> Path:
    """Write the report of ``artifact`` to ``output`` (default ``ARTIFACT/report.html``); returns its path."""
    m = load_manifest(artifact)
    out = Path(output) if output else Path(artifact) / REPORT_FILE
    out.write_text(build_html(m, explain), encoding="utf-8")
    return out
