"""Bad inputs, many of them generated: each one fails ``lowbit compile`` cleanly.

The contract every case checks (``fails``): a non-zero exit, exactly one line on stderr and it
starts ``lowbit: error:``, no traceback, no artifact at OUT and no ``.OUT.tmp-*`` beside it.
Most cases fail before the model is loaded (a recipe, a flag, a data file) or right after (an
ONNX file mutated from a small MLP), so the suite runs in well under a minute; three load
stories260K or a tiny Llama (an override glob matching no layer, a NaN weight, a pickle).

The CLI runs in-process (``main`` with stderr captured); ``--quiet`` keeps progress lines out.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import string
import struct
import textwrap
import uuid
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from lowbit.compiler.cli import main
from lowbit.compiler.core.registry import pass_options, resolve_pass
from tests.graphs import mlp

#: examples per generated test: few, to keep the suite fast; LOWBIT_FUZZ_EXAMPLES=500 hunts for more
FEW = settings(max_examples=int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", 12)), deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PRINTABLE = string.ascii_letters + string.digits + " ._-*?[]=:/%+"


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``lowbit ARGV`` in this process: (exit status, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, err.getvalue()


def fails(model, out: Path, *args: str, contains: str | None = None) -> str:
    """Compile ``model`` into ``out``: the one-line error (checked as the module docstring says)."""
    code, err = run_cli(["-q", "compile", str(model), "-o", str(out), "--no-latency", *map(str, args)])
    lines = err.strip().splitlines()
    assert code not in (0, None), f"compile succeeded: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    assert not out.exists(), "a partial artifact was left"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")] == []
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


def fresh(tmp_path: Path) -> Path:
    """An output path not used before (hypothesis runs a test body many times in one tmp_path)."""
    return tmp_path / f"out-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_proto() -> onnx.ModelProto:
    return ir.to_proto(mlp())


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory, base_proto) -> Path:
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(base_proto, str(path))
    return path


@pytest.fixture(scope="module")
def stories(shared_dir) -> Path:
    return shared_dir / "stories260K" / "stories260K.bin"


@pytest.fixture
def nowhere(tmp_path) -> Path:
    """A model path that does not exist: a compile given it fails at load, after every earlier check."""
    return tmp_path / "missing.onnx"


NOT_FOUND = "ONNX file not found"


# --------------------------------------------------------------------------- model sources
def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _config(tmp: Path, config) -> Path:
    _write(tmp / "hf" / "config.json", config if isinstance(config, str) else json.dumps(config))
    return tmp / "hf"


def _llama2c_v2(tmp: Path) -> Path:
    header = struct.pack("<Ii", 0x616B3432, 2) + struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512)
    return _write(tmp / "v2.bin", header.ljust(256, b"\0") + bytes(100))


def _two_ggufs(tmp: Path) -> Path:
    _write(tmp / "g" / "a.gguf", b"GGUF")
    _write(tmp / "g" / "b.gguf", b"GGUF")
    return tmp / "g"


SOURCES = {
    "missing path": (lambda tmp: tmp / "nothing-here.bin", "model source not found"),
    "empty folder": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "neither config.json nor a .gguf"),
    "unknown model_type": (lambda tmp: _config(tmp, {"model_type": "gpt9"}), "unsupported architecture 'gpt9'"),
    "config.json not JSON": (lambda tmp: _config(tmp, "{model_type: llama"), "cannot read"),
    "config.json a list": (lambda tmp: _config(tmp, [1, 2]), "is not a JSON object"),
    "config.json without model_type": (lambda tmp: _config(tmp, {"architectures": ["LlamaForCausalLM"]}),
                                       "has no model_type"),
    "config.json architectures not a list": (lambda tmp: _config(tmp, {"model_type": "llama", "architectures": 3}),
                                             "is not a list of strings"),
    "llama config without weights": (lambda tmp: _config(tmp, {"model_type": "llama"}), "cannot load a Llama checkpoint"),
    "text file as .bin": (lambda tmp: _write(tmp / "notes.bin", "not a checkpoint at all, just some notes\n" * 3),
                          "not a llama2.c checkpoint"),
    "empty .bin": (lambda tmp: _write(tmp / "empty.bin", b""), "not a llama2.c checkpoint"),
    "llama2.c version 2": (_llama2c_v2, "version 2 is not supported"),
    "garbage .gguf": (lambda tmp: _write(tmp / "x.gguf", bytes(range(256))), "cannot read GGUF file"),
    "two .gguf files": (_two_ggufs, "several .gguf files"),
    "unsupported suffix": (lambda tmp: _write(tmp / "model.txt", "hello"), "unsupported model source"),
    "folder named .onnx": (lambda tmp: (tmp / "d.onnx").mkdir() or tmp / "d.onnx", "is a folder"),
}


@pytest.mark.parametrize("case", SOURCES)
def test_bad_model_source(case, tmp_path):
    make, expected = SOURCES[case]
    fails(make(tmp_path), tmp_path / "out", contains=expected)


def test_truncated_llama2c_checkpoint(stories, tmp_path):
    cut = _write(tmp_path / "cut.bin", stories.read_bytes()[:5000])
    fails(cut, tmp_path / "out", contains="truncated")


# --------------------------------------------------------------------------- mutated ONNX protos
def _mutate(proto: onnx.ModelProto, change) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    change(m)
    return m


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _set_weight(m, name, array):
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(array, name))


def _nan_weight(m):
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w2")).copy()
    w[0, :3] = np.nan
    _set_weight(m, "w2", w)


def _inf_weight(m):
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1")).copy()
    w[1, 1] = -np.inf
    _set_weight(m, "w1", w)


def _drop_initializer(m):
    keep = [t for t in m.graph.initializer if t.name != "w1"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


def _unknown_domain_op(m):
    act = _node(m, "act")  # between the two linears up and down
    act.op_type, act.domain = "Weird", "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))


def _no_linear(m):
    for name in ("w1", "w2", "w3"):  # weights become graph inputs: nothing to quantize
        t = next(t for t in m.graph.initializer if t.name == name)
        m.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    keep = [t for t in m.graph.initializer if t.name not in ("w1", "w2", "w3")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


MUTATIONS = {
    "opset newer than onnx": (lambda m: setattr(m.opset_import[0], "version", 99), "opset 99 is newer"),
    "opset too old for its ops": (lambda m: setattr(m.opset_import[0], "version", 12), "not a valid ONNX model"),
    "ir_version from the future": (lambda m: setattr(m, "ir_version", 99), "not a valid ONNX model"),
    "missing initializer": (_drop_initializer, "reads 'w1', which no node, graph input or initializer defines"),
    "a cycle": (lambda m: _node(m, "up").input.__setitem__(0, "hr"), "not acyclic"),
    "unknown op domain in a linear's path": (_unknown_domain_op, "com.example:Weird"),
    "unknown op in a linear's path": (lambda m: setattr(_node(m, "act"), "op_type", "Frobnicate"),
                                      "No Op registered for Frobnicate"),
    "a value produced twice": (lambda m: _node(m, "side").output.__setitem__(0, "h"), "redeclared"),
    "an invalid dtype": (lambda m: setattr(next(t for t in m.graph.initializer if t.name == "w2"), "data_type", 999),
                         "not a valid DataType"),
    "a weight of the wrong shape": (lambda m: _set_weight(m, "w2", np.ones((5, 8), np.float32)), "ShapeInferenceError"),
    "no graph output": (lambda m: m.graph.ClearField("output"), "has no graph"),
    "a graph input removed": (lambda m: m.graph.ClearField("input"), "reads 'x'"),
    "NaN weight": (_nan_weight, "weight 'w2' has 3 NaN values"),
    "infinite weight": (_inf_weight, "weight 'w1' has 1 infinite value"),
    "no linear layer": (_no_linear, "no quantizable linear layer"),
}


@pytest.mark.parametrize("case", MUTATIONS)
def test_mutated_onnx(case, base_proto, tmp_path):
    change, expected = MUTATIONS[case]
    path = tmp_path / "m.onnx"
    onnx.save(_mutate(base_proto, change), str(path))
    fails(path, tmp_path / "out", contains=expected)


@pytest.mark.parametrize("keep", [0, 1, 7, 0.25, 0.5, 0.9])
def test_truncated_onnx_file(keep, mlp_file, tmp_path):
    data = mlp_file.read_bytes()
    path = _write(tmp_path / "cut.onnx", data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    fails(path, tmp_path / "out")


def test_text_file_named_onnx(tmp_path):
    fails(_write(tmp_path / "notes.onnx", "these are my notes, not a model\n"), tmp_path / "out", contains="notes.onnx")


@FEW
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes_fail_cleanly_or_compile(flips, mlp_file, tmp_path):
    """Random bytes changed: a clean one-line error, or (a harmless byte: a name, a weight's low bits) an artifact."""
    data = bytearray(mlp_file.read_bytes())
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    path = _write(tmp_path / f"{uuid.uuid4().hex[:8]}.onnx", bytes(data))
    out = fresh(tmp_path)
    code, err = run_cli(["-q", "compile", str(path), "-o", str(out), "--no-latency"])
    assert "Traceback" not in err
    if code == 0:  # then verified, with numbers that mean something
        accuracy = json.loads((out / "manifest.json").read_text())["accuracy"]
        assert all(np.isfinite(v) for v in accuracy.values() if isinstance(v, float)), accuracy
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
        assert not out.exists()


# --------------------------------------------------------------------------- external data: never read outside
@pytest.fixture
def external(tmp_path):
    """An MLP saved with external data in its own folder, a secret file beside the folder, and a way to point
    the initializers' data elsewhere."""
    folder = tmp_path / "model"
    folder.mkdir()
    ir.save(mlp(), folder / "mlp.onnx", external_data="mlp.onnx.data", size_threshold_bytes=0)
    secret = _write(tmp_path / "secret.bin", bytes(100_000))  # large enough for every offset

    def pointing_to(location: str) -> Path:
        proto = onnx.load(str(folder / "mlp.onnx"), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(proto, str(folder / "evil.onnx"))
        return folder / "evil.onnx"

    return folder, secret, pointing_to


def _opened(monkeypatch) -> list[str]:
    """Record every path opened through Python (builtins.open, io.open, os.open)."""
    seen: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **kw):
        seen.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_open(file, *a, **kw)

    def spy_os_open(path, *a, **kw):
        seen.append(os.path.realpath(path))
        return real_os_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


@pytest.mark.parametrize("how", ["relative ../", "deep ../../../../", "absolute", "symlink inside the folder"])
def test_external_data_outside_the_model_folder_is_refused_unread(how, external, tmp_path, monkeypatch):
    folder, secret, pointing_to = external
    if how == "relative ../":
        location = "../secret.bin"
    elif how == "deep ../../../../":
        location = "../" * 4 + str(secret).lstrip("/")  # climbs past / and back down to the secret
    elif how == "absolute":
        location = str(secret)
    else:
        (folder / "link.bin").symlink_to(secret)
        location = "link.bin"
    model = pointing_to(location)
    st0 = secret.stat()
    os.utime(secret, (st0.st_mtime - 1000, st0.st_mtime))  # atime before mtime: even relatime records a read
    before = secret.stat().st_atime_ns
    opened = _opened(monkeypatch)
    fails(model, tmp_path / "out", contains="leaves the model's folder")
    monkeypatch.undo()
    assert str(secret.resolve()) not in opened
    assert secret.stat().st_atime_ns == before


def test_passwd_path_escape_is_one_line(external, tmp_path):
    _, _, pointing_to = external
    err = fails(pointing_to("../../../../etc/passwd"), tmp_path / "out")
    assert "'../../../../etc/passwd'" in err and "leaves the model's folder" in err


def test_missing_and_truncated_external_data(external, tmp_path):
    folder, _, pointing_to = external
    fails(pointing_to("gone.data"), tmp_path / "out", contains="missing external data file 'gone.data'")
    _write(folder / "short.data", bytes(10))
    fails(pointing_to("short.data"), tmp_path / "out", contains="is truncated")


# --------------------------------------------------------------------------- NaN weights of an exported model
def test_nan_weight_of_a_llama2c_checkpoint_names_the_torch_parameter(stories, tmp_path):
    from lowbit.models.llama2c import read_header

    header, offset = read_header(stories)
    for name, shape in header.shapes():  # the legacy layout: arrays in file order
        if name == "w2":
            break
        offset += 4 * int(np.prod(shape))
    data = bytearray(stories.read_bytes())
    for i in (0, 5, 17):  # three values of layer 0's w2 (down_proj)
        data[offset + 4 * i : offset + 4 * i + 4] = np.float32(np.nan).tobytes()
    folder = tmp_path / "nan"
    folder.mkdir()
    (folder / "tok512.bin").write_bytes((stories.parent / "tok512.bin").read_bytes())
    (folder / "stories260K.bin").write_bytes(bytes(data))
    err = fails(folder / "stories260K.bin", tmp_path / "out")
    assert "weight 'model.layers.0.mlp.down_proj.weight_t' (torch parameter 'model.layers.0.mlp.down_proj.weight') " \
           "has 3 NaN values" in err


# --------------------------------------------------------------------------- Hugging Face pickles
class _Marker:
    """Unpickled, it would create the marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("form", ["plain pickle", "torch.save zip"])
def test_malicious_pickle_is_never_unpickled(form, tiny_llama, tmp_path):
    import pickle

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama / "config.json").read_text())
    marker = tmp_path / "MARKER"
    if form == "plain pickle":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    else:  # real weights, plus one entry that runs code
        weights = dict(load_file(str(tiny_llama / "model.safetensors")))
        torch.save({**weights, "evil": _Marker(str(marker))}, str(folder / "pytorch_model.bin"))
    err = fails(folder, tmp_path / "out", contains="pytorch_model.bin")
    assert "not a plain weights file" in err and "never runs code" in err
    assert not marker.exists()


def test_corrupt_safetensors(tiny_llama, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    fails(folder, tmp_path / "out", contains="cannot load a Llama checkpoint")


def test_language_model_without_a_tokenizer(tiny_llama, tmp_path):
    fails(tiny_llama, tmp_path / "out", contains="no tokenizer was found")


# --------------------------------------------------------------------------- recipes
RECIPES = {
    "not TOML": ("[[passes]\npass = ", "not valid TOML"),
    "not UTF-8": (b"\xff\xfe\x00[[passes]]", "not valid TOML"),
    "passes not tables": ("passes = [1, 2]\n", "entry 1 is 1, not a table"),
    "pass name not a string": ('[[passes]]\npass = 3\n', "entry 1 has no 'pass' name"),
    "no passes": ('name = "x"\n', "non-empty [[passes]] list"),
    "unknown pass": ('[[passes]]\npass = "canonicalize"\n[[passes]]\npass = "frobnicate"\n',
                     "[[passes]] entry 2 ('frobnicate'): unknown pass"),
    "empty module path": ('[[passes]]\npass = ":X"\n', "absolute dotted path"),
    "relative module path": ('[[passes]]\npass = ".rel:X"\n', "absolute dotted path"),
    "module without the class": ('[[passes]]\npass = "tests.compiler.custom_passes:Nope"\n', "has no attribute 'Nope'"),
    "not a pass class": ('[[passes]]\npass = "os:getcwd"\n', "is not a pass class"),
    "calibration samples 0": ('[calibration]\nsamples = 0\n[[passes]]\npass = "canonicalize"\n', "must be at least 1"),
    "misspelt calibration key": ('[calibration]\nsampels = 4\n[[passes]]\npass = "canonicalize"\n', "has no key 'sampels'"),
    "evaluation seq_len 1": ('[evaluation]\nseq_len = 1\n[[passes]]\npass = "canonicalize"\n', "must be at least 2"),
    "name not a string": ('name = 5\n[[passes]]\npass = "canonicalize"\n', "name = 5 is not a string"),
    "unknown top-level key": ('passs = 1\n[[passes]]\npass = "canonicalize"\n', "unknown top-level keys"),
    "wrong option type": ('[[passes]]\npass = "smooth"\nmin_gain = "quarter"\n', "option 'min_gain' = 'quarter' is not a float"),
}


@pytest.mark.parametrize("case", RECIPES)
def test_bad_recipe_fails_before_loading(case, tmp_path, nowhere):
    text, expected = RECIPES[case]
    recipe = _write(tmp_path / "r.toml", text)
    fails(nowhere, tmp_path / "out", "--recipe", recipe, contains=expected)  # the recipe's error, not "not found"


def test_recipe_folder(tmp_path, nowhere):
    fails(nowhere, tmp_path / "out", "--recipe", tmp_path, contains="no recipe")


@pytest.mark.parametrize("raises", ["RuntimeError('boom')", "SystemExit(3)", "ImportError('needs libfoo')"])
def test_pass_module_raising_at_import_names_the_recipe_entry(raises, tmp_path, nowhere, monkeypatch):
    module = f"my_mod_{uuid.uuid4().hex[:8]}"
    _write(tmp_path / "site" / f"{module}.py", f"raise {raises}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    recipe = _write(tmp_path / "x.toml", '[[passes]]\npass = "canonicalize"\n[[passes]]\npass = "recognize"\n'
                                         f'[[passes]]\npass = "{module}:MyPass"\n')
    err = fails(nowhere, tmp_path / "out", "--recipe", recipe)
    kind = raises.partition("(")[0]
    assert err.startswith(f"lowbit: error: recipe {recipe}, [[passes]] entry 3 ('{module}:MyPass'): "
                          f"importing {module} failed: {kind}")
    if kind == "RuntimeError":
        assert err.endswith("RuntimeError: boom")


def test_pass_constructor_raising(tmp_path, nowhere, monkeypatch):
    _write(tmp_path / "site" / "ctor_mod.py", textwrap.dedent("""
        import onnx_ir as ir
        class P(ir.passes.InPlacePass):
            def __init__(self):
                raise RuntimeError("no way")
            def call(self, model):
                return ir.passes.PassResult(model, False)
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    recipe = _write(tmp_path / "c.toml", '[[passes]]\npass = "ctor_mod:P"\n')
    fails(nowhere, tmp_path / "out", "--recipe", recipe, contains="creating it failed: RuntimeError: no way")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if abs(value) == float("inf") else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


OPTIONED = ["plan", "smooth", "calibrate", "rotate", "quantize-weights", "fold-norms", "plan-mixed"]
_values = st.one_of(st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(PRINTABLE, max_size=12), st.lists(st.one_of(st.integers(-9, 9), st.text(PRINTABLE, max_size=5)),
                                                             max_size=3))


@FEW
@given(data=st.data())
def test_random_recipe_values(data, tmp_path):
    """A random value for a random option: refused naming the pass (its type or value is wrong), or accepted
    (then the compile goes on to the model, which does not exist)."""
    name = data.draw(st.sampled_from(OPTIONED))
    opt = data.draw(st.sampled_from([o.name for o in pass_options(resolve_pass(name))]))
    value = data.draw(_values)
    recipe = _write(tmp_path / f"{uuid.uuid4().hex[:8]}.toml", f'[[passes]]\npass = "{name}"\n{opt} = {_toml(value)}\n')
    err = fails(tmp_path / "missing.onnx", fresh(tmp_path), "--recipe", recipe)
    assert f"pass '{name}'" in err or "--override" in err or NOT_FOUND in err, err


@FEW
@given(text=st.text(max_size=80))
def test_random_recipe_text(text, tmp_path):
    recipe = _write(tmp_path / f"{uuid.uuid4().hex[:8]}.toml", text)
    fails(tmp_path / "missing.onnx", fresh(tmp_path), "--recipe", recipe)


# --------------------------------------------------------------------------- --set, --override, budgets
@FEW
@given(setting=st.text(PRINTABLE, max_size=30))
def test_random_set(setting, tmp_path):
    err = fails(tmp_path / "missing.onnx", fresh(tmp_path), f"--set={setting}")
    assert "--set" in err or "pass '" in err or NOT_FOUND in err, err


@FEW
@given(item=st.one_of(st.text(PRINTABLE, max_size=30),
                      st.tuples(st.text(PRINTABLE, max_size=10), st.text(string.ascii_lowercase + string.digits + "-", max_size=9))
                      .map("=".join)))
def test_random_override(item, tmp_path):
    """Syntax and precision are checked before the model is loaded; a well-formed item then reaches the model."""
    err = fails(tmp_path / "missing.onnx", fresh(tmp_path), f"--override={item}")
    assert "--override" in err or NOT_FOUND in err, err


def test_override_glob_matching_no_layer_fails_before_any_pass(stories, tmp_path):
    dump = tmp_path / "dump"
    err = fails(stories, tmp_path / "out", "--override", "nomatch.*=fp32", "--dump-ir", dump)
    assert "--override 'nomatch.*=fp32': no layer matches 'nomatch.*'" in err and "36 layers" in err
    assert not dump.exists()  # no pass ran


def test_override_glob_matching_no_layer_of_an_onnx_model(mlp_file, tmp_path):
    dump = tmp_path / "dump"
    fails(mlp_file, tmp_path / "out", "--override", "up=fp32", "--override", "middle=w8a8", "--dump-ir", dump,
          contains="no layer matches 'middle'")
    assert not dump.exists()


FLAGS = {
    "override: unknown precision": (["--override", "model.layers.*=w3a8"], "unknown precision 'w3a8'"),
    "override: no '='": (["--override", "model.layers.0"], "expected LAYER_GLOB=PRECISION"),
    "override: empty glob": (["--override", "=fp32"], "expected LAYER_GLOB=PRECISION"),
    "override: groups outside mixed": (["--override", "x=w4a16-g32"], "unknown precision 'w4a16-g32'"),
    "override: bad group (mixed)": (["--recipe", "mixed", "--override", "x=w4a16-g7"], "power of two"),
    "override: static activations": (["--recipe", "w8a8-static", "--override", "x=w4a8"], "static activations"),
    "budget without a unit": (["--recipe", "mixed", "--budget", "5"], "expected a number and a unit"),
    "budget of 0 bits": (["--recipe", "mixed", "--budget", "0bits"], "must be in (0, 32]"),
    "budget overflowing": (["--recipe", "mixed", "--budget", "1e400MB"], "out of range"),
    "budget without plan-mixed": (["--budget", "5bits"], "needs a recipe with a plan-mixed pass"),
    "latency budget NaN": (["--recipe", "mixed", "--budget-latency", "nan"], "positive, finite"),
    "latency budget 0x": (["--recipe", "mixed", "--budget-latency", "0x"], "positive, finite"),
    "latency budget words": (["--recipe", "mixed", "--budget-latency", "half"], "expected a fraction"),
    "max-kl negative": (["--recipe", "mixed", "--max-kl", "-1"], "option 'max_kl'"),
    "max-kl infinite": (["--recipe", "mixed", "--max-kl", "inf"], "finite"),
    "max-kl not a number": (["--recipe", "mixed", "--max-kl", "abc"], "invalid float value: 'abc'"),
    "max-ppl-increase NaN": (["--recipe", "mixed", "--max-ppl-increase", "nan"], "finite"),
    "max-ppl-increase negative": (["--recipe", "mixed", "--max-ppl-increase=-1%"], "not negative"),
    "max-kl with a budget": (["--recipe", "mixed", "--max-kl", "0.1", "--budget", "5bits"], "does not combine"),
    "max-drop not a number": (["--max-drop", "abc"], "expected a fraction or a percentage"),
    "unknown backend": (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments"),
    "set without a value": (["--set", "plan.precision"], "expected PASS.OPTION=VALUE"),
    "set of an unknown pass": (["--set", "nosuch.x=1"], "has no pass 'nosuch'"),
    "set of an unknown data key": (["--set", "calibration.sampels=4"], "has no key 'sampels'"),
}


@pytest.mark.parametrize("case", FLAGS)
def test_bad_flag_fails_before_loading(case, tmp_path, nowhere):
    args, expected = FLAGS[case]
    fails(nowhere, tmp_path / "out", *args, contains=expected)


def test_override_needs_a_planner(tmp_path, nowhere):
    recipe = _write(tmp_path / "noplan.toml", '[[passes]]\npass = "canonicalize"\n')
    fails(nowhere, tmp_path / "out", "--recipe", recipe, "--override", "x=fp32", contains="needs a 'plan' pass")


# --------------------------------------------------------------------------- data files, tokenizers, output
def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _nan_npz(tmp: Path) -> Path:
    x = np.random.default_rng(0).standard_normal((10, 4, 8)).astype(np.float32)
    x[3, 1, 2] = np.nan
    return _npz(tmp / "nan.npz", x=x)


DATA = {
    "missing file": (lambda tmp: tmp / "nope.txt", "does not exist"),
    "a folder": (lambda tmp: tmp, "is a folder"),
    "binary with NUL bytes": (lambda tmp: _write(tmp / "b.txt", b"\x00\x01\x02\x03" * 100), "holds NUL bytes"),
    "not UTF-8": (lambda tmp: _write(tmp / "l1.txt", "caf\xe9 cr\xe8me".encode("latin-1") * 50), "not UTF-8"),
    "empty": (lambda tmp: _write(tmp / "e.txt", "  \n\n"), "is empty"),
    "NaN in an .npz": (_nan_npz, "calibration batch 3: input 'x' contains NaN"),
    "corrupt .npz": (lambda tmp: _write(tmp / "c.npz", b"PK\x03\x04garbage"), "cannot read input arrays"),
    ".npz arrays of different lengths": (lambda tmp: _npz(tmp / "m.npz", x=np.zeros((3, 2, 8), np.float32),
                                                          y=np.zeros((4, 2), np.float32)), "first (sample) dimension"),
}


@pytest.mark.parametrize("case", DATA)
def test_bad_calibration_data_fails_before_loading(case, tmp_path, nowhere):
    make, expected = DATA[case]
    fails(nowhere, tmp_path / "out", "--calib-data", make(tmp_path), contains=expected)


def test_bad_evaluation_data(tmp_path, nowhere):
    fails(nowhere, tmp_path / "out", "--eval-data", tmp_path / "nope.txt", contains="--eval-data")


def test_evaluation_text_shorter_than_a_window(mlp_file, stories, tmp_path):
    """Held-out text too short for one window would leave the artifact unverified: refused (after the quick
    load of an MLP given the stories tokenizer, before any pass)."""
    short = _write(tmp_path / "short.txt", "Once upon a time.")
    fails(mlp_file, tmp_path / "out", "--tokenizer", stories.parent / "tok512.bin", "--eval-data", short,
          contains=f"evaluation data {short} has fewer than 128 tokens")


def test_npz_without_the_model_inputs(mlp_file, tmp_path):
    data = _npz(tmp_path / "z.npz", z=np.zeros((3, 2, 8), np.float32))
    fails(mlp_file, tmp_path / "out", "--calib-data", data, contains="no array for the model's input(s) ['x']")


TOKENIZERS = {
    "missing": (lambda tmp: tmp / "nope", "tokenizer not found"),
    "a text file": (lambda tmp: _write(tmp / "t.txt", "hello"), "not a tokenizer file"),
    "garbage llama2.c tokenizer": (lambda tmp: _write(tmp / "t.bin", bytes(range(256)) * 2), "not a llama2.c tokenizer"),
    "garbage SentencePiece model": (lambda tmp: _write(tmp / "t.model", bytes(range(256))), "not a SentencePiece model"),
}


@pytest.mark.parametrize("case", TOKENIZERS)
def test_bad_tokenizer(case, mlp_file, tmp_path):
    make, expected = TOKENIZERS[case]
    fails(mlp_file, tmp_path / "out", "--tokenizer", make(tmp_path), contains=expected)


def test_dump_ir_is_a_file(mlp_file, tmp_path):
    fails(mlp_file, tmp_path / "out", "--dump-ir", mlp_file, contains="--dump-ir")


def test_output_below_a_file(mlp_file, tmp_path):
    blocker = _write(tmp_path / "a-file", "x")
    code, err = run_cli(["-q", "compile", str(mlp_file), "-o", str(blocker / "out"), "--no-latency"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("lowbit: error: ")
    assert blocker.read_text() == "x"
