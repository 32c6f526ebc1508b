import textwrap

import pytest
from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.registry import (
    all_passes,
    instantiate,
    pass_options,
    resolve_pass,
)
from lowbit.passes.plan import PlanUniformPass

from tests.compiler.custom_passes import InsertIdentityPass


def test_builtin_names_and_options():
    passes = all_passes()
    for name in ("canonicalize", "recognize", "calibrate", "plan", "quantize-weights", "lower-ort"):
        assert name in passes
    opts = {o.name: o for o in pass_options(PlanUniformPass)}
    assert opts["precision"].default == "w8a8"
    assert "per-token" in opts["activations"].help


def test_dotted_path():
    assert resolve_pass("tests.compiler.custom_passes:InsertIdentityPass") is InsertIdentityPass
    with pytest.raises(InputError, match="not a pass class"):
        resolve_pass("tests.compiler.custom_passes:NotAPass")
    with pytest.raises(InputError, match="cannot import pass"):
        resolve_pass("tests.compiler.nowhere:X")


def install_entry_point(tmp_path, monkeypatch, name="plugin-identity"):
    """Install a distribution (dist-info on sys.path) that declares a lowbit.passes entry point."""
    dist = tmp_path / "lowbit_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lowbit-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""
        [lowbit.passes]
        {name} = tests.compiler.custom_passes:InsertIdentityPass
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point(tmp_path, monkeypatch):
    install_entry_point(tmp_path, monkeypatch)
    assert resolve_pass("plugin-identity") is InsertIdentityPass
    assert "plugin-identity" in all_passes()


def test_unknown_pass_and_option():
    with pytest.raises(InputError, match="unknown pass 'nope'"):
        resolve_pass("nope")
    with pytest.raises(InputError, match="pass 'plan' has no option 'alpha'"):
        instantiate("plan", {"alpha": 1})
    with pytest.raises(InputError, match="unknown activation mode 'sometimes'"):
        instantiate("plan", {"activations": "sometimes"})
