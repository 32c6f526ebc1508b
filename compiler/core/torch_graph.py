"""Run an ONNX graph in PyTorch, differentiable in its initializers.

Passes that *learn* something through the whole model (the rotation of
``passes/rotate.py`` learned on the output KL) need gradients of the model's
output with respect to its weights. ONNX Runtime gives outputs, not
gradients, so :func:`run_graph` evaluates the ``onnx_ir`` graph node by node
with torch operators: any initializer can be replaced by a tensor that
requires grad (a rotated, fake-quantized weight) and the loss backpropagates
to it.

It covers the default-domain operators the exported transformers are made of
after ``canonicalize`` (elementwise arithmetic, MatMul, Softmax, the norms'
reductions, the shape plumbing of attention and rotary embeddings, masks). An
operator outside that set raises :class:`UnsupportedOpError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lowbit.compiler.core.errors import LowbitError


class UnsupportedOpError(LowbitError):
    """The graph has an operator :func:`run_graph` cannot evaluate."""


_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT64: torch.int64,
    ir.DataType.BOOL: torch.bool,
}


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(node: ir.Node, x: list) -> list[int] | None:
    """Axes from the second input (opset >= 13) or the attribute (older opsets)."""
    return _ints(x[1]) if len(x) > 1 and x[1] is not None else _attr(node, "axes")


def _reduce_mean(node, x):
    axes = _axes(node, x)
    keep = bool(_attr(node, "keepdims", 1))
    return x[0].mean(dim=tuple(axes), keepdim=keep) if axes else x[0].mean().reshape([1] * x[0].dim() if keep else [])


def _reshape(node, x):
    shape = _ints(x[1])
    if not _attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


def _slice(node, x):
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * x[0].dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 1:
            raise UnsupportedOpError(f"Slice {node.name!r} with step {step} (only step 1 is supported)")
        dim = x[0].shape[axis]
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        index[axis] = slice(start, end)
    return x[0][tuple(index)]


def _unsqueeze(node, x):
    axes = _axes(node, x)
    rank = x[0].dim() + len(axes)
    y = x[0]
    for a in sorted(a % rank for a in axes):
        y = y.unsqueeze(a)
    return y


def _squeeze(node, x):
    axes = _axes(node, x)
    if axes is None:
        return x[0].squeeze()
    y = x[0]
    for a in sorted((a % x[0].dim() for a in axes), reverse=True):
        y = y.squeeze(a)
    return y


def _gather(node, x):
    axis = _attr(node, "axis", 0) % x[0].dim()
    flat = torch.index_select(x[0], axis, x[1].reshape(-1) % x[0].shape[axis])
    return flat.reshape(*x[0].shape[:axis], *x[1].shape, *x[0].shape[axis + 1 :])


def _gather_nd(node, x):
    if _attr(node, "batch_dims", 0):
        raise UnsupportedOpError(f"GatherND {node.name!r} with batch_dims (only 0 is supported)")
    k = x[1].shape[-1]
    index = x[1].reshape(-1, k)
    return x[0][tuple(index[:, j] for j in range(k))].reshape(*x[1].shape[:-1], *x[0].shape[k:])


def _cumsum(node, x):
    if _attr(node, "exclusive", 0) or _attr(node, "reverse", 0):
        raise UnsupportedOpError(f"CumSum {node.name!r} exclusive/reverse")
    return torch.cumsum(x[0], dim=int(x[1].reshape(-1)[0]))


def _max(node, x):
    y = x[0]
    for other in x[1:]:
        y = torch.maximum(y, other)
    return y


def _shape(node, x):
    dims = list(x[0].shape)[_attr(node, "start", 0) : _attr(node, "end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _cast(node, x):
    to = ir.DataType(_attr(node, "to"))
    if to not in _DTYPES:
        raise UnsupportedOpError(f"Cast {node.name!r} to {to.name}")
    return x[0].to(_DTYPES[to])


_OPS: dict[str, Callable[[ir.Node, list], torch.Tensor]] = {
    "Add": lambda n, x: x[0] + x[1],
    "Sub": lambda n, x: x[0] - x[1],
    "Mul": lambda n, x: x[0] * x[1],
    "Div": lambda n, x: x[0] / x[1],
    "MatMul": lambda n, x: x[0] @ x[1],
    "Pow": lambda n, x: x[0] ** x[1],
    "Sqrt": lambda n, x: torch.sqrt(x[0]),
    "Reciprocal": lambda n, x: 1.0 / x[0],
    "Neg": lambda n, x: -x[0],
    "Exp": lambda n, x: torch.exp(x[0]),
    "Tanh": lambda n, x: torch.tanh(x[0]),
    "Erf": lambda n, x: torch.erf(x[0]),
    "Relu": lambda n, x: torch.relu(x[0]),
    "Sigmoid": lambda n, x: torch.sigmoid(x[0]),
    "Cos": lambda n, x: torch.cos(x[0]),
    "Sin": lambda n, x: torch.sin(x[0]),
    "Equal": lambda n, x: x[0] == x[1],
    "Less": lambda n, x: x[0] < x[1],
    "LessOrEqual": lambda n, x: x[0] <= x[1],
    "Greater": lambda n, x: x[0] > x[1],
    "GreaterOrEqual": lambda n, x: x[0] >= x[1],
    "And": lambda n, x: x[0] & x[1],
    "Or": lambda n, x: x[0] | x[1],
    "Not": lambda n, x: ~x[0],
    "Where": lambda n, x: torch.where(x[0], x[1], x[2]),
    "Identity": lambda n, x: x[0],
    "Max": _max,
    "Cast": _cast,
    "Softmax": lambda n, x: torch.softmax(x[0], dim=_attr(n, "axis", -1)),
    "ReduceMean": _reduce_mean,
    "Reshape": _reshape,
    "Transpose": lambda n, x: x[0].permute(*(_attr(n, "perm") or range(x[0].dim() - 1, -1, -1))),
    "Slice": _slice,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda n, x: torch.cat(x, dim=_attr(n, "axis")),
    "Expand": lambda n, x: x[0].expand(torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1])))),
    "Shape": _shape,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Range": lambda n, x: torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype),
    "CumSum": _cumsum,
}


def check_supported(graph: ir.Graph) -> None:
    """Raise :class:`UnsupportedOpError` naming the first node :func:`run_graph` cannot evaluate."""
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            raise UnsupportedOpError(
                f"node {node.name!r}: operator {node.domain or 'ai.onnx'}::{node.op_type} is not supported "
                "by lowbit's torch evaluator (lowbit.compiler.core.torch_graph)"
            )


def graph_params(graph: ir.Graph) -> dict[str, torch.Tensor]:
    """Every initializer of ``graph`` as a torch tensor (copies)."""
    return {name: torch.from_numpy(np.array(v.const_value.numpy())) for name, v in graph.initializers.items()}


def run_graph(
    graph: ir.Graph,
    feeds: Mapping[str, np.ndarray | torch.Tensor],
    params: Mapping[str, torch.Tensor],
) -> list[torch.Tensor]:
    """The graph's outputs for ``feeds``, with ``params`` as initializers."""
    env: dict[str, torch.Tensor] = dict(params)
    for name, value in feeds.items():
        env[name] = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    for node in graph:
        fn = _OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None:
            check_supported(graph)
        args = [env[v.name] if v is not None and v.name else None for v in node.inputs]
        env[node.outputs[0].name] = fn(node, args)
    return [env[v.name] for v in graph.outputs]
