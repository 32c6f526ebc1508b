"""``lowbit diff``: what changed between two IRs (two dump stages, two artifacts).

A compile is a sequence of passes; ``--dump-ir`` writes the IR after each one
(``NNN_<Pass>.onnx``). Reading two dumps side by side answers "what did this
pass do?" without opening Netron:

* **nodes** are matched by name, falling back to the debug id
  (``lowbit.debug_id``) for nodes left unmatched by name: a pass that replaces
  a node carries its debug id to the node computing the replacement, so a
  lowered linear is reported as the rewrite of the MatMul it replaced rather
  than as one removal and one unrelated addition. A matched node is
  *rewritten* when its op type, inputs (by value name) or attributes differ;
  a change of its metadata only (e.g. a layer tag) is counted apart.
* **initializers** are matched by name: added, removed, changed (shape,
  dtype, bytes, or values).
* **plans**: the per-layer precision of the plan each side carries (model
  metadata ``lowbit.plan``, or an artifact's manifest).

Both a readable rendering (rich tables) and plain JSON (``--json``) come from
one ``ModelDiff`` dict, so tools and humans read the same facts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.passbase import DEBUG_KEY, PASS_KEY
from lowbit.compiler.core.plan import PLAN_KEY

_STAGE = re.compile(r"^(\d{3})_(.+)\.onnx$")


# ---------------------------------------------------------------------------
# Resolving what the user named
# ---------------------------------------------------------------------------
def dump_stages(folder: str | Path) -> list[tuple[int, str, Path]]:
    """``(index, pass name, path)`` of every ``NNN_<Pass>.onnx`` in a dump folder, in order."""
    folder = Path(folder)
    stages = []
    for p in sorted(folder.glob("*.onnx")):
        m = _STAGE.match(p.name)
        if m:
            stages.append((int(m.group(1)), m.group(2), p))
    return stages


def resolve_side(path: str | Path) -> tuple[Path, Path | None, str]:
    """``(model file, manifest file or None, label)`` for an ``.onnx`` file or an artifact folder."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".onnx":
            raise InputError(f"{p} is not an .onnx file or an artifact folder")
        return p, None, p.name
    if p.is_dir():
        if (p / "model.onnx").is_file():
            manifest = p / "manifest.json"
            return p / "model.onnx", manifest if manifest.is_file() else None, p.name
        if dump_stages(p):
            raise InputError(f"{p} is a dump folder: name two stages, e.g. 'lowbit diff {p} 3 4'")
        raise InputError(f"{p} holds no model.onnx (not an artifact folder)")
    raise InputError(f"{p} does not exist")


def resolve_args(args: Sequence[str]) -> list[tuple[Path, Path | None, str]]:
    """The two sides named on the command line: ``A B`` or ``DUMPDIR I J``."""
    if len(args) == 3:
        folder, i, j = args
        stages = {idx: (name, path) for idx, name, path in dump_stages(folder)}
        if not stages:
            raise InputError(f"{folder} holds no NNN_<Pass>.onnx dumps")
        sides = []
        for raw in (i, j):
            try:
                idx = int(raw)
            except ValueError:
                raise InputError(f"stage {raw!r} is not a number (stages in {folder}: {sorted(stages)})") from None
            if idx not in stages:
                raise InputError(f"no stage {idx} in {folder} (stages: {sorted(stages)})")
            name, path = stages[idx]
            sides.append((path, None, f"{idx:03d}_{name}"))
        return sides
    if len(args) == 2:
        return [resolve_side(a) for a in args]
    raise InputError("diff takes two models (A B) or a dump folder and two stage numbers (DIR I J)")


# ---------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------
def _attr_key(attr: ir.Attr) -> Any:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha1(value.tobytes()).hexdigest())
    if isinstance(value, ir.Graph):
        return ("graph", sum(1 for _ in value))
    if isinstance(value, (list, tuple)):
        return tuple(repr(v) for v in value)
    return repr(value)


def _node_sig(node: ir.Node) -> dict[str, Any]:
    return {
        "op": f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type,
        "inputs": [v.name if v is not None else "" for v in node.inputs],
        "attributes": {k: _attr_key(a) for k, a in node.attributes.items()},
        "metadata": dict(node.metadata_props),
    }


def _keyed_nodes(graph: ir.Graph) -> tuple[dict[str, ir.Node], list[ir.Node]]:
    """Nodes by unique name; nodes without a (unique) name go to the second list."""
    counts = Counter(n.name for n in graph.all_nodes() if n.name)
    named, anonymous = {}, []
    for n in graph.all_nodes():
        if n.name and counts[n.name] == 1:
            named[n.name] = n
        else:
            anonymous.append(n)
    return named, anonymous


def _label(node: ir.Node) -> str:
    if node.name:
        return node.name
    outs = ",".join(v.name or "?" for v in node.outputs)
    return f"<{node.op_type} -> {outs}>"


def _by_debug_id(nodes: list[ir.Node]) -> dict[str, ir.Node]:
    """Nodes keyed by debug id, for ids held by exactly one node."""
    counts = Counter(n.metadata_props.get(DEBUG_KEY) for n in nodes)
    return {n.metadata_props[DEBUG_KEY]: n for n in nodes if DEBUG_KEY in n.metadata_props and counts[n.metadata_props[DEBUG_KEY]] == 1}


def _tensor_info(value: ir.Value) -> dict[str, Any]:
    t = value.const_value
    if t is None:
        return {"shape": None, "dtype": None, "bytes": 0, "digest": None}
    data = t.tobytes()
    return {
        "shape": [int(d) for d in t.shape],
        "dtype": t.dtype.name,
        "bytes": len(data),
        "digest": hashlib.sha1(data).hexdigest(),
    }


def read_plan_layers(model: ir.Model, manifest: dict[str, Any] | None) -> dict[str, str] | None:
    """Layer -> precision from the model's plan metadata, else from a manifest."""
    raw = model.metadata_props.get(PLAN_KEY)
    plan = json.loads(raw) if raw else (manifest or {}).get("plan")
    if not plan:
        return None
    return {name: lp.get("precision", "?") for name, lp in plan.get("layers", {}).items()}


def diff_models(
    a: ir.Model, b: ir.Model, *, manifest_a: dict[str, Any] | None = None, manifest_b: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that differs between two IRs, as plain data (see the module docstring)."""
    named_a, anon_a = _keyed_nodes(a.graph)
    named_b, anon_b = _keyed_nodes(b.graph)
    pairs: list[tuple[ir.Node, ir.Node, str]] = [(named_a[k], named_b[k], "name") for k in named_a.keys() & named_b.keys()]
    left_a = [n for k, n in named_a.items() if k not in named_b] + anon_a
    left_b = [n for k, n in named_b.items() if k not in named_a] + anon_b
    ids_a, ids_b = _by_debug_id(left_a), _by_debug_id(left_b)
    by_id = ids_a.keys() & ids_b.keys()
    pairs += [(ids_a[i], ids_b[i], "debug_id") for i in by_id]
    matched_a = {id(x) for x, _, _ in pairs}
    matched_b = {id(y) for _, y, _ in pairs}

    order_b = {id(n): i for i, n in enumerate(b.graph.all_nodes())}
    order_a = {id(n): i for i, n in enumerate(a.graph.all_nodes())}
    added = [_entry(n) for n in sorted(left_b, key=lambda n: order_b[id(n)]) if id(n) not in matched_b]
    removed = [_entry(n) for n in sorted(left_a, key=lambda n: order_a[id(n)]) if id(n) not in matched_a]
    rewritten, metadata_changed = [], []
    for x, y, via in sorted(pairs, key=lambda p: order_b[id(p[1])]):
        sa, sb = _node_sig(x), _node_sig(y)
        changes = [k for k in ("op", "inputs", "attributes") if sa[k] != sb[k]]
        if via == "debug_id" and not changes:
            changes = ["name"]
        if changes:
            item = {"name": _label(y), "op": sb["op"], "op_before": sa["op"], "changes": changes, "matched_by": via}
            if via == "debug_id":
                item["name_before"] = _label(x)
            if "inputs" in changes:
                item["inputs_before"], item["inputs"] = sa["inputs"], sb["inputs"]
            if PASS_KEY in y.metadata_props:
                item["pass"] = y.metadata_props[PASS_KEY]
            rewritten.append(item)
        elif sa["metadata"] != sb["metadata"]:
            keys = sorted(k for k in sa["metadata"].keys() | sb["metadata"].keys() if sa["metadata"].get(k) != sb["metadata"].get(k))
            metadata_changed.append({"name": _label(y), "op": sb["op"], "keys": keys})

    by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"added": 0, "removed": 0, "rewritten": 0, "metadata": 0})
    for n in added:
        by_op[n["op"]]["added"] += 1
    for n in removed:
        by_op[n["op"]]["removed"] += 1
    for n in rewritten:
        op = n["op"] if n["op"] == n["op_before"] else f"{n['op_before']} → {n['op']}"
        by_op[op]["rewritten"] += 1
    for n in metadata_changed:
        by_op[n["op"]]["metadata"] += 1

    inits = _diff_initializers(a.graph, b.graph)
    plan = _diff_plans(read_plan_layers(a, manifest_a), read_plan_layers(b, manifest_b))
    meta_keys = sorted(
        k for k in a.metadata_props.keys() | b.metadata_props.keys() if a.metadata_props.get(k) != b.metadata_props.get(k)
    )
    io = {
        kind: {"before": [v.name for v in getattr(a.graph, kind)], "after": [v.name for v in getattr(b.graph, kind)]}
        for kind in ("inputs", "outputs")
        if [v.name for v in getattr(a.graph, kind)] != [v.name for v in getattr(b.graph, kind)]
    }
    opsets = {"before": dict(a.opset_imports), "after": dict(b.opset_imports)} if dict(a.opset_imports) != dict(b.opset_imports) else None
    return {
        "summary": {
            "nodes_before": sum(1 for _ in a.graph.all_nodes()),
            "nodes_after": sum(1 for _ in b.graph.all_nodes()),
            "added": len(added),
            "removed": len(removed),
            "rewritten": len(rewritten),
            "metadata_changed": len(metadata_changed),
            "initializers_added": len(inits["added"]),
            "initializers_removed": len(inits["removed"]),
            "initializers_changed": len(inits["changed"]),
            "initializer_bytes_before": inits["bytes_before"],
            "initializer_bytes_after": inits["bytes_after"],
            "precision_changes": len(plan["changes"]) if plan else 0,
        },
        "by_op": dict(sorted(by_op.items())),
        "nodes": {"added": added, "removed": removed, "rewritten": rewritten, "metadata_changed": metadata_changed},
        "initializers": {k: inits[k] for k in ("added", "removed", "changed")},
        "plan": plan,
        "model_metadata_changed": meta_keys,
        "graph_io": io,
        "opsets": opsets,
    }


def _entry(node: ir.Node) -> dict[str, Any]:
    sig = _node_sig(node)
    item = {"name": _label(node), "op": sig["op"], "inputs": sig["inputs"]}
    for key, out in ((PASS_KEY, "pass"), ("lowbit.layer", "layer")):
        if key in node.metadata_props:
            item[out] = node.metadata_props[key]
    return item


def _diff_initializers(a: ir.Graph, b: ir.Graph) -> dict[str, Any]:
    ia = {k: _tensor_info(v) for k, v in a.initializers.items()}
    ib = {k: _tensor_info(v) for k, v in b.initializers.items()}
    strip = lambda d: {k: v for k, v in d.items() if k != "digest"}  # noqa: E731
    changed = []
    for k in sorted(ia.keys() & ib.keys()):
        x, y = ia[k], ib[k]
        if x["digest"] == y["digest"] and x["shape"] == y["shape"] and x["dtype"] == y["dtype"]:
            continue
        what = [f for f in ("shape", "dtype", "bytes") if x[f] != y[f]] or ["values"]
        changed.append({"name": k, "changes": what, "before": strip(x), "after": strip(y)})
    return {
        "added": [{"name": k, **strip(ib[k])} for k in sorted(ib.keys() - ia.keys())],
        "removed": [{"name": k, **strip(ia[k])} for k in sorted(ia.keys() - ib.keys())],
        "changed": changed,
        "bytes_before": sum(v["bytes"] for v in ia.values()),
        "bytes_after": sum(v["bytes"] for v in ib.values()),
    }


def _diff_plans(a: dict[str, str] | None, b: dict[str, str] | None) -> dict[str, Any] | None:
    if a is None and b is None:
        return None
    a, b = a or {}, b or {}
    changes = [{"layer": k, "before": a.get(k, "-"), "after": b.get(k, "-")} for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return {"layers_before": len(a), "layers_after": len(b), "changes": changes}


def diff_paths(args: Sequence[str]) -> dict[str, Any]:
    """Resolve ``args`` (see :func:`resolve_args`), load both sides, diff them."""
    sides = resolve_args(args)
    models, manifests = [], []
    for path, manifest, _ in sides:
        try:
            models.append(ir.load(path))
        except Exception as e:  # onnx raises several types for unreadable files
            raise InputError(f"cannot load {path}: {type(e).__name__}: {e}") from None
        manifests.append(json.loads(manifest.read_text()) if manifest else None)
    out = diff_models(models[0], models[1], manifest_a=manifests[0], manifest_b=manifests[1])
    out["a"] = {"label": sides[0][2], "path": str(sides[0][0])}
    out["b"] = {"label": sides[1][2], "path": str(sides[1][0])}
    return out


def diff_dump_folder(folder: str | Path) -> list[dict[str, Any]]:
    """One summary row per consecutive pair of stages in a dump folder: what each pass did."""
    stages = dump_stages(folder)
    if len(stages) < 2:
        raise InputError(f"{folder} holds fewer than two NNN_<Pass>.onnx dumps")
    rows, prev = [], ir.load(stages[0][2])
    for idx, name, path in stages[1:]:
        cur = ir.load(path)
        d = diff_models(prev, cur)
        rows.append({"stage": idx, "pass": name, **d["summary"], "by_op": d["by_op"]})
        prev = cur
    return rows


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e4 else f"{n} B"


def render(d: dict[str, Any], console=None, *, limit: int = 40) -> None:
    """Rich tables: a summary, counts per op type, then the changed nodes, initializers and plan layers."""
    from rich.table import Table

    console = console or _console()
    s = d["summary"]
    console.print(
        f"[bold]{d.get('a', {}).get('label', 'A')}[/] → [bold]{d.get('b', {}).get('label', 'B')}[/]: "
        f"nodes {s['nodes_before']} → {s['nodes_after']} (+{s['added']} added, -{s['removed']} removed, "
        f"{s['rewritten']} rewritten, {s['metadata_changed']} metadata only); initializers +{s['initializers_added']} "
        f"-{s['initializers_removed']} ~{s['initializers_changed']} ({_mb(s['initializer_bytes_before'])} → "
        f"{_mb(s['initializer_bytes_after'])}); {s['precision_changes']} layer precision change(s)"
    )
    if not any(s[k] for k in ("added", "removed", "rewritten", "metadata_changed", "initializers_added",
                              "initializers_removed", "initializers_changed", "precision_changes")):
        console.print("no differences")
    if d["by_op"]:
        t = Table(title="nodes per op type")
        for col in ("op", "added", "removed", "rewritten", "metadata only"):
            t.add_column(col, justify="right" if col != "op" else "left")
        for op, c in d["by_op"].items():
            t.add_row(op, *(str(c[k]) if c[k] else "" for k in ("added", "removed", "rewritten", "metadata")))
        console.print(t)
    nodes = d["nodes"]
    if nodes["added"] or nodes["removed"] or nodes["rewritten"]:
        t = Table(title="changed nodes" + (f" (first {limit} of each kind; --json for all)" if _over(nodes, limit) else ""))
        for col in ("", "node", "op", "what changed", "by pass"):
            t.add_column(col, overflow="fold")
        for n in nodes["added"][:limit]:
            t.add_row("[green]+[/]", n["name"], n["op"], "inputs: " + ", ".join(n["inputs"]), n.get("pass", ""))
        for n in nodes["removed"][:limit]:
            t.add_row("[red]-[/]", n["name"], n["op"], "", "")
        for n in nodes["rewritten"][:limit]:
            what = []
            if "op" in n["changes"]:
                what.append(f"op {n['op_before']} → {n['op']}")
            if n["matched_by"] == "debug_id":
                what.append(f"replaces {n['name_before']} (same debug id)")
            if "inputs" in n["changes"]:
                diff = [f"{x or '∅'} → {y or '∅'}" for x, y in zip(n["inputs_before"], n["inputs"]) if x != y]
                extra = len(n["inputs"]) - len(n["inputs_before"])
                what.append("inputs " + ", ".join(diff) + (f" ({extra:+d} inputs)" if extra else ""))
            if "attributes" in n["changes"]:
                what.append("attributes")
            t.add_row("[yellow]~[/]", n["name"], n["op"], "; ".join(what), n.get("pass", ""))
        console.print(t)
    inits = d["initializers"]
    if any(inits.values()):
        t = Table(title="initializers")
        for col in ("", "name", "shape", "dtype", "bytes"):
            t.add_column(col, overflow="fold")
        for kind, mark in (("added", "[green]+[/]"), ("removed", "[red]-[/]")):
            for v in inits[kind][:limit]:
                t.add_row(mark, v["name"], str(v["shape"]), str(v["dtype"]), _mb(v["bytes"]))
        for v in inits["changed"][:limit]:
            x, y = v["before"], v["after"]
            show = lambda f: str(x[f]) if x[f] == y[f] else f"{x[f]} → {y[f]}"  # noqa: E731
            t.add_row("[yellow]~[/]", v["name"] + ("" if v["changes"] != ["values"] else " (values)"),
                      show("shape"), show("dtype"), _mb(x["bytes"]) if x["bytes"] == y["bytes"] else f"{_mb(x['bytes'])} → {_mb(y['bytes'])}")
        console.print(t)
    plan = d.get("plan")
    if plan and plan["changes"]:
        t = Table(title=f"layer precision ({plan['layers_before']} → {plan['layers_after']} planned layers)")
        for col in ("layer", "before", "after"):
            t.add_column(col, overflow="fold")
        for c in plan["changes"][:limit * 4]:
            t.add_row(c["layer"], c["before"], c["after"])
        console.print(t)
    for what in ("model_metadata_changed",):
        if d.get(what):
            console.print("model metadata changed: " + ", ".join(d[what]))
    for kind, v in (d.get("graph_io") or {}).items():
        console.print(f"graph {kind}: {v['before']} → {v['after']}")
    if d.get("opsets"):
        console.print(f"opset imports: {d['opsets']['before']} → {d['opsets']['after']}")


def render_stages(rows: list[dict[str, Any]], console=None) -> None:
    from rich.table import Table

    console = console or _console()
    t = Table(title="what every pass did")
    for col in ("#", "pass", "nodes", "+", "-", "~", "meta", "inits +/-/~", "weights", "precision changes", "ops touched"):
        t.add_column(col, overflow="fold")
    for r in rows:
        ops = ", ".join(f"{op} {sum(c.values())}" for op, c in sorted(r["by_op"].items(), key=lambda kv: -sum(kv[1].values()))[:4])
        t.add_row(
            str(r["stage"]), r["pass"], f"{r['nodes_before']} → {r['nodes_after']}", str(r["added"]), str(r["removed"]),
            str(r["rewritten"]), str(r["metadata_changed"]),
            f"{r['initializers_added']}/{r['initializers_removed']}/{r['initializers_changed']}",
            f"{_mb(r['initializer_bytes_before'])} → {_mb(r['initializer_bytes_after'])}"
            if r["initializer_bytes_before"] != r["initializer_bytes_after"] else _mb(r["initializer_bytes_after"]),
            str(r["precision_changes"]), ops,
        )
    console.print(t)


def _over(nodes: dict[str, list], limit: int) -> bool:
    return any(len(v) > limit for v in nodes.values())


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def to_json(d: Any) -> str:
    return json.dumps(d, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
