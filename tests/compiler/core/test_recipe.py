import pytest

from lowbit.compiler.core.errors import InputError
from lowbit.compiler.core.recipe import builtin_recipes, load_recipe


def test_builtin_recipes_build_and_resolve():
    assert {"w8a8", "w8a8-static"} <= set(builtin_recipes())
    recipe = load_recipe("w8a8")
    passes = recipe.build()
    assert [p.name for p in passes] == ["canonicalize", "fold-norms", "rotate", "recognize", "calibrate", "smooth", "plan", "quantize-weights", "quantize-embeddings", "fuse-linears", "lower-ort"]
    resolved = recipe.resolved()
    plan = next(p for p in resolved["passes"] if p["pass"] == "plan")
    assert plan["activations"] == "dynamic" and plan["keep_float_top"] == 0  # defaults filled in
    assert resolved["calibration"]["samples"] == 32


def test_set_option_and_errors(tmp_path):
    recipe = load_recipe("w8a8")
    recipe.set_option("plan.activations", "static")
    recipe.set_option("calibration.samples", 4)
    assert next(p for p in recipe.build() if p.name == "plan").activations == "static" and recipe.calibration["samples"] == 4
    with pytest.raises(InputError, match="has no pass 'rotate'"):
        load_recipe("w8a8-plain").set_option("rotate.seed", 1)
    with pytest.raises(InputError, match="no recipe 'w3a3'"):
        load_recipe("w3a3")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_recipe(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text('name = "x"\n')
    with pytest.raises(InputError, match="non-empty \\[\\[passes\\]\\]"):
        load_recipe(empty)


def test_learned_rotation_follows_the_plans_group_size_unless_set():
    def learn_group(recipe):
        rotate = next(p for p in recipe.build() if p.name == "rotate")
        resolved = next(p for p in recipe.resolved()["passes"] if p["pass"] == "rotate")
        assert resolved["learn_group_size"] == rotate.learn_group_size
        return rotate.learn_group_size

    recipe = load_recipe("w4a8")
    assert learn_group(recipe) == 128
    recipe.set_option("plan.group_size", 32)
    assert learn_group(recipe) == 32
    recipe.set_option("rotate.learn_group_size", 64)  # an explicit value wins
    assert learn_group(recipe) == 64


def _recipe_file(tmp_path, body: str):
    path = tmp_path / "typed.toml"
    path.write_text(body)
    return path


def test_a_wrong_typed_option_in_a_recipe_fails_when_the_passes_are_built(tmp_path):
    path = _recipe_file(tmp_path, '[[passes]]\npass = "calibrate"\n[[passes]]\npass = "smooth"\nmin_gain = "quarter"\n')
    recipe = load_recipe(path)  # loading reads names only; building checks every option
    with pytest.raises(InputError, match=r"^pass 'smooth': option 'min_gain' = 'quarter' is not a float$"):
        recipe.build()
    recipe = load_recipe("w8a8")
    recipe.set_option("smooth.max_rows", True)
    with pytest.raises(InputError, match=r"^pass 'smooth': option 'max_rows' = True is not an int$"):
        recipe.build()


def test_a_linked_option_is_reported_where_the_user_set_it():
    recipe = load_recipe("w4a8")  # rotate.learn_group_size follows plan.group_size
    recipe.set_option("plan.group_size", "32")
    with pytest.raises(InputError, match=r"^pass 'plan': option 'group_size' = '32' is not an int$"):
        recipe.build()


def test_calibration_and_evaluation_sizes_are_integers(tmp_path):
    path = _recipe_file(tmp_path, '[calibration]\nsamples = "lots"\n[[passes]]\npass = "canonicalize"\n')
    with pytest.raises(InputError, match=r"recipe .*typed.toml: \[calibration\] samples = 'lots' is not an int$"):
        load_recipe(path)
    path = _recipe_file(tmp_path, '[evaluation]\nseq_len = true\n[[passes]]\npass = "canonicalize"\n')
    with pytest.raises(InputError, match=r"\[evaluation\] seq_len = True is not an int$"):
        load_recipe(path)
    recipe = load_recipe("w8a8")
    with pytest.raises(InputError, match=r"^--set calibration.seq_len: \[calibration\] seq_len = 1.5 is not an int$"):
        recipe.set_option("calibration.seq_len", 1.5)
    recipe.set_option("evaluation.samples", 4)
    assert recipe.evaluation["samples"] == 4 and recipe.resolved()["evaluation"]["samples"] == 4
