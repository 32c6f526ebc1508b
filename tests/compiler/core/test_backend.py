"""The Backend interface and registry: names, aliases, errors, option checks, recipe swap, supports()."""

from __future__ import annotations

import pytest

from lowbit.compiler.core import backend as backend_mod
from lowbit.compiler.core.backend import (
    Backend,
    BackendOptions,
    Built,
    backend_names,
    get_backend,
)
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.plan import LayerPlan
from lowbit.compiler.core.recipe import PassSpec, Recipe


def _recipe(*passes: PassSpec) -> Recipe:
    return Recipe("r", "", list(passes), {"samples": 1, "seq_len": 8}, {"samples": 1, "seq_len": 8})


def test_installed_backends_are_found_by_name_and_alias():
    assert {"onnxruntime", "tvm"} <= set(backend_names())
    ort = get_backend("onnxruntime")
    assert ort.name == "onnxruntime" and ort.lowering == "lower-ort" and ort.measures_latency
    assert type(get_backend("ort")) is type(ort)
    assert type(get_backend(None)) is type(ort)  # the default
    assert get_backend(ort) is ort  # an instance is taken as is
    tvm = get_backend("tvm")  # found without TVM installed: the module imports TVM only when building
    assert tvm.name == "tvm" and tvm.lowering == "lower-tvm" and not tvm.measures_latency


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(InputError, match=r"unknown backend 'cuda' \(known: onnxruntime \(ort\), tvm\)"):
        get_backend("cuda")


def test_a_registered_backend_is_found(monkeypatch, tmp_path):
    monkeypatch.setattr(backend_mod, "_REGISTRY", {})

    @backend_mod.register_backend
    class Null(Backend):
        name = "null"
        aliases = ("none",)

        def build(self, model, folder, options, *, threads=None):
            return Built({"kind": "null"}, None, "nothing to run")

        def load(self, folder, *, threads=None):
            return folder

    assert type(get_backend("null")) is Null and type(get_backend("none")) is Null
    assert "null" in backend_names()
    with pytest.raises(ValueError, match="already registered"):
        backend_mod.register_backend(type("Other", (Null,), {"name": "null"}))
    assert get_backend("none").load(tmp_path) == tmp_path


def test_options_a_backend_does_not_take_fail_early():
    ort = get_backend("ort")
    ort.check(BackendOptions())  # the defaults are no flags
    with pytest.raises(InputError, match="--tune, --tune-seq-len and --tuning-db apply to --backend tvm only"):
        ort.check(BackendOptions(tune=4))
    with pytest.raises(InputError, match="--target and --arch apply to --backend tvm only"):
        ort.check(BackendOptions(target="cuda"))
    with pytest.raises(InputError, match="--target and --arch"):
        ort.check(BackendOptions(arch="sm_90"))
    assert BackendOptions(tune=2, tuning_db="db").given() == ["tune", "tuning_db"]


def test_prepare_recipe_swaps_the_lowering_and_keeps_shared_options():
    tvm, ort = get_backend("tvm"), get_backend("ort")
    recipe = _recipe(PassSpec("canonicalize", {}),
                     PassSpec("lower-ort", {"token_zero_point": "per-token", "w4a8_kernel": "int8-gemm"}))
    tvm.prepare_recipe(recipe)
    assert [(p.name, p.options) for p in recipe.passes][-1] == ("lower-tvm", {"token_zero_point": "per-token"})
    tvm.prepare_recipe(recipe)  # already the backend's: unchanged
    assert recipe.passes[-1].name == "lower-tvm"
    ort.prepare_recipe(recipe)  # and back
    assert (recipe.passes[-1].name, recipe.passes[-1].options) == ("lower-ort", {"token_zero_point": "per-token"})

    plain = _recipe(PassSpec("canonicalize", {}))
    ort.prepare_recipe(plain)  # ONNX Runtime runs a float model as it is
    assert [p.name for p in plain.passes] == ["canonicalize"]
    with pytest.raises(InputError, match="has no lowering pass .* for --backend tvm"):
        tvm.prepare_recipe(plain)


W8A8 = LayerPlan(precision="w8a8")
REFUSED_BY_TVM = {
    "w4a8 per group": LayerPlan(precision="w4a8", group_size=32, weight_algorithm="rtn"),
    "w4a8 per channel": LayerPlan(precision="w4a8"),
    "w8a8 per group": LayerPlan(precision="w8a8", group_size=128),
    "w8a8 asymmetric": LayerPlan(precision="w8a8", symmetric=False),
}
RUN_BY_TVM = {
    "fp32": LayerPlan(precision="fp32"),
    "w8a8": W8A8,
    "w8a8 static": LayerPlan(precision="w8a8", activations="static"),
    "w8a16": LayerPlan(precision="w8a16"),
    "w4a16 per group": LayerPlan(precision="w4a16", group_size=32),
    "w4a16 asymmetric": LayerPlan(precision="w4a16", group_size=128, symmetric=False),
}


@pytest.mark.parametrize("what", sorted(REFUSED_BY_TVM))
def test_tvm_refuses_int8_activations_without_symmetric_per_channel_int8_weights(what):
    reason = get_backend("tvm").supports(REFUSED_BY_TVM[what])
    assert reason is not None and "symmetric per-channel int8 weights" in reason
    assert get_backend("ort").supports(REFUSED_BY_TVM[what]) is None  # ONNX Runtime runs every plan


@pytest.mark.parametrize("what", sorted(RUN_BY_TVM))
def test_tvm_runs_weight_only_and_int8_layers(what):
    assert get_backend("tvm").supports(RUN_BY_TVM[what]) is None
