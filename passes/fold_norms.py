"""Fold norm scales and per-channel scales into the linears that read them.

A normalisation ends in an elementwise affine map, ``n = normalize(x) * γ + β``
(RMSNorm has no β). Where every reader of ``n`` is a linear ``y = n W + b``
(our layout: ``W`` is ``[K, N]``), the affine map moves into the weights::

    y = (normalize(x) ⊙ γ + β) W + b = normalize(x) (diag(γ) W) + (β W + b)

so ``W' [k, :] = γ[k] · W[k, :]`` and ``b' = β W + b``, and the norm is left
with ``γ = 1, β = 0``: the written-out RMSNorm loses its ``Mul(γ)`` node, the
fused ops (``LayerNormalization``, ``SimplifiedLayerNormalization``,
``RMSNormalization``) get a ones/zeros scale and bias. The same rule folds any
``Mul`` by a constant per-channel vector (or scalar) whose output only linears
read. The fp32 function is unchanged up to float rounding.

This is the first step of QuaRot (Ashkboos et al., 2024, arXiv:2404.00456,
"fuse the RMSNorm scale into the next linear") and of SmoothQuant's scale
migration in reverse: with γ gone, the norm output is a plain function of the
residual stream, which a rotation can commute with (``passes/rotate.py``).

A norm is skipped, with the reason recorded, when any reader of its output is
not a linear (BERT's post-norm LayerNorm also feeds the next residual Add) or
its γ/β does not broadcast over the last axis only. A weight initializer that
some other node also reads (a tied embedding / LM head, a weight reused by two
linears) is copied before it is scaled, so the other reader keeps its values.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.irutil import add_initializer, replace_value
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass, carry_debug_id
from lowbit.compiler.core.results import PassRecord, internal
from lowbit.passes.recognize import Norm, constant_weight, find_norms, layer_name

_FUSED_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


@dataclasses.dataclass
class FoldReport(PassRecord):
    """What one run of the fold logic did (``fold-norms``'s record: folded and skipped, with the reasons)."""

    norms_folded: list[str] = dataclasses.field(default_factory=list)
    scales_folded: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    #: names of values whose contents changed (their calibration stats are stale)
    changed_values: list[str] = internal(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.norms_folded or self.scales_folded)


def is_linear(node: ir.Node) -> bool:
    """A MatMul whose second input is a constant float 2-D weight (``y = x @ W``)."""
    return (
        node.op_type == "MatMul"
        and node.domain == ""
        and constant_weight(node.inputs[1]) is None
        and (node.inputs[0] is None or node.inputs[0].const_value is None)
    )


def linear_readers(value: ir.Value) -> tuple[list[ir.Node], str | None]:
    """The linears reading ``value`` as their ``x``, or why some reader is not one."""
    if value.is_graph_output():
        return [], f"{value.name} is a graph output"
    readers = []
    for node, index in value.uses():
        if index != 0 or not is_linear(node):
            return readers, f"also read by {node.op_type} ({node.name})"
        if node not in readers:
            readers.append(node)
    if not readers:
        return [], f"{value.name} has no readers"
    return readers, None


def set_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node.inputs[index]`` the new constant ``array``.

    The initializer is overwritten only when ``node`` is its sole reader;
    otherwise ``node`` gets a private copy, so a tied weight (embedding and LM
    head) or a weight shared by two linears stays right for its other readers.
    """
    value = node.inputs[index]
    array = np.ascontiguousarray(array.astype(value.const_value.dtype.numpy(), copy=False))
    shared = len(value.uses()) > 1 or value.is_graph_output() or value.is_graph_input()
    if shared:
        node.replace_input_with(index, add_initializer(graph, f"{value.name}.{node.name or 'private'}", array))
    else:
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)


def scale_rows(node: ir.Node, scale: np.ndarray) -> np.ndarray:
    """``diag(scale) @ W`` for a linear's weight, in the weight's dtype.

    One product per element, rounded once: the same result float64 arithmetic
    would give after rounding, at a fraction of the memory traffic.
    """
    w = node.inputs[1].const_value.numpy()
    return scale.astype(w.dtype)[:, None] * w


def channel_vector(value: ir.Value | None, k: int, default: float) -> np.ndarray | None:
    """``value`` as a length-``k`` vector over the last axis (None: it is not one)."""
    if value is None:
        return np.full(k, default)
    if value.const_value is None:
        return None
    arr = value.const_value.numpy().astype(np.float64)
    if arr.size == 1:
        return np.full(k, float(arr.reshape(())))
    if arr.size == k and arr.shape[-1] == k:
        return arr.reshape(k)
    return None


def _last_axis(node: ir.Node) -> bool:
    axis = node.attributes.get_int("axis", -1)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _add_bias(graph: ir.Graph, linear: ir.Node, extra: np.ndarray, tag) -> None:
    """``linear``'s output gains ``+ extra``: into its bias Add, or a new Add."""
    out = linear.outputs[0]
    uses = out.uses()
    if len(uses) == 1 and not out.is_graph_output():
        add, index = uses[0]
        other = add.inputs[1 - index] if add.op_type == "Add" and len(add.inputs) == 2 else None
        if other is not None and other.const_value is not None and other.const_value.shape == (extra.size,):
            bias = other.const_value.numpy().astype(np.float64)
            set_constant_input(graph, add, 1 - index, bias + extra)
            return
    dtype = linear.inputs[1].const_value.dtype.numpy()
    bias = add_initializer(graph, f"{linear.inputs[1].name}.folded_bias", extra.astype(dtype))
    add = tag(ir.node("Add", [out, bias], name=f"{linear.name}/folded_bias"), layer_name(linear))
    graph.insert_after(linear, add)
    name = out.name
    replace_value(out, add.outputs[0])
    add.replace_input_with(0, out)  # replace_value rerouted the Add's own input too
    if out.name is None:  # it was a graph output: the Add took its name
        out.name = f"{name}.unbiased"
    carry_debug_id(linear, add.outputs[0])


def fold_norm(graph: ir.Graph, norm: Norm, tag) -> str | None:
    """Fold one norm's γ/β into its readers. Returns a skip reason, "" if nothing to do, None if folded."""
    readers, reason = linear_readers(norm.output)
    if reason is not None:
        return f"norm output {reason}"
    ks = {int(node.inputs[1].const_value.shape[0]) for node in readers}
    if len(ks) != 1:
        return f"readers have different input widths {sorted(ks)}"
    (k,) = ks
    fused = norm.nodes[-1].op_type in _FUSED_NORMS
    if fused and not _last_axis(norm.nodes[-1]):
        return f"{norm.nodes[-1].op_type} normalizes over more than the last axis"
    gamma = channel_vector(norm.gamma, k, 1.0)
    beta = channel_vector(norm.beta, k, 0.0)
    for what, vec, val in (("gamma", gamma, norm.gamma), ("beta", beta, norm.beta)):
        if vec is None:
            shape = val.const_value.shape if val.const_value is not None else "a computed value"
            return f"{what} ({shape}) is not a constant vector over the last axis of width {k}"
    if fused and np.all(gamma == 1.0) and np.all(beta == 0.0):
        return ""  # already unit: nothing to fold
    if not fused and norm.gamma is None:
        return ""
    for node in readers:
        if np.any(beta != 0.0):
            _add_bias(graph, node, beta @ node.inputs[1].const_value.numpy().astype(np.float64), tag)
        set_constant_input(graph, node, 1, scale_rows(node, gamma))
    if fused:
        ln = norm.nodes[-1]
        for index, value, fill in ((1, norm.gamma, np.ones), (2, norm.beta, np.zeros)):
            if value is not None:
                set_constant_input(graph, ln, index, fill(value.const_value.shape, value.const_value.dtype.numpy()))
    else:
        gamma_mul = norm.nodes[-1]
        x = next(v for v in gamma_mul.inputs if v is not norm.gamma)
        replace_value(gamma_mul.outputs[0], x)
        graph.remove(gamma_mul, safe=True)
    return None


def fold_scales(graph: ir.Graph, skip_nodes: set[int], report: FoldReport) -> None:
    """Fold ``Mul(x, c)`` with a constant per-channel ``c`` into the linears that alone read it."""
    for node in list(graph):
        if node.op_type != "Mul" or node.domain != "" or id(node) in skip_nodes or len(node.inputs) != 2:
            continue
        consts = [v for v in node.inputs if v is not None and v.const_value is not None]
        if len(consts) != 1 or not consts[0].const_value.dtype.is_floating_point():
            continue
        c = consts[0]
        x = next(v for v in node.inputs if v is not c)
        out = node.outputs[0]
        if not any(is_linear(u) and i == 0 for u, i in out.uses()):
            continue  # not a scale in front of a linear: not ours to judge
        shape = c.const_value.shape
        name = f"scale {node.name}"
        if any(int(s) != 1 for s in list(shape)[:-1]):
            report.skipped[name] = f"scale of shape {shape} is not per-channel"
            continue
        if len(shape) > 1 and (x.shape is None or len(x.shape) < len(shape)):
            report.skipped[name] = "scale would broadcast its input to a higher rank"
            continue
        readers, reason = linear_readers(out)
        if reason is not None:
            report.skipped[name] = f"scaled output {reason}"
            continue
        k = int(readers[0].inputs[1].const_value.shape[0])
        scale = channel_vector(c, k, 1.0)
        if scale is None or any(int(r.inputs[1].const_value.shape[0]) != k for r in readers):
            report.skipped[name] = f"scale of shape {shape} does not match the linears' input width {k}"
            continue
        for r in readers:
            set_constant_input(graph, r, 1, scale_rows(r, scale))
        replace_value(out, x)
        graph.remove(node, safe=True)
        report.scales_folded.append(node.name or c.name)
        report.changed_values.append(out.name)


def fold_model(model: ir.Model, tag, *, norms: bool = True, scales: bool = True) -> FoldReport:
    """Fold every foldable norm (and, with ``scales``, per-channel Mul) in ``model``."""
    graph = model.graph
    report = FoldReport()
    found = find_norms(graph)
    norm_nodes = {id(n) for norm in found for n in norm.nodes}
    if norms:
        seen: dict[str, int] = {}
        for norm in found:
            name = norm.name
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}#{seen[name]}"
            out_name = norm.output.name
            reason = fold_norm(graph, norm, tag)
            if reason is None:
                report.norms_folded.append(name)
                report.changed_values.append(out_name)
            elif reason:
                report.skipped[name] = reason
    if scales:
        fold_scales(graph, norm_nodes, report)
    return report


@dataclasses.dataclass(frozen=True)
class FoldNormsOptions(PassOptions):
    norms: bool = option(True, "fold RMSNorm/LayerNorm scales (and LayerNorm biases).")
    scales: bool = option(True, "fold Mul-by-constant per-channel scales that only linears read.")


class FoldNormScalesPass(LowbitPass):
    """Fold norm γ/β and per-channel Mul scales into the linears that read them.

    In place; keeps the fp32 function. Run it after ``canonicalize`` (weights
    must be ``MatMul`` initializers) and before ``calibrate``: statistics of
    tensors it changed are dropped from the compile context. Skipped norms and
    scales, with the reason, are in its record (:class:`FoldReport`). Options:
    :class:`FoldNormsOptions`.
    """

    name = "fold-norms"
    Options = FoldNormsOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = fold_model(model, self.tag, norms=self.norms, scales=self.scales)
        for name in report.changed_values:
            self.context.stats.pop(name, None)
        return self.result(model, report.modified, report)
