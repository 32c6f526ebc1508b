"""Recognise the structures later passes act on.

* **Linears**: ``MatMul(x, W)`` whose ``W`` is a constant 2-D initializer
  (``Gemm`` is rewritten to that form by canonicalize). The layer is named
  after the module that produced it (the exporter's ``name_scopes``
  metadata), else after the weight.
* **Norms**: ``LayerNormalization``, ``SimplifiedLayerNormalization``,
  ``RMSNormalization``, and RMSNorm written out as
  ``x * 1/sqrt(mean(x^2) + eps) * gamma`` (Pow/Mul, ReduceMean, Add, Sqrt,
  Div/Reciprocal, Mul).
* **Groups**: linears that read the same tensor (Q/K/V, gate/up).

``RecognizeStructuresPass`` tags each linear and norm node with its layer name
(``lowbit.layer``) and role (``lowbit.role``) so dumps and diffs show them; it
modifies metadata only.
"""

from __future__ import annotations

import ast
import dataclasses
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.passbase import (
    LAYER_KEY,
    ONLINE_HADAMARD,
    ROLE_KEY,
    LowbitPass,
)
from lowbit.compiler.core.results import PassRecord


@dataclasses.dataclass
class Linear:
    """A MatMul with a constant weight ``[K, N]``: ``y = x @ W``."""

    node: ir.Node
    name: str
    x: ir.Value
    weight: ir.Value

    @property
    def weight_array(self) -> np.ndarray:
        return self.weight.const_value.numpy()

    @property
    def shape(self) -> tuple[int, int]:
        k, n = self.weight.const_value.shape
        return int(k), int(n)


@dataclasses.dataclass
class Norm:
    """A normalisation whose output is ``normalize(x) * gamma (+ beta)``."""

    kind: str  # "layernorm" | "rmsnorm"
    name: str
    output: ir.Value
    gamma: ir.Value | None
    beta: ir.Value | None
    nodes: list[ir.Node]


def layer_name(node: ir.Node, fallback: str | None = None) -> str:
    """The module path that produced ``node`` (e.g. ``model.layers.0.mlp.up_proj``)."""
    for key in (LAYER_KEY, "lowbit.module"):  # set by lowbit's passes / by the frontend
        if key in node.metadata_props:
            return node.metadata_props[key]
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = [p for p in ast.literal_eval(scopes) if p]
        except (ValueError, SyntaxError):
            parts = []
        if len(parts) >= 2:
            return parts[-2]
    return fallback or node.name or "?"


def constant_weight(value: ir.Value | None) -> str | None:
    """None if ``value`` is a usable linear weight, else the reason it is not."""
    if value is None:
        return "no weight input"
    if value.const_value is None:
        producer = value.producer()
        what = f"computed by {producer.op_type}" if producer is not None else "a graph input"
        return f"weight is not a constant initializer ({what})"
    if len(value.const_value.shape) != 2:
        return f"weight has rank {len(value.const_value.shape)}, not 2"
    if not value.const_value.dtype.is_floating_point():
        return f"weight dtype is {value.const_value.dtype.name}, not float"
    return None


def find_linears(graph: ir.Graph) -> tuple[list[Linear], dict[str, str]]:
    """All linears of ``graph``, and the MatMuls rejected with their reasons."""
    linears, rejected = [], {}
    seen: dict[str, int] = defaultdict(int)
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        x, w = node.inputs[0], node.inputs[1]
        name = layer_name(node, node.name or (w.name or "matmul").removesuffix(".weight"))
        if node.metadata_props.get(ROLE_KEY) == ONLINE_HADAMARD:
            rejected[node.name] = "online Hadamard transform of a rotation (stays in float)"
            continue
        reason = constant_weight(w)
        if reason is None and x is not None and x.const_value is not None:
            reason = "both inputs are constant"
        if reason is not None:
            rejected[name if name != "?" else node.name] = reason
            continue
        seen[name] += 1
        if seen[name] > 1:  # one module applied twice: keep names unique
            name = f"{name}#{seen[name]}"
        linears.append(Linear(node, name, x, w))
    return linears, rejected


#: ops that pass a linear's result on to a graph output unchanged but for its shape (or a bias)
_TO_OUTPUT = ("Identity", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Add")


def is_output_linear(lin: Linear) -> bool:
    """Whether ``lin``'s result is a graph output, up to reshaping and a constant bias: an LM head or
    classifier, whose error lands on the logits with nothing after it to dilute it."""
    value = lin.node.outputs[0]
    while not value.is_graph_output():
        users = [u for u, _ in value.uses()]
        if len(users) != 1 or users[0].domain not in ("", "ai.onnx") or users[0].op_type not in _TO_OUTPUT:
            return False
        node = users[0]
        if node.op_type == "Add" and not any(v is not None and v is not value and v.const_value is not None for v in node.inputs):
            return False
        value = node.outputs[0]
    return True


def linear_groups(linears: list[Linear]) -> list[list[Linear]]:
    """Linears grouped by the tensor they read, in graph order."""
    groups: dict[int, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(id(lin.x), []).append(lin)
    return list(groups.values())


def _single_consumer(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    users = [u for u, _ in value.uses()]
    if len(users) == 1 and users[0].op_type in op_types:
        return users[0]
    return None


def _const_operand(node: ir.Node, other: ir.Value) -> ir.Value | None:
    for v in node.inputs:
        if v is not other and v is not None and v.const_value is not None:
            return v
    return None


def find_norms(graph: ir.Graph) -> list[Norm]:
    """LayerNorm and RMSNorm instances (fused ops and the written-out RMSNorm)."""
    norms = []
    for node in graph:
        if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            kind = "layernorm" if node.op_type == "LayerNormalization" else "rmsnorm"
            gamma = node.inputs[1] if len(node.inputs) > 1 else None
            beta = node.inputs[2] if len(node.inputs) > 2 else None
            norms.append(Norm(kind, layer_name(node), node.outputs[0], gamma, beta, [node]))
        elif node.op_type == "ReduceMean":
            norm = _match_rmsnorm(node)
            if norm is not None:
                norms.append(norm)
    return norms


def _match_rmsnorm(mean: ir.Node) -> Norm | None:
    """Match x * 1/sqrt(mean(x*x) + eps) [* gamma] starting at the ReduceMean."""
    square = mean.inputs[0].producer() if mean.inputs[0] is not None else None
    if square is None or square.op_type not in ("Pow", "Mul"):
        return None
    x = square.inputs[0]
    if square.op_type == "Mul" and square.inputs[1] is not x:
        return None
    nodes = [square, mean]
    add = _single_consumer(mean.outputs[0], ("Add",))
    if add is None:
        return None
    nodes.append(add)
    sqrt = _single_consumer(add.outputs[0], ("Sqrt", "Rsqrt"))
    if sqrt is None:
        return None
    nodes.append(sqrt)
    inv = sqrt
    if sqrt.op_type == "Sqrt":
        inv = _single_consumer(sqrt.outputs[0], ("Reciprocal", "Div"))
        if inv is None:
            return None
        if inv.op_type == "Div" and inv.inputs[1] is not sqrt.outputs[0]:
            # x / sqrt(...) directly
            if inv.inputs[0] is x:
                nodes.append(inv)
                return _with_gamma(inv, nodes)
            return None
        nodes.append(inv)
    scale = _single_consumer(inv.outputs[0], ("Mul",))
    if scale is None or x not in scale.inputs:
        return None
    nodes.append(scale)
    return _with_gamma(scale, nodes)


def _with_gamma(last: ir.Node, nodes: list[ir.Node]) -> Norm:
    out = last.outputs[0]
    gamma_mul = _single_consumer(out, ("Mul",))
    gamma = _const_operand(gamma_mul, out) if gamma_mul is not None else None
    if gamma is not None:
        nodes.append(gamma_mul)
        out = gamma_mul.outputs[0]
    return Norm("rmsnorm", layer_name(nodes[-1]), out, gamma, None, nodes)


@dataclasses.dataclass
class Writer:
    """A linear whose output (plus an optional constant bias) is added to the stream."""

    linear: ir.Node
    bias: tuple[ir.Node, int] | None  # (bias Add, index of the bias input)


@dataclasses.dataclass
class ResidualStream:
    width: int
    values: list[ir.Value]
    embeddings: list[ir.Node]  # Gathers whose table rows enter the stream
    norms: list[Norm]
    readers: list[ir.Node]  # linears reading a norm of the stream
    writers: list[Writer]



@dataclasses.dataclass
class RecognizeRecord(PassRecord):
    """What ``recognize`` found: the manifest's ``structure``."""

    section = "structure"
    linears: int
    norms: int
    groups: list[list[str]]  # linears sharing an input (Q/K/V, gate/up), by layer name
    rejected: dict[str, str]  # MatMul -> why it is not a linear


class RecognizeStructuresPass(LowbitPass):
    """Tag linears and norms with their layer name and role (metadata only).

    In place. Records rejected MatMuls with the reason (:class:`RecognizeRecord`,
    the manifest's ``structure``) so ``lowbit inspect`` can show why a layer
    was not quantized.
    """

    name = "recognize"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        linears, rejected = find_linears(model.graph)
        for lin in linears:
            modified |= _set(lin.node, {LAYER_KEY: lin.name, ROLE_KEY: "linear"})
        norms = find_norms(model.graph)
        for norm in norms:
            for node in norm.nodes:
                modified |= _set(node, {LAYER_KEY: norm.name, ROLE_KEY: norm.kind})
        groups = [[lin.name for lin in g] for g in linear_groups(linears) if len(g) > 1]
        return self.result(model, modified, RecognizeRecord(len(linears), len(norms), groups, rejected))


def _set(node: ir.Node, props: dict[str, str]) -> bool:
    changed = any(node.metadata_props.get(k) != v for k, v in props.items())
    node.metadata_props.update(props)
    return changed
