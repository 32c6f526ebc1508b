"""Per-layer sensitivity: what the final output loses when one layer alone takes a candidate.

For a model with linears ``1..L`` and candidates ``c`` (``lowbit.compiler.analysis.candidates``),
the sensitivity of ``(l, c)`` is the final-output error, against the fp32 model,
of the model in which layer ``l`` alone is compiled as ``c``:

* language models: ``KL(p_fp32 || p_{l,c})`` of the next-token distributions, mean
  over positions, and the change of the mean next-token negative log-likelihood
  ``dNLL`` (``log`` of the perplexity ratio);
* other models: mean ``1 - cosine`` of the first output.

Measured, not estimated: **one** ONNX Runtime session runs the model with every
linear replaced by a small tree of ``If`` nodes over that layer's candidates, each
branch the layer as ``quantize-weights`` and ``lower-ort`` compile it (the kernels
the artifact runs: ``MatMulIntegerToFloat``, ``MatMulNBits``, ...). An input
``lowbit_choice[L]`` (int64) picks each layer's branch, so any assignment, one
layer changed or all of them, is one run of the same session: nothing is rebuilt
between measurements, and a chosen plan's joint error (interactions included) is
measured the same way. ``If`` runs only the branch taken; a layer costs a
``log2(candidates)``-deep chain of scalar conditions more than its kernel.

A run that changes one layer recomputes only what follows it: the graph is cut into
**segments** (one starting at each linear), each an ``If`` that either computes its
values or passes on copies fed as inputs (``lowbit_start``, and one input per value
that crosses a cut). :meth:`SensitivityGraph.frontier` records those values once, in
an all-fp32 run; a run for layer ``l`` then starts at ``l``'s segment and feeds them.
The prefix before ``l`` is the fp32 model's either way, so the result is the same,
and the analysis costs about half the full-model runs (the embedding, LM head and
scoring stay).

Results are cached on disk by a key over the graph, the weights, the candidates,
their options and the calibration data (:class:`SensitivityCache`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lowbit.compiler.analysis.candidates import Candidate, lower_linear, weight_bytes
from lowbit.compiler.core.evaluate import cosine
from lowbit.compiler.core.irutil import add_initializer, replace_value
from lowbit.compiler.core.ortsession import session_for
from lowbit.compiler.core.plan import LayerPlan
from lowbit.compiler.core.progress import progress
from lowbit.passes.recognize import find_linears

CHOICE_INPUT = "lowbit_choice"
START_INPUT = "lowbit_start"
INJECT_PREFIX = "lowbit_in/"
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


@dataclasses.dataclass
class LayerInfo:
    """A linear of the sensitivity graph: its name, weight shape ``[K, N]`` and input tensor."""

    name: str
    shape: tuple[int, int]
    input: str
    index: int


class SensitivityGraph:
    """One ORT session over ``model`` where each linear's candidate is an input (see the module doc).

    ``model`` is left as it is (a copy is rewritten). ``layer_plan(candidate, layer)`` gives the
    plan entry each branch is compiled with; ``stats`` the calibration observers (per-token zero
    points); ``hessians`` ``X^T X / T`` by input tensor for GPTQ branches; ``only``: the layers
    given branches (the others stay fp32); ``segments``: cut the graph so that runs can start at a
    layer (see the module doc); ``local_inputs``: per input tensor, its calibration rows ``[tokens, K]``,
    from which each branch's local output error is measured (``local_error``, for :func:`measure_scaled`).
    """

    def __init__(
        self,
        model: ir.Model,
        candidates: Sequence[Candidate],
        *,
        layer_plan: Callable[[Candidate, str], LayerPlan],
        stats: Mapping[str, Any] | None = None,
        hessians: Mapping[str, np.ndarray] | None = None,
        only: set[str] | None = None,
        lower_options: Mapping[str, Any] | None = None,
        quantize_options: Mapping[str, Any] | None = None,
        threads: int | None = None,
        segments: bool = True,
        local_inputs: Mapping[str, np.ndarray] | None = None,
        show_progress: bool = True,
    ) -> None:
        start = time.perf_counter()
        self.candidates = list(candidates)
        work = ir.from_proto(ir.to_proto(model))
        graph = work.graph
        linears = [lin for lin in find_linears(graph)[0] if only is None or lin.name in only]
        choice = ir.Value(name=CHOICE_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(linears)]))
        graph.inputs.append(choice)
        self.layers: list[LayerInfo] = []
        #: bytes of each (layer, candidate) branch as lowered (None: the candidate is not offered)
        self.branch_bytes: dict[tuple[str, str], int] = {}
        #: ``||y_c - y||^2 / ||y||^2`` of each (layer, candidate) branch on ``local_inputs`` (when given)
        self.local_error: dict[tuple[str, str], float] = {}
        opsets = dict(graph.opset_imports)
        firsts: list[ir.Node] = []
        for i, lin in enumerate(progress(linears, desc="mixed: building candidate branches", enabled=show_progress)):
            w = lin.weight_array.astype(np.float32)
            branches = []
            quantized: dict = {}
            for j, c in enumerate(self.candidates):
                lp = layer_plan(c, lin.name)
                h = hessians.get(lin.x.name) if hessians and lp.weight_algorithm == "gptq" else None
                micro = lower_linear(w, c, layer=lin.name, input_name=lin.x.name, opset_imports=opsets, layer_plan=lp,
                                     stats=stats, hessian=h, lower_options=lower_options,
                                     quantize_options=quantize_options, quantized=quantized)
                self.branch_bytes[(lin.name, c.name)] = weight_bytes(micro)
                if local_inputs is not None and lin.x.name in local_inputs:
                    self.local_error[(lin.name, c.name)] = _local_error(micro, w, local_inputs[lin.x.name])
                for domain, version in micro.opset_imports.items():
                    opsets.setdefault(domain, version)
                branches.append((j, _as_branch(micro, lin.x, f"{lin.name}#{c.name}/")))
            y, first = _select(graph, lin, i, choice, branches)
            firsts.append(first)
            replace_value(lin.node.outputs[0], y)
            graph.remove(lin.node, safe=True)
            self.layers.append(LayerInfo(lin.name, lin.shape, lin.x.name, i))
        graph.opset_imports.update(opsets)
        self.index = {lay.name: lay.index for lay in self.layers}
        self._cuts = _segment(graph, firsts) if segments and firsts else None
        #: per layer, the segment a run that changes it starts at
        self.segment_of = self._cuts.segment_of if self._cuts else [0] * len(firsts)
        self.output_name = graph.outputs[0].name
        self.session = session_for(work, threads=threads)
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.build_seconds = time.perf_counter() - start

    def choice(self, assignment: Mapping[str, str] | None = None) -> np.ndarray:
        """The ``lowbit_choice`` vector for ``{layer: candidate name}`` (other layers: fp32)."""
        names = [c.name for c in self.candidates]
        out = np.full(len(self.layers), names.index("fp32"), np.int64)
        for layer, cand in (assignment or {}).items():
            if layer in self.index:
                out[self.index[layer]] = names.index(cand)
        return out

    def start_of(self, assignment: Mapping[str, str]) -> int:
        """The first segment a run with ``assignment`` must compute (0: all of them)."""
        layers = [self.index[k] for k, v in assignment.items() if k in self.index and v != "fp32"]
        return min((self.segment_of[i] for i in layers), default=0)

    def frontier(self, batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Per batch, every value that crosses a cut, from an all-fp32 run (what ``run(..., start)`` feeds)."""
        names = sorted(self._cuts.output_of) if self._cuts else []
        if not names:
            return [{} for _ in batches]
        outs = [self.session.run([self._cuts.output_of[n] for n in names], self._feed(b, self.choice({}), 0, None))
                for b in batches]
        return [dict(zip(names, o)) for o in outs]

    def run(self, batches: Sequence[Mapping[str, np.ndarray]], choice: np.ndarray, *, start: int = 0,
            frontier: Sequence[Mapping[str, np.ndarray]] | None = None) -> list[np.ndarray]:
        """The model's first output per batch, with ``choice``; ``start`` > 0 skips the segments before it
        and feeds their values from ``frontier`` (:meth:`frontier` of the same batches)."""
        if start and frontier is None:
            raise ValueError("a run that starts past segment 0 needs the frontier of its batches")
        return [self.session.run([self.output_name], self._feed(b, choice, start, frontier[k] if start else None))[0]
                for k, b in enumerate(batches)]

    def _feed(self, batch: Mapping[str, np.ndarray], choice: np.ndarray, start: int,
              values: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        feed = {k: v for k, v in batch.items() if k in self._inputs}
        feed[CHOICE_INPUT] = choice
        if self._cuts:
            feed[START_INPUT] = np.array(start, np.int64)
            wanted = self._cuts.needed[start] if start else set()
            for name, dtype in self._cuts.dtypes.items():
                feed[INJECT_PREFIX + name] = values[name] if name in wanted else np.zeros((0,), dtype)
        return feed


def _local_error(micro: ir.Model, w: np.ndarray, x: np.ndarray) -> float:
    """``||micro(x) - x w||^2 / ||x w||^2``: the lowered layer's own output error on rows ``x``."""
    ref = x.astype(np.float64) @ w.astype(np.float64)
    if all(n.op_type == "MatMul" and n.domain == "" for n in micro.graph):
        return 0.0  # fp32 itself
    session = session_for(micro, threads=1)
    y = session.run(None, {session.get_inputs()[0].name: x[None].astype(np.float32)})[0][0]
    return float(((y - ref) ** 2).sum() / max(float((ref**2).sum()), 1e-30))


def layer_inputs(model: ir.Model, names: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]],
                 threads: int | None = None) -> dict[str, np.ndarray]:
    """Each named tensor of ``model`` over ``batches``, rows stacked: ``[tokens, K]`` float32."""
    names = list(dict.fromkeys(names))
    session = session_for(model, names, threads=threads)
    feeds = {i.name for i in session.get_inputs()}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b in batches:
        for n, x in zip(names, session.run(names, {k: v for k, v in b.items() if k in feeds})):
            parts[n].append(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
    return {n: np.concatenate(v) for n, v in parts.items()}


def _as_branch(micro: ir.Model, outer_x: ir.Value, prefix: str) -> ir.Graph:
    """The micro model's graph as an ``If`` branch: no inputs, reads ``outer_x`` from the
    enclosing scope, every other name prefixed (ONNX names are unique across scopes)."""
    g = micro.graph
    x = g.inputs[0]
    nodes, inits, y = list(g), list(g.initializers.values()), g.outputs[0]
    for node in nodes:
        for k, v in enumerate(node.inputs):
            if v is x:
                node.replace_input_with(k, outer_x)
    g.outputs.clear()
    g.inputs.clear()
    for node in nodes:
        g.remove(node)
    g.initializers.clear()
    for v in inits:
        v.name = prefix + v.name
    for node in nodes:
        node.name = prefix + (node.name or node.op_type)
        for o in node.outputs:
            o.name = prefix + (o.name or "")
    return ir.Graph([], [y], nodes=nodes, initializers=inits, name=prefix.rstrip("/"))


def _select(graph: ir.Graph, lin, i: int, choice: ir.Value,
            branches: list[tuple[int, ir.Graph]]) -> tuple[ir.Value, ir.Node]:
    """A balanced tree of ``If`` over ``branches`` ((candidate index, graph)), inserted before the
    linear; returns the selected output and the first node inserted. One branch: inlined, no ``If``."""
    name = lin.name
    nodes: list[ir.Node] = []
    if len(branches) == 1:
        branch = branches[0][1]
        sub = list(branch)
        for node in sub:
            branch.remove(node)
        y = branch.outputs[0]
        for v in list(branch.initializers.values()):
            branch.initializers.pop(v.name)
            graph.register_initializer(v)
        graph.insert_before(lin.node, sub)
        return y, sub[0]
    idx = add_initializer(graph, f"{name}#choice_index", np.array(i, np.int64))
    sel = ir.node("Gather", [choice, idx], attributes={"axis": 0}, name=f"{name}#choice")
    sel.outputs[0].name = f"{name}#choice"
    nodes.append(sel)

    def tree(part: list[tuple[int, ir.Graph]], depth: str) -> tuple[ir.Graph | None, ir.Node | None]:
        if len(part) == 1:
            return part[0][1], None
        mid = len(part) // 2
        bound = add_initializer(graph, f"{name}#bound{depth}", np.array(part[mid][0], np.int64))
        cond = ir.node("Less", [sel.outputs[0], bound], name=f"{name}#cond{depth}")
        cond.outputs[0].name = f"{name}#cond{depth}"
        nodes.append(cond)
        then_g, then_n = tree(part[:mid], depth + "0")
        else_g, else_n = tree(part[mid:], depth + "1")
        then_g = then_g if then_n is None else _wrap(then_n, f"{name}#t{depth}")
        else_g = else_g if else_n is None else _wrap(else_n, f"{name}#e{depth}")
        node = ir.node("If", [cond.outputs[0]], attributes={"then_branch": then_g, "else_branch": else_g},
                       name=f"{name}#if{depth}")
        out = node.outputs[0]
        out.name = f"{name}#sel{depth}"
        out.type = ir.TensorType(ir.DataType.FLOAT)
        return None, node

    _, top = tree(branches, "")
    graph.insert_before(lin.node, [*nodes, top])
    return top.outputs[0], nodes[0]


def _wrap(node: ir.Node, name: str) -> ir.Graph:
    return ir.Graph([], [node.outputs[0]], nodes=[node], name=name)


@dataclasses.dataclass
class _Cuts:
    segment_of: list[int]  # per layer
    needed: list[set[str]]  # per start segment: the values fed to start there
    output_of: dict[str, str]  # crossing value -> the graph output exposing it
    dtypes: dict[str, np.dtype]  # crossing value -> its dtype (the empty feed of an unused input)


def _nested(node: ir.Node):
    """``node`` and every node of its subgraphs, recursively."""
    yield node
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            for inner in g:
                yield from _nested(inner)


def _segment(graph: ir.Graph, firsts: Sequence[ir.Node]) -> _Cuts | None:
    """Cut ``graph`` before each of ``firsts`` (a layer's first node) into ``If`` segments (module doc).

    Segment ``j`` becomes ``If(start <= j)``: the then branch is its nodes, the else branch
    copies the inputs ``lowbit_in/NAME`` of every value NAME it hands to later segments.
    None (nothing cut) when a crossing value has no known dtype.
    """
    nodes = list(graph)
    pos = {id(n): k for k, n in enumerate(nodes)}
    bounds = sorted({0, *(pos[id(f)] for f in firsts)})
    seg_at = np.searchsorted(bounds, np.arange(len(nodes)), side="right") - 1
    owner = {id(inner): int(seg_at[k]) for k, n in enumerate(nodes) for inner in _nested(n)}
    outputs = {id(v) for v in graph.outputs}
    plan = []  # per segment: [(value, [later uses], last segment reading it)]
    for j in range(len(bounds) - 1):
        exported = []
        for n in nodes[bounds[j]:bounds[j + 1]]:
            for v in n.outputs:
                later = [u for u in v.uses() if owner[id(u.node)] > j]
                if later or id(v) in outputs:
                    if v.dtype is None:
                        return None
                    last = len(bounds) if id(v) in outputs else max(owner[id(u.node)] for u in later)
                    exported.append((v, later, last))
        plan.append(exported)
    start = ir.Value(name=START_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    graph.inputs.append(start)
    cuts = _Cuts([int(seg_at[pos[id(f)]]) for f in firsts], [set() for _ in bounds], {}, {})
    for j, exported in enumerate(plan):
        if not exported:
            continue  # nothing leaves it: dead code, left as it is
        body = nodes[bounds[j]:bounds[j + 1]]
        graph.remove(body)
        copies, feeds = [], []
        for v, _, _ in exported:
            fed = ir.Value(name=INJECT_PREFIX + v.name, type=v.type)
            graph.inputs.append(fed)
            feeds.append(ir.node("Identity", [fed], name=f"segment{j}/copy/{v.name}"))
            feeds[-1].outputs[0].name = f"segment{j}/copy/{v.name}"
            copies.append(feeds[-1].outputs[0])
        bound = add_initializer(graph, f"segment{j}#index", np.array(j, np.int64))
        cond = ir.node("LessOrEqual", [start, bound], name=f"segment{j}#runs")
        cond.outputs[0].name = f"segment{j}#runs"
        node = ir.node("If", [cond.outputs[0]], num_outputs=len(exported), name=f"segment{j}", attributes={
            "then_branch": ir.Graph([], [v for v, _, _ in exported], nodes=body, name=f"segment{j}"),
            "else_branch": ir.Graph([], copies, nodes=feeds, name=f"segment{j}_fed"),
        })
        graph.insert_before(nodes[bounds[j + 1]], [cond, node])
        for (v, later, last), out in zip(exported, node.outputs):
            out.name = f"segment{j}/{v.name}"
            out.type = v.type
            for use in later:
                use.node.replace_input_with(use.idx, out)
            if id(v) in outputs:
                graph.outputs[[id(o) for o in graph.outputs].index(id(v))] = out
            else:
                graph.outputs.append(out)  # read once, by frontier()
            cuts.output_of[v.name] = out.name
            cuts.dtypes[v.name] = v.dtype.numpy()
            for k in range(j + 1, min(last, len(bounds) - 1) + 1):
                cuts.needed[k].add(v.name)
    return cuts


# ---------------------------------------------------------------------------
# Scoring against the fp32 outputs
# ---------------------------------------------------------------------------
class Scorer:
    """Final-output error of outputs against the reference ones (see the module doc).

    ``ids``: per batch, the token ids ``[B, T]`` (language models: KL and dNLL); None for
    other models (``1 - cosine``).

    With ``d = q - r`` the logit change and ``p = softmax(r)`` the reference distribution,
    ``log softmax(q) = log softmax(r) + d - log(1 + m)``, ``m = E_p[expm1(d)]``, so per position

    * ``KL(p || softmax(q)) = log1p(m) - E_p[d]``;
    * ``NLL_q(target) - NLL_r(target) = log1p(m) - d[target]``.

    Every term is of the size of ``d``, so float32 loses nothing to cancellation, and a run
    costs four threaded (torch) passes over its ``[B, T, V]`` logits instead of two
    log-softmaxes in float64: with a 49k-word vocabulary the scoring would otherwise cost
    about as much as the run.
    """

    def __init__(self, reference: Sequence[np.ndarray], ids: Sequence[np.ndarray] | None) -> None:
        self.ids = ids
        self.kind = "kl" if ids is not None else "1-cosine"
        self.reference = list(reference)
        if ids is not None:
            self._targets = [torch.from_numpy(np.asarray(t, np.int64)[:, 1:, None]) for t in ids]
            self._r = [torch.from_numpy(np.asarray(r, np.float32)) for r in reference]
            self._p = [torch.softmax(r.double(), dim=-1).float() for r in self._r]

    def zero(self) -> dict[str, float]:
        """The score of outputs equal to the reference (fp32's, by definition)."""
        return {"metric": 0.0, "dnll": 0.0} if self.ids is not None else {"metric": 0.0}

    def score(self, outputs: Sequence[np.ndarray]) -> dict[str, float]:
        if self.ids is None:
            c = np.concatenate([cosine(r, q) for r, q in zip(self.reference, outputs)])
            return {"metric": float((1.0 - c).mean())}
        kl = dnll = positions = targets = 0.0
        for p, r, target, q in zip(self._p, self._r, self._targets, outputs):
            d = torch.from_numpy(np.asarray(q, np.float32)) - r
            log1p_m = torch.log1p(_expect(p, torch.expm1(d)))
            kl += float((log1p_m - _expect(p, d)).sum())
            dnll += float((log1p_m[:, :-1] - d[:, :-1].gather(-1, target)[..., 0].double()).sum())
            positions += log1p_m.numel()
            targets += target.numel()
        return {"metric": kl / max(positions, 1), "dnll": dnll / max(targets, 1)}


def _expect(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E_p[x]`` over the last axis (float64 result): one batched dot product per position."""
    v = p.shape[-1]
    return torch.bmm(p.reshape(-1, 1, v), x.reshape(-1, v, 1)).reshape(p.shape[:-1]).double()


# ---------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------
def fingerprint(model: ir.Model, batches: Sequence[Mapping[str, np.ndarray]], extra: Mapping[str, Any]) -> str:
    """A key over the graph (ops and wiring), every initializer's bytes, the data, and ``extra``."""
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for node in model.graph:
        h.update(f"{node.domain}:{node.op_type}:{[v.name if v else '' for v in node.inputs]}".encode())
    for name, v in sorted(model.graph.initializers.items()):
        h.update(name.encode())
        if v.const_value is not None:
            h.update(v.const_value.tobytes())
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()[:32]


class SensitivityCache:
    """Measured values by (layer, candidate), in ``DIR/sensitivity-KEY.json``."""

    def __init__(self, folder: str | Path | None, key: str) -> None:
        self.path = None if folder is None else Path(folder) / f"sensitivity-{key}.json"
        self.key = key
        self.entries: dict[str, dict[str, float]] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION and data.get("key") == key:
                    self.entries = data.get("entries", {})
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a broken cache is measured again, not an error

    def get(self, layer: str, candidate: str) -> dict[str, float] | None:
        return self.entries.get(f"{layer}|{candidate}")

    def put(self, layer: str, candidate: str, value: dict[str, float]) -> None:
        self.entries[f"{layer}|{candidate}"] = value

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "key": self.key, "entries": self.entries}))
        tmp.replace(self.path)


def measure(
    graph: SensitivityGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    scorer: Scorer,
    pairs: Sequence[tuple[str, str]],
    *,
    cache: SensitivityCache | None = None,
    show_progress: bool = True,
) -> tuple[dict[tuple[str, str], dict[str, float]], dict[str, Any]]:
    """Sensitivity of each (layer, candidate name) of ``pairs``; fp32 is 0 by definition.

    Returns the values and a record (runs made, values taken from the cache, seconds).
    """
    start = time.perf_counter()
    out: dict[tuple[str, str], dict[str, float]] = {}
    todo = []
    for layer, cand in pairs:
        if cand == "fp32":
            out[(layer, cand)] = scorer.zero()
            continue
        hit = cache.get(layer, cand) if cache is not None else None
        if hit is not None:
            out[(layer, cand)] = hit
        else:
            todo.append((layer, cand))
    frontier = graph.frontier(batches) if todo else None
    for n, (layer, cand) in enumerate(progress(todo, desc="mixed: sensitivity", enabled=show_progress)):
        assignment = {layer: cand}
        outputs = graph.run(batches, graph.choice(assignment), start=graph.start_of(assignment), frontier=frontier)
        value = scorer.score(outputs)
        out[(layer, cand)] = value
        if cache is not None:
            cache.put(layer, cand, value)
            if n % 50 == 49:
                cache.save()  # a long analysis survives an interruption
    if cache is not None and todo:
        cache.save()
    seconds = time.perf_counter() - start
    return out, {"method": "exact", "runs": len(todo), "cached": len(out) - len(todo), "seconds": round(seconds, 2),
                 "seconds_per_run": round(seconds / len(todo), 4) if todo else None}


def measure_scaled(
    graph: SensitivityGraph,
    batches: Sequence[Mapping[str, np.ndarray]],
    scorer: Scorer,
    pairs: Sequence[tuple[str, str]],
    *,
    cache: SensitivityCache | None = None,
    show_progress: bool = True,
) -> tuple[dict[tuple[str, str], dict[str, float]], dict[str, Any]]:
    """As :func:`measure`, with one run per layer instead of one per (layer, candidate).

    For each layer the candidate with the largest local output error (``graph.local_error``)
    is measured exactly (the *anchor*: the largest effect, the least relative noise); every
    other candidate ``c`` gets the anchor's values scaled by ``local_error[c] /
    local_error[anchor]``. To second order the final-output KL of a small change ``e`` of a
    layer's output is a quadratic form ``e^T F e / 2``, which scales as ``||e||^2`` when the
    candidates of a layer perturb it in alike directions; ``benchmarks/mixed_smollm2.py``
    measures how well the estimate ranks against :func:`measure`.
    """
    by_layer: dict[str, list[str]] = {}
    for layer, cand in pairs:
        by_layer.setdefault(layer, []).append(cand)
    anchors = {}
    for layer, cands in by_layer.items():
        scored = [c for c in cands if c != "fp32"]
        if scored:
            missing = [c for c in scored if (layer, c) not in graph.local_error]
            if missing:
                raise ValueError(f"no local error for {layer} {missing}: build the graph with local_inputs")
            anchors[layer] = max(scored, key=lambda c: graph.local_error[(layer, c)])
    exact, record = measure(graph, batches, scorer, [(k, v) for k, v in anchors.items()], cache=cache,
                            show_progress=show_progress)
    out: dict[tuple[str, str], dict[str, float]] = {}
    for layer, cand in pairs:
        anchor = anchors.get(layer)
        if anchor is None or cand == "fp32":
            out[(layer, cand)] = scorer.zero()
            continue
        ratio = graph.local_error[(layer, cand)] / max(graph.local_error[(layer, anchor)], 1e-30)
        out[(layer, cand)] = {k: v * ratio for k, v in exact[(layer, anchor)].items()}
    return out, {**record, "method": "scaled", "anchors": dict(collections.Counter(anchors.values()))}


def reference_outputs(graph: SensitivityGraph, batches: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Outputs with every layer in fp32."""
    return graph.run(batches, graph.choice({}))
