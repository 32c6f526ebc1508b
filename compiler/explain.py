"""``lowbit explain``: where a compiled model's error comes from, and what would fix it.

The manifest says *how much* a quantized model departs from fp32 (KL of the
next-token distributions, or 1 - cosine); this module says *where*. It
replays the compile from what the manifest recorded (the imported fp32 graph
kept as ``reference.onnx`` with ``--keep-reference``, else the source
exported again; the data files; the resolved recipe), checks that the replay
reproduces the artifact's outputs, and measures on the compile's held-out
evaluation inputs:

1. **Pass-by-pass bisect.** After every pass that modified the graph, the
   graph as it stands runs in ONNX Runtime (weight-only QDQ stages run as
   they are) and its final output is compared with fp32: the pass that moved
   the output most is named.
2. **Per-layer error, matched by debug id.** Every node of the imported fp32
   graph carries a debug id, and a pass that replaces a node carries the id
   to the node computing the replacement (``passbase.carry_debug_id``), so a
   linear's fp32 output and its quantized output are found in two different
   graphs without guessing from names. The fp32 side is the *float stage*
   (the graph just before weights were quantized: after smoothing or
   rotation, which keep the fp32 function but rescale some tensors). Per
   linear, the SQNR ``10 log10(||y_ref||^2 / ||y_ref - y_q||^2)`` in dB:

   * *cumulative*: in the quantized model (this layer's error plus all
     upstream); where it drops most along depth, the error grows;
   * *local*: the quantized layer fed fp32 activations (every other linear
     in float): the error this layer alone injects.
3. **Measured promotions.** The *explain graph* is the last QDQ stage (what
   the backend lowers from) in which each quantized linear gets a float twin
   mixed in by a mask input, ``y = y_q + m_fp32[i] (x W_fp32 - y_q)``, then
   lowered by the recipe's remaining passes exactly as in the compile; a
   weight-only twin ``+ m_wo[i] (x DQ(W_q) - y_q)`` is added after the
   lowering, as the backend leaves a ``w8a16`` layer. All masks 0 is the
   artifact (checked); a one-hot mask is the artifact recompiled with
   ``--override "layer=fp32"`` (or ``=w8a16``); all fp32 masks 1 gives every
   layer's local error in one run. Promotions are measured for the layers
   with the lowest local SQNR plus any layer writing a graph output (its
   error reaches the output undamped), on a graph with twins for those
   layers only. A layer's *error contribution* is the share of the final KL
   its promotion to fp32 removes; suggestions are the promotions with the
   largest KL reduction per byte they add to the artifact (w8a16 adds none:
   it keeps the int8 weights and pays in speed, giving up the integer
   activation kernel, so such promotions come first, by gain), with the
   exact ``--override`` strings.

Results go next to the artifact (``explain.json``), where ``lowbit inspect
--layers`` and ``lowbit report`` read them; the artifact's files and their
hashes in the manifest are left as they are.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.compiler.compilation import Compilation, CompileOptions
from lowbit.compiler.core.artifact import MODEL, load_manifest
from lowbit.compiler.core.calibration import TensorObserver
from lowbit.compiler.core.data import batched
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.evaluate import cosine, log_softmax
from lowbit.compiler.core.irutil import add_initializer
from lowbit.compiler.core.ortsession import make_session, session_for
from lowbit.compiler.core.passbase import (
    DEBUG_KEY,
    LAYER_KEY,
    CompileContext,
)
from lowbit.compiler.core.pipeline import Instrument, pass_name, run_pipeline
from lowbit.compiler.core.plan import PRECISIONS, read_plan, write_plan
from lowbit.compiler.core.progress import progress as progress_bar
from lowbit.compiler.core.recipe import parse_recipe
from lowbit.passes.recognize import find_linears

EXPLAIN_FILE = "explain.json"
MASK_FP32 = "lowbit_explain_fp32"
MASK_WO = "lowbit_explain_weight_only"
ROLE_KEY = "lowbit.explain"
#: on a Split behind horizontally fused linears: the debug ids its outputs stand for (passes/fuse_linears.py)
DEBUG_IDS_KEY = "lowbit.debug_ids"
#: a weight-only twin enters the plan as ``LAYER#explain-w8a16``
TWIN_SUFFIX = "#explain-"
#: activation ranges kept per channel (for plots) for this many most outlier-heavy inputs
KEEP_CHANNELS = 6


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
class _Metric:
    """Final-output error against fp32, accumulated over samples.

    Language models: mean KL(p_fp32 || p_q) over positions; others: mean 1 - cosine.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def sample(self, ref: np.ndarray, q: np.ndarray) -> tuple[float, int]:
        if self.kind == "kl":
            lp_ref, lp_q = log_softmax(ref), log_softmax(q)
            kl = (np.exp(lp_ref) * (lp_ref - lp_q)).sum(axis=-1)
            return float(kl.sum()), int(kl.size)
        c = cosine(ref, q)
        return float((1.0 - c).sum()), int(c.size)

    def mean(self, refs: Sequence[np.ndarray], qs: Sequence[np.ndarray]) -> float:
        total = count = 0
        for r, q in zip(refs, qs):
            s, n = self.sample(r, q)
            total, count = total + s, count + n
        return total / max(count, 1)


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); +inf for an exact match."""
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


# ---------------------------------------------------------------------------
# Reproducing the compile
# ---------------------------------------------------------------------------
def reproduction_args(manifest: dict[str, Any]) -> dict[str, Any]:
    """Source, data files and tokenizer the compile used (``manifest["reproduce"]``, else parsed)."""
    rep = manifest.get("reproduce")
    if rep:
        return dict(rep)
    source = manifest.get("source")
    calib = (manifest.get("calibration") or {}).get("source", "")
    calib_data = eval_data = None
    if calib and not calib.startswith("builtin:") and calib not in ("example inputs", "synthetic (random inputs)"):
        calib_data, _, rest = calib.partition(" | eval: ")
        eval_data = rest or None
    return {"source": source, "calib_data": calib_data, "eval_data": eval_data, "tokenizer": None}


def _recipe_from_manifest(manifest: dict[str, Any]):
    resolved = dict(manifest["recipe"])
    source = resolved.pop("source", "")
    passes = []
    for entry in resolved["passes"]:
        # resolved recipes list every option with its default; None means "not given"
        passes.append({k: v for k, v in entry.items() if v is not None})
    resolved["passes"] = passes
    return parse_recipe(resolved, source=source)


# ---------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------
def qdq_weight(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear node if ``node`` is a MatMul on a constant QDQ weight (per-axis or blocked)."""
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    if any(v is not None and v.const_value is None for v in dq.inputs):
        return None
    if dq.inputs[0].const_value is None or len(dq.inputs[0].const_value.shape) != 2:
        return None
    return dq


def float_input(x: ir.Value) -> ir.Value:
    """The float tensor behind a static activation QuantizeLinear -> DequantizeLinear pair (or ``x``)."""
    dq = x.producer()
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is not None and q.op_type == "QuantizeLinear":
            return q.inputs[0]
    return x


def _layer_of(node: ir.Node, dq: ir.Node) -> str | None:
    return dq.metadata_props.get(LAYER_KEY) or node.metadata_props.get(LAYER_KEY)


def _save(model: ir.Model, folder: Path, stem: str) -> Path:
    path = folder / f"{stem}.onnx"
    ir.save(model, path, external_data=f"{stem}.onnx.data", size_threshold_bytes=1024)
    return path


def _by_debug_id(graph: ir.Graph) -> dict[str, ir.Node]:
    out = {}
    for node in graph:
        d = node.metadata_props.get(DEBUG_KEY)
        if d is not None:
            out[d] = node  # the last one in graph order computes the value
    return out


def glob_escape(name: str) -> str:
    """A layer name as an ``--override`` glob matching only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# ---------------------------------------------------------------------------
# The probe that runs along the re-played pipeline
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Layer:
    name: str
    debug_id: str
    precision: str
    weight_only: str | None  # the same weights without activation quantization ("w8a16"), if that differs
    shape: tuple[int, int]
    weight_bytes: int
    order: int
    writes_output: bool = False  # its output is a graph output (lm_head -> logits)


def _run_logits(session, batches, extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    name = session.get_outputs()[0].name
    return [session.run([name], _feed(session, b, extra))[0] for b in batches]


class _Probe(Instrument):
    """Measures every modified stage; keeps the last float stage and the last full QDQ stage.

    The *float stage* is the graph just before weights were quantized: after
    smoothing or rotation, fp32-equivalent, with each linear's weight as the
    quantizer saw it. Its tensors, matched by debug id, are the fp32 reference
    per layer (a smoothed layer's output is rescaled, so the imported graph's
    tensor is not comparable to it). The *QDQ stage* is the last stage where
    every quantized linear is still a MatMul on a DequantizeLinear weight.
    """

    def __init__(self, batches, ref_logits, metric: _Metric, folder: Path) -> None:
        self.batches, self.ref_logits, self.metric, self.folder = batches, ref_logits, metric, folder
        self.stages: list[dict[str, Any]] = []
        self.fp32_weights: dict[str, np.ndarray] = {}
        self.snapshot: Path | None = None
        self.snapshot_index = -1
        self.float_stage: Path | None = None
        self.best_count = 0
        self.last_metric = 0.0

    def _remember_weights(self, model: ir.Model) -> None:
        # the weight of each linear as the last stage before its quantization saw it
        # (after smoothing or rotation, if any): the float twin of its quantized form
        for lin in find_linears(model.graph)[0]:
            d = lin.node.metadata_props.get(DEBUG_KEY)
            if d is not None and np.issubdtype(lin.weight_array.dtype, np.floating):
                self.fp32_weights[d] = lin.weight_array

    def before(self, index, pass_, model):
        if index == 0:
            self._remember_weights(model)
            self.float_stage = _save(model, self.folder, "float_stage")

    def after(self, index, pass_, model, modified, seconds):
        entry: dict[str, Any] = {"index": index + 1, "pass": pass_name(pass_), "modified": bool(modified)}
        if modified:
            self._remember_weights(model)
            try:
                value = self.metric.mean(self.ref_logits, _run_logits(session_for(model), self.batches))
                entry.update(metric=value, delta=value - self.last_metric, runnable=True)
                self.last_metric = value
            except Exception as e:  # a stage some later pass must finish first (custom ops, ...)
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                entry.update(metric=None, delta=None, runnable=False, note=f"{type(e).__name__}: {msg}")
        else:
            entry.update(metric=self.last_metric, delta=0.0, runnable=True)
        self.stages.append(entry)
        count = sum(1 for n in model.graph if qdq_weight(n) is not None)
        if modified and not count and not self.best_count:
            self.float_stage = _save(model, self.folder, "float_stage")
        if count and count >= self.best_count:
            self.best_count = count
            self.snapshot = _save(model, self.folder, "qdq_stage")
            self.snapshot_index = index


def _feed(session, feed: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    out = {k: v for k, v in feed.items() if k in names}
    if extra:
        out.update({k: v for k, v in extra.items() if k in names})
    return out


# ---------------------------------------------------------------------------
# The explain graph
# ---------------------------------------------------------------------------
def build_explain_graph(
    model: ir.Model, fp32_weights: dict[str, np.ndarray], only: set[str] | None = None, weight_only: bool = False
) -> list[_Layer]:
    """Give every QDQ linear of ``model`` (or those named in ``only``) twins mixed in by mask inputs (in place).

    Layer ``i`` (graph order) computes ``y_q + m_fp32[i] (x W_fp32 - y_q)``,
    plus ``m_wo[i] (x DQ(W_q) - y_q)`` with ``weight_only``, where ``x`` is its
    float input (before any static activation Q/DQ) and ``W_fp32`` its weight
    before quantization. The graph is then meant for the backend's lowering:
    it lowers the quantized MatMul (rewiring the twins to the lowered output)
    and, since the weight-only twin is entered in the plan as a layer of its
    own (``LAYER#explain-w8a16``), lowers that twin exactly as it lowers a
    weight-only layer of a recompiled plan. Call :func:`finish_explain_graph`
    after the lowering. Returns the layers in graph order (the masks' order).
    """
    graph = model.graph
    plan = read_plan(model)
    found = []
    for node in list(graph):
        dq = qdq_weight(node)
        if dq is None:
            continue
        layer = _layer_of(node, dq)
        d = node.metadata_props.get(DEBUG_KEY)
        if layer is None or d is None or d not in fp32_weights or (only is not None and layer not in only):
            continue
        found.append((node, dq, layer, d))
    if not found:
        raise InputError("the compile has no quantized linear in QDQ form (MatMul on a DequantizeLinear weight) to explain")
    layers = []
    for i, (node, dq, layer, d) in enumerate(found):
        lp = plan.layers.get(layer) if plan else None
        weight_only = None
        if lp is not None and lp.activation_bits is not None and f"w{lp.weight_bits}a16" in PRECISIONS:
            weight_only = f"w{lp.weight_bits}a16"
        w_bytes = sum(v.const_value.nbytes for v in dq.inputs if v is not None and v.const_value is not None)
        shape = tuple(int(v) for v in fp32_weights[d].shape)
        layers.append(_Layer(layer, d, lp.precision if lp else "?", weight_only, shape, int(w_bytes), i,
                             node.outputs[0].is_graph_output()))

    n = len(found)
    mask_f = ir.Value(name=MASK_FP32, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]))
    mask_w = ir.Value(name=MASK_WO, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]))
    graph.inputs.extend([mask_f, mask_w])

    for i, ((node, dq, _layer, _d), lay) in enumerate(zip(found, layers)):
        x = float_input(node.inputs[0])
        y_q = node.outputs[0]
        w = add_initializer(graph, f"{lay.name}.explain_w_fp32", np.ascontiguousarray(fp32_weights[lay.debug_id], dtype=np.float32))
        mix = _mix_in(graph, node, y_q, y_q, x, w, mask_f, i, lay.name, "fp32")
        if weight_only and lay.weight_only:
            twin = f"{lay.name}{TWIN_SUFFIX}{lay.weight_only}"
            inputs = [None if v is None else _copy_initializer(graph, v, f"{twin}.{k}") for k, v in enumerate(dq.inputs)]
            attrs = [ir.Attr(a.name, a.type, a.value) for a in dq.attributes.values()]
            dq2 = ir.Node("", "DequantizeLinear", inputs, attributes=attrs, name=f"{twin}/weight_dq")
            dq2.outputs[0].name = f"{twin}.weight_dq"
            dq2.metadata_props[LAYER_KEY] = twin
            _mix_in(graph, mix.producer(), mix, y_q, x, dq2.outputs[0], mask_w, i, lay.name, "weight_only", extra=[dq2], layer_tag=twin)
            plan.layers[twin] = dataclasses.replace(plan.layers[lay.name], precision=lay.weight_only, reason="explain twin")
    if weight_only and plan is not None:
        write_plan(model, plan)
    return layers


def _copy_initializer(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    copy = ir.Value(name=name, const_value=value.const_value, type=value.type, shape=value.shape)
    graph.register_initializer(copy)
    return copy


def finish_explain_graph(model: ir.Model) -> None:
    """After the lowering: give each weight-only twin its own copies of the constants it shares.

    The lowering merges identical initializers, and a twin's int8 weight equals
    the lowered layer's; ONNX Runtime treats a ``DequantizeLinear -> MatMul``
    pair differently when its weight has other readers (it fuses only an
    unshared one into MatMulNBits), so a shared weight would make the twin
    run unlike the same layer in a recompiled artifact.
    """
    graph = model.graph
    for node in list(graph):
        tag = node.metadata_props.get(LAYER_KEY, "")
        if TWIN_SUFFIX not in tag:
            continue
        for k, v in enumerate(node.inputs):
            if v is None or not v.is_initializer():
                continue
            if any(u.metadata_props.get(LAYER_KEY) != tag for u, _ in v.uses()):
                node.replace_input_with(k, _copy_initializer(graph, v, f"{tag}.{node.name}.{k}"))


def _tag(node: ir.Node, layer: str, role: str) -> ir.Node:
    node.metadata_props[ROLE_KEY] = role
    node.metadata_props[ROLE_KEY + ".layer"] = layer
    return node


def _mix_in(graph, after, current, y_q, x, w, mask, i, layer, role, extra=(), layer_tag=None) -> ir.Value:
    """``current + mask[i] * (x @ w - y_q)`` replaces ``current`` everywhere (graph outputs too).

    The twin reads ``x`` through an Identity of its own (removed by ONNX Runtime), so
    that passes fusing linears which share an input leave it apart from its siblings,
    as they would leave a layer whose plan differs from theirs.
    """
    uses = list(current.uses())
    out_index = next((k for k, v in enumerate(graph.outputs) if v is current), None)
    idx = add_initializer(graph, f"{layer}.explain_idx_{role}", np.array(i, np.int64))
    own_x = _tag(ir.node("Identity", [x], name=f"{layer}/explain_{role}_input"), layer, "input")
    extra = [*extra, own_x]
    mm = _tag(ir.node("MatMul", [own_x.outputs[0], w], name=f"{layer}/explain_{role}"), layer, role)
    mm.outputs[0].name = f"{layer}.explain_{role}"
    if layer_tag:
        mm.metadata_props[LAYER_KEY] = layer_tag
    g = _tag(ir.node("Gather", [mask, idx], attributes={"axis": 0}, name=f"{layer}/explain_{role}_mask"), layer, "mask")
    diff = _tag(ir.node("Sub", [mm.outputs[0], y_q], name=f"{layer}/explain_{role}_diff"), layer, f"diff_{role}")
    scaled = _tag(ir.node("Mul", [g.outputs[0], diff.outputs[0]], name=f"{layer}/explain_{role}_scaled"), layer, "scaled")
    mix = _tag(ir.node("Add", [current, scaled.outputs[0]], name=f"{layer}/explain_{role}_mix"), layer, f"mix_{role}")
    mix.outputs[0].name = f"{layer}.explain_mix_{role}"
    graph.insert_after(after, [*extra, mm, g, diff, scaled, mix])
    for user, j in uses:
        user.replace_input_with(j, mix.outputs[0])
    if out_index is not None:  # the layer computes a graph output (lm_head -> logits): the mix takes its place
        name = current.name
        current.name = f"{layer}.explain_before_{role}"
        graph.outputs[out_index] = mix.outputs[0]
        mix.outputs[0].name = name
    return mix.outputs[0]


def debug_id_of(value: ir.Value) -> str | None:
    """The debug id of the fp32 node ``value`` stands for: its producer's, or, for an output
    of a Split that horizontal fusion put behind fused linears, the id listed for that output."""
    node = value.producer()
    if node is None:
        return None
    ids = node.metadata_props.get(DEBUG_IDS_KEY)
    if ids is not None:
        listed = ids.split(",")
        return listed[value.index()] if value.index() < len(listed) else None
    return node.metadata_props.get(DEBUG_KEY)


def _locate(model: ir.Model, layers: list[_Layer]) -> dict[str, dict[str, Any]]:
    """Value names, after lowering, of each layer's quantized output, float twin and float input."""
    names: dict[str, dict[str, Any]] = {lay.name: {} for lay in layers}
    for node in model.graph:
        layer = node.metadata_props.get(ROLE_KEY + ".layer")
        role = node.metadata_props.get(ROLE_KEY)
        if layer not in names:
            continue
        if role == "diff_fp32":
            names[layer]["q"] = node.inputs[1].name
            names[layer]["q_debug_id"] = debug_id_of(node.inputs[1])
        elif role == "fp32":
            names[layer]["fp32"] = node.outputs[0].name
    for lay in layers:
        # the lowering carried the MatMul's debug id to the node computing the lowered
        # output, which is the one the twins read: the fp32 <-> quantized match holds
        names[lay.name]["matched_by_debug_id"] = names[lay.name].get("q_debug_id") == lay.debug_id
    return names


# ---------------------------------------------------------------------------
# explain()
# ---------------------------------------------------------------------------
def explain(
    artifact: str | Path,
    *,
    source: Any = None,
    samples: int | None = None,
    candidates: int = 12,
    measure: Sequence[str] = (),
    suggestions: int = 3,
    save: bool = True,
    progress: bool = True,
    max_tokens: int = 2048,
) -> dict[str, Any]:
    """Measure where the artifact's error comes from (see the module docstring); returns the results.

    Args:
        source: the model source, when neither the artifact's ``reference.onnx`` nor the
            source the manifest names can be loaded (a module, a moved file).
        samples: evaluation samples to use (default: all the compile evaluated on).
        candidates: measure the promotion of this many layers, those with the lowest local
            SQNR, plus any layer writing a graph output (0: every quantized layer).
        measure: glob patterns of layers whose promotion is measured in any case.
        suggestions: how many promotions to suggest.
        save: write ``explain.json`` into the artifact folder.
        max_tokens: tokens per ONNX Runtime run (samples are batched up to this).
    """
    start = time.perf_counter()
    folder = Path(artifact)
    manifest = load_manifest(folder)
    with tempfile.TemporaryDirectory(prefix="lowbit-explain-") as tmp:
        tmp = Path(tmp)
        # the compile's own steps, replayed: load (debug ids: a kept reference has them already, a
        # re-export gets the same ones; the fp32 reference saved into tmp), data, context
        replay = replay_compilation(folder, manifest, source, progress=progress)
        _load_reference(replay, tmp)
        adapter = replay.adapter
        data = replay.prepare_data()
        feeds = data.evaluation[: samples or None]
        if not feeds:
            raise InputError("the compile had no evaluation data to explain the error on")
        metric = _Metric("kl" if getattr(adapter, "task", None) == "causal-lm" else "1-cosine")
        batches = batched(feeds, max_tokens)
        ref_path = replay.reference_path
        ref_logits = _run_logits(make_session(ref_path), batches)

        probe = _Probe(batches, ref_logits, metric, tmp)
        context = replay.make_context()
        final = replay.run_passes(instruments=[probe])
        final_logits = _run_logits(session_for(final), batches)
        del final
        replay.model = None
        recipe = replay.recipe
        reproduced = _check_reproduction(folder, batches, final_logits, ref_logits, metric, manifest)
        replayed = time.perf_counter()

        if probe.snapshot is None:
            raise InputError("no stage of this compile has quantized linears in QDQ form: nothing to attribute")
        tail_context = CompileContext(calibration_batches=data.calibration, stats=context.stats, adapter=adapter,
                                      progress=False, backend=replay.backend)

        def make_graph(only: set[str] | None, weight_only: bool) -> tuple[ir.Model, list[_Layer]]:
            """The QDQ stage with twins, lowered by the recipe's remaining passes as the compile was."""
            eg = ir.load(probe.snapshot)
            layers = build_explain_graph(eg, probe.fp32_weights, only, weight_only)
            eg = run_pipeline(eg, recipe.build()[probe.snapshot_index + 1 :], context=tail_context)
            finish_explain_graph(eg)
            return eg, layers

        result = _measure(make_graph, ref_path, probe.float_stage, feeds, batches, ref_logits, metric, candidates,
                          list(measure), suggestions, progress, max_tokens)

    stages = [{"index": 0, "pass": "Input", "modified": False, "metric": 0.0, "delta": 0.0, "runnable": True}] + probe.stages
    moved = max((s for s in stages if s.get("delta") is not None), key=lambda s: s["delta"])
    out = {
        "artifact": str(folder),
        "model": manifest.get("model", {}).get("name"),
        "recipe": manifest.get("recipe", {}).get("name"),
        "metric": metric.kind,
        "samples": len(feeds),
        "reproduced": reproduced | {"explain_graph_metric": result["base_metric"]},
        "bisect": stages,
        "bisect_max": {"pass": moved["pass"], "index": moved["index"], "delta": moved["delta"]},
        **result,
        "seconds": round(time.perf_counter() - start, 1),
        "timings": {"replay_and_bisect": round(replayed - start, 1), **result.pop("timings")},
    }
    if save:
        (folder / EXPLAIN_FILE).write_text(json.dumps(_finite(out), indent=1) + "\n")
    return out


def replay_compilation(folder: Path, manifest: dict[str, Any], source: Any = None, *, progress: bool = True) -> Compilation:
    """The compile that made the artifact in ``folder``, ready to replay step by step: its resolved recipe,
    data files and backend, and as source the artifact's ``reference.onnx`` (the imported fp32 graph,
    with ``--keep-reference``), else ``source``, else the source the manifest names."""
    args = reproduction_args(manifest)
    kept = folder / "reference.onnx"
    tokenizer = args.get("tokenizer")
    if source is None and kept.is_file():
        tok = folder / "tokenizer"
        source, tokenizer = kept, (tok if tok.is_dir() and any(tok.iterdir()) else tokenizer)
    elif source is None:
        source = args.get("source")
        if source is None:
            raise InputError("the manifest does not say what was compiled; give the model with --source MODEL")
    options = CompileOptions(recipe=_recipe_from_manifest(manifest), calib_data=args.get("calib_data"),
                             eval_data=args.get("eval_data"), tokenizer=tokenizer, progress=progress,
                             backend=manifest.get("backend") or "onnxruntime")
    return Compilation(source, options)


def _load_reference(replay: Compilation, workdir: Path) -> None:
    """The replay's load step, with an error that says how to point at the model."""
    try:
        replay.load(workdir)
    except Exception as e:
        if Path(str(replay.source)).name == "reference.onnx":
            raise
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load the model this artifact was compiled from ({replay.source!r}: {why}); "
                         "give it with --source MODEL") from e


def _check_reproduction(folder, batches, final_logits, ref_logits, metric, manifest) -> dict[str, Any]:
    """Does the re-played compile give the artifact's outputs? (It must, for the attribution to hold.)"""
    art_logits = _run_logits(make_session(folder / MODEL), batches)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(art_logits, final_logits))
    scale = max(float(np.abs(a).max()) for a in art_logits)
    return {
        "max_abs_output_diff": diff,
        "exact": diff <= 1e-4 * max(scale, 1.0),
        "artifact_metric": metric.mean(ref_logits, art_logits),
        "manifest_metric": (manifest.get("accuracy") or {}).get("kl" if metric.kind == "kl" else "cosine_mean"),
    }


def _matmuls(model: ir.Model, layers: list[_Layer]) -> tuple[dict[str, str], dict[str, str]]:
    """Output and input value names of each layer's MatMul in ``model``, found by debug id."""
    nodes = _by_debug_id(model.graph)
    outs, ins = {}, {}
    for lay in layers:
        node = nodes.get(lay.debug_id)
        if node is not None and node.op_type == "MatMul":
            outs[lay.name], ins[lay.name] = node.outputs[0].name, node.inputs[0].name
    return outs, ins


def _measure(make_graph, ref_path, float_path, feeds, batches, ref_logits, metric, candidates, measure, suggestions, show,
             max_tokens) -> dict[str, Any]:
    start = time.perf_counter()
    eg, layers = make_graph(None, False)
    where = _locate(eg, layers)
    n = len(layers)
    zero = np.zeros(n, np.float32)
    ones = np.ones(n, np.float32)
    extras = list(dict.fromkeys(v for lay in layers for v in (where[lay.name]["q"], where[lay.name]["fp32"])))
    session = session_for(eg, extras)
    out_names = [o.name for o in session.get_outputs()]
    del eg

    # the imported graph gives the activations before any transform; the float stage the
    # fp32 value of every layer's input and output in the coordinates the quantizer saw
    reference = ir.load(ref_path)
    _, ref_in = _matmuls(reference, layers)
    ref_session = session_for(reference, list(dict.fromkeys(ref_in.values())))
    ref_names = [o.name for o in ref_session.get_outputs()]
    floating = ir.load(float_path)
    ref_out, flt_in = _matmuls(floating, layers)
    flt_session = session_for(floating, list(dict.fromkeys(list(ref_out.values()) + list(flt_in.values()))))
    flt_names = [o.name for o in flt_session.get_outputs()]
    del reference, floating

    # intermediate tensors of every layer come back from these runs: keep batches small
    width = sum(2 * lay.shape[1] + lay.shape[0] for lay in layers) * 2
    seq = max(max((a.shape[-1] for a in f.values() if a.ndim >= 2), default=1) for f in feeds)
    per_batch = max(1, min(max_tokens, (256 << 20) // max(4 * width, 1)) // max(seq, 1))
    acc: dict[tuple[str, str], float] = defaultdict(float)
    before = {t: TensorObserver(t) for t in set(ref_in.values())}
    after = {t: TensorObserver(t) for t in set(flt_in.values())}
    all_ref, q0_logits, floor_logits = [], [], []
    for f in progress_bar(batched(feeds, per_batch * seq), desc="explain: per-layer error", enabled=show):
        r = dict(zip(ref_names, ref_session.run(None, _feed(ref_session, f))))
        fl = dict(zip(flt_names, flt_session.run(None, _feed(flt_session, f))))
        q0 = dict(zip(out_names, session.run(None, _feed(session, f, {MASK_FP32: zero, MASK_WO: zero}))))
        q1 = dict(zip(out_names, session.run(None, _feed(session, f, {MASK_FP32: ones, MASK_WO: zero}))))
        all_ref.append(r[ref_names[0]])
        q0_logits.append(q0[out_names[0]])
        floor_logits.append(q1[out_names[0]])
        for lay in layers:
            w = where[lay.name]
            y_f, y_q = q1[w["fp32"]].astype(np.float64), q1[w["q"]].astype(np.float64)
            acc[(lay.name, "local_s")] += float((y_f**2).sum())
            acc[(lay.name, "local_n")] += float(((y_q - y_f) ** 2).sum())
            if lay.name in ref_out:
                y_r, y_c = fl[ref_out[lay.name]].astype(np.float64), q0[w["q"]].astype(np.float64)
                acc[(lay.name, "cum_s")] += float((y_r**2).sum())
                acc[(lay.name, "cum_n")] += float(((y_c - y_r) ** 2).sum())
        for t, obs in before.items():
            obs.update(r[t])
        for t, obs in after.items():
            obs.update(fl[t])
        del r, fl, q0, q1
    del ref_session, flt_session, session
    base = metric.mean(all_ref, q0_logits)
    floor = metric.mean(all_ref, floor_logits)
    del all_ref, q0_logits, floor_logits

    rows = []
    for lay in layers:
        k, nn = lay.shape
        x_name = flt_in.get(lay.name)
        a_obs, b_obs = after.get(x_name), before.get(ref_in.get(lay.name, ""))
        row = {
            "name": lay.name,
            "order": lay.order,
            "debug_id": lay.debug_id,
            "matched_by_debug_id": where[lay.name]["matched_by_debug_id"],
            "precision": lay.precision,
            "weight_only": lay.weight_only,
            "shape": [k, nn],
            "weight_bytes": lay.weight_bytes,
            "input": x_name,
            "input_absmax_max": float(a_obs.absmax.max()) if a_obs else None,
            "input_absmax_median": float(np.median(a_obs.absmax)) if a_obs else None,
            "input_outlier_ratio": a_obs.outlier_ratio() if a_obs else None,
            "sqnr_local_db": sqnr_db(acc[(lay.name, "local_s")], acc[(lay.name, "local_n")]),
            "sqnr_cumulative_db": sqnr_db(acc[(lay.name, "cum_s")], acc[(lay.name, "cum_n")]) if lay.name in ref_out else None,
        }
        if a_obs is not None and b_obs is not None:
            row["input_outlier_ratio_fp32"] = b_obs.outlier_ratio()
            # both graphs are fp32: only a transform (smoothing, rotation) changes the ranges beyond rounding
            same = b_obs.absmax.shape == a_obs.absmax.shape and np.allclose(a_obs.absmax, b_obs.absmax, rtol=1e-3, atol=1e-6)
            row["input_transformed"] = not same
        rows.append(row)

    per_layer = time.perf_counter()
    # promotions are measured on a graph with twins for the candidates only (cheaper to run):
    # the layers injecting the most error (lowest local SQNR), and those writing a graph output,
    # whose error reaches the output undamped however small it looks locally
    order = sorted(range(n), key=lambda i: rows[i]["sqnr_local_db"])
    picked = set(order if not candidates or candidates >= n else order[:candidates])
    picked |= {i for i, lay in enumerate(layers) if lay.writes_output}
    for pattern in measure:
        hits = {i for i, lay in enumerate(layers) if fnmatch.fnmatchcase(lay.name, pattern)}
        if not hits:
            raise InputError(f"--measure {pattern!r}: no quantized layer matches")
        picked |= hits
    eg, cand = make_graph({layers[i].name for i in picked}, True)
    session = session_for(eg)
    del eg
    index = {lay.name: i for i, lay in enumerate(cand)}
    row_of = {r["name"]: r for r in rows}
    zero = np.zeros(len(cand), np.float32)
    runs = [(lay, "fp32") for lay in cand] + [(lay, lay.weight_only) for lay in cand if lay.weight_only]
    for lay, option in progress_bar(runs, desc="explain: promotions", enabled=show):
        m_f, m_w = zero.copy(), zero.copy()
        (m_f if option == "fp32" else m_w)[index[lay.name]] = 1.0
        value = metric.mean(ref_logits, _run_logits(session, batches, {MASK_FP32: m_f, MASK_WO: m_w}))
        k, nn = lay.shape
        bytes_after = 4 * k * nn if option == "fp32" else lay.weight_bytes
        row_of[lay.name].setdefault("promote", {})[option] = {
            "metric": value,
            "gain": base - value,
            "extra_bytes": bytes_after - lay.weight_bytes,
            "bytes_after": bytes_after,
            # KL removed per byte the promotion adds; one that adds none (w8a16 keeps the int8
            # weights, and pays in speed, not size) counts as one byte, so it ranks by its gain first
            "score": (base - value) / max(bytes_after - lay.weight_bytes, 1),
        }
    for row in rows:
        fp = row.get("promote", {}).get("fp32")
        row["contribution"] = fp["gain"] / base if fp and base > 0 else None
    ranked = sorted((r for r in rows if r["contribution"] is not None), key=lambda r: -r["contribution"])
    for rank, r in enumerate(ranked, 1):
        r["rank"] = rank

    options = []
    for r in rows:
        best = max(r.get("promote", {}).items(), key=lambda kv: kv[1]["score"], default=None)
        if best and best[1]["gain"] > 0:
            options.append((r, best[0], best[1]))
    options.sort(key=lambda t: -t[2]["score"])
    sugg = [
        {
            "layer": r["name"],
            "precision": p,
            "override": f"{glob_escape(r['name'])}={p}",
            "metric_after": o["metric"],
            "gain": o["gain"],
            "extra_bytes": o["extra_bytes"],
            "score": o["score"],
        }
        for r, p, o in options[:suggestions]
    ]
    combined = None
    if sugg:
        m_f, m_w = zero.copy(), zero.copy()
        for s in sugg:
            (m_f if s["precision"] == "fp32" else m_w)[index[s["layer"]]] = 1.0
        combined = metric.mean(ref_logits, _run_logits(session, batches, {MASK_FP32: m_f, MASK_WO: m_w}))

    return {
        "timings": {"per_layer": round(per_layer - start, 1), "promotions": round(time.perf_counter() - per_layer, 1)},
        "base_metric": base,
        "floor_metric": floor,
        "layers": rows,
        "depth": _depth(rows),
        "attribution": [r["name"] for r in ranked],
        "candidates": [lay.name for lay in cand],
        "suggestions": sugg,
        "suggested_overrides": [s["override"] for s in sugg],
        "metric_with_suggestions": combined,
        "activations": _channel_ranges(rows, before, after, ref_in),
    }


_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _depth(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Cumulative SQNR per block (``...layers.N...``) in graph order, and where it drops the most."""
    blocks: dict[str, list[float]] = {}
    for r in sorted(rows, key=lambda r: r["order"]):
        if r["sqnr_cumulative_db"] is None or not math.isfinite(r["sqnr_cumulative_db"]):
            continue
        m = _BLOCK.search(r["name"])
        key = r["name"][: m.end(1)] if m else r["name"]
        blocks.setdefault(key, []).append(r["sqnr_cumulative_db"])
    seq = [{"block": k, "sqnr_cumulative_db": float(np.mean(v)), "layers": len(v)} for k, v in blocks.items()]
    for prev, cur in zip(seq, seq[1:]):
        cur["drop_db"] = prev["sqnr_cumulative_db"] - cur["sqnr_cumulative_db"]
    drops = [b for b in seq if "drop_db" in b]
    largest = max(drops, key=lambda b: b["drop_db"]) if drops else None
    # within the model, the single layer after which cumulative SQNR falls most
    ordered = [r for r in sorted(rows, key=lambda r: r["order"]) if r["sqnr_cumulative_db"] is not None]
    worst_layer = min(ordered, key=lambda r: r["sqnr_local_db"]) if ordered else None
    return {
        "blocks": seq,
        "largest_drop": largest,
        "most_local_error": worst_layer["name"] if worst_layer else None,
    }


def _channel_ranges(rows, before, after, ref_in) -> list[dict[str, Any]]:
    """Per-channel absmax of the most outlier-heavy linear inputs (fp32 graph, and as quantized)."""
    by_tensor: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["input"] in after:
            by_tensor[r["input"]].append(r)
    ranked = sorted(by_tensor.items(), key=lambda kv: -kv[1][0]["input_outlier_ratio"])[:KEEP_CHANNELS]
    out = []
    for tensor, rs in ranked:
        a = after[tensor]
        b = before.get(ref_in.get(rs[0]["name"], ""))
        entry = {
            "tensor": tensor,
            "layers": [r["name"] for r in rs],
            "outlier_ratio": a.outlier_ratio(),
            "absmax": [round(float(v), 5) for v in a.absmax],
            "transformed": bool(rs[0].get("input_transformed", False)),
        }
        if b is not None and entry["transformed"]:
            entry["absmax_fp32"] = [round(float(v), 5) for v in b.absmax]
            entry["outlier_ratio_fp32"] = b.outlier_ratio()
        out.append(entry)
    return out


def _finite(value: Any) -> Any:
    """JSON has no infinity: an exact layer's SQNR is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _finite(value.item())
    return value


def load_explain(artifact: str | Path) -> dict[str, Any] | None:
    path = Path(artifact) / EXPLAIN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "exact"
    return format(v, fmt)


def render(e: dict[str, Any], console=None, *, limit: int = 60) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=170)
    metric = e["metric"].upper() if e["metric"] == "kl" else e["metric"]
    rep = e["reproduced"]
    console.print(
        f"[bold]{e['model']}[/] — recipe {e['recipe']}; {e['samples']} held-out samples; final-output {metric} vs fp32: "
        f"artifact {_num(rep['artifact_metric'])} (manifest {_num(rep.get('manifest_metric'))}), "
        f"explain graph {_num(rep['explain_graph_metric'])}; re-played compile "
        + ("reproduces the artifact" if rep["exact"] else f"[red]differs from the artifact[/] (max |Δ| {rep['max_abs_output_diff']:.3g})")
    )
    t = Table(title=f"pass-by-pass bisect: final-output {metric} vs fp32 after each pass")
    for col in ("#", "pass", "modified", metric, "Δ"):
        t.add_column(col, justify="left" if col in ("pass", "modified") else "right")
    top = e["bisect_max"]["index"]
    for s in e["bisect"]:
        style = "bold red" if s["index"] == top and (s.get("delta") or 0) > 0 else None
        t.add_row(str(s["index"]), s["pass"], str(s["modified"]), _num(s.get("metric")) if s.get("runnable", True) else "not runnable",
                  _num(s.get("delta"), "+.3g"), style=style)
    console.print(t)
    console.print(f"the pass that moved the output most: [bold]{e['bisect_max']['pass']}[/] ({metric} {e['bisect_max']['delta']:+.3g}); "
                  f"with every linear promoted to fp32 the {metric} would be {_num(e['floor_metric'])} (what other quantized parts leave)")

    lt = Table(title="per-layer error (depth order); contribution = share of the final " + metric + " removed by promoting the layer to fp32")
    for col in ("layer", "precision", "input outlier ratio", "local SQNR dB", "cumulative SQNR dB", "contribution", "→fp32 " + metric, "→weight-only " + metric, "rank"):
        lt.add_column(col, overflow="fold", justify="left" if col in ("layer", "precision") else "right")
    rows = sorted(e["layers"], key=lambda r: r["order"])
    for r in rows[:limit]:
        p = r.get("promote", {})
        lt.add_row(
            r["name"], r["precision"], _num(r["input_outlier_ratio"], ".2f"), _num(r["sqnr_local_db"], ".1f"), _num(r["sqnr_cumulative_db"], ".1f"),
            f"{r['contribution']:.1%}" if r.get("contribution") is not None else "-",
            _num(p.get("fp32", {}).get("metric")), _num(p.get(r.get("weight_only") or "", {}).get("metric")), str(r.get("rank", "-")),
        )
    console.print(lt)
    d = e["depth"]
    if d.get("largest_drop"):
        b = d["largest_drop"]
        console.print(f"error grows most at [bold]{b['block']}[/] (cumulative SQNR drops {b['drop_db']:.1f} dB to {b['sqnr_cumulative_db']:.1f} dB); "
                      f"most local error: [bold]{d['most_local_error']}[/]")
    if e["suggestions"]:
        st = Table(title=f"suggested promotions (KL reduction per added byte); all together: {metric} {_num(e['base_metric'] if 'base_metric' in e else rep['explain_graph_metric'])} → {_num(e['metric_with_suggestions'])}")
        for col in ("override", metric + " alone", "gain", "extra bytes"):
            st.add_column(col, overflow="fold")
        for s in e["suggestions"]:
            st.add_row(f"--override \"{s['override']}\"", _num(s["metric_after"]), _num(s["gain"]), f"{s['extra_bytes']:,}")
        console.print(st)
        console.print("apply: lowbit compile ... " + " ".join(f"--override \"{o}\"" for o in e["suggested_overrides"]))
    else:
        console.print("no promotion measurably lowers the error")
