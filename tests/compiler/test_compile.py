"""End to end: compile real and small models, run, inspect, and fail cleanly on bad input."""

from __future__ import annotations

import io
import json
import re
import sys
import textwrap
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit.compiler.cli import main
from lowbit.compiler.core.artifact import verify_files
from lowbit.compiler.core.evaluate import greedy
from tests.cli_support import cli_error
from tests.compiler.core.test_registry import install_entry_point
from tests.graphs import mlp

LILY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def stories(shared_dir):
    return shared_dir / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def tinystories(shared_dir):
    return shared_dir.parent / "data" / "tinystories.txt"


@pytest.fixture(scope="module")
def artifact(stories, tinystories, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "stories-w8a8"
    code = main(["--quiet", "compile", str(stories), "-o", str(out), "--recipe", "w8a8", "--calib-data", str(tinystories)])
    assert code == 0
    return out


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


def test_stories_w8a8_keeps_accuracy_and_generation(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    acc = m["accuracy"]
    assert acc["generation"]["matching_prefix"] == 32
    assert acc["perplexity_increase"] < 0.005
    assert acc["kl"] < 0.01 and acc["top1_agreement"] > 0.95
    assert acc["tokens"] > 1000 and "tinystories" in acc["source"]
    # every planned linear is int8, lowered to integer kernels
    assert {lp["precision"] for lp in m["plan"]["layers"].values()} == {"w8a8"}
    assert len(m["plan"]["layers"]) == 5 * 7 + 1
    assert m["passes"][-1]["pass"] == "LowerToORTPass" and m["passes"][-1]["modified"]
    assert m["calibration"]["samples"] == 32 and m["calibration"]["tokens"] == 32 * 128
    assert m["inputs"][0] == {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "INT64"}
    assert {"onnx", "onnxruntime", "torch"} <= set(m["versions"])
    assert m["size"]["ratio"] < 0.5
    assert set(m["latency"]) >= {"T=1", "T=128"}
    assert verify_files(artifact) == []
    assert "greedy text after 'Once upon a time': the same 32 tokens as fp32" in (artifact / "summary.txt").read_text()
    gen = acc["generation"]
    assert gen["prompt"] == "Once upon a time" and gen["prompt_tokens"][0] == 1 and len(gen["prompt_tokens"]) > 1
    assert gen["fp32_text"] == gen["text"] and "there was a little girl named Lily" in gen["text"]  # the prompt continued


def test_manifest_layer_table_joins_what_each_pass_recorded(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    layers = m["layers"]
    assert set(layers) == set(m["plan"]["layers"])  # one row per quantized linear (quantize-weights)
    assert all(row["kernel"] for row in layers.values())  # the lowering's kernel, every fused member included
    qkv = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert all(layers[name]["fused_with"] == qkv for name in qkv)  # fuse-linears' group
    assert len({layers[name]["kernel"] for name in qkv}) == 1  # one kernel runs the group
    assert "fused_with" not in layers["model.layers.0.mlp.down_proj"]
    assert list(layers[qkv[0]])[:2] == ["precision", "weight_bits"] and list(layers[qkv[0]])[-2:] == ["fused_with", "kernel"]
    assert m["structure"]["linears"] == 5 * 7 + 1 and qkv in m["structure"]["groups"]
    assert list(m["notes"]) == ["fold-norms", "rotate", "calibrate", "smooth", "quantize-embeddings", "fuse-linears",
                                "lower-ort"]
    assert m["notes"]["lower-ort"]["lowered"] == sum(m["notes"]["lower-ort"]["kernels"].values())


def test_plain_onnxruntime_runs_the_artifact(artifact):
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = ir.load(artifact / "model.onnx").graph
    integer = [n for n in graph if n.op_type in ("MatMulInteger", "MatMulIntegerToFloat")]
    # q/k/v and gate/up each share one integer GEMM (fuse-linears): 4 per block + the LM head
    assert len(integer) == 5 * 4 + 1
    # what stays float is attention (activation x activation), never a constant weight
    assert all(n.inputs[1].const_value is None for n in graph if n.op_type == "MatMul")
    from lowbit.compiler.core.tokenizers import load_tokenizer

    tok = load_tokenizer(artifact / "tokenizer")
    assert tok.decode(greedy(session, [1], 24)).startswith(LILY[:60])


def test_run_and_inspect_commands(artifact, capsys):
    assert main(["run", str(artifact), "--prompt", "Once upon a time", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time, there was a little girl named Lily")
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "perplexity_increase" in out and "LowerToORTPass" in out and "model.layers.0.mlp.down_proj" in out


def test_custom_passes_from_a_recipe_file(stories, tinystories, tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()
    install_entry_point(tmp_path / "site", monkeypatch)
    recipe = tmp_path / "custom.toml"
    recipe.write_text(textwrap.dedent("""
        name = "custom"
        [calibration]
        samples = 4
        [evaluation]
        samples = 2
        [[passes]]
        pass = "canonicalize"
        [[passes]]
        pass = "plugin-identity"
        label = "from_entry_point"
        [[passes]]
        pass = "tests.compiler.custom_passes:InsertIdentityPass"
        label = "from_dotted_path"
        [[passes]]
        pass = "recognize"
        [[passes]]
        pass = "plan"
        [[passes]]
        pass = "quantize-weights"
        [[passes]]
        pass = "lower-ort"
    """))
    dump, out = tmp_path / "dump", tmp_path / "out"
    assert main(["-q", "compile", str(stories), "-o", str(out), "--recipe", str(recipe), "--dump-ir", str(dump),
                 "--calib-data", str(tinystories), "--no-latency"]) == 0
    step2 = {n.name for n in ir.load(dump / "002_InsertIdentityPass.onnx").graph}
    step3 = {n.name for n in ir.load(dump / "003_InsertIdentityPass.onnx").graph}
    assert "from_entry_point" in step2 and "from_dotted_path" not in step2
    assert {"from_entry_point", "from_dotted_path"} <= step3
    assert (dump / "003_InsertIdentityPass.txt").read_text().count("Identity") >= 2
    passes = [e["pass"] for e in json.loads((out / "manifest.json").read_text())["passes"]]
    assert passes[1:3] == ["InsertIdentityPass", "InsertIdentityPass"]


def _error(capsys, argv):
    return cli_error(capsys, argv, stdout_empty=False)


def test_a_pass_that_breaks_the_graph_fails_the_compile(stories, tmp_path, capsys):
    recipe = tmp_path / "broken.toml"
    recipe.write_text('[[passes]]\npass = "canonicalize"\n[[passes]]\npass = "tests.compiler.custom_passes:BreakGraphPass"\n')
    out = tmp_path / "out"
    err = _error(capsys, ["compile", str(stories), "-o", str(out), "--recipe", str(recipe)])
    assert "pass BreakGraphPass failed (after CanonicalizePass): the graph is invalid" in err
    assert not out.exists() and leftovers(tmp_path, "out") == []


def _fails_before_any_pass(capsys, tmp_path, stories, *args):
    """The one-line error of a compile that must stop before loading the model or running a pass."""
    out, dump = tmp_path / "out", tmp_path / "dump"
    err = _error(capsys, ["compile", str(stories), "-o", str(out), "--dump-ir", str(dump), "--no-latency", *args])
    assert not dump.exists()  # no pass ran: the IR dump (written from before the first pass) was never started
    assert not out.exists() and leftovers(tmp_path, "out") == []
    return err


def test_wrong_typed_option_in_a_recipe_fails_before_any_pass_runs(stories, tmp_path, capsys):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('[[passes]]\npass = "canonicalize"\n[[passes]]\npass = "calibrate"\n'
                      '[[passes]]\npass = "smooth"\nmin_gain = "quarter"\n')
    err = _fails_before_any_pass(capsys, tmp_path, stories, "--recipe", str(recipe))
    assert err == "lowbit: error: pass 'smooth': option 'min_gain' = 'quarter' is not a float"


def test_wrong_typed_set_fails_before_any_pass_runs(stories, tmp_path, capsys):
    err = _fails_before_any_pass(capsys, tmp_path, stories, "--set", "smooth.min_gain=quarter")
    assert err == "lowbit: error: pass 'smooth': option 'min_gain' = 'quarter' is not a float"
    err = _fails_before_any_pass(capsys, tmp_path, stories, "--set", "plan.group_size=true")  # a bool is no int
    assert err == "lowbit: error: pass 'plan': option 'group_size' = True is not an int"
    err = _fails_before_any_pass(capsys, tmp_path, stories, "--set", "smooth.min_gain=1.5")  # right type, bad value
    assert err == "lowbit: error: pass 'smooth': option 'min_gain' = 1.5 must be in [0, 1)"


def test_non_integer_calibration_size_fails_naming_section_key_and_value(stories, tmp_path, capsys):
    recipe = tmp_path / "lots.toml"
    recipe.write_text('[calibration]\nsamples = "lots"\n[[passes]]\npass = "canonicalize"\n')
    err = _fails_before_any_pass(capsys, tmp_path, stories, "--recipe", str(recipe))
    assert err.endswith("lots.toml: [calibration] samples = 'lots' is not an int")
    err = _fails_before_any_pass(capsys, tmp_path, stories, "--set", "evaluation.seq_len=long")
    assert err == "lowbit: error: --set evaluation.seq_len: [evaluation] seq_len = 'long' is not an int"


@pytest.fixture
def mlp_onnx(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(mlp(), path)
    return path


def test_small_onnx_model_compiles_with_synthetic_data(mlp_onnx, tmp_path):
    result = lowbit.compile(mlp_onnx, tmp_path / "out", measure_latency=False, progress=False)
    assert result.accuracy["cosine_mean"] > 0.99
    assert result.manifest["calibration"]["source"] == "synthetic (random inputs)"


def test_bad_inputs_get_one_line_errors_and_leave_nothing(mlp_onnx, tmp_path, capsys):
    out = tmp_path / "out"

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mlp_onnx.read_bytes()[:300])
    assert "truncated.onnx" in _error(capsys, ["compile", str(truncated), "-o", str(out)])

    text = tmp_path / "notes.onnx"
    text.write_text("these are my notes, not a model\n")
    assert "notes.onnx" in _error(capsys, ["compile", str(text), "-o", str(out)])

    relu = mlp()
    for n in [n for n in relu.graph if n.op_type == "MatMul"]:
        n.replace_input_with(1, ir.Value(name=f"{n.name}_w_in", shape=n.inputs[1].shape, type=n.inputs[1].type))
        relu.graph.inputs.append(n.inputs[1])
    ir.save(relu, tmp_path / "nolinear.onnx")
    assert "no quantizable linear layer" in _error(capsys, ["compile", str(tmp_path / "nolinear.onnx"), "-o", str(out)])

    x = np.random.default_rng(0).standard_normal((10, 4, 8)).astype(np.float32)
    x[3, 1, 2] = np.nan
    np.savez(tmp_path / "calib.npz", x=x)
    err = _error(capsys, ["compile", str(mlp_onnx), "-o", str(out), "--calib-data", str(tmp_path / "calib.npz")])
    assert "calibration batch 3: input 'x' contains NaN" in err

    zero = mlp()
    w = zero.graph.initializers["w1"]
    arr = w.const_value.numpy().copy()
    arr[:, 0] = 0
    w.const_value = ir.tensor(arr, name="w1")
    ir.save(zero, tmp_path / "zero.onnx")
    assert "all zero" in _error(capsys, ["compile", str(tmp_path / "zero.onnx"), "-o", str(out)])

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "cannot write output" in _error(capsys, ["compile", str(mlp_onnx), "-o", str(blocker / "out")])

    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_nn_module_with_example_inputs(tmp_path):
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    result = lowbit.compile(module, tmp_path / "out", example_inputs={"x": x}, measure_latency=False, progress=False)
    assert len(result.manifest["plan"]["layers"]) == 2
    assert result.accuracy["cosine_mean"] > 0.999


def test_run_with_npz_inputs(mlp_onnx, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["-q", "compile", str(mlp_onnx), "-o", str(out), "--no-latency"]) == 0
    x = np.random.default_rng(5).standard_normal((1, 3, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "y.npz")]) == 0
    assert "y: shape [1, 3, 8]" in capsys.readouterr().out
    y = np.load(tmp_path / "y.npz")["y"]
    ref = ort.InferenceSession(str(mlp_onnx)).run(None, {"x": x})[0]
    assert np.abs(y - ref).max() / np.abs(ref).max() < 0.05
    np.savez(tmp_path / "bad.npz", z=x)
    assert "inputs lack ['x']" in _error(capsys, ["run", str(out), "--inputs", str(tmp_path / "bad.npz")])
    assert "--prompt needs a language model" in _error(capsys, ["run", str(out), "--prompt", "hi"])


def test_artifact_owns_weights_of_an_external_data_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ir.save(mlp(), src / "mlp.onnx", external_data="mlp.onnx.data", size_threshold_bytes=0)
    result = lowbit.compile(src / "mlp.onnx", tmp_path / "out", measure_latency=False, progress=False,
                            settings={"plan.exclude": ["down"]})  # "down" keeps its fp32 weight
    (src / "mlp.onnx.data").unlink()
    session = ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 2, 8), np.float32)})[0].shape == (1, 2, 8)


class _StampedStderr(io.TextIOBase):
    """A stderr that is no terminal and records when each line arrived."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._part = ""

    def write(self, text: str) -> int:
        self._part += text
        while "\n" in self._part:
            line, self._part = self._part.split("\n", 1)
            self.lines.append((time.monotonic(), line))
        return len(text)

    def isatty(self) -> bool:
        return False


def test_progress_lines_name_every_step_and_pass_when_stderr_is_no_terminal(stories, tinystories, tmp_path, monkeypatch):
    from lowbit.compiler.core.recipe import load_recipe

    err = _StampedStderr()
    monkeypatch.setattr(sys, "stderr", err)
    start = time.monotonic()
    assert main(["compile", str(stories), "-o", str(tmp_path / "out"), "--calib-data", str(tinystories), "--no-latency"]) == 0
    lines = [(t, line[len("[lowbit] "):]) for t, line in err.lines if line.startswith("[lowbit] ")]
    text = [line for _, line in lines]
    assert lines[0][0] - start < 5 and text[0].startswith(f"compile {stories} into ")  # before anything slow
    names = [p.name for p in load_recipe("w8a8").passes]
    started = [line for line in text if re.fullmatch(r"pass \d+/\d+ \S+", line)]
    assert started == [f"pass {i}/{len(names)} {name}" for i, name in enumerate(names, 1)]
    # the first line came before the first pass finished (the second began), and the steps around the passes show
    assert text.index(f"pass 2/{len(names)} {names[1]}") > 0
    order = [next(i for i, line in enumerate(text) if line.startswith(prefix))
             for prefix in ("compile ", "recipe w8a8", f"load {stories}", "data: ", "pass 1/", "build: ", "verify: greedy text")]
    assert order == sorted(order)
    assert all(not line.startswith(("\r", "Converting")) for _, line in err.lines)  # no third-party bars in a log


def test_quiet_compile_prints_no_progress(mlp_onnx, tmp_path, capsys):
    assert main(["-q", "compile", str(mlp_onnx), "-o", str(tmp_path / "out"), "--no-latency"]) == 0
    captured = capsys.readouterr()
    assert "[lowbit]" not in captured.err and "[lowbit]" not in captured.out
