"""ECG monitoring: a short real training run on DS1 records, and evaluation on unseen records."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from datasets import DatasetError
from tests.conftest import PROJECT_ROOT, medscreen_error_line

ECG_RECIPE = PROJECT_ROOT / "training" / "recipes" / "ecg-full.yaml"
TINY_ECG = [
    'data.train_records=["106", "118", "207", "209"]',
    'data.val_records=["220"]',
    "data.max_normal_beats_per_record=80",
    "optimisation.max_epochs=1",
    "model.block_config=[2, 2]",
]


def _client() -> MlflowClient:
    from training.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


@pytest.fixture(scope="module")
def ecg_run(shared_datasets: Path):
    from training import load_recipe
    from training.ecg import train_ecg

    recipe = load_recipe(ECG_RECIPE, [f"data.records_dir={shared_datasets / 'mitdb'}", *TINY_ECG])
    return train_ecg(recipe, show_progress=False)


@pytest.mark.slow
def test_ecg_run_reports_aami_metrics_per_class_and_per_record(ecg_run):
    client = _client()
    run = client.get_run(ecg_run.run_id)
    metrics = run.data.metrics
    for name in ("N", "S"):
        assert 0 <= metrics[f"val_{name}_sensitivity"] <= 1
    # Record 220 has no V beat: its V sensitivity is undefined and not logged as a number.
    assert metrics["val_S_beats"] == 94 and metrics["val_V_beats"] == 0
    assert "val_V_sensitivity" not in metrics
    assert [point.step for point in client.get_metric_history(ecg_run.run_id, "val_sv_f1")] == [0]
    per_record = json.loads(
        mlflow.artifacts.load_text(f"runs:/{ecg_run.run_id}/evaluation/val_per_record.json")
    )
    assert set(per_record) == {"220"}
    lineage = json.loads(mlflow.artifacts.load_text(f"runs:/{ecg_run.run_id}/data/lineage.json"))
    assert lineage["train_records"] == ["106", "118", "207", "209"]
    assert lineage["train_beats_per_class"]["S"] == 96 + 107 + 383
    assert {Path(a.path).name for a in client.list_artifacts(ecg_run.run_id, "plots")} == {
        "val_confusion.png"
    }


@pytest.mark.slow
def test_ecg_evaluation_on_unseen_records_is_a_linked_run(ecg_run, shared_datasets: Path):
    from training.ecg import evaluate_ecg_records

    result = evaluate_ecg_records(ecg_run.run_id, shared_datasets / "mitdb", ["201", "223"])
    run = _client().get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == ecg_run.run_id
    assert run.data.metrics["eval_V_beats"] == 198 + 473
    per_record = json.loads(
        mlflow.artifacts.load_text(f"runs:/{result.run_id}/evaluation/eval_per_record.json")
    )
    assert set(per_record) == {"201", "223"}
    with pytest.raises(DatasetError, match=r"\['209'\] were used to train or select"):
        evaluate_ecg_records(ecg_run.run_id, shared_datasets / "mitdb", ["209", "223"])


def test_ecg_recipe_errors_are_one_line(shared_datasets: Path):
    line = medscreen_error_line("train", str(ECG_RECIPE))
    assert "records_dir" in line
    line = medscreen_error_line("train", str(ECG_RECIPE), "--set", 'data.val_records=["101"]')
    assert "are in both train_records and val_records" in line
    line = medscreen_error_line(
        "evaluate",
        "--run-id",
        "x",
        "--manifest",
        "m.csv",
        "--records-dir",
        str(shared_datasets / "mitdb"),
    )
    assert "either --manifest" in line
