"""A short real training run, tracked in a temporary MLflow store, exported and registered."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pytest
from mlflow.tracking import MlflowClient

from datasets import get_dataset_spec, load_split
from tests.conftest import (
    QUICK_RECIPE,
    TINY_TRAINING,
    check_recorded_commit,
    medscreen_error_line,
)

pytestmark = pytest.mark.slow


def _client() -> MlflowClient:
    from training.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


def test_run_records_recipe_metrics_lineage_and_provenance(trained_run, medmnist_dir: Path):
    recipe, result = trained_run
    client = _client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optimisation.max_epochs"] == "2"
    assert params["model.network"] == "DenseNet"
    assert params["evaluation.sensitivity_target"] == "0.95"
    # Per-epoch history, one point per epoch.
    for name in ("train_loss", "val_loss", "val_auc"):
        history = client.get_metric_history(result.run_id, name)
        assert [point.step for point in history] == [0, 1], name
    metrics = run.data.metrics
    for name in (
        "test_auc",
        "test_sensitivity",
        "test_specificity",
        "threshold",
        "selected_val_auc",
    ):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert metrics["test_auc"] > 0.6  # a real, if tiny, model
    # The threshold is chosen on validation data for the sensitivity target.
    assert metrics["selected_val_sensitivity"] >= recipe.evaluation.sensitivity_target
    # Lineage: every split is an MLflow input carrying its fingerprint.
    spec = get_dataset_spec("pneumoniamnist")
    val = load_split(spec, "val", data_dir=medmnist_dir, max_samples=160, seed=0)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"pneumoniamnist-train", "pneumoniamnist-val", "pneumoniamnist-test"}
    val_input = inputs["pneumoniamnist-val"]
    assert val_input.dataset.digest == val.fingerprint[:32]
    assert {t.key: t.value for t in val_input.tags}["fingerprint_sha256"] == val.fingerprint
    assert run.data.tags["medscreen.data.val.fingerprint"] == val.fingerprint
    # Provenance: the commit, package versions and seed.
    tags = run.data.tags
    check_recorded_commit(tags["medscreen.git_commit"], tags["medscreen.git_dirty"])
    assert tags["medscreen.version.torch"].startswith("2.13")
    assert tags["medscreen.version.monai"] != "not installed"
    assert tags["medscreen.version.pydicom"] != "not installed"  # decoders shape the data too
    assert tags["medscreen.seed"] == "0"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"recipe.yaml", "model", "evaluation", "data", "card"} <= artifacts


def test_every_run_logs_a_markdown_run_card(trained_run):
    recipe, result = trained_run
    card = mlflow.artifacts.load_text(f"runs:/{result.run_id}/card/run_card.md")
    assert card.startswith(f"# Run card: {recipe.name}")
    assert f"Training run `{result.run_id}`" in card
    assert f"Threshold **{result.threshold:.6f}**" in card
    assert f"test AUC **{result.metrics['test_auc']:.4f}**" in card
    fingerprint = _client().get_run(result.run_id).data.tags["medscreen.data.test.fingerprint"]
    assert fingerprint in card and recipe.registration.intended_use in card


def test_export_registers_a_version_with_card_and_checked_onnx(
    registered_model, trained_run, medmnist_dir: Path
):
    _, result = trained_run
    client = _client()
    version = client.get_model_version(registered_model.model_name, registered_model.version)
    assert version.run_id == result.run_id
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert float(version.tags["medscreen.threshold"]) == pytest.approx(result.threshold, abs=1e-6)
    # What exported it, beside what trained it (the run's tags).
    check_recorded_commit(
        version.tags["medscreen.export.git_commit"], version.tags["medscreen.export.git_dirty"]
    )
    assert version.tags["medscreen.export.version.onnxruntime"] != "not installed"
    card = registered_model.card
    assert card.positive_finding == "pneumonia" and card.positive_classes == [1]
    assert card.onnx.parity_max_abs_difference <= 1e-4
    assert card.provenance.run_id == result.run_id
    assert (
        card.training_data.split_fingerprints["val"]
        == client.get_run(result.run_id).data.tags["medscreen.data.val.fingerprint"]
    )

    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{registered_model.model_name}/{registered_model.version}"
        )
    )
    stored_card = json.loads((model_dir / "extra_files" / "card.json").read_text())
    assert stored_card["operating_point"]["threshold"] == pytest.approx(result.threshold)
    assert stored_card["input"]["dtype"] == "uint8"
    assert (model_dir / "extra_files" / "card.md").read_text().startswith("# Model card")

    # The graph takes raw uint8 images, any batch size, and gives probabilities.
    session = onnxruntime.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (graph_input,) = session.get_inputs()
    assert graph_input.type == "tensor(uint8)" and graph_input.shape[1:] == [1, 28, 28]
    val = load_split(
        get_dataset_spec("pneumoniamnist"), "val", data_dir=medmnist_dir, max_samples=160, seed=0
    )
    for batch in (1, 7):
        (probabilities,) = session.run(None, {"image": val.images[:batch]})
        assert probabilities.shape == (batch, 2)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    # The threshold is the one the validation split gives for the target, not the test split's.
    from training.evaluation import choose_threshold

    def threshold_on(split_name: str) -> float:
        split = load_split(
            get_dataset_spec("pneumoniamnist"),
            split_name,
            data_dir=medmnist_dir,
            max_samples=160,
            seed=0,
        )
        (probabilities,) = session.run(None, {"image": split.images})
        return choose_threshold(split.labels == 1, probabilities[:, 1], 0.95)

    assert result.threshold == pytest.approx(threshold_on("val"), abs=1e-4)
    assert result.threshold != pytest.approx(threshold_on("test"), abs=1e-4)

    # Validation accuracy at the most probable class, as the graph gives it (one image may flip
    # within the parity tolerance).
    (val_probabilities,) = session.run(None, {"image": val.images})
    val_accuracy = float(np.mean(val_probabilities.argmax(axis=1) == val.labels))
    assert result.metrics["val_accuracy"] == pytest.approx(val_accuracy, abs=1.01 / len(val))


def test_export_never_reopens_the_training_run(trained_run):
    """Nothing an interrupted export could leave behind is ever visible.

    A reopened run is RUNNING until closed: an export killed meanwhile left it so for good, and
    a run that is not FINISHED can no longer be exported. A version registered before its tags
    looked released in the registry with no gate, threshold or checksum tag.
    """
    import threading

    from training import export_and_register
    from training.export import GATE_PASSED_TAG

    recipe, result = trained_run
    client = _client()
    query = f"name='{recipe.registration.model_name}'"
    earlier = {version.version for version in client.search_model_versions(query)}
    closed_at = client.get_run(result.run_id).info.end_time
    statuses: set[str] = set()
    seen_new: set[str] = set()
    exporting = threading.Thread(target=export_and_register, args=(result.run_id,))
    exporting.start()
    while True:
        alive = exporting.is_alive()
        statuses.add(client.get_run(result.run_id).info.status)
        for version in client.search_model_versions(query):
            if version.version in earlier:
                continue  # other tests register versions without a gate on purpose
            seen_new.add(version.version)
            assert version.tags.get(GATE_PASSED_TAG) == "passed", version.version
            assert version.tags.get("medscreen.onnx_sha256"), version.version
        if not alive:
            break
        exporting.join(timeout=0.02)
    assert statuses == {"FINISHED"}
    # A reopening between two polls would still have closed the run again, at a new time.
    assert client.get_run(result.run_id).info.end_time == closed_at
    assert len(seen_new) == 1


def test_export_logs_the_model_in_the_training_runs_experiment_whatever_the_environment_says(
    trained_run, monkeypatch: pytest.MonkeyPatch
):
    """An auditor finds the exported graph beside its run, even if MLflow's variables point away."""
    from training import export_and_register

    _, result = trained_run
    client = _client()
    elsewhere = client.create_experiment("not-the-training-experiment")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", elsewhere)
    exported = export_and_register(result.run_id)
    version = client.get_model_version(exported.model_name, exported.version)
    assert version.source.startswith("models:/"), version.source
    logged_model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged_model.experiment_id == client.get_run(result.run_id).info.experiment_id
    assert logged_model.source_run_id == result.run_id
    assert logged_model.status.to_int() == logged_model.status.READY.to_int()
    assert not client.search_logged_models(experiment_ids=[elsewhere])


def test_the_gate_refuses_a_threshold_or_metrics_from_a_handful_of_cases(medmnist_dir: Path):
    """Two test images give an AUC of 1.0 (interval 1.0 to 1.0): no evidence for a release."""
    from training import export_and_register, load_recipe, train_recipe
    from training.export import ExportError

    overrides = [f"data.data_dir={medmnist_dir}", *TINY_TRAINING, "data.max_train_samples=64"]
    recipe = load_recipe(QUICK_RECIPE, [*overrides, "data.max_test_samples=6"])
    result = train_recipe(recipe, show_progress=False)
    client = _client()
    query = f"name='{recipe.registration.model_name}'"
    before = len(client.search_model_versions(query))
    with pytest.raises(ExportError) as failure:
        export_and_register(result.run_id)
    message = str(failure.value)
    assert "validation cases" not in message  # 160 validation images pass
    positives = int(client.get_run(result.run_id).data.metrics["test_positives"])
    assert (
        f"test cases: {positives} positive and {6 - positives} negative case(s); at least 10 of "
        "each needed" in message
    )
    assert message.endswith("nothing was registered")
    assert len(client.search_model_versions(query)) == before

    # A threshold chosen on a handful of validation images is refused the same way.
    recipe = load_recipe(QUICK_RECIPE, [*overrides, "data.max_val_samples=12"])
    result = train_recipe(recipe, show_progress=False)
    with pytest.raises(ExportError) as failure:
        export_and_register(result.run_id)
    message = str(failure.value)
    positives = int(client.get_run(result.run_id).data.metrics["selected_val_positives"])
    assert message == (
        f"release gate failed: validation cases: {positives} positive and {12 - positives} "
        "negative case(s); at least 10 of each needed; nothing was registered"
    )
    # The command says it in one line: torch's exporter warned on stderr before it.
    assert medscreen_error_line("export", "--run-id", result.run_id) == f"error: {message}"
    assert len(client.search_model_versions(query)) == before


def test_export_cli_names_an_unknown_run():
    line = medscreen_error_line("export", "--run-id", "0" * 32)
    assert "run '00000000000000000000000000000000' not found" in line


def test_export_cli_refuses_the_other_kinds_data_option(trained_run, tmp_path: Path):
    """An image run's export ignored --records-dir and registered a version anyway."""
    line = medscreen_error_line(
        "export", "--run-id", trained_run[1].run_id, "--records-dir", str(tmp_path)
    )
    assert line == "error: --records-dir is for ECG runs; give an image run's --data-dir"


def test_train_prints_the_run_id_whole_above_its_summary(medmnist_dir: Path):
    from typer.testing import CliRunner

    from medscreen_cli import app

    overrides = [*TINY_TRAINING, "optimisation.max_epochs=1", f"data.data_dir={medmnist_dir}"]
    result = CliRunner().invoke(
        app,
        ["train", str(QUICK_RECIPE), "--no-progress", *(f"--set={o}" for o in overrides)],
        terminal_width=60,
    )
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    assert len(run_id) == 32
    # A narrow terminal once wrapped the id inside the table's title.
    assert f"run {run_id} (pneumonia-quick)" in result.stderr.splitlines()


@pytest.mark.parametrize(
    ("signal_name", "exit_code", "last_line"),
    [("SIGINT", 130, "aborted"), ("SIGTERM", 143, "terminated")],
)
def test_a_stopped_training_run_is_marked_failed_not_left_running(
    medmnist_dir: Path, signal_name: str, exit_code: int, last_line: str
):
    """Ctrl-C or a scheduler's SIGTERM unwinds ``train``: its run ends FAILED, not RUNNING."""
    import signal
    import subprocess
    import time

    from tests.conftest import medscreen_command

    overrides = [
        *TINY_TRAINING,
        "optimisation.max_epochs=1000",  # still training when the signal comes
        f"data.data_dir={medmnist_dir}",
        f"experiment=stopped-training-{signal_name}",
    ]
    # As in the download test: the command must not inherit a background job's ignored SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [*medscreen_command(), "train", str(QUICK_RECIPE), "--no-progress"]
            + [f"--set={override}" for override in overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    client = _client()
    running = []
    deadline = time.monotonic() + 180
    while not running and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        experiment = client.get_experiment_by_name(f"stopped-training-{signal_name}")
        if experiment is not None:
            running = client.search_runs(
                [experiment.experiment_id], "attributes.status = 'RUNNING'"
            )
    assert running, "the training run never started"
    time.sleep(3)  # into the epochs
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert stderr.strip().splitlines()[-1] == last_line
    assert client.get_run(running[0].info.run_id).info.status == "FAILED"


def test_a_diverging_training_stops_with_one_line_naming_the_learning_rate(medmnist_dir: Path):
    """A NaN loss stopped nothing: every epoch trained on NaN, then threshold selection raised."""
    import subprocess

    from tests.conftest import medscreen_command

    overrides = [
        *TINY_TRAINING,
        f"data.data_dir={medmnist_dir}",
        "optimisation.learning_rate=1e30",
        "experiment=diverging-training",
    ]
    completed = subprocess.run(
        [*medscreen_command(), "train", str(QUICK_RECIPE), "--no-progress"]
        + [f"--set={override}" for override in overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr
    last_line = completed.stderr.strip().splitlines()[-1]
    assert re.match(
        r"error: training diverged: the loss was (nan|-?inf) at epoch 0, batch ", last_line
    )
    assert last_line.endswith("; lower optimisation.learning_rate (now 1e+30)")
    client = _client()
    experiment = client.get_experiment_by_name("diverging-training")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"


def test_an_interrupted_export_leaves_its_logged_model_failed_not_pending(
    trained_run, monkeypatch: pytest.MonkeyPatch
):
    import mlflow.onnx
    from mlflow.entities import LoggedModelStatus

    from training import export_and_register

    recipe, result = trained_run
    client = _client()
    name = recipe.registration.model_name
    versions_before = len(client.search_model_versions(f"name='{name}'"))
    logged_for_real = mlflow.onnx.log_model

    def log_then_interrupt(*args, **kwargs):
        logged_for_real(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C just after the graph and card were logged

    monkeypatch.setattr(mlflow.onnx, "log_model", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_and_register(result.run_id)
    experiment_id = client.get_run(result.run_id).info.experiment_id
    logged = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{result.run_id}'",
        output_format="list",
    )
    newest = max(logged, key=lambda model: model.creation_timestamp)
    # Before: READY here (PENDING if cut inside log_model), for a model never registered.
    assert newest.status == LoggedModelStatus.FAILED
    assert len(client.search_model_versions(f"name='{name}'")) == versions_before

    # Cut just after the registry's write: the version exists, so its logged model stays READY.
    monkeypatch.setattr(mlflow.onnx, "log_model", logged_for_real)
    registered_for_real = MlflowClient.create_model_version

    def register_then_interrupt(self, *args, **kwargs):
        registered_for_real(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowClient, "create_model_version", register_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_and_register(result.run_id)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == versions_before + 1
    newest_version = max(versions, key=lambda version: int(version.version))
    model_id = newest_version.source.removeprefix("models:/")
    assert mlflow.get_logged_model(model_id).status == LoggedModelStatus.READY
