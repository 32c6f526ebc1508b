import numpy as np
import onnx_ir as ir

from lowbit.compiler.core.passbase import LAYER_KEY
from lowbit.passes.recognize import (
    ROLE_KEY,
    RecognizeStructuresPass,
    constant_weight,
    find_linears,
    find_norms,
    linear_groups,
)
from tests.graphs import mlp


def test_linears_norms_and_groups():
    model = mlp()
    linears, rejected = find_linears(model.graph)
    assert [lin.name for lin in linears] == ["up", "down", "side"]
    assert rejected == {}
    groups = [[lin.name for lin in g] for g in linear_groups(linears)]
    assert ["up", "side"] in groups
    norms = find_norms(model.graph)
    assert len(norms) == 1 and norms[0].kind == "rmsnorm"
    assert norms[0].gamma.name == "gamma"
    assert norms[0].output.name == "xn"


def test_pass_tags_nodes_and_second_run_is_unmodified():
    model = mlp()
    p = RecognizeStructuresPass()
    result = p(model)
    assert result.modified
    up = next(n for n in model.graph if n.name == "up")
    assert up.metadata_props[LAYER_KEY] == "up" and up.metadata_props[ROLE_KEY] == "linear"
    assert next(n for n in model.graph if n.name == "norm/pow").metadata_props[ROLE_KEY] == "rmsnorm"
    assert not RecognizeStructuresPass()(model).modified
    assert result.record.linears == 3 and result.record.to_json()["groups"] == [["up", "side"]]


def test_non_constant_weight_is_rejected_with_reason():
    model = mlp()
    # feed W1 through an Identity: the weight is computed, no longer a constant
    up = next(n for n in model.graph if n.name == "up")
    ident = ir.node("Identity", [up.inputs[1]], name="ident")
    model.graph.insert_before(up, ident)
    up.replace_input_with(1, ident.outputs[0])
    linears, rejected = find_linears(model.graph)
    assert "up" not in [lin.name for lin in linears]
    assert rejected["up"] == "weight is not a constant initializer (computed by Identity)"


def test_constant_weight_reasons():
    v = ir.Value(name="w", const_value=ir.tensor(np.zeros((2, 2, 2), np.float32)))
    assert constant_weight(v) == "weight has rank 3, not 2"
    v = ir.Value(name="w", const_value=ir.tensor(np.zeros((2, 2), np.int64)))
    assert constant_weight(v) == "weight dtype is INT64, not float"
