"""Recipe validation and overrides: every error names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, QUICK_RECIPE, medscreen_error_line
from training import RecipeError, load_recipe


@pytest.mark.parametrize("recipe", sorted((PROJECT_ROOT / "training" / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(recipe: Path):
    from datasets import get_dataset_spec
    from training.recipe import EcgRecipe

    loaded = load_recipe(recipe)
    assert loaded.registration.intended_use and loaded.registration.limitations
    assert loaded.registration.minimum_metrics, "every shipped recipe states its release gate"
    assert loaded.registration.model_name.replace("-", "").isalnum()
    if isinstance(loaded, EcgRecipe):
        assert not set(loaded.data.train_records) & set(loaded.data.val_records)
    else:
        assert len(get_dataset_spec(loaded.data.dataset).classes) >= 2


def test_override_sets_nested_fields_with_yaml_values():
    recipe = load_recipe(
        QUICK_RECIPE,
        ["optimisation.max_epochs=3", "model.network_params.block_config=[2, 2]", "seed=7"],
    )
    assert recipe.optimisation.max_epochs == 3
    assert recipe.model.network_params["block_config"] == [2, 2]
    assert recipe.seed == 7
    assert recipe.flat()["optimisation.max_epochs"] == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimisation.max_epoch=3", "field 'optimisation.max_epoch' is not a recipe field"),
        ("nosuch=1", "field 'nosuch' is not a recipe field"),
        ("seed.value=1", "'seed' is a value"),
        ("no-equals-sign", "expected KEY=VALUE"),
    ],
)
def test_bad_override_is_named(override: str, message: str):
    with pytest.raises(RecipeError, match=message):
        load_recipe(QUICK_RECIPE, [override])


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("optimisation:\n  max_epochs: many\n", "optimisation.max_epochs"),
        ("model:\n  netwrk: DenseNet\n", "model.netwrk': unknown field"),
        ("evaluation:\n  sensitivity_target: 1.5\n", "evaluation.sensitivity_target"),
    ],
)
def test_wrong_or_unknown_field_is_named(tmp_path: Path, text: str, field: str):
    base = QUICK_RECIPE.read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(base + "\n" + text)
    with pytest.raises(RecipeError, match=f"{broken}: field '{field}"):
        load_recipe(broken)


def test_missing_recipe_and_bad_yaml(tmp_path: Path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_train_cli_prints_one_line_naming_the_field():
    line = medscreen_error_line("train", str(QUICK_RECIPE), "--set", "optimisation.max_epochs=-1")
    assert "field 'optimisation.max_epochs'" in line
