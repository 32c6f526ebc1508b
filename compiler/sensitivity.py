"""Per-layer sensitivity: what the final output loses when one layer alone takes a candidate.

For a model with linears ``1..L`` and candidates ``c`` (``lowbit.compiler.candidates``),
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

Results are cached on disk by a key over the graph, the weights, the candidates,
their options and the calibration data (:class:`SensitivityCache`).
"""

from __future__ import annotations

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

from lowbit.compiler.candidates import Candidate, lower_linear, weight_bytes
from lowbit.compiler.evaluate import cosine, log_softmax
from lowbit.compiler.irutil import add_initializer, replace_value
from lowbit.compiler.ortsession import session_for
from lowbit.compiler.plan import LayerPlan
from lowbit.compiler.progress import progress
from lowbit.passes.recognize import find_linears

CHOICE_INPUT = "lowbit_choice"
CACHE_VERSION = 1


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
    given branches (the others stay fp32).
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
        opsets = dict(graph.opset_imports)
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
                for domain, version in micro.opset_imports.items():
                    opsets.setdefault(domain, version)
                branches.append((j, _as_branch(micro, lin.x, f"{lin.name}#{c.name}/")))
            y = _select(graph, lin, i, choice, branches)
            replace_value(lin.node.outputs[0], y)
            graph.remove(lin.node, safe=True)
            self.layers.append(LayerInfo(lin.name, lin.shape, lin.x.name, i))
        graph.opset_imports.update(opsets)
        self.index = {lay.name: lay.index for lay in self.layers}
        self.session = session_for(work, threads=threads)
        self.output_name = self.session.get_outputs()[0].name
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

    def run(self, batches: Sequence[Mapping[str, np.ndarray]], choice: np.ndarray) -> list[np.ndarray]:
        extra = {CHOICE_INPUT: choice}
        return [
            self.session.run([self.output_name], {k: v for k, v in {**b, **extra}.items() if k in self._inputs})[0]
            for b in batches
        ]


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


def _select(graph: ir.Graph, lin, i: int, choice: ir.Value, branches: list[tuple[int, ir.Graph]]) -> ir.Value:
    """A balanced tree of ``If`` over ``branches`` ((candidate index, graph)), inserted before the
    linear; returns the selected output. One branch: inlined, no ``If``."""
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
        return y
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
    return top.outputs[0]


def _wrap(node: ir.Node, name: str) -> ir.Graph:
    return ir.Graph([], [node.outputs[0]], nodes=[node], name=name)


# ---------------------------------------------------------------------------
# Scoring against the fp32 outputs
# ---------------------------------------------------------------------------
class Scorer:
    """Final-output error of outputs against the reference ones (see the module doc).

    ``ids``: per batch, the token ids ``[B, T]`` (language models: KL and dNLL); None for
    other models (``1 - cosine``).
    """

    def __init__(self, reference: Sequence[np.ndarray], ids: Sequence[np.ndarray] | None) -> None:
        self.ids = ids
        self.kind = "kl" if ids is not None else "1-cosine"
        self.reference = list(reference)
        if ids is not None:
            self._lp = [log_softmax(r) for r in reference]
            self._p = [np.exp(lp) for lp in self._lp]
            self._nll_ref = self._nll(self._lp)

    def _nll(self, lps: Sequence[np.ndarray]) -> float:
        total = count = 0.0
        for lp, tok in zip(lps, self.ids):
            target = np.asarray(tok)[:, 1:]
            total -= float(np.take_along_axis(lp[:, :-1], target[..., None], -1).sum())
            count += target.size
        return total / max(count, 1)

    def score(self, outputs: Sequence[np.ndarray]) -> dict[str, float]:
        if self.ids is None:
            c = np.concatenate([cosine(r, q) for r, q in zip(self.reference, outputs)])
            return {"metric": float((1.0 - c).mean())}
        kl = count = 0.0
        lps = []
        for p, lp_ref, q in zip(self._p, self._lp, outputs):
            lp_q = log_softmax(q)
            lps.append(lp_q)
            kl += float((p * (lp_ref - lp_q)).sum())
            count += p.shape[0] * p.shape[1]
        return {"metric": kl / max(count, 1), "dnll": self._nll(lps) - self._nll_ref}


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
    zero = {"metric": 0.0, "dnll": 0.0} if scorer.ids is not None else {"metric": 0.0}
    out: dict[tuple[str, str], dict[str, float]] = {}
    todo = []
    for layer, cand in pairs:
        if cand == "fp32":
            out[(layer, cand)] = dict(zero)
            continue
        hit = cache.get(layer, cand) if cache is not None else None
        if hit is not None:
            out[(layer, cand)] = hit
        else:
            todo.append((layer, cand))
    for n, (layer, cand) in enumerate(progress(todo, desc="mixed: sensitivity", enabled=show_progress)):
        value = scorer.score(graph.run(batches, graph.choice({layer: cand})))
        out[(layer, cand)] = value
        if cache is not None:
            cache.put(layer, cand, value)
            if n % 50 == 49:
                cache.save()  # a long analysis survives an interruption
    if cache is not None and todo:
        cache.save()
    seconds = time.perf_counter() - start
    return out, {"runs": len(todo), "cached": len(out) - len(todo), "seconds": round(seconds, 2),
                 "seconds_per_run": round(seconds / len(todo), 4) if todo else None}


def reference_outputs(graph: SensitivityGraph, batches: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Outputs with every layer in fp32."""
    return graph.run(batches, graph.choice({}))
