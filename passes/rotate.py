"""Rotate the residual stream by an orthogonal matrix (QuaRot / SpinQuant).

With the norms' scales folded into the linears (``passes/fold_norms.py``),
every RMSNorm computes ``x / rms(x)``, and ``rms(x Q) = rms(x)`` for an
orthogonal ``Q``. So the whole residual stream can run rotated, ``x -> x Q``,
without changing the model's function, if every matrix that writes into the
stream or reads from it absorbs ``Q`` (our layout, ``y = x @ W`` with ``W``
``[K, N]``):

* embedding rows: ``E' = E Q`` (the Gather's table);
* readers of the normalised stream (q/k/v, gate/up, LM head): ``W' = Qᵀ W``;
* writers into the stream (o_proj, down_proj, whose outputs the residual Adds
  take): ``W' = W Q``, ``b' = b Q``.

Rotating spreads the few huge activation channels of a trained LLM over all
channels, so the per-token int8/int4 activation quantization that follows
loses much less (Ashkboos et al., "QuaRot", arXiv:2404.00456; Liu et al.,
"SpinQuant", arXiv:2405.16406, who learn ``Q``). ``Q`` starts as QuaRot's
randomized Hadamard, which SpinQuant reports as a strong random choice; with
``learn_steps`` it is then learned, to spread the weights' large entries
(OptRot's data-free objective) or against the recipe's weight quantizer on
calibration data (SpinQuant's), see ``passes/rotation_learning.py``.

``Q`` is ``D (H_p ⊗ O_m)``: ``d = p·m`` with ``p`` the largest power of two
dividing ``d``, ``H_p`` the normalised Sylvester Hadamard matrix, ``O_m`` a
random orthogonal matrix (QR of a Gaussian) for the odd part (``m = 9`` for
SmolLM2's ``d = 576``, ``m = 1`` for stories260K's ``d = 64``), and ``D`` a
random ±1 diagonal. Every row of ``Q`` is spread over all ``d`` channels, as a
Hadamard row is; the seed option fixes ``D`` and ``O_m``.

Two optional extra rotations inside a block:

* ``per_head_v``: a rotation ``H_h`` (head size) on each head of the value
  path, ``W_v' = W_v (I ⊗ H_h)``, ``W_o' = (I ⊗ H_h)ᵀ W_o``. Attention mixes
  tokens, never channels within a head, so it commutes with ``I ⊗ H_h``; with
  GQA the repeated KV heads meet the same ``H_h``.
* ``online_down_proj``: the MLP output (down_proj's input) gets an online
  transform ``x -> x H`` in the graph and ``W_down' = Hᵀ W_down``. ONNX
  Runtime has no fast Walsh-Hadamard kernel, so ``H = A ⊗ B`` with ``B`` a
  Sylvester Hadamard of size ``b`` (a power of two near ``√n``) and ``A``
  Hadamard-like of size ``a = n / b``; with ``x`` reshaped to ``V [.., a, b]``,
  ``x H`` is ``Aᵀ V B``: two small MatMuls and one Transpose (the channel
  permutation that saves a second Transpose is folded into ``W_down'``), ``a + b``
  multiply-adds per element (88 for SmolLM2's 1536 = 24·64,
  against 576 for down_proj itself), and every output channel still mixes all
  ``n`` inputs. A dense ``n x n`` transform would cost more than down_proj.
  A down_proj is a linear writing into the stream whose input an activation
  or gate product (Mul, Relu, Gelu, ...) computes, not attention's Reshape.

The residual stream is found structurally: it starts at the embedding Gather
that the first norm reads (through Adds of other embeddings, such as learned
positions), and follows Adds. Its only allowed readers are RMSNorms whose
outputs only linears read, residual Adds, and scalar Mul/Div; every value an
Add puts into it must come from a linear (optionally plus a constant bias) or
an embedding Gather. Anything else is refused, naming the node. LayerNorm is
refused: its mean subtraction does not commute with a general rotation
(QuaRot turns pre-norm LayerNorm into RMSNorm first; BERT-style post-norm has
no rotatable stream at all).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.errors import InputError, LowbitError
from lowbit.compiler.core.irutil import add_initializer
from lowbit.compiler.core.options import PassOptions, option
from lowbit.compiler.core.passbase import LowbitPass
from lowbit.compiler.core.results import PassRecord
from lowbit.passes.fold_norms import (
    fold_model,
    is_linear,
    linear_readers,
    set_constant_input,
)
from lowbit.passes.recognize import (
    ONLINE_HADAMARD,
    ROLE_KEY,
    Norm,
    ResidualStream,
    Writer,
    find_norms,
    layer_name,
)
from lowbit.passes.rotation_learning import learn_incoherent_rotation, learn_rotation

_FUSED_RMS = ("SimplifiedLayerNormalization", "RMSNormalization")
# ops that move a value-path tensor around without mixing channels of a head
_HEAD_PRESERVING = ("Reshape", "Transpose", "Unsqueeze", "Expand", "Identity")
# ops that end an MLP (activation or gate product): their consumer linear is a down_proj
_MLP_OUTPUT_OPS = (
    "Mul", "Div", "Relu", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Silu", "Swish",
    "Elu", "Selu", "LeakyRelu", "Softplus", "HardSwish", "Erf",
)  # fmt: skip


class RotationError(LowbitError):
    """The model's structure does not allow rotating its residual stream."""


# ----------------------------------------------------------------- matrices


def sylvester(n: int) -> np.ndarray:
    """The normalised Sylvester Hadamard matrix of order ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def two_adic(n: int) -> int:
    """The largest power of two dividing ``n``."""
    return n & -n


@dataclasses.dataclass
class Rotation:
    """An orthogonal ``M = diag(signs) · (I_k ⊗ F_1 ⊗ F_2 ⊗ ...)``.

    Leading identity factors (given as their size: ``I_heads ⊗ H_h`` for the
    per-head rotation) become a batch of small products, never an ``n x n``
    block-diagonal matrix. The other factors are multiplied out into one
    dense block: contracting them axis by axis needs far fewer multiply-adds
    but, with the transposes in between, measured slower than one BLAS
    product on SmolLM2's 49152 x 576 embedding. Arithmetic is float64; the
    result is rounded once, to the weight's dtype.
    """

    factors: list[np.ndarray | int]  # a square orthogonal matrix, or the size of a leading identity
    signs: np.ndarray | None = None

    def __post_init__(self) -> None:
        lead = next((i for i, f in enumerate(self.factors) if not isinstance(f, int)), len(self.factors))
        if any(isinstance(f, int) for f in self.factors[lead:]):
            raise ValueError("identity factors must come first")
        block = np.ones((1, 1))
        for f in self.factors[lead:]:
            block = np.kron(block, f)
        self.block = block
        self.n = math.prod(self.factors[:lead]) * block.shape[0]

    def dense(self) -> np.ndarray:
        return self.apply(np.eye(self.n))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x @ M`` over the last axis of ``x`` (an embedding table, a writer's weight)."""
        rows = np.asarray(x, np.float64).reshape(-1, self.n)
        if self.signs is not None:
            rows = rows * self.signs
        return (rows.reshape(-1, self.block.shape[0]) @ self.block).reshape(np.shape(x))

    def apply_t_left(self, w: np.ndarray) -> np.ndarray:
        """``Mᵀ @ w`` for ``w [n, N]`` (a reader's weight rows)."""
        w = np.asarray(w, np.float64)
        if self.signs is not None:
            w = self.signs[:, None] * w
        b = self.block.shape[0]
        return np.matmul(self.block.T, w.reshape(self.n // b, b, -1)).reshape(w.shape)


def hadamard_like(n: int, rng: np.random.Generator, *, random_signs: bool) -> Rotation:
    """``[D] (H_p ⊗ O_m)``: Hadamard on the power-of-two part, random orthogonal on the rest."""
    p = two_adic(n)
    m = n // p
    factors = [sylvester(p)] + ([random_orthogonal(m, rng)] if m > 1 else [])
    signs = rng.choice([-1.0, 1.0], size=n) if random_signs else None
    return Rotation(factors, signs)


def online_factors(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``A ⊗ B`` orthogonal ``n x n``; ``B`` Sylvester of a power-of-two size near √n."""
    b = 1 << min(two_adic(n).bit_length() - 1, math.ceil(math.log2(math.sqrt(n))))
    return hadamard_like(n // b, rng, random_signs=False).dense(), sylvester(b)


# ----------------------------------------------------------------- analysis


@dataclasses.dataclass
class ValuePath:
    """v_proj -> (reshape/transpose/repeat) -> attention MatMul -> (transpose/reshape) -> o_proj."""

    v_proj: ir.Node
    v_bias: tuple[ir.Node, int] | None
    o_proj: ir.Node
    head_dim: int


def _is_embedding(node: ir.Node) -> bool:
    if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
        return False
    table = node.inputs[0]
    return (
        table is not None
        and table.const_value is not None
        and len(table.const_value.shape) == 2
        and table.const_value.dtype.is_floating_point()
    )


def _scalar_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1


def _passes_through(node: ir.Node, index: int) -> bool:
    """Ops that commute with the rotation: Identity, multiplying/dividing the stream by a scalar."""
    if node.op_type == "Identity":
        return True
    if node.op_type == "Mul" and len(node.inputs) == 2:
        return _scalar_const(node.inputs[1 - index])
    return node.op_type == "Div" and index == 0 and _scalar_const(node.inputs[1])


def _embedding_sum(value: ir.Value) -> list[ir.Node] | None:
    """The embedding Gathers whose (summed) rows ``value`` is, e.g. token + position embeddings."""
    node = value.producer()
    if node is None:
        return None
    if _is_embedding(node):
        return [node]
    if node.op_type == "Add" and len(node.inputs) == 2:
        parts = []
        for v in node.inputs:
            found = _embedding_sum(v) if v is not None and len(v.uses()) == 1 else None
            if found is None:
                return None
            parts += found
        return parts
    return None


def _stream_start(value: ir.Value, norm: Norm) -> tuple[ir.Value, list[ir.Node]]:
    """Where the residual stream begins, going back from the first norm's input, and its embeddings."""
    gathers = _embedding_sum(value)
    if gathers is not None:
        return value, gathers
    node = value.producer()
    if node is None:
        raise RotationError(
            f"the first norm ({norm.name}) reads graph input {value.name}: the residual stream does not start"
            " at an embedding Gather, and rotating it would change the model's inputs"
        )
    for i, v in enumerate(node.inputs):
        if v is not None and v.const_value is None and _passes_through(node, i):
            return _stream_start(v, norm)
    raise RotationError(
        f"the first norm ({norm.name}) reads {value.name}, computed by {node.op_type} ({node.name}),"
        " not by an embedding Gather (or a sum of them)"
    )


def norm_input(norm: Norm) -> ir.Value:
    return norm.nodes[0].inputs[0]


def _check_norm(norm: Norm) -> None:
    """Reasons an RMSNorm on the stream would not commute with the rotation."""
    if norm.kind == "layernorm":
        raise RotationError(
            f"{norm.name} is a LayerNorm on the residual stream: its mean subtraction does not commute with"
            " a general rotation (QuaRot rewrites pre-norm LayerNorm as RMSNorm first; not implemented)"
        )
    last = norm.nodes[-1]
    rank = len(norm_input(norm).shape) if norm_input(norm).shape is not None else None
    if last.op_type in _FUSED_RMS:
        axis = last.attributes.get_int("axis", -1)
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            raise RotationError(f"{norm.name} ({last.op_type}) normalizes over axis {axis}, not only the last axis")
        scale = last.inputs[1] if len(last.inputs) > 1 else None
        if scale is not None and (scale.const_value is None or np.any(scale.const_value.numpy() != 1)):
            raise RotationError(f"{norm.name} still has a non-unit scale after folding")
        return
    if norm.gamma is not None:
        raise RotationError(f"{norm.name} still has a gamma Mul after folding")
    mean = norm.nodes[1]
    axes = mean.inputs[1] if len(mean.inputs) > 1 else None
    if axes is not None and axes.const_value is not None:
        axes = [int(a) for a in axes.const_value.numpy().reshape(-1)]
    else:
        axes = list(mean.attributes.get_ints("axes", []) or [])
    if not (axes == [-1] or (rank is not None and axes == [rank - 1])):
        raise RotationError(f"{norm.name}: the mean of squares runs over axes {axes}, not only the last axis")


def _writer(add: ir.Node, value: ir.Value) -> Writer | list[ir.Node]:
    """What ``add`` puts into the stream through ``value``: a linear writer or an embedding Gather."""
    node = value.producer()
    if node is None:
        raise RotationError(f"residual Add {add.name} adds {value.name}, a graph input or constant, to the stream")
    if len(value.uses()) != 1 or value.is_graph_output():
        others = [u.name for u, _ in value.uses() if u is not add]
        raise RotationError(
            f"{value.name}, added to the residual stream by {add.name}, is also read by "
            f"{', '.join(others) or 'the graph outputs'}"
        )
    if is_linear(node):
        return Writer(node, None)
    gathers = _embedding_sum(value)
    if gathers is not None:
        return gathers
    if node.op_type == "Add" and len(node.inputs) == 2:
        for i, v in enumerate(node.inputs):
            lin = v.producer() if v is not None else None
            bias = node.inputs[1 - i]
            if (
                lin is not None
                and is_linear(lin)
                and len(v.uses()) == 1
                and not v.is_graph_output()
                and bias is not None
                and bias.const_value is not None
                and bias.const_value.size == lin.inputs[1].const_value.shape[1]
                and bias.const_value.shape[-1] == bias.const_value.size
            ):
                return Writer(lin, (node, 1 - i))
    raise RotationError(
        f"residual Add {add.name} adds {value.name}, computed by {node.op_type} ({node.name}),"
        " which is neither a linear (with an optional constant bias) nor an embedding"
    )


def find_residual_stream(graph: ir.Graph) -> ResidualStream:
    """The residual stream of a pre-norm transformer, or a ``RotationError`` naming what breaks it."""
    norms = find_norms(graph)
    if not norms:
        raise RotationError("no RMSNorm found: cannot recognise the residual stream")
    owner = {id(n): norm for norm in norms for n in norm.nodes}
    seed, embeddings = _stream_start(norm_input(norms[0]), norms[0])
    stream_ids = {id(seed)}
    values, writers = [seed], []
    stream_norms: list[Norm] = []
    for node in graph:
        hits = [i for i, v in enumerate(node.inputs) if v is not None and id(v) in stream_ids]
        if not hits:
            continue
        value = node.inputs[hits[0]]
        norm = owner.get(id(node))
        if norm is not None:
            if norm_input(norm) is not value:
                raise RotationError(f"node {node.name} of {norm.name} reads the residual stream {value.name}")
            if all(norm is not n for n in stream_norms):
                _check_norm(norm)
                stream_norms.append(norm)
            continue
        if node.op_type == "Add" and len(node.inputs) == 2:
            if len(hits) == 1:
                w = _writer(node, node.inputs[1 - hits[0]])
                if isinstance(w, Writer):
                    writers.append(w)
                else:
                    embeddings += w
        elif not (len(hits) == 1 and _passes_through(node, hits[0])):
            raise RotationError(
                f"{node.op_type} node {node.name} reads the residual stream ({value.name});"
                " only RMSNorms, residual Adds and scalar Mul/Div may"
            )
        stream_ids.add(id(node.outputs[0]))
        values.append(node.outputs[0])
    for v in values:
        if v.is_graph_output():
            raise RotationError(f"the residual stream value {v.name} is a graph output; rotating it would change it")
    readers: list[ir.Node] = []
    for norm in stream_norms:
        found, reason = linear_readers(norm.output)
        if reason is not None:
            raise RotationError(f"{norm.name}: norm output {reason}")
        readers += [r for r in found if r not in readers]
    width = int(embeddings[0].inputs[0].const_value.shape[1])
    for g in embeddings:
        if int(g.inputs[0].const_value.shape[1]) != width:
            raise RotationError(f"embedding {g.name} has width {g.inputs[0].const_value.shape[1]}, stream {width}")
    for node, axis, what in [(r, 0, "input") for r in readers] + [(w.linear, 1, "output") for w in writers]:
        size = int(node.inputs[1].const_value.shape[axis])
        if size != width:
            raise RotationError(f"linear {layer_name(node)} has {what} width {size}, the residual stream {width}")
    return ResidualStream(width, values, embeddings, stream_norms, readers, writers)


def _reshape_last_dim(node: ir.Node) -> int | None:
    """The last entry of a Reshape's target shape, where a constant (or a constant tail of a Concat) gives it."""
    shape = node.inputs[1]
    if shape is None:
        return None
    if shape.const_value is not None:
        return int(shape.const_value.numpy().reshape(-1)[-1])
    concat = shape.producer()
    if concat is not None and concat.op_type == "Concat" and concat.inputs and concat.inputs[-1] is not None:
        tail = concat.inputs[-1]
        if tail.const_value is not None and tail.const_value.size:
            return int(tail.const_value.numpy().reshape(-1)[-1])
    return None


def _keeps_last_axis(node: ir.Node) -> bool:
    """Whether a head-preserving op leaves the last axis (the channels of a head) in place."""
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[-1] == len(perm) - 1
    if node.op_type == "Unsqueeze":
        out = node.outputs[0].shape
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        if out is None or axes is None or axes.const_value is None:
            return False
        rank = len(out)
        return all(int(a) % rank != rank - 1 for a in axes.const_value.numpy().reshape(-1))
    return True  # Reshape: checked against the head size; Expand cannot change a non-1 last axis; Identity


def _trace_value_source(value: ir.Value):
    """From an attention MatMul's right operand back to the linear producing it: (linear, bias, reshapes)."""
    reshapes = []
    while True:
        if len(value.uses()) != 1 or value.is_graph_output():
            return None  # read elsewhere too (a KV-cache output, say): rotating it would show
        node = value.producer()
        if node is None:
            return None
        if node.op_type in _HEAD_PRESERVING and node.domain == "":
            if not _keeps_last_axis(node):
                return None
            if node.op_type == "Reshape":
                reshapes.append(node)
            value = node.inputs[0]
            continue
        if is_linear(node):
            return node, None, reshapes
        if node.op_type == "Add" and len(node.inputs) == 2:
            for i, v in enumerate(node.inputs):
                bias = node.inputs[1 - i]
                lin = v.producer() if v is not None else None
                if lin is not None and is_linear(lin) and bias is not None and bias.const_value is not None:
                    if len(v.uses()) == 1 and bias.const_value.size == lin.inputs[1].const_value.shape[1]:
                        return lin, (node, 1 - i), reshapes
        return None


def _trace_value_sink(value: ir.Value):
    """From an attention MatMul's output forward to the linear reading it: (linear, reshapes)."""
    reshapes = []
    while True:
        uses = value.uses()
        if len(uses) != 1 or value.is_graph_output():
            return None
        node, index = uses[0]
        if index != 0:
            return None
        if is_linear(node):
            return node, reshapes
        if node.op_type not in ("Transpose", "Reshape", "Identity") or not _keeps_last_axis(node):
            return None
        if node.op_type == "Reshape":
            reshapes.append(node)
        value = node.outputs[0]


def find_value_paths(graph: ir.Graph, head_dim: int = 0) -> list[ValuePath]:
    """Every attention value path v_proj -> probs @ v -> o_proj, with its head size."""
    paths = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
            continue
        if any(v is None or v.const_value is not None for v in node.inputs):
            continue
        source = _trace_value_source(node.inputs[1])
        sink = _trace_value_sink(node.outputs[0]) if source is not None else None
        if sink is None:
            continue
        v_proj, v_bias, back = source
        o_proj, forward = sink
        name = layer_name(v_proj)
        dims = [_reshape_last_dim(r) for r in reversed(back)]  # nearest v_proj first
        hd = head_dim or next((d for d in dims if d is not None and d > 0), 0)
        if not hd:
            raise RotationError(f"per_head_v: cannot tell the head size of {name} from its Reshape; set head_dim")
        for r, d in zip(reversed(back), dims):
            if d != hd and not (head_dim and d is None):
                raise RotationError(f"per_head_v: Reshape {r.name} after {name} gives last axis {d}, not {hd}")
        for r in forward:
            # the merge of the heads right before o_proj may leave its width to -1 (o_proj's K);
            # an earlier Reshape must keep whole heads on the last axis
            d = _reshape_last_dim(r)
            unknown = d is None or d == -1
            if (unknown and r is not forward[-1]) or (not unknown and d % hd):
                raise RotationError(f"per_head_v: Reshape {r.name} before {layer_name(o_proj)} gives last axis {d}")
        n_v = int(v_proj.inputs[1].const_value.shape[1])
        k_o = int(o_proj.inputs[1].const_value.shape[0])
        if n_v % hd or k_o % hd:
            raise RotationError(f"per_head_v: {name} ({n_v}) or {layer_name(o_proj)} ({k_o}) is not a multiple of {hd}")
        paths.append(ValuePath(v_proj, v_bias, o_proj, hd))
    return paths


def mlp_output_linears(stream: ResidualStream) -> list[ir.Node]:
    """Writers whose input an activation or gate product computes (down_proj), not attention's reshape."""
    found = []
    for w in stream.writers:
        producer = w.linear.inputs[0].producer()
        if producer is not None and producer.op_type in _MLP_OUTPUT_OPS:
            found.append(w.linear)
    return found


# ----------------------------------------------------------------- the pass


@dataclasses.dataclass(frozen=True)
class RotateOptions(PassOptions):
    seed: int = option(0, "seed of the random signs and of the random orthogonal factors.")
    per_head_v: bool = option(False, "also rotate each attention head's values by a head-size Hadamard "
                                     "(v_proj/o_proj).")
    online_down_proj: bool = option(False, "insert an online Hadamard-like transform on down_proj's input.")
    head_dim: int = option(0, "head size for per_head_v when the graph's Reshapes do not tell it (0: read it).")
    strict: bool = option(True, "raise when the model cannot be rotated (False: skip the rotation and record why).")
    learn_steps: int = option(0, "learn the rotation for this many steps, starting from the randomized Hadamard "
                                 "(0: the randomized Hadamard as drawn).")
    learn_objective: str = option(
        "incoherence", 'what the learning lowers: "incoherence", the kurtosis of the rotated weights\' entries '
                       '(OptRot; data-free, about a minute on SmolLM2-135M), or "kl", the output KL of the model '
                       "with round-to-nearest weights on the calibration data (SpinQuant; about ten minutes). The "
                       'options below apply to "kl" only.')
    learn_lr: float = option(2e-3, "Adam's learning rate for the rotation's Cayley parameters (cosine decay to 0).")
    learn_batch: int = option(2, "calibration windows per learning step.")
    learn_bits: int = option(4, "weight bits of the fake quantizer the rotation is learned against (4 or 8).")
    learn_group_size: int = option(128, "its group size along the input features (0: per output channel); in a "
                                        "recipe it follows the plan pass's group_size unless set.")

    def __post_init__(self) -> None:
        self.require(self.learn_steps >= 0, "learn_steps", "must be >= 0")
        self.require(self.learn_batch >= 1, "learn_batch", "must be >= 1")
        self.require(self.learn_lr > 0, "learn_lr", "must be > 0")
        self.require(self.learn_bits in (4, 8), "learn_bits", "must be 4 or 8")
        self.require(self.learn_group_size >= 0, "learn_group_size", "must be >= 0")
        self.require(self.learn_objective in ("kl", "incoherence"), "learn_objective", "must be 'kl' or 'incoherence'")


@dataclasses.dataclass
class RotateRecord(PassRecord):
    """What ``rotate`` folded and rotated, or why it refused (``strict = false``)."""

    norms_folded: list[str]
    refused: str | None = None
    width: int | None = None
    rotation: str | None = None
    seed: int | None = None
    embeddings: list[str] | None = None
    readers: list[str] | None = None
    writers: list[str] | None = None
    per_head_v: dict[str, int] | None = None
    online_down_proj: dict[str, str] | None = None
    learned: dict | None = None

    def to_json(self) -> dict:
        out = {"norms_folded": self.norms_folded}
        if self.refused is not None:
            out["refused"] = self.refused
        if self.width is not None:  # rotated
            for f in ("width", "rotation", "seed", "embeddings", "readers", "writers", "per_head_v", "online_down_proj"):
                out[f] = getattr(self, f)
        if self.learned is not None:
            out["learned"] = self.learned
        return out

    @property
    def clears_stats(self) -> bool:
        return self.width is not None  # every activation downstream of the embedding changed


class RotateResidualStreamPass(LowbitPass):
    """Rotate the residual stream by a randomized Hadamard (or learned) ``Q`` folded into the weights.

    In place; keeps the fp32 function. Preconditions: canonicalized graph
    (linears are ``MatMul`` with constant weights), a pre-norm transformer
    with RMSNorm. Norm scales are folded first (the ``fold-norms`` logic),
    so running ``fold-norms`` before is optional. Calibration statistics in
    the compile context are dropped (the record says so, and every pass that
    needs statistics then asks for a ``calibrate`` after this one). Where the
    structure does not allow the rotation, the pass raises ``RotationError``
    naming the node (``strict``) or records the reason (:class:`RotateRecord`)
    and leaves the weights unrotated. Options: :class:`RotateOptions`.
    """

    name = "rotate"
    Options = RotateOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fold = fold_model(model, self.tag, scales=False)
        for name in fold.changed_values:
            self.context.stats.pop(name, None)
        record = RotateRecord(norms_folded=fold.norms_folded)
        try:
            stream = find_residual_stream(graph)
            paths = find_value_paths(graph, self.head_dim) if self.per_head_v else []
            if self.per_head_v and not paths:
                raise RotationError("per_head_v: no attention value path (v_proj -> probs @ v -> o_proj) found")
            downs = mlp_output_linears(stream) if self.online_down_proj else []
            if self.online_down_proj and not downs:
                raise RotationError("online_down_proj: no linear writing an MLP output into the stream found")
            for lin in downs:
                if lin.inputs[0].shape is None:
                    raise RotationError(f"online_down_proj: the rank of {layer_name(lin)}'s input is unknown")
        except RotationError as e:
            if self.strict:
                raise
            record.refused = str(e)
            return self.result(model, fold.modified, record)

        rng = np.random.default_rng(self.seed)
        q = hadamard_like(stream.width, rng, random_signs=True)
        factors: dict[int, tuple[np.ndarray, np.ndarray, ir.Value, ir.Value]] = {}
        learned = None
        if self.learn_steps:  # learning sees the weights as they will be quantized: the in-block rotations first
            self._rotate_blocks(graph, paths, downs, factors, rng)
            q, learned = self._learn(graph, stream, q)
        for g in stream.embeddings:
            set_constant_input(graph, g, 0, q.apply(_value(g.inputs[0])))
        for r in stream.readers:
            set_constant_input(graph, r, 1, q.apply_t_left(_value(r.inputs[1])))
        for w in stream.writers:
            set_constant_input(graph, w.linear, 1, q.apply(_value(w.linear.inputs[1])))
            if w.bias is not None:
                _rotate_bias(graph, *w.bias, q)
        if not self.learn_steps:
            # After the residual rotation, in the order the unlearned rotation always had: the same in exact
            # arithmetic, but float32 rounding of v_proj / o_proj differs by ~5e-8 with the other order, enough
            # to flip a smoothing alpha and move SmolLM2 w8a8's 16-window perplexity by 0.4 points (noise: equal
            # on 128 windows), so artifacts stay bit-identical to those the benchmarks recorded.
            self._rotate_blocks(graph, paths, downs, factors, rng)
        online = {}
        for lin in downs:
            a, b, *_ = factors[_k(lin)]
            online[layer_name(lin)] = f"{len(a)}x{len(a)} ⊗ {len(b)}x{len(b)}"

        self.context.stats.clear()  # every activation downstream of the embedding changed
        record = dataclasses.replace(
            record,
            width=stream.width,
            rotation=_describe(stream.width) + (", learned" if learned and learned["kept"] == "learned" else ""),
            seed=self.seed,
            embeddings=[g.name for g in stream.embeddings],
            readers=[layer_name(r) for r in stream.readers],
            writers=[layer_name(w.linear) for w in stream.writers],
            per_head_v={layer_name(lin): p.head_dim for p in paths for lin in (p.v_proj, p.o_proj)},
            online_down_proj=online,
            learned=learned,
        )
        return self.result(model, True, record)

    def _rotate_blocks(self, graph: ir.Graph, paths: list, downs: list[ir.Node], factors: dict,
                       rng: np.random.Generator) -> None:
        """The rotations inside a block: per attention head on the value path (``per_head_v``), online on
        down_proj's input (``online_down_proj``); random factors drawn from ``rng`` after the residual's."""
        heads: dict[int, np.ndarray] = {}  # one H_h per head size, shared by the layers
        for path in paths:
            if path.head_dim not in heads:
                heads[path.head_dim] = hadamard_like(path.head_dim, rng, random_signs=True).dense()
            h = heads[path.head_dim]
            w_v = _value(path.v_proj.inputs[1])
            per_head_v = Rotation([w_v.shape[1] // path.head_dim, h])
            set_constant_input(graph, path.v_proj, 1, per_head_v.apply(w_v))
            if path.v_bias is not None:
                _rotate_bias(graph, *path.v_bias, per_head_v)
            w_o = _value(path.o_proj.inputs[1])
            per_head_o = Rotation([w_o.shape[0] // path.head_dim, h])
            set_constant_input(graph, path.o_proj, 1, per_head_o.apply_t_left(w_o))
        for lin in downs:
            self._online_transform(graph, lin, factors, rng)

    def _learn(self, graph: ir.Graph, stream: ResidualStream, start: Rotation) -> tuple[Rotation, dict]:
        """The rotation that :mod:`rotation_learning` keeps for ``learn_objective``, and its notes."""
        if self.learn_objective == "incoherence":
            q, notes = learn_incoherent_rotation(
                graph, stream, start.dense(), steps=self.learn_steps, lr=self.learn_lr, seed=self.seed,
                show_progress=self.context.progress,
            )
            return Rotation([q]), notes
        if not self.context.calibration_batches:
            raise InputError("rotate: learn_steps needs calibration data to learn the rotation on (none given)")
        q, notes = learn_rotation(
            graph, stream, start.dense(), self.context.calibration_batches,
            steps=self.learn_steps, lr=self.learn_lr, batch_size=self.learn_batch, bits=self.learn_bits,
            group_size=self.learn_group_size or None, seed=self.seed, show_progress=self.context.progress,
        )  # fmt: skip
        return Rotation([q]), notes

    def _online_transform(self, graph: ir.Graph, lin: ir.Node, factors: dict, rng: np.random.Generator) -> None:
        """``x -> x (A ⊗ B)`` on ``lin``'s input, folded as ``W' = P (A ⊗ B)ᵀ W``; factors are shared per width.

        With ``x`` viewed as ``V [.., a, b]``, ``x (A ⊗ B) = Aᵀ V B``. The graph computes
        ``Z = (V B)ᵀ A`` (``[.., b, a]``: two MatMuls with constant right operands, which ORT
        runs as single GEMMs over all rows, and one Transpose) and flattens it: that is
        ``x (A ⊗ B)`` with its channels permuted (``z[q a + p] = y[p b + q]``), and the
        permutation ``P`` is folded into ``W'``'s rows instead of transposing back. The
        MatMuls carry the ``online_hadamard`` role, so recognition never takes them for
        linear layers to quantize.
        """
        n = _k(lin)
        if n not in factors:
            a, b = online_factors(n, rng)
            dtype = lin.inputs[1].const_value.dtype.numpy()
            factors[n] = (a, b, add_initializer(graph, f"lowbit.online_hadamard.{n}.left", a.astype(dtype)),
                          add_initializer(graph, f"lowbit.online_hadamard.{n}.right", b.astype(dtype)))
        a, b, a_init, b_init = factors[n]
        na, nb = a.shape[0], b.shape[0]
        perm = (np.arange(na)[None, :] * nb + np.arange(nb)[:, None]).reshape(-1)  # z[q*na + p] = y[p*nb + q]
        set_constant_input(graph, lin, 1, Rotation([a, b]).apply_t_left(_value(lin.inputs[1]))[perm])
        x = lin.inputs[0]
        prefix = f"{layer_name(lin, lin.name)}/online_hadamard"
        rank = len(x.shape)
        lead = [0] * (rank - 1)  # Reshape's 0: keep that leading dimension
        swap = [*range(rank - 1), rank, rank - 1]  # the last two axes of the [.., a, b] view
        split = add_initializer(graph, f"{prefix}.split", np.array([*lead, na, nb], np.int64))
        merge = add_initializer(graph, f"{prefix}.merge", np.array([*lead, n], np.int64))
        nodes = [ir.node("Reshape", [x, split], name=f"{prefix}/split")]
        nodes.append(ir.node("MatMul", [nodes[-1].outputs[0], b_init], name=f"{prefix}/right"))
        nodes.append(ir.node("Transpose", [nodes[-1].outputs[0]], {"perm": swap}, name=f"{prefix}/transpose"))
        nodes.append(ir.node("MatMul", [nodes[-1].outputs[0], a_init], name=f"{prefix}/left"))
        nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], merge], name=f"{prefix}/merge"))
        for node in nodes:
            self.tag(node, layer_name(lin))
            node.metadata_props[ROLE_KEY] = ONLINE_HADAMARD
        graph.insert_before(lin, nodes)
        lin.replace_input_with(0, nodes[-1].outputs[0])


def _k(lin: ir.Node) -> int:
    return int(lin.inputs[1].const_value.shape[0])


def _value(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def _rotate_bias(graph: ir.Graph, add: ir.Node, index: int, rotation: Rotation) -> None:
    bias = _value(add.inputs[index])
    set_constant_input(graph, add, index, rotation.apply(bias.reshape(-1)).reshape(bias.shape))


def _describe(d: int) -> str:
    p = two_adic(d)
    return f"randomized Hadamard D·H_{d}" if p == d else f"randomized Hadamard D·(H_{p} ⊗ O_{d // p})"
