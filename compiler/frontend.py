"""Frontend: model source -> one fp32 `onnx_ir.Model`.

PyTorch models are exported with `torch.onnx.export(..., dynamo=True)`
(torch.export + onnxscript's torchlib, then onnxscript's optimizer, which folds
constants). Existing `.onnx` files, external data included, are loaded and
checked. `load_source` dispatches on what the user named.

What the exporter produces, and what this module adds so that later passes can
treat every linear layer alike:

- Default opset 21 (the first with blocked QuantizeLinear/DequantizeLinear).
  Opset 23 exports too, with RMSNorm as one `RMSNormalization` node instead
  of Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul.
- `nn.Linear` becomes `MatMul(x, W^T)` (+ `Add(bias)`); the exporter's
  optimizer folds `Transpose(W)` into a new initializer named "val_<n>" with
  `pkg.onnxscript.optimizer.folded_from` metadata, but only when W has one
  consumer. A weight shared with another op (a tied lm_head, read by the
  embedding's Gather too) keeps a runtime Transpose; `_fold_weight_transposes`
  folds those as well, so every linear weight is a constant initializer.
- Each node carries `pkg.torch.onnx.name_scopes`, the module path of the torch
  module it came from (e.g. [..., 'model.layers.0.self_attn.q_proj',
  'linear']). `_tag_linears` resolves it against the exported module: each
  linear's MatMul/Gemm gets `metadata_props["lowbit.module"]` = the module name,
  and its weight initializer is renamed "<module>.weight_t" (MatMul layout
  [in, out], i.e. torch's weight transposed; "<module>.weight" where a Gemm
  keeps torch's layout with transB=1). `linear_module_name(node)` reads the tag.
- The exporter can give an internal value the name of a graph output (an
  output called "embedding" collides with `aten.embedding`'s result, and ONNX
  Runtime then rejects the model); such internal values are renamed.
- Model-level metadata: `lowbit.family`, `lowbit.task`, `lowbit.name`.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from lowbit.compiler.core.errors import InputError, LowbitError

DEFAULT_OPSET = 21
MODULE_KEY = "lowbit.module"
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FOLDED_KEY = "pkg.onnxscript.optimizer.folded_from"

logger = logging.getLogger(__name__)


class ExportError(LowbitError):
    """torch.onnx export of a model failed."""


def linear_module_name(node: ir.Node) -> str | None:
    """The torch module name of the nn.Linear a MatMul/Gemm node computes, if known."""
    return node.metadata_props.get(MODULE_KEY)


def _scopes(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get(_SCOPES_KEY)
    if not raw:
        return []
    try:
        return list(ast.literal_eval(raw))
    except (ValueError, SyntaxError):
        return []


def _fold_weight_transposes(graph: ir.Graph) -> int:
    """Replace `Transpose(initializer)` by a transposed initializer, whatever its size."""
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or src.const_value is None or not src.is_initializer() or src.is_graph_input():
            continue
        perm = node.attributes.get_ints("perm", None)
        array = src.const_value.numpy()
        out = np.ascontiguousarray(np.transpose(array, perm))
        new = ir.Value(name=f"{src.name}_t", shape=ir.Shape(out.shape), type=src.type, const_value=ir.tensor(out))
        new.metadata_props[_FOLDED_KEY] = repr([src.name])
        i = 0
        while new.name in graph.initializers:  # keep names unique
            i += 1
            new.name = f"{src.name}_t{i}"
        graph.register_initializer(new)
        ir.convenience.replace_all_uses_with(node.outputs[0], new)
        graph.remove(node, safe=True)
        folded += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return folded


def _tag_linears(graph: ir.Graph, module: nn.Module) -> int:
    """Tag each nn.Linear's MatMul/Gemm with its module name; name its weight after it."""
    linears = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    tagged = 0
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        owner = next((s for s in reversed(_scopes(node)[:-1]) if s in linears), None)
        if owner is None:
            continue
        node.metadata_props[MODULE_KEY] = owner
        tagged += 1
        w = node.inputs[1]
        if w is None or w.const_value is None or not w.is_initializer() or len(w.uses()) != 1:
            continue
        trans_b = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0
        want = f"{owner}.weight" if trans_b else f"{owner}.weight_t"
        if w.name != want and want not in graph.initializers:
            graph.initializers.pop(w.name)
            w.name = want
            graph.register_initializer(w)
    return tagged


def _dedupe_io_names(graph: ir.Graph) -> None:
    """Rename internal values that carry the name of a graph input or output."""
    reserved = {v.name for v in (*graph.inputs, *graph.outputs)}
    io = {id(v) for v in (*graph.inputs, *graph.outputs)}
    taken = {v.name for node in graph for v in node.outputs} | set(graph.initializers) | reserved
    for node in graph:
        for v in node.outputs:
            if v.name in reserved and id(v) not in io:
                i = 1
                while f"{v.name}_{i}" in taken:
                    i += 1
                v.name = f"{v.name}_{i}"
                taken.add(v.name)


def _torch_dynamic_shapes(adapter) -> dict[str, dict[int, str]] | None:
    dyn = adapter.dynamic_shapes
    if not dyn:
        return None
    return {n: dict(dyn.get(n, {})) for n in adapter.input_names}


def export_to_onnx(adapter, *, opset: int | None = None, batch: int = 2, seq: int = 8) -> ir.Model:
    """Export `adapter.module` to an optimized fp32 ONNX model (see module docstring).

    Traced with `adapter.example_args(batch, seq)`; batch and seq should not
    be 1, which torch.export would specialize. Raises `ExportError` with the
    exporter's own message when tracing or translation fails.
    """
    if getattr(adapter, "module", None) is None:
        raise InputError(f"{adapter.name}: nothing to export (no torch module)")
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < 18:
        raise InputError(f"opset {opset} is too old for the dynamo exporter (need >= 18)")
    module = adapter.module.eval()
    args = adapter.example_args(batch, seq)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
            warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=adapter.input_names,
                output_names=adapter.output_names,
                dynamic_shapes=_torch_dynamic_shapes(adapter),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; keep its message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx export of {adapter.name} failed: {first}") from e
    model = program.model
    folded = _fold_weight_transposes(model.graph)
    tagged = _tag_linears(model.graph, module)
    _dedupe_io_names(model.graph)
    for key, value in (("family", adapter.family), ("task", adapter.task), ("name", adapter.name)):
        model.metadata_props[f"lowbit.{key}"] = str(value)
    model.producer_name = "lowbit"
    logger.info("exported %s: opset %d, %d linears tagged, %d transposes folded", adapter.name, opset, tagged, folded)
    return model


#: op domains ONNX and ONNX Runtime define; a node of another domain needs a function in the model
KNOWN_DOMAINS = frozenset({
    "", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "ai.onnx.training", "com.microsoft",
    "com.microsoft.experimental", "com.microsoft.nchwc", "com.ms.internal.nhwc", "org.pytorch.aten",
})


def _cause(e: BaseException) -> str:
    """The innermost message of an exception chain, on one line (onnx_ir wraps the parser's error)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _inside(folder: Path, location: str) -> bool:
    """Whether ``folder / location`` stays inside ``folder``, as written and with links followed."""
    if Path(location).is_absolute():
        return False
    base = os.path.normpath(os.path.abspath(folder))
    target = os.path.normpath(os.path.join(base, location))
    if os.path.commonpath([base, target]) != base:
        return False
    real_base = os.path.realpath(base)
    return os.path.commonpath([real_base, os.path.realpath(target)]) == real_base


def _check_external_data(path: Path, model: ir.Model) -> None:
    """External data stays inside the model's folder (checked before any of it is opened) and covers
    every tensor it holds."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if not _inside(path.parent, tensor.location):
            raise InputError(
                f"{path.name}: external data location {tensor.location!r} of initializer {value.name!r} leaves "
                f"the model's folder {path.parent} (refused: lowbit reads only files beside the model)"
            )
        data = Path(tensor.base_dir) / tensor.location
        if not data.is_file():
            raise InputError(
                f"missing external data file '{tensor.location}' for initializer {value.name!r} "
                f"(looked in {data.parent})"
            )
        need = (tensor.offset or 0) + (tensor.length or 0)
        if data.stat().st_size < need:
            raise InputError(
                f"external data file {data.name} is truncated: initializer {value.name!r} needs "
                f"bytes up to {need}, file has {data.stat().st_size}"
            )


def _check_graph(path: Path, model: ir.Model) -> None:
    """What ONNX Runtime or the passes would trip over later, named now: values nothing defines, a cycle,
    an opset newer than ``onnx`` knows, ops of an unknown domain, and what the ONNX checker refuses."""
    import onnx

    graph = model.graph
    texts = [("graph name", graph.name), *((f"metadata {k!r}", v) for k, v in model.metadata_props.items()),
             *(("value name", v.name) for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()))]
    for what, text in texts:  # a name that is not UTF-8 text: the model could not be written back
        if text is not None and not isinstance(text, str):
            raise InputError(f"{path.name} is not a valid ONNX model: {what} {text!r} is not UTF-8 text")
    for node in graph.all_nodes():
        try:
            ir.serde.serialize_node(node)  # what writing the model back would refuse (its weights aside)
        except Exception as e:
            raise InputError(f"{path.name} is not a valid ONNX model: node {node.name!r} ({node.op_type!r}) "
                             f"cannot be written back: {_cause(e)}") from None
    for node in graph:
        for v in node.inputs:
            if v is not None and v.producer() is None and not v.is_graph_input() and not v.is_initializer():
                raise InputError(f"{path.name}: node {node.name or node.op_type!r} ({node.op_type}) reads {v.name!r}, "
                                 "which no node, graph input or initializer defines (a missing initializer?)")
    for v in graph.outputs:
        if v.producer() is None and not v.is_graph_input() and not v.is_initializer():
            raise InputError(f"{path.name}: graph output {v.name!r} is not computed by any node")
    try:
        graph.sort()
    except Exception as e:  # onnx_ir: "Graph contains a cycle"
        raise InputError(f"{path.name}: the graph is not acyclic ({_cause(e)})") from None
    newest = onnx.defs.onnx_opset_version()
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is not None and version > newest:
        raise InputError(f"{path.name}: opset {version} is newer than this onnx knows (up to {newest})")
    functions = {(domain, name) for domain, name, *_ in model.functions}
    for node in graph.all_nodes():
        if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in functions:
            raise InputError(f"{path.name}: node {node.name or node.op_type!r} uses op {node.domain}:{node.op_type}, "
                             "which neither ONNX nor ONNX Runtime defines (and the model has no function for it)")
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values())
    try:  # with shape inference, unless it would need the external data (not read yet)
        onnx.checker.check_model(str(path), full_check=not external)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        if "topologically sorted" not in str(e):  # the order is ours to fix (sorted above), not an error
            raise InputError(f"{path.name} is not a valid ONNX model: {_cause(e)}") from None


def load_onnx(path: str | Path) -> ir.Model:
    """Load an `.onnx` file (external data resolved next to it, never outside its folder) with clear errors."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}" if not path.exists() else f"not an ONNX file: {path} is a folder")
    serde_logger = logging.getLogger("onnx_ir.serde")
    level = serde_logger.level
    serde_logger.setLevel(logging.ERROR)  # its warnings about an invalid graph: reported below, on one line
    try:
        model = ir.load(path)
    except DecodeError:
        with open(path, "rb") as f:
            head = f.read(1)
        # ONNX writers put ir_version (field 1, varint: tag byte 0x08) first.
        what = "corrupt or truncated ONNX file" if head == b"\x08" else "not an ONNX model"
        raise InputError(f"{what}: {path} ({path.stat().st_size} bytes do not parse as onnx.ModelProto)") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # the proto parsed, but onnx_ir refuses what it says (a dtype, a redeclared value)
        raise InputError(f"{path.name} is not a valid ONNX model: {_cause(e)}") from None
    finally:
        serde_logger.setLevel(level)
    if not len(model.graph) or not model.graph.outputs:
        raise InputError(f"not an ONNX model: {path} has no graph (empty or unrelated file)")
    _check_external_data(path, model)
    _check_graph(path, model)
    # Read the weights now: passes, verification and the artifact must not
    # depend on the source's data file staying where it is.
    try:
        return ir.external_data.load_to_model(model)
    except (OSError, ValueError) as e:  # onnx_ir's own containment checks (a hard link, ...)
        raise InputError(f"{path.name}: cannot read its external data: {_cause(e)}") from None


def _parameter_name(value: ir.Value) -> str | None:
    """The torch parameter an initializer holds (the exporter records it), if another name than its own."""
    names = [value.name]
    folded = value.metadata_props.get(_FOLDED_KEY)
    if folded:
        try:
            names = list(ast.literal_eval(folded))
        except (ValueError, SyntaxError):
            pass
    if len(names) == 1 and names[0] and names[0] != value.name and not names[0].startswith("val_"):
        return names[0]
    return None


def check_weights(model: ir.Model) -> None:
    """Refuse NaN or infinite weights, naming the first such initializer (and its torch parameter)."""
    bad = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        array = tensor.numpy()
        if np.isfinite(array).all():
            continue
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        bad.append((value, nan, inf))
    if not bad:
        return
    value, nan, inf = bad[0]
    counts = " and ".join(f"{n} {kind} value{'s' if n > 1 else ''}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
    param = _parameter_name(value)
    what = f"weight {value.name!r}" + (f" (torch parameter {param!r})" if param else "")
    more = f" ({len(bad) - 1} more weight{'s' if len(bad) > 2 else ''} too: {', '.join(v.name for v, *_ in bad[1:4])}" \
           f"{', ...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
    raise InputError(f"{what} has {counts}{more}: the model cannot be quantized (or run) with them")


def load_source(source: Any, *, tokenizer=None, opset: int | None = None, name: str | None = None, **kw):
    """Model source -> `(onnx_ir.Model, adapter or None)`.

    `.onnx` files are loaded as they are (no adapter, unless a tokenizer is
    given: then an ONNX-only adapter that can build inputs); llama2.c `.bin`,
    `.gguf`, Hugging Face folders, known names and `nn.Module`s go through
    `lowbit.models` and are exported. Extra keywords go to
    `adapter_for_module` for modules (e.g. `example_inputs=`). Weights that are NaN
    or infinite are refused here, naming the weight (`check_weights`).
    """
    model, adapter = _load_source(source, tokenizer=tokenizer, opset=opset, name=name, **kw)
    check_weights(model)
    return model, adapter


def _load_source(source: Any, *, tokenizer, opset: int | None, name: str | None, **kw):
    from lowbit.models import adapter_for_module, load_model, load_tokenizer
    from lowbit.models.base import ModelAdapter

    if isinstance(source, ModelAdapter):
        return export_to_onnx(source, opset=opset), source
    if isinstance(source, nn.Module):
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        adapter = adapter_for_module(source, tokenizer=tokenizer, name=name, **kw)
        return export_to_onnx(adapter, opset=opset), adapter
    if kw:
        raise InputError(f"unexpected options for {source}: {', '.join(kw)}")
    if str(source).lower().endswith(".onnx"):
        model = load_onnx(source)
        if tokenizer is None:
            return model, None
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        return model, onnx_adapter(model, tokenizer, name=name or Path(source).stem, source=str(source))
    adapter = load_model(source, tokenizer=tokenizer, name=name)
    return export_to_onnx(adapter, opset=opset), adapter


def onnx_adapter(model: ir.Model, tokenizer, *, name: str, source: str | None = None):
    """An adapter without a torch module for an `.onnx` model: it builds inputs
    from token ids (input_ids [+ attention_mask]) for calibration and evaluation."""
    from lowbit.models.base import ModelAdapter

    adapter = ModelAdapter(
        None,
        name=name,
        input_names=[v.name for v in model.graph.inputs],
        output_names=[v.name for v in model.graph.outputs],
        tokenizer=tokenizer,
        source=source,
    )
    logits = any(v.name == "logits" for v in model.graph.outputs)
    adapter.family = model.metadata_props.get("lowbit.family", "onnx")
    adapter.task = model.metadata_props.get("lowbit.task", "causal-lm" if logits else "generic")
    return adapter
