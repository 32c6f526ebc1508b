"""Smooth activations: migrate per-channel outliers from activations into weights.

SmoothQuant (Xiao et al., arXiv 2211.10438). A few input channels of a
linear carry activations hundreds of times larger than the rest; a per-token
int8 scale then spends its levels on them and rounds the others away. For a
group of linears reading one tensor ``X [.., K]`` (Q/K/V, gate/up, or one
linear alone) and a per-channel scale ``s [K]``::

    X W = (X / s) (s W)        s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|W_j|`` over row ``j`` of every weight of the group, our weights being
``[K, N]``; ``s`` clipped to [1e-5, 1e5]; ``s_j = 1`` where either maximum is
0). ``W_j`` rows are multiplied by ``s_j``, and the division of ``X`` is folded
into whatever produces ``X`` so that no operator is added and the fp32
function is unchanged:

* a norm (RMSNorm written out, RMSNormalization / SimplifiedLayerNormalization,
  LayerNormalization): ``gamma / s`` (and ``beta / s``);
* a linear whose output reaches ``X`` through ops that carry a per-channel
  scale unchanged: a bias ``Add``, Reshape / Transpose / Unsqueeze / Squeeze /
  Expand, ``MatMul`` by an activation (the attention-weighted sum of V), and
  ``Mul`` (``silu(gate) * up`` is linear in ``up``). The path is traced
  structurally: for every channel of ``X`` the pass follows its coordinates
  through each op back to one output column of the linear, whose weight
  columns (and bias) are divided by ``s``. Channels of ``X`` that share a
  column (grouped-query attention repeats a KV head over several query heads
  with Expand + Reshape) get one common scale. A tensor on the path must have
  no other reader, or the other reader would see the scaled values.

Anything else (Relu, Gelu, Softmax, a residual Add, a graph input) cannot
absorb a per-channel scale: the group is skipped and the reason recorded.

``alpha`` is searched per group on calibration data: for each alpha of a grid
the smoothed weights are quantized as ``quantize-weights`` does (symmetric per
output channel) and the smoothed activations as the lowering does (uint8
asymmetric per token, or per tensor), and the alpha with the least output
error ``||X W - Q(X/s) Q(sW)||^2 / ||X W||^2`` (summed over the group, on a
bounded sample of calibration rows) wins; a group no alpha improves is left
alone. The statistics of every smoothed tensor are gathered again afterwards,
so later passes (planning, static activation ranges) see the new ranges.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.calibration import observe
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.irutil import add_initializer
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.ortsession import session_for
from lowbit.compiler.core.passbase import LowbitPass
from lowbit.compiler.core.progress import progress
from lowbit.compiler.core.results import PassRecord
from lowbit.passes.calibrate import CalibrateRecord
from lowbit.passes.quantize_weights import quantize_per_channel
from lowbit.passes.recognize import (
    Linear,
    Norm,
    find_linears,
    find_norms,
    linear_groups,
)

SCALE_RANGE = (1e-5, 1e5)
COARSE_GRID = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9, then +-0.05 around the best
_NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
# ops through which a per-channel scale of their result can be moved onto one operand
_CARRIERS = ("Identity", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Mul", "Div", "MatMul", "Add")


# --------------------------------------------------------------------------- the math


def smoothing_scales(
    x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, src: np.ndarray | None = None
) -> np.ndarray:
    """Per-channel scales ``s [K]`` of SmoothQuant for one alpha.

    ``src[j]`` names the channel of the absorbing tensor that channel ``j`` of
    X comes from (None: itself). Channels sharing a source get one scale,
    computed from the maxima over all of them.
    """
    x_absmax = np.asarray(x_absmax, np.float64)
    w_absmax = np.asarray(w_absmax, np.float64)
    if src is not None:
        m = int(src.max()) + 1
        xm, wm = np.zeros(m), np.zeros(m)
        np.maximum.at(xm, src, x_absmax)
        np.maximum.at(wm, src, w_absmax)
    else:
        xm, wm = x_absmax, w_absmax
    live = (xm > 0) & (wm > 0)  # a dead channel keeps s = 1: data unseen in calibration may use it
    s = np.ones_like(xm)
    s[live] = xm[live] ** alpha / wm[live] ** (1.0 - alpha)
    s = np.clip(s, *SCALE_RANGE)
    return s[src] if src is not None else s


def quantize_activations(x: np.ndarray, granularity: str = "per-token") -> np.ndarray:
    """Dequantized uint8 asymmetric quantization of ``x [R, K]``, as ``lower-ort`` computes it.

    Per token: each row's range ``[min(x, 0), max(x, 0)]`` in 255 steps; per
    tensor: the whole sample's range.
    """
    keep = granularity == "per-token"
    lo = np.minimum(x.min(axis=-1, keepdims=True) if keep else x.min(), 0.0)
    hi = np.maximum(x.max(axis=-1, keepdims=True) if keep else x.max(), 0.0)
    scale = np.maximum((hi - lo) * np.float32(1 / 255), np.float32(1e-30)).astype(np.float32)
    zp = np.rint(-lo / scale)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return ((q - zp) * scale).astype(np.float32)


def group_error(
    x: np.ndarray, w: np.ndarray, s: np.ndarray, *, bits: int = 8, granularity: str = "per-token",
    reference: np.ndarray | None = None,
) -> float:
    """Relative output error ``||X W - Q(X/s) Q(sW)||^2 / ||X W||^2`` of smoothing by ``s``."""
    y = x @ w if reference is None else reference
    s = s.astype(np.float32)
    w_q, w_scale = quantize_per_channel(w * s[:, None], bits)
    y_q = quantize_activations(x / s, granularity) @ (w_q.astype(np.float32) * w_scale)
    return float(((y - y_q).astype(np.float64) ** 2).sum() / max(float((y.astype(np.float64) ** 2).sum()), 1e-30))


# --------------------------------------------------------------------------- where the scale goes


@dataclasses.dataclass
class Fold:
    """How the division of one group's input by ``s`` is absorbed upstream.

    ``src[j]`` is the channel of the absorbing tensor that X's channel ``j``
    comes from; ``edits`` are constants (node, input index) whose last axis
    (of size ``channels``) is divided by the scale of that channel.
    """

    via: str
    src: np.ndarray
    channels: int
    edits: list[tuple[ir.Node, int]]


class _NoFold(Exception):
    """The scale cannot be absorbed; the message says why."""


def _dims(value: ir.Value) -> list | None:
    """The value's shape: ints, symbolic names, None for unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (getattr(d, "value", None) and ("sym", d.value)) for d in value.shape]


def _shape(value: ir.Value) -> list:
    dims = _dims(value)
    if dims is None:
        raise _NoFold(f"shape of {value.name} is unknown")
    return dims


def _label(node: ir.Node) -> str:
    return f"{node.op_type} ({node.name})" if node.name else node.op_type


def _ints(node: ir.Node, attr: str, input_index: int) -> list[int] | None:
    if attr in node.attributes:
        return list(node.attributes[attr].value)
    if len(node.inputs) > input_index and node.inputs[input_index] is not None:
        const = node.inputs[input_index].const_value
        if const is None:
            raise _NoFold(f"{_label(node)} has non-constant axes")
        return [int(a) for a in const.numpy().reshape(-1)]
    return None


def _reshape_groups(src: list, dst: list) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes of ``src`` and ``dst`` covering the same elements (size-1 axes left out).

    Row-major reshapes keep the flat index inside each run, so coordinates
    can be carried across a run. None when the shapes cannot be aligned.
    """
    si = [i for i, d in enumerate(src) if d != 1]
    di = [j for j, d in enumerate(dst) if d != 1]
    groups, i, j = [], 0, 0
    while i < len(si) and j < len(di):
        a, b = src[si[i]], dst[di[j]]
        if not (isinstance(a, int) and isinstance(b, int)):
            if a is None or a != b:
                return None
            groups.append(([si[i]], [di[j]]))
            i, j = i + 1, j + 1
            continue
        gs, gd, pa, pb = [si[i]], [di[j]], a, b
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(si) or not isinstance(src[si[i]], int):
                    return None
                pa *= src[si[i]]
                gs.append(si[i])
                i += 1
            else:
                if j >= len(di) or not isinstance(dst[di[j]], int):
                    return None
                pb *= dst[di[j]]
                gd.append(di[j])
                j += 1
        groups.append((gs, gd))
    return groups if i == len(si) and j == len(di) else None


def _broadcast_to_operand(coords: dict[int, np.ndarray], out: list, operand: list) -> dict[int, np.ndarray]:
    """Coordinates in an operand broadcast to ``out``: a channel axis it broadcasts is shared."""
    shift = len(out) - len(operand)
    new = {}
    for axis, c in coords.items():
        a = axis - shift
        if a < 0 or operand[a] == 1:
            continue  # one element serves every channel along this axis: they share its scale
        if operand[a] != out[axis]:
            raise _NoFold(f"cannot match axis {axis} of sizes {out[axis]} and {operand[a]}")
        new[a] = c
    return new


class _Tracer:
    """Follows X's channels back to the output columns of one linear."""

    def __init__(self, linears: dict[int, Linear]) -> None:
        self.linears = linears  # id(MatMul node) -> Linear

    def trace(self, x: ir.Value, channels: int) -> Fold:
        # axis -1 until a step needs the rank: an unsupported producer is then reported as such
        return self._step(x, {-1: np.arange(channels)}, [], first=True)

    def _step(self, value: ir.Value, coords: dict[int, np.ndarray], path: list[str], *, first: bool = False) -> Fold:
        if not first:
            readers = len(value.uses())
            if value.is_graph_output() or readers != 1:
                why = "is a graph output" if value.is_graph_output() else f"has {readers} readers"
                raise _NoFold(f"{value.name} {why}: scaling it would change them")
        node = value.producer()
        if node is None:
            raise _NoFold(f"{value.name} is a graph input")
        path = [*path, node.op_type]
        lin = self.linears.get(id(node))
        if lin is not None:
            return self._source(lin, value, coords, [], path)
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op not in _CARRIERS:
            raise _NoFold(f"input produced by {' <- '.join(path[:-1] + [_label(node)])}: cannot absorb a per-channel scale")
        dims = _shape(value)
        coords = {a % len(dims): c for a, c in coords.items()}
        if op == "Identity":
            return self._step(node.inputs[0], coords, path)
        if op == "Transpose":
            perm = _ints(node, "perm", 99) or list(reversed(range(len(dims))))
            return self._step(node.inputs[0], {perm[a]: c for a, c in coords.items()}, path)
        if op == "Reshape":
            return self._step(node.inputs[0], self._reshape(node, coords, dims), path)
        if op == "Unsqueeze":
            axes = {a % len(dims) for a in (_ints(node, "axes", 1) or [])}
            kept = [a for a in range(len(dims)) if a not in axes]
            return self._step(node.inputs[0], {kept.index(a): c for a, c in coords.items() if a not in axes}, path)
        if op == "Squeeze":
            src = _shape(node.inputs[0])
            axes = _ints(node, "axes", 1)
            axes = {a % len(src) for a in axes} if axes is not None else {i for i, d in enumerate(src) if d == 1}
            kept = [a for a in range(len(src)) if a not in axes]
            return self._step(node.inputs[0], {kept[a]: c for a, c in coords.items()}, path)
        if op == "Expand":
            return self._step(node.inputs[0], _broadcast_to_operand(coords, dims, _shape(node.inputs[0])), path)
        if op in ("Mul", "Div", "MatMul"):
            return self._linear_in_one_operand(node, op, coords, dims, path)
        if op == "Add":
            # only a bias right after the linear: adding a constant does not commute with scaling otherwise
            bias = [i for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None]
            other = [v for v in node.inputs if v is not None and v.const_value is None]
            if len(bias) == 1 and len(other) == 1 and other[0].producer() is not None:
                lin = self.linears.get(id(other[0].producer()))
                if lin is not None:
                    if len(other[0].uses()) != 1 or other[0].is_graph_output():
                        raise _NoFold(f"output of {lin.name} has other readers than its bias Add")
                    return self._source(lin, other[0], coords, [(node, bias[0])], [*path, "MatMul"])
        raise _NoFold(f"input produced by {' <- '.join(path[:-1] + [_label(node)])}: cannot absorb a per-channel scale")

    def _reshape(self, node: ir.Node, coords: dict[int, np.ndarray], dims: list) -> dict[int, np.ndarray]:
        src = _shape(node.inputs[0])
        groups = _reshape_groups(src, dims)
        if groups is None:
            raise _NoFold(f"{_label(node)}: cannot align shapes {src} -> {dims}")
        new = {}
        for s_axes, d_axes in groups:
            inside = [a for a in d_axes if a in coords]
            if not inside:
                continue
            if len(inside) != len(d_axes):
                raise _NoFold(f"{_label(node)} merges channel and token axes")
            flat = np.ravel_multi_index([coords[a] for a in d_axes], [dims[a] for a in d_axes])
            for a, c in zip(s_axes, np.unravel_index(flat, [src[a] for a in s_axes])):
                new[a] = c
        return new

    def _linear_in_one_operand(self, node, op, coords, dims, path) -> Fold:
        """Mul/Div (elementwise) and MatMul are linear in each operand: follow one that carries the channels."""
        reasons = []
        candidates = [0] if op == "Div" else ([1, 0] if op == "MatMul" else [0, 1])
        for index in candidates:
            value = node.inputs[index]
            if value is None or value.const_value is not None:
                continue
            try:
                operand = _shape(value)
                if op == "MatMul":
                    new = self._matmul_operand(index, coords, dims, operand)
                else:
                    new = _broadcast_to_operand(coords, dims, operand)
                return self._step(value, new, path)
            except _NoFold as e:
                reasons.append(str(e))
        if not reasons:
            raise _NoFold(f"{_label(node)} has no activation operand to follow")
        raise _NoFold(reasons[-1] if len(reasons) == 1 else "; ".join(dict.fromkeys(reasons)))

    @staticmethod
    def _matmul_operand(index: int, coords, out: list, operand: list) -> dict[int, np.ndarray]:
        if len(out) < 2 or len(operand) < 2:
            raise _NoFold("MatMul with a 1-D operand")
        r = len(out)
        own = r - 1 if index == 1 else r - 2  # the output axis that comes from this operand's matrix
        foreign = r - 2 if index == 1 else r - 1
        if foreign in coords:
            raise _NoFold("channels of X come from the other MatMul operand")
        batch = {a: c for a, c in coords.items() if a != own}
        new = _broadcast_to_operand(batch, out[:-2], operand[:-2])
        if own in coords:
            new[len(operand) - 1 if index == 1 else len(operand) - 2] = coords[own]
        return new

    def _source(self, lin: Linear, value: ir.Value, coords, edits, path) -> Fold:
        rank = len(_shape(value))
        coords = {a % rank: c for a, c in coords.items()}
        if set(coords) != {rank - 1}:
            raise _NoFold(f"channels of X do not map to the output columns of {lin.name} through {' <- '.join(path)}")
        via = f"{lin.name} output columns" + (f" through {' <- '.join(path[:-1])}" if len(path) > 1 else "")
        return Fold(via, coords[rank - 1].astype(np.int64), lin.shape[1], [(lin.node, 1), *edits])


def _norm_fold(norm: Norm, channels: int) -> Fold:
    if norm.gamma is None or norm.gamma.const_value is None:
        raise _NoFold(f"norm {norm.name} has no constant gamma to absorb the scale")
    node = next(n for n in norm.nodes if norm.gamma in n.inputs)
    edits = [(node, list(node.inputs).index(norm.gamma))]
    if node.op_type in _NORM_OPS:
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        rank = len(_shape(node.inputs[0]))
        if axis % rank != rank - 1:
            raise _NoFold(f"norm {norm.name} normalizes over axes {axis}.., not the channel axis alone")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if node.inputs[2].const_value is None:
                raise _NoFold(f"norm {norm.name} has a non-constant beta")
            edits.append((node, 2))
    return Fold(f"{norm.kind} {norm.name}", np.arange(channels), channels, edits)


def _check_edit(node: ir.Node, index: int, channels: int) -> None:
    const = node.inputs[index].const_value
    last = const.shape[-1] if len(const.shape) else 1
    if last not in (1, channels) or not const.dtype.is_floating_point():
        raise _NoFold(f"{node.inputs[index].name} (shape {list(const.shape)}) is not per channel")


def _set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` a new constant at ``index``; a constant other nodes also read is copied, not changed."""
    value = node.inputs[index]
    if len(value.uses()) == 1 and value.is_initializer():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
    else:
        node.replace_input_with(index, add_initializer(graph, f"{value.name}.smoothed", array))


def _weight(lin: Linear) -> np.ndarray:
    """The linear's weight as it is now (an earlier group may have given the node a new initializer)."""
    return lin.node.inputs[1].const_value.numpy()


def _divide_last_axis(graph: ir.Graph, node: ir.Node, index: int, s: np.ndarray) -> None:
    arr = node.inputs[index].const_value.numpy()
    dtype = arr.dtype
    if arr.ndim == 0:  # one value shared by every channel: give each its own
        arr = np.full(len(s), arr)
    elif arr.shape[-1] == 1:
        arr = np.repeat(arr, len(s), axis=-1)
    _set_const(graph, node, index, (arr.astype(np.float64) / s).astype(dtype))


# --------------------------------------------------------------------------- the pass


@dataclasses.dataclass
class _Group:
    linears: list[Linear]
    fold: Fold | None = None
    reason: str | None = None
    rescale: list[ir.Node] = dataclasses.field(default_factory=list)  # other readers of X (other_uses="rescale")

    @property
    def key(self) -> str:
        return "+".join(lin.name for lin in self.linears)

    @property
    def x(self) -> ir.Value:
        return self.linears[0].x


@dataclasses.dataclass(frozen=True)
class SmoothOptions(PassOptions):
    alpha: float | None = option(None, "migration strength used for every group; None searches alpha_grid per group.")
    alpha_grid: list[float] | None = option(None, "alphas tried by the search (each in [0, 1]); None: 0.0, 0.1, .., "
                                                  "0.9, then the best +-0.05.")
    max_rows: int = option(512, "calibration rows (tokens) per group the search quantizes, spread over the batches.")
    max_columns: int = option(1024, "output columns per group the search evaluates (a fixed random subset of wider "
                                    "groups; columns quantize independently).")
    bits: int = option(8, "weight bits the search simulates (symmetric, per output channel).")
    act_granularity: str = option("per-token", 'activation quantization the search simulates: "per-token" (dynamic) '
                                               'or "per-tensor" (static).')
    other_uses: str = option("skip", "when X is also read by something other than the group's linears: \"skip\" the "
                                     'group, or "rescale" (those readers get Mul(X / s, s)).')
    min_gain: float = option(0.0, "with the search, smooth a group only when its best alpha lowers the simulated "
                                  "output error by at least this fraction (0: any decrease).")

    def __post_init__(self) -> None:
        self.require(self.alpha is None or 0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        grid = list(COARSE_GRID if self.alpha_grid is None else self.alpha_grid)
        self.require(bool(grid) and all(0.0 <= a <= 1.0 for a in grid), "alpha_grid",
                     "must be a non-empty list of values in [0, 1]")
        self.require(self.act_granularity in ("per-token", "per-tensor"), "act_granularity",
                     "must be 'per-token' or 'per-tensor'")
        self.require(self.other_uses in ("skip", "rescale"), "other_uses", "must be 'skip' or 'rescale'")
        self.require(2 <= self.bits <= 8, "bits", "must be in 2..8")
        self.require(0.0 <= self.min_gain < 1.0, "min_gain", "must be in [0, 1)")
        self.require(self.max_rows >= 1, "max_rows", "must be positive")
        self.require(self.max_columns >= 1, "max_columns", "must be positive")
        self.normalize("alpha_grid", None if self.alpha_grid is None else grid)


@dataclasses.dataclass
class SmoothRecord(PassRecord):
    """Per group (its linears' names joined by "+"): the absorbing producer, the chosen alpha and the
    simulated output error before and after, or why it was skipped."""

    smoothed: int
    skipped: int
    groups: dict[str, dict]


class SmoothActivationsPass(LowbitPass):
    """SmoothQuant: divide linear inputs by per-channel scales folded upstream, multiply weight rows.

    In place; keeps the fp32 function (to float rounding). Requires
    calibration statistics of the linear inputs (a ``calibrate`` pass before
    it, after any ``rotate``) and inferred shapes (``canonicalize``). Per group
    it records (:class:`SmoothRecord`) the absorbing producer, the chosen alpha
    and the simulated output error before and after, or why it was skipped;
    the statistics of every smoothed input are gathered again.

    Example recipe entry::

        [[passes]]
        pass = "smooth"
        max_rows = 512

    Options: :class:`SmoothOptions`.
    """

    name = "smooth"
    Options = SmoothOptions

    def requires(self, model: ir.Model) -> None:
        if not find_linears(model.graph)[0]:
            return  # nothing to smooth (the planner names that problem)
        if not self.context.stats:
            raise InputError(self.context.missing_stats("smooth"))
        if not self.context.calibration_batches:
            raise InputError("smooth needs calibration data to search alpha")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        linears, _ = find_linears(graph)
        norms = {id(n.output): n for n in find_norms(graph)}
        tracer = _Tracer({id(lin.node): lin for lin in linears})
        groups = [self._analyse(graph, g, norms, tracer) for g in linear_groups(linears)]
        ready = [g for g in groups if g.fold is not None]

        calibrated = self.context.results.latest(CalibrateRecord)  # the batches the statistics describe
        n_cal = (calibrated.batches if calibrated else 0) or len(self.context.calibration_batches)
        batches = self.context.calibration_batches[:n_cal]
        rows = _sample_rows(model, [g.x.name for g in ready], batches, self.max_rows, show_progress=self.context.progress)

        records: dict[str, dict] = {}
        smoothed: list[_Group] = []
        for g in progress(groups, desc="smooth: alpha search", unit="layer groups", enabled=self.context.progress):
            if g.fold is None:
                records[g.key] = {"skipped": g.reason}
                continue
            record, s = self._search(g, rows[g.x.name])
            records[g.key] = record
            if s is not None:
                self._apply(graph, g, s)
                smoothed.append(g)

        if smoothed:  # X / s has new ranges: the planner and static activations must see them
            names = [g.x.name for g in smoothed]
            self.context.stats.update(observe(model, names, batches, show_progress=self.context.progress))
        return self.result(model, bool(smoothed), SmoothRecord(len(smoothed), len(groups) - len(smoothed), records))

    def _analyse(self, graph: ir.Graph, linears: list[Linear], norms: dict[int, Norm], tracer: _Tracer) -> _Group:
        g = _Group(linears)
        x = g.x
        k = linears[0].shape[0]
        stats = self.context.stats.get(x.name)
        if stats is None or stats.absmax is None or len(stats.absmax) != k:
            g.reason = f"no calibration statistics for {x.name}"
            return g
        others = [u for u, _ in x.uses() if all(u is not lin.node for lin in linears)]
        if x.is_graph_output():
            g.reason = f"{x.name} is a graph output"
            return g
        if others and self.other_uses == "skip":
            g.reason = f"{x.name} is also read by {_label(others[0])}, which would see X / s (other_uses=rescale would restore it there)"
            return g
        g.rescale = others
        try:
            norm = norms.get(id(x))
            g.fold = _norm_fold(norm, k) if norm is not None else tracer.trace(x, k)
            for node, index in g.fold.edits:
                _check_edit(node, index, g.fold.channels)
        except _NoFold as e:
            g.fold, g.reason = None, str(e)
        return g

    def _search(self, g: _Group, x: np.ndarray) -> tuple[dict, np.ndarray | None]:
        """Pick alpha for one group; (record for the notes, scales or None to leave it alone)."""
        w = np.concatenate([_weight(lin).astype(np.float32) for lin in g.linears], axis=1)
        x_absmax = self.context.stats[g.x.name].absmax
        w_absmax = np.abs(w).max(axis=1)  # over every column: s is the one applied to the whole group
        src = g.fold.src
        if w.shape[1] > self.max_columns:  # per-column weight scales: a column subset estimates the sum
            w = w[:, np.sort(np.random.default_rng(0).choice(w.shape[1], self.max_columns, replace=False))]
        opts = {"bits": self.bits, "granularity": self.act_granularity, "reference": x @ w}
        before = group_error(x, w, np.ones(w.shape[0]), **opts)
        tried: dict[float, float] = {}

        def trial(alphas) -> float:
            for alpha in alphas:
                if float(alpha) not in tried:
                    tried[float(alpha)] = group_error(x, w, smoothing_scales(x_absmax, w_absmax, alpha, src), **opts)
            return min(tried, key=tried.get)

        best = trial([self.alpha] if self.alpha is not None else self.alpha_grid or COARSE_GRID)
        if self.alpha is None and self.alpha_grid is None:
            best = trial([a for a in (round(best - 0.05, 2), round(best + 0.05, 2)) if 0.0 <= a <= 1.0])
        record = {
            "via": g.fold.via,
            "input": g.x.name,
            "alpha": best,
            "error_before": before,
            "error_after": tried[best],
            "rows": len(x),
            "columns": w.shape[1],
            "outlier_ratio": round(float(self.context.stats[g.x.name].outlier_ratio()), 2),
        }
        if g.rescale:
            record["rescaled_readers"] = [_label(n) for n in g.rescale]
        if self.alpha is None and tried[best] >= before * (1.0 - self.min_gain):
            why = "lowers the simulated error" if not self.min_gain else f"lowers the simulated error by {self.min_gain:.0%}"
            record = {"skipped": f"no alpha {why} ({tried[best]:.3g} at alpha={best} vs {before:.3g} unsmoothed)",
                      **{k: v for k, v in record.items() if k != "alpha"}}
            return record, None
        s = smoothing_scales(x_absmax, w_absmax, best, src)
        if np.all(s == 1.0):
            return {"skipped": f"alpha={best} gives s = 1 on every channel", **record}, None
        record["scale"] = {"min": float(s.min()), "max": float(s.max())}
        return record, s

    def _apply(self, graph: ir.Graph, g: _Group, s: np.ndarray) -> None:
        fold = g.fold
        s_src = np.ones(fold.channels)
        s_src[fold.src] = s  # channels sharing a source have equal s (smoothing_scales ties them)
        for node, index in fold.edits:
            _divide_last_axis(graph, node, index, s_src)
        for lin in g.linears:
            w = _weight(lin)
            _set_const(graph, lin.node, 1, (w.astype(np.float64) * s[:, None]).astype(w.dtype))
        if g.rescale:  # other readers must still see X: give them (X / s) * s
            s_v = add_initializer(graph, f"{g.x.name}.smooth_scale", s.astype(np.float32))
            mul = self.tag(ir.node("Mul", [g.x, s_v], name=f"{g.x.name}/unsmooth"), g.linears[0].name)
            mul.outputs[0].name = f"{g.x.name}.unsmoothed"
            mul.outputs[0].shape = g.x.shape.copy() if g.x.shape is not None else None
            mul.outputs[0].type = g.x.type
            graph.insert_after(g.x.producer(), mul)
            for reader in g.rescale:
                for i, v in enumerate(reader.inputs):
                    if v is g.x:
                        reader.replace_input_with(i, mul.outputs[0])


def _sample_rows(
    model: ir.Model, names: Sequence[str], batches: Sequence[dict[str, np.ndarray]], max_rows: int, *,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """Up to ``max_rows`` rows of each named tensor, drawn evenly from every batch (bounded memory)."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    session = session_for(model, names)
    inputs = {i.name for i in session.get_inputs()}
    per_batch = max(1, math.ceil(max_rows / max(len(batches), 1)))
    rng = np.random.default_rng(0)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in progress(batches, desc="smooth: sampling inputs", unit="windows", enabled=show_progress):
        outs = session.run(names, {k: v for k, v in feed.items() if k in inputs})
        for name, arr in zip(names, outs):
            flat = arr.reshape(-1, arr.shape[-1])
            pick = np.sort(rng.choice(len(flat), min(per_batch, len(flat)), replace=False))
            parts[name].append(flat[pick].astype(np.float32))
    return {n: np.concatenate(p)[:max_rows] for n, p in parts.items()}
