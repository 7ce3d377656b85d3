"""Recipe validation and overrides: every error names the field."""

from __future__ import annotations

import re
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
    elif loaded.data.manifest is not None:
        assert loaded.data.manifest.is_absolute() and loaded.data.manifest_task is not None
        assert loaded.data.manifest_task.positive_indices() == (1,)
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
    import yaml

    tree = yaml.safe_load(QUICK_RECIPE.read_text())
    for section, fields in yaml.safe_load(text).items():
        tree[section] = {**tree.get(section, {}), **fields}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(tree))
    with pytest.raises(RecipeError, match=f"{broken}: field '{field}"):
        load_recipe(broken)


def test_dropout_is_refused_where_the_network_has_none():
    with pytest.raises(RecipeError, match=r"field 'model': model\.dropout applies to DenseNet"):
        load_recipe(QUICK_RECIPE, ["model.network=ResNet", "model.dropout=0.2"])
    # The quick recipe's network_params are DenseNet's: ResNet takes none of them.
    resnet = ["model.network=ResNet", "model.network_params={}", "model.dropout=0"]
    assert load_recipe(QUICK_RECIPE, resnet).model.dropout == 0


MANIFEST_RECIPE = PROJECT_ROOT / "training" / "recipes" / "hospital-manifest-example.yaml"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data.dataset=pneumoniamnist"], "data.manifest': give data.dataset or data.manifest"),
        (["data.manifest_task=null"], "data.manifest_task': required with data.manifest"),
        (
            ["data.manifest=null", "data.dataset=pneumoniamnist"],
            "data.manifest_task': only used with data.manifest",
        ),
        (["data.max_train_samples=10"], "data.max_train_samples': not used with data.manifest"),
        (["data.data_dir=/tmp"], "data.data_dir': not used with data.manifest"),
        (["data.val_fraction=0.5", "data.test_fraction=0.5"], "data.test_fraction': val_fra"),
        (["data.val_fraction=1.5"], "data.val_fraction': Input should be less than 1"),
        (
            ["data.manifest_task.positive_classes=[covid]"],
            "data.manifest_task.positive_classes': \\['covid'\\] not in classes",
        ),
        (
            ["data.manifest_task.positive_classes=[normal, Pneumonia]"],
            "data.manifest_task.positive_classes': at least one class must be negative",
        ),
        (["data.manifest_task.classes=[normal, Normal]"], "data.manifest_task.classes': names"),
        (
            ["data.manifest_task.image_shape=[2, 28, 28]"],
            "data.manifest_task.image_shape': 2D images have 1 or 3 channels",
        ),
        (["data.manifest_task.image_shape=[28, 28]"], "data.manifest_task.image_shape': \\[28"),
        (
            ["data.manifest_task.image_shape=[3, 8, 28, 28]"],
            "data.manifest_task.image_shape': volumes have 1 channel",
        ),
        (["data.manifest_task.name=Has Spaces"], "data.manifest_task.name': String should"),
    ],
)
def test_manifest_recipe_errors_name_the_field(overrides: list[str], field: str):
    # Each case's error comes from its last override, and the error names it.
    named = re.escape(f"override {overrides[-1]!r}: field '")
    with pytest.raises(RecipeError, match=f"^{named}{field}"):
        load_recipe(MANIFEST_RECIPE, overrides)


def test_catalogue_recipe_refuses_manifest_fields():
    with pytest.raises(RecipeError, match=r"field 'data\.val_fraction': only used with data"):
        load_recipe(QUICK_RECIPE, ["data.val_fraction=0.2"])
    with pytest.raises(RecipeError, match=r"field 'data\.dataset': give a catalogue dataset"):
        load_recipe(QUICK_RECIPE, ["data.dataset=null"])


def test_manifest_task_overrides_are_checked_against_the_section():
    with pytest.raises(RecipeError, match=r"field 'data\.manifest_task\.colour' is not a recipe"):
        load_recipe(MANIFEST_RECIPE, ["data.manifest_task.colour=red"])
    recipe = load_recipe(MANIFEST_RECIPE, ["data.manifest=elsewhere/m.csv"])
    assert recipe.data.manifest == (Path.cwd() / "elsewhere" / "m.csv").resolve()
    assert recipe.data.val_fraction == 0.15 and recipe.flat()["data.manifest_task.name"]


def test_missing_recipe_and_bad_yaml(tmp_path: Path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    # PyYAML's own loader kept the last of two keys, silently.
    twice = tmp_path / "twice.yaml"
    twice.write_text(
        QUICK_RECIPE.read_text().replace("max_epochs: 6", "max_epochs: 6\n  max_epochs: 7")
    )
    with pytest.raises(
        RecipeError, match=rf"^{twice}:\d+:3: not valid YAML: field 'max_epochs' is given twice$"
    ):
        load_recipe(twice)
    with pytest.raises(
        RecipeError, match=re.escape("override 'model={a: 1, a: 2}': the value is field 'a' is")
    ):
        load_recipe(QUICK_RECIPE, ["model={a: 1, a: 2}"])
    # Nesting past Python's recursion limit was a RecursionError traceback.
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecipeError, match="not valid YAML: nested too deeply"):
        load_recipe(deep)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Infinity passes the learning rate's lower bound; NaN a field without bounds.
        (
            "optimisation.learning_rate=inf",
            "field 'optimisation.learning_rate': Input should be a finite number",
        ),
        (
            "optimisation.learning_rate=.inf",
            "field 'optimisation.learning_rate': Input should be a finite number",
        ),
        (
            "model.intensity_mean=.nan",
            "field 'model.intensity_mean': Input should be a finite number",
        ),
        # pydantic would read true as 1: one epoch where a flag was meant.
        (
            "optimisation.max_epochs=true",
            "field 'optimisation.max_epochs': expected a number, not true or false",
        ),
        (
            "model.intensity_mean=false",
            "field 'model.intensity_mean': expected a number, not true or false",
        ),
        (
            "optimisation.limit_train_batches=true",
            "field 'optimisation.limit_train_batches': expected a number, not true or false",
        ),
        # A gate of `false` read as 0 would pass any model.
        (
            "registration.minimum_metrics={test_auc: false}",
            "field 'registration.minimum_metrics': expected a number, not true or false",
        ),
        # An override's error names the override, not the recipe file it did not come from.
        ("name=", "field 'name': Input should be a valid string"),
        (
            "optimisation={max_epochs: 0}",
            "field 'optimisation.max_epochs': Input should be greater than 0",
        ),
    ],
)
def test_an_overridden_field_is_named_with_its_override(override: str, message: str):
    with pytest.raises(RecipeError) as refused:
        load_recipe(QUICK_RECIPE, [override, "seed=1"])  # the one at fault, not the last
    assert str(refused.value) == f"override {override!r}: {message}"


def test_train_cli_prints_one_line_naming_the_field():
    line = medscreen_error_line("train", str(QUICK_RECIPE), "--set", "optimisation.max_epochs=-1")
    assert "field 'optimisation.max_epochs'" in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-5", "field 'seed': Input should be greater than or equal to 0"),
        (f"seed={2**32}", "field 'seed': Input should be less than or equal to 4294967295"),
        ('experiment=""', "field 'experiment': String should have at least 1 character"),
        ('experiment="  "', "field 'experiment': String should match pattern"),
        (f"experiment={'a' * 501}", "field 'experiment': String should have at most 500"),
        # Built, but MONAI fails at the first forward pass: caught by a trial pass.
        (
            "model.network_params.init_features=0",
            "error: model.network_params: MONAI's DenseNet refused them: ",
        ),
        # Allowed by the recipe's types, refused by MONAI: named before any run starts.
        (
            "model.network_params.growth_rate=-1",
            "error: model.network_params: MONAI's DenseNet refused them: Trying to create tensor",
        ),
        (
            "model.network_params.act=bogus",
            "error: model.network_params: MONAI's DenseNet refused them: Unsupported option",
        ),
        # A release-gate metric the run never logs failed only at export, after training.
        (
            "registration.minimum_metrics={test_auc: 0.9, test_sensitvity: 0.9}",
            "field 'registration.minimum_metrics.test_sensitvity': not a metric that "
            "image-screening runs log with higher being better; for example test_auc,",
        ),
    ],
)
def test_values_that_would_fail_later_are_one_line_before_any_run(
    override: str, message: str, medmnist_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path
):
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path))
    arguments = ["--set", override, "--set", f"data.data_dir={medmnist_dir}", "--no-progress"]
    assert message in medscreen_error_line("train", str(QUICK_RECIPE), *arguments)
    assert not (tmp_path / "mlflow.db").exists() or "run" not in _runs_in(tmp_path)


def _runs_in(state: Path) -> str:
    import sqlite3

    with sqlite3.connect(state / "mlflow.db") as database:
        return "run" if database.execute("SELECT COUNT(*) FROM runs").fetchone()[0] else ""


ECG_RECIPE = PROJECT_ROOT / "training" / "recipes" / "ecg-full.yaml"


@pytest.mark.parametrize(
    ("recipe", "metric"),
    [
        (ECG_RECIPE, "test_auc"),  # an image metric: ECG runs report beats on validation records
        (ECG_RECIPE, "val_V_loss"),
        (QUICK_RECIPE, "val_S_sensitivity"),
        (QUICK_RECIPE, "test_ece"),  # lower is better: a minimum would reward miscalibration
        (QUICK_RECIPE, "train_loss"),
        (QUICK_RECIPE, "test_AUC"),
        (QUICK_RECIPE, "val_auc"),  # the per-epoch curve: its last epoch, not the selected one
        (QUICK_RECIPE, "selected_val_auc_ci_low"),  # intervals are computed on test only
    ],
)
def test_a_release_gate_metric_runs_do_not_log_is_named(recipe: Path, metric: str):
    with pytest.raises(RecipeError, match=f"field 'registration.minimum_metrics.{metric}': not a"):
        load_recipe(recipe, [f"registration.minimum_metrics={{{metric}: 0.5}}"])


def test_a_recipe_a_run_logged_is_read_with_the_gate_it_was_trained_with():
    from training.runs import image_recipe_of_run

    # Runs logged before gate names were checked must stay exportable and evaluable.
    logged = load_recipe(QUICK_RECIPE).model_dump(mode="json")
    logged["registration"]["minimum_metrics"] = {"test_ci_resamples": 900}
    read = image_recipe_of_run(logged)
    assert read.registration.minimum_metrics == {"test_ci_resamples": 900}


# Logged, but no minimum of them means "good enough to release" (val_auc and val_sv_f1 are
# per-epoch curves: the run's value is the last epoch's, not the selected checkpoint's; an
# INT8 export logs int8_* to the run, after the float gate).
NOT_GATE_METRICS = re.compile(
    r".*_(loss|ece|ece_uncalibrated|ci_resamples|missed_beats|unannotated_detections)"
    r"|threshold|temperature|best_epoch|val_sv_f1|val_auc|int8_.*"
)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["image", "ecg"])
def test_every_metric_runs_log_is_a_release_gate_metric_or_not_one_by_design(
    which: str, request: pytest.FixtureRequest
):
    from mlflow.tracking import MlflowClient

    from training.recipe import _check_gate_metrics

    if which == "image":
        recipe, result = request.getfixturevalue("trained_run")
    else:
        result = request.getfixturevalue("ecg_run")
        recipe = load_recipe(ECG_RECIPE)
    logged = MlflowClient().get_run(result.run_id).data.metrics
    assert len(logged) > 20
    refused = []
    for name in logged:
        try:
            _check_gate_metrics(recipe.kind, {name: 0.0})
        except ValueError:
            refused.append(name)
    assert [name for name in refused if not NOT_GATE_METRICS.fullmatch(name)] == []
    assert len(refused) < len(logged) / 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: x\xff\xfe\n", r":1:8: not UTF-8 text \(byte 0xff\)"),
        (b"name: x\nseed: [1,\n  2\n", r":4:1: not valid YAML: expected ',' or ']'"),
        (b"name: x\nseed: 1\n  kind: y\n", r":3:7: not valid YAML: mapping values are not"),
        (b"name: x\x07\n", r":1:8: not valid YAML: character 0x0007: special characters are not"),
    ],
)
def test_unreadable_recipe_names_file_line_and_column(tmp_path: Path, content: bytes, message: str):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(RecipeError, match=f"^{re.escape(str(bad))}{message}") as caught:
        load_recipe(bad)
    assert "\n" not in str(caught.value) and "<unicode string>" not in str(caught.value)


@pytest.mark.parametrize(
    "content", [b"name: x\xff\xfe\n", b"name: [unclosed\n"], ids=["not-utf8", "bad-yaml"]
)
def test_train_cli_prints_one_line_for_an_unreadable_recipe(tmp_path: Path, content: bytes):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    assert medscreen_error_line("train", str(bad)).startswith(f"error: {bad}:")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.network_params.grwth_rate=12"],
            r"'model\.network_params\.grwth_rate': not a parameter of MONAI's DenseNet; "
            r"accepted: act, block_config, bn_size, growth_rate, init_features, norm$",
        ),
        (
            ["model.network=DenseNet121", "model.network_params={bn_siz: 2}"],
            r"'model\.network_params\.bn_siz': not a parameter of MONAI's DenseNet121; "
            r"accepted: act, block_config, bn_size, growth_rate, init_features, norm, pretrained, "
            r"progress$",
        ),
        (
            ["model.network=ResNet", "model.network_params={layer: [1, 1, 1, 1]}"],
            r"'model\.network_params\.layer': not a parameter of MONAI's ResNet; accepted: act, "
            r"bias_downsample, block, block_inplanes, conv1_t_size, .*, widen_factor$",
        ),
        (
            ["model.network_params.dropout_prob=0.3"],
            r"'model\.network_params\.dropout_prob': set by medscreen from model\.dropout",
        ),
        (
            ["model.network_params.in_channels=3"],
            r"'model\.network_params\.in_channels': set by medscreen from the data",
        ),
        (
            ["model.network=ResNet", "model.network_params={num_classes: 3}"],
            r"'model\.network_params\.num_classes': set by medscreen from the data",
        ),
    ],
)
def test_unknown_network_params_are_named(overrides: list[str], message: str):
    with pytest.raises(RecipeError, match=f"{QUICK_RECIPE}: field {message}"):
        load_recipe(QUICK_RECIPE, overrides)


def test_network_params_medscreen_does_not_set_are_accepted():
    recipe = load_recipe(
        QUICK_RECIPE, ["model.network=DenseNet121", "model.network_params={bn_size: 2}"]
    )
    assert recipe.model.network_params == {"bn_size": 2}
    resnet = load_recipe(
        QUICK_RECIPE,
        ["model.network=ResNet", "model.network_params={block: bottleneck, widen_factor: 0.5}"],
    )
    assert resnet.model.network_params["block"] == "bottleneck"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.block_config=[-1]", "model.block_config.0"),
        ("model.block_config=[3, 0]", "model.block_config.1"),
        ("model.block_config=[]", "model.block_config"),
        ("model.block_config=[true, 2]", "model.block_config"),
    ],
)
def test_ecg_block_sizes_must_be_positive(override: str, field: str):
    with pytest.raises(RecipeError, match=re.escape(f"override {override!r}: field '{field}': ")):
        load_recipe(ECG_RECIPE, [override])
    assert load_recipe(ECG_RECIPE, ["model.block_config=[1, 2]"]).model.block_config == [1, 2]
