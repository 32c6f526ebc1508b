"""The lowered IR (``onnx_ir.Model`` after ``lower-tvm``) -> a Relax ``IRModule`` + parameters.

Two translators share one walk over the graph:

* the ``lowbit.tvm`` operators (:mod:`lowbit.backends.tvm.ops`) are emitted by lowbit's
  own code: per-row activation quantization (Relax reductions + a TE quantize), an
  ``R.matmul`` int8 x int8 -> int32 with the zero-point correction and float rescale
  (``Int8Linear``), or a TE decode of packed codes feeding ``R.matmul``
  (``PackedLinear``);
* the float remainder (norms, attention, rotary embedding, embedding lookup) goes
  through TVM's ONNX importer (``tvm.relax.frontend.onnx``), one node at a time.

Two things make torch-dynamo exports import with symbolic ``batch``/``seq``. The
importer turns shape arithmetic into ``PrimExpr`` values, which it then cannot
``Reshape``: such inputs become 0-d int64 tensors. And it loses shapes through the
mask construction (``Range``, ``GatherND``, ``CumSum``): where the Relax shape is
unknown or uses variables other than the graph inputs' dimensions, the output is
``match_cast`` to the shape ONNX shape inference recorded on the IR (which names the
same ``batch``/``seq``), so downstream broadcasting stays shape-checked.

Those ``match_cast`` hints leave the importer's own variables (``range_len_0`` for a
``Range`` of length ``seq``; ``s``, ``s_1`` that ``LegalizeOps`` gives a
``dynamic_strided_slice``) defined *after* the function's inputs, and only asserted
equal to ``batch``/``seq``. TVM 0.27's ``FuseTIR`` then rewrites other calls' output
shapes in terms of those later variables (a PrimFunc that ``LegalizeOps`` shared
between two call sites keeps the first site's variables), so ``VMShapeLower`` finds
a tensor of shape ``[s, range_len_0, 576]`` allocated before ``s`` exists (SmolLM2's
attention mask). :func:`unify_symbolic_vars` removes such variables: every variable
that a ``match_cast`` equates with an expression of the inputs' dimensions is
replaced by that expression, and the ``match_cast`` that defined it becomes a
runtime check. It runs after the import and again after ``LegalizeOps``.

Initializers of at least :data:`PARAM_MIN_ELEMENTS` elements become function
parameters (saved beside the library as ``params.bin``); smaller ones stay constants,
so shape tensors fold.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as _onnx

from lowbit.backends.tvm import kernels, ops
from lowbit.compiler.core.errors import InputError

PARAM_MIN_ELEMENTS = 64
#: ops whose converters accept a shape value (a PrimExpr) as an input
_PRIM_COMPATIBLE = {
    "Add", "Sub", "Mul", "Div", "Range", "Squeeze", "Unsqueeze", "Concat", "Equal", "Where", "Cast", "CastLike",
    "Shape", "Gather", "Slice", "Expand", "ConstantOfShape", "Resize",
}


class _Importer(_onnx.ONNXGraphImporter):
    """TVM's ONNX importer, with lowbit's operators and shape hints from the IR."""

    def __init__(self, model: ir.Model, graph) -> None:
        """``graph``: ``model``'s GraphProto, its nodes named uniquely (the importer identifies nodes by name)."""
        super().__init__({}, "float32", keep_params_in_input=True, sanitize=True)
        values = {v.name: v for n in model.graph for v in n.outputs}
        lowbit = {n.name: n for n in model.graph if n.domain == ops.DOMAIN}
        self._lowbit_nodes = {p.name: lowbit[p.name] for p in graph.node if p.domain == ops.DOMAIN}
        self._outputs = {p.name: [values[o] for o in p.output if o in values] for p in graph.node}
        self._dims: dict[str, tirx.Var] | None = None

    # --- parameters ------------------------------------------------------------------
    def _parse_graph_initializers(self, graph) -> None:
        for init in graph.initializer:
            array = self._parse_array(init)
            if int(np.prod(array.shape)) >= PARAM_MIN_ELEMENTS:
                name = f"p{len(self._params)}_" + "".join(c if c.isalnum() else "_" for c in init.name)[:48]
                var = self._new_var(name, shape=array.shape, dtype=array.dtype)
                self._nodes[init.name] = var
                self._params[init.name] = (var, array)
            else:
                self._nodes[init.name] = relax.const(array)

    # --- operator support ------------------------------------------------------------
    def _check_for_unsupported_ops(self, graph) -> None:
        supported = set(_onnx._get_convert_map()) | {"If", "Constant"}
        bad = sorted({
            f"{n.domain + '::' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}"
            for n in graph.node
            if n.name not in self._lowbit_nodes and (n.domain not in ("", "ai.onnx") or n.op_type not in supported)
        })
        if bad:
            raise InputError(f"the TVM backend cannot compile operator(s) {', '.join(bad)} (not lowered by lower-tvm and "
                             "not supported by TVM's ONNX importer); compile with --backend onnxruntime")

    def _dim_vars(self) -> dict[str, tirx.Var]:
        if self._dims is None:
            self._dims = {}
            for v in self._inputs.values():
                ty = getattr(v, "ty", None)
                if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
                    for d in ty.shape.values:
                        if isinstance(d, tirx.Var):
                            self._dims[d.name] = d
        return self._dims

    def _convert_operator(self, op_name: str, inputs, attrs: dict, opset: int):
        name = attrs["tvm_custom"]["name"]
        inputs = list(inputs)
        for i, x in enumerate(inputs):
            if isinstance(x, tvm.ir.expr.Call):
                inputs[i] = self.bb.normalize(x)
        node = self._lowbit_nodes.get(name)
        if node is not None:
            return self._lowbit_operator(node, inputs)
        if op_name not in _PRIM_COMPATIBLE:
            for i, x in enumerate(inputs):
                if x is not None and isinstance(getattr(x, "ty", None), tvm.ir.PrimType):
                    t = self.bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([x])))
                    inputs[i] = self.bb.normalize(relax.op.reshape(t, []))
        out = super()._convert_operator(op_name, _onnx.onnx_input(inputs), attrs, opset)
        if isinstance(out, tvm.ir.expr.Call):
            out = self.bb.normalize(out)
        return self._shape_hint(out, name)

    def _shape_hint(self, out, node_name: str):
        ty = getattr(out, "ty", None)
        if not isinstance(ty, relax.TensorType) or not self._foreign(ty):
            return out
        outs = self._outputs.get(node_name, [])
        if len(outs) != 1 or outs[0].shape is None:
            return out
        dims = self._dim_vars()
        shape = []
        for d in outs[0].shape:
            if isinstance(d, int):
                shape.append(d)
            elif str(d) in dims:
                shape.append(dims[str(d)])
            else:
                return out
        if ty.ndim not in (-1, len(shape)):
            return out
        return self.bb.match_cast(self.bb.emit(out), relax.TensorType(shape, ty.dtype))

    def _foreign(self, ty: relax.TensorType) -> bool:
        """Shape unknown, or written with variables other than the graph inputs' dimensions."""
        if not isinstance(ty.shape, relax.ShapeExpr):
            return True
        known = set(self._dim_vars().values())
        return any(v not in known for d in ty.shape.values if not isinstance(d, tirx.IntImm)
                   for v in tirx.analysis.undefined_vars(d))

    # --- lowbit operators -------------------------------------------------------------
    def _lowbit_operator(self, node: ir.Node, inputs: list) -> relax.Expr:
        if node.op_type == ops.INT8_LINEAR:
            return emit_int8_linear(self.bb, *inputs[:4], mode=_attr(node, "mode"),
                                    zero_point=_attr(node, "zero_point", 0), scale=_attr(node, "scale", 1.0))
        if node.op_type == ops.PACKED_LINEAR:
            zero = inputs[3] if len(inputs) > 3 else None
            return emit_packed_linear(self.bb, inputs[0], inputs[1], inputs[2], zero, bits=_attr(node, "bits"),
                                      group=_attr(node, "group_size"), k=_attr(node, "in_features"))
        raise InputError(f"node {node.name}: unknown {ops.DOMAIN} operator {node.op_type}")


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _f32(v: float) -> relax.Constant:
    return relax.const(np.float32(v))


def _row_stat(x: relax.Expr, op) -> relax.Expr:
    return op(x, axis=[-1], keepdims=True)


def emit_int8_linear(bb: relax.BlockBuilder, x, w_q, w_scale, colsum, *, mode: str, zero_point: int, scale: float):
    """``Int8Linear`` (see :mod:`lowbit.backends.tvm.ops`) as Relax: quantize rows, int8 GEMM, correct, rescale."""
    nd = x.ty.ndim
    ones = [1] * nd
    eps = _f32(ops.SCALE_EPS)
    zero = _f32(0.0)
    if mode == "static":
        s = relax.const(np.full(ones, scale, np.float32))
        z = relax.const(np.full(ones, zero_point, np.float32))
    elif mode == "symmetric":
        amax = bb.emit(_row_stat(relax.op.abs(x), relax.op.max))
        s = bb.emit(relax.op.maximum(relax.op.multiply(amax, _f32(1 / 127)), eps))
        z = relax.const(np.full(ones, 128, np.float32))
    elif mode == "tensor":
        axes = list(range(nd))
        hi = bb.emit(relax.op.maximum(relax.op.max(x, axis=axes, keepdims=True), zero))
        lo = bb.emit(relax.op.minimum(relax.op.min(x, axis=axes, keepdims=True), zero))
        s = bb.emit(relax.op.maximum(relax.op.divide(relax.op.subtract(hi, lo), _f32(255.0)), eps))
        z = bb.emit_te(lambda lo_, s_: _nearbyint_div(lo_, s_), lo, s, primfunc_name_hint="lowbit_tensor_zero_point")
    else:
        hi = bb.emit(relax.op.maximum(_row_stat(x, relax.op.max), zero))
        lo = bb.emit(relax.op.minimum(_row_stat(x, relax.op.min), zero))
        if mode == "shared":
            zp = int(zero_point)
            s_hi = relax.op.multiply(hi, _f32(1 / (255 - zp)))
            s_lo = relax.op.multiply(lo, _f32(-1 / zp))
            s = bb.emit(relax.op.maximum(relax.op.maximum(s_hi, s_lo), eps))
            z = relax.const(np.full(ones, zp, np.float32))
        elif mode == "per-token":
            s = bb.emit(relax.op.maximum(relax.op.multiply(relax.op.subtract(hi, lo), _f32(1 / 255)), eps))
            z = bb.emit_te(lambda lo_, s_: _nearbyint_div(lo_, s_), lo, s, primfunc_name_hint="lowbit_token_zero_point")
        else:
            raise InputError(f"Int8Linear: unknown activation mode {mode!r} (known: {', '.join(ops.TOKEN_MODES)})")
    q = bb.emit_te(kernels.quantize_rows, x, s, z, primfunc_name_hint="lowbit_quantize_rows")
    acc = bb.emit(relax.op.matmul(q, relax.op.permute_dims(w_q), out_dtype="int32"))
    if mode in ("per-token", "tensor"):
        zi = relax.op.subtract(relax.op.astype(z, "int32"), relax.const(np.int32(128)))
        acc = bb.emit(relax.op.subtract(acc, relax.op.multiply(zi, colsum)))
    elif mode != "symmetric" and int(zero_point) != 128:
        corr = relax.op.multiply(colsum, relax.const(np.int32(int(zero_point) - 128)))
        acc = bb.emit(relax.op.subtract(acc, corr))
    y = relax.op.multiply(relax.op.multiply(relax.op.astype(acc, "float32"), w_scale), s)
    return bb.normalize(y)


def _nearbyint_div(lo, s):
    from tvm import te

    return te.compute(lo.shape, lambda *i: tirx.nearbyint(-lo[i] / s[i]), name="token_zero_point")


def emit_packed_linear(bb: relax.BlockBuilder, x, packed, scale, zero, *, bits: int, group: int, k: int):
    """``PackedLinear`` as Relax: a TE decode of the packed codes feeding ``R.matmul`` (fused by the build)."""
    if zero is None:
        w = bb.emit_te(lambda p, s: kernels.decode_packed(p, s, None, bits=bits, k=k, group=group), packed, scale,
                       primfunc_name_hint=f"{kernels.DECODE_PREFIX}_w{bits}")
    else:
        w = bb.emit_te(lambda p, s, z: kernels.decode_packed(p, s, z, bits=bits, k=k, group=group), packed, scale, zero,
                       primfunc_name_hint=f"{kernels.DECODE_PREFIX}_w{bits}")
    return bb.normalize(relax.op.matmul(x, relax.op.permute_dims(w)))


def _dims(ty) -> list | None:
    """The dimensions of a tensor or shape type, when known (None otherwise)."""
    if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
        return list(ty.shape.values)
    if isinstance(ty, relax.ShapeType) and ty.values is not None:
        return list(ty.values)
    return None


def _free_vars(e) -> list:
    return [] if isinstance(e, tirx.IntImm) else list(tirx.analysis.undefined_vars(e))


def symbolic_equalities(func: relax.Function) -> dict:
    """``{var: expr}``: variables that a ``match_cast`` of ``func`` equates with an expression
    of the parameters' dimensions or a constant (where both sides of the cast have known
    dimensions; constants once ``--tune`` has bound ``batch``/``seq``)."""
    known = {v for p in func.params for d in (_dims(p.ty) or []) for v in _free_vars(d)}
    found: dict = {}
    changed = True
    while changed:  # an equality may express a variable through one found before
        changed = False
        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.MatchCast):
                    continue
                src, dst = _dims(b.value.ty), _dims(b.ty)
                if src is None or dst is None or len(src) != len(dst):
                    continue
                for a, c in zip(src, dst):
                    for var, expr in ((a, c), (c, a)):
                        if (isinstance(var, tirx.Var) and var not in known and var not in found
                                and not expr.same_as(var)
                                and all(v in known for v in _free_vars(expr))):
                            found[var] = expr
                            known.add(var)
                            changed = True
    return found


@tvm.transform.module_pass(opt_level=0, name="LowbitUnifySymbolicVars")
def unify_symbolic_vars(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Replace, in every Relax function, the symbolic variables that ``match_cast`` equates
    with the inputs' dimensions by those dimensions (see the module docstring)."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            found = symbolic_equalities(func)
            if found:
                mod = relax.transform.BindSymbolicVars(found, gv.name_hint)(mod)
    return mod


def to_relax(model: ir.Model) -> tuple[tvm.IRModule, list[str], list[np.ndarray]]:
    """``(module, parameter names, parameter arrays)``: ``main(inputs..., params...)``."""
    proto = ir.to_proto(model)
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            if node.domain == ops.DOMAIN:
                raise InputError(f"{ops.DOMAIN} node {i} ({node.op_type}) has no unique name")
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)
    opset = model.graph.opset_imports.get("", model.opset_imports.get("", 21))
    importer = _Importer(model, proto.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the importer warns about every renamed or symbolic input
        try:
            mod = importer.from_onnx(proto.graph, opset)
        except InputError:
            raise
        except tvm.error.OpNotImplemented as e:
            raise InputError(f"the TVM backend cannot compile this graph: {e}") from e
    names = list(importer._params)
    arrays = [importer._params[n][1].numpy() for n in names]
    mod["main"] = mod["main"].without_attr("params")  # the arrays live in params.bin, not in the library
    return unify_symbolic_vars(mod), names, arrays
