import dataclasses
import textwrap

import pytest

from lowbit.compiler.core.errors import InputError, OptionError
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


# --------------------------------------------------------------------------- typed options


def test_options_come_from_the_options_dataclass_with_help_from_field_metadata():
    from lowbit.passes.smooth import SmoothActivationsPass, SmoothOptions

    assert SmoothActivationsPass.Options is SmoothOptions
    opts = {o.name: o for o in pass_options(SmoothActivationsPass)}
    assert list(opts) == [f.name for f in dataclasses.fields(SmoothOptions)]
    assert (opts["min_gain"].type, opts["min_gain"].default) == ("float", 0.0)
    assert (opts["alpha_grid"].type, opts["alpha_grid"].default) == ("list[float] | None", None)
    help_text = dataclasses.fields(SmoothOptions)[-1].metadata["help"]
    assert opts["min_gain"].help == help_text and "lowers the simulated output error" in help_text
    assert "Options:\n" not in (SmoothActivationsPass.__doc__ or "")  # not parsed from the docstring any more


def test_a_value_of_the_wrong_type_names_pass_option_value_and_type():
    with pytest.raises(OptionError, match=r"^pass 'smooth': option 'min_gain' = 'quarter' is not a float$"):
        instantiate("smooth", {"min_gain": "quarter"})
    with pytest.raises(InputError, match=r"^pass 'smooth': option 'alpha' = 'half' is not a float or None$"):
        instantiate("smooth", {"alpha": "half"})
    with pytest.raises(InputError, match=r"^pass 'smooth': option 'alpha_grid' = \[0.2, 'x'\] is not a list of floats or None$"):
        instantiate("smooth", {"alpha_grid": [0.2, "x"]})
    with pytest.raises(InputError, match=r"^pass 'plan': option 'exclude' = 'lm_head' is not a list of strings or None$"):
        instantiate("plan", {"exclude": "lm_head"})
    with pytest.raises(InputError, match=r"^pass 'fold-norms': option 'norms' = 'yes' is not a bool$"):
        instantiate("fold-norms", {"norms": "yes"})


def test_bool_is_neither_an_int_nor_a_float_but_an_int_is_a_float():
    with pytest.raises(InputError, match=r"^pass 'plan': option 'group_size' = True is not an int$"):
        instantiate("plan", {"group_size": True})
    with pytest.raises(InputError, match=r"^pass 'smooth': option 'min_gain' = False is not a float$"):
        instantiate("smooth", {"min_gain": False})
    smooth = instantiate("smooth", {"min_gain": 0, "alpha": None, "alpha_grid": [0, 0.5]})
    assert (smooth.min_gain, smooth.alpha, smooth.alpha_grid) == (0, None, [0, 0.5])


def test_direct_construction_checks_types_and_values_too():
    from lowbit.passes.smooth import SmoothActivationsPass

    with pytest.raises(OptionError, match=r"^pass 'smooth': option 'max_rows' = '512' is not an int$"):
        SmoothActivationsPass(max_rows="512")
    with pytest.raises(OptionError, match=r"^pass 'smooth': option 'min_gain' = 1.0 must be in \[0, 1\)$") as e:
        SmoothActivationsPass(min_gain=1.0)
    assert (e.value.pass_name, e.value.option, e.value.value) == ("smooth", "min_gain", 1.0)
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do
    with pytest.raises(TypeError, match="has no option 'nope'"):
        SmoothActivationsPass(nope=1)


def test_options_are_frozen_and_mirrored_as_attributes():
    from lowbit.passes.plan import PlanOptions

    plan = PlanUniformPass(precision="w4a16", group_size=32, exclude=None)
    assert isinstance(plan.config, PlanOptions) and plan.precision == "w4a16" and plan.group_size == 32
    assert plan.exclude == [] and plan.config.exclude == []  # normalised once, as before
    assert plan.options()["exclude"] == [] and list(plan.options()) == [f.name for f in dataclasses.fields(PlanOptions)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.config.precision = "w8a8"


def test_a_value_check_names_pass_option_and_value():
    with pytest.raises(InputError, match=r"^pass 'quantize-weights': option 'gptq_percdamp' = 1.5 must be in \[0, 1\)$"):
        instantiate("quantize-weights", {"gptq_percdamp": 1.5})
    with pytest.raises(InputError, match=r"^pass 'lower-ort': option 'w4a8_kernel' = 'fast' must be 'nbits' or 'int8-gemm'$"):
        instantiate("lower-ort", {"w4a8_kernel": "fast"})
    with pytest.raises(InputError, match=r"^pass 'plan': option 'precision' = 'int3' is refused: unknown precision 'int3'"):
        instantiate("plan", {"precision": "int3"})
    with pytest.raises(InputError, match=r"^pass 'plan-mixed': option 'budget' = '5parsecs' is refused: .*unknown unit"):
        instantiate("plan-mixed", {"budget": "5parsecs"})


def test_third_party_passes_without_an_options_dataclass_keep_working():
    opts = pass_options(InsertIdentityPass)
    assert [(o.name, o.type, o.default, o.help) for o in opts] == [("label", "str", "inserted_by_plugin", "")]
    spec = "tests.compiler.custom_passes:InsertIdentityPass"
    assert instantiate(spec, {"label": "x"}).label == "x"
    with pytest.raises(InputError, match=r"^pass '.*InsertIdentityPass': option 'label' = 3 is not a string$"):
        instantiate(spec, {"label": 3})
