"""A hospital's own data: manifests, patient-disjoint splits, and linked evaluation runs."""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from datasets import (
    DatasetError,
    get_dataset_spec,
    load_manifest,
    load_split,
    patient_disjoint_split,
)
from tests.conftest import check_recorded_commit, medscreen_command, medscreen_error_line

SECRET = "PATIENT-SECRET-"


def _write_manifest(
    folder: Path, medmnist_dir: Path, shared_datasets: Path, rows: int = 40
) -> Path:
    test = load_split(get_dataset_spec("pneumoniamnist"), "test", data_dir=medmnist_dir)
    chosen = np.concatenate(
        [
            np.flatnonzero(test.labels == 0)[: rows // 2],
            np.flatnonzero(test.labels == 1)[: rows // 2],
        ]
    )
    images = folder / "images"
    images.mkdir()
    entries = []
    for number, index in enumerate(chosen):
        name = f"images/case{number:03d}.png"
        Image.fromarray(test.images[index, 0]).save(folder / name)
        entries.append(
            {
                "path": name,
                "label": ["normal", "pneumonia"][test.labels[index]],
                "patient_id": f"{SECRET}{number // 2:04d}",
                "site": "north" if number % 2 else "south",
            }
        )
    entries.append(
        {
            "path": str(shared_datasets / "dicom" / "nih_chestxray14_dx_1024.dcm"),
            "label": "normal",
            "patient_id": f"{SECRET}dicom",
            "site": "south",
        }
    )
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["path", "label", "patient_id", "site"])
        writer.writeheader()
        writer.writerows(entries)
    return manifest


def test_manifest_reads_pngs_and_dicom_with_sites(tmp_path, medmnist_dir, shared_datasets):
    manifest = _write_manifest(tmp_path, medmnist_dir, shared_datasets)
    data = load_manifest(manifest, get_dataset_spec("pneumoniamnist"))
    assert data.images.shape == (41, 1, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.tolist().count(1) == 20
    assert set(data.sites.tolist()) == {"north", "south"}
    assert SECRET not in data.fingerprint


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"path": "images/nowhere.png", "label": "normal"}, "No such file"),
        ({"path": " ", "label": "normal"}, "the path is empty; give the image's file"),
        ({"path": "notes.txt", "label": "normal"}, "not a PNG, JPEG or DICOM"),
        ({"path": "images/ok.png", "label": "bronchitis"}, "the label is not one of"),
        # Indices are refused: "1" is malignant in one hospital and benign in BreastMNIST.
        ({"path": "images/ok.png", "label": "1"}, "the label is not one of"),
        # Listed twice, even with another label, it would count double (or contradict itself).
        ({"path": "images/ok.png", "label": "pneumonia"}, "the same as line 2's"),
    ],
)
def test_bad_manifest_row_is_named_before_any_work(tmp_path: Path, bad_row: dict, message: str):
    _check_bad_row(tmp_path, f"{bad_row['path']},{bad_row['label']}", message)


def test_the_same_picture_saved_again_is_refused(tmp_path: Path):
    # Other file bytes, the same pixels: under another patient it could land in train and test.
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(buffer, "PNG", compress_level=0)
    (tmp_path / "copy.png").write_bytes(buffer.getvalue())
    assert buffer.getvalue() != _png(np.zeros((28, 28), dtype=np.uint8))
    _check_bad_row(tmp_path, "copy.png,normal", r"the image has the same pixels as line 2's")


def test_sites_whose_metric_names_would_collide_are_refused(tmp_path: Path):
    (tmp_path / "b.png").write_bytes(_png(np.ones((28, 28), dtype=np.uint8)))
    _check_bad_row(
        tmp_path,
        "b.png,normal,St Mary_s",
        r"site 'St Mary_s' and site \"St Mary's\" \(line 2\) have the same metric name",
        header="path,label,site",
        first="images/ok.png,normal,St Mary's",
    )


RUNS_ON = "a quoted value runs on past the end of the line"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        # A name with an unquoted comma: " Jane" would be filed under "site".
        ("images/b.png,normal,Doe, Jane,north", "the row has 5 field(s) and the header 4"),
        ("images/b.png,normal", "the row has 2 field(s) and the header 4"),
        ('images/b.png,normal,"Doe,north', "not valid CSV"),  # a quote never closed
        # Closed by the next row's quote: as many fields as the header, one image gone.
        ('images/b.png,normal,"Doe, Jane,north\nimages/c.png,normal,"P3",south', "not valid CSV"),
        # Valid CSV, but a value over two lines is a quote closed in the wrong place.
        ('images/b.png,normal,"Doe\nJane",north', RUNS_ON),
    ],
)
def test_a_row_whose_fields_do_not_match_the_header_is_named_without_its_values(
    tmp_path: Path, rows: str, message: str
):
    (tmp_path / "images").mkdir()
    for value, name in enumerate(("ok", "b", "c")):
        (tmp_path / "images" / f"{name}.png").write_bytes(_png(np.full((28, 28), value, np.uint8)))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,label,patient_id,site\nimages/ok.png,normal,P1,south\n{rows}\n")
    with pytest.raises(DatasetError) as failure:
        load_manifest(manifest, get_dataset_spec("pneumoniamnist"))
    text = str(failure.value)
    assert f"manifest.csv:3: {message}" in text  # the line the row starts on
    assert "Jane" not in text and "Doe" not in text


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path):
    (tmp_path / "ok.png").write_bytes(_png(np.zeros((28, 28), dtype=np.uint8)))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,site,site\nok.png,normal,a,b\n")
    with pytest.raises(DatasetError, match=r"manifest.csv: column\(s\) site given twice"):
        load_manifest(manifest, get_dataset_spec("pneumoniamnist"))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_bad_row(
    tmp_path: Path,
    row: str,
    message: str,
    header: str = "path,label",
    first: str = "images/ok.png,normal",
) -> None:
    """A manifest of a good first row and ``row``: loading it names line 3 and ``message``."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(_png(np.zeros((28, 28), dtype=np.uint8)))
    (tmp_path / "notes.txt").write_text("not an image")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"{header}\n{first}\n{row}\n")
    with pytest.raises(DatasetError, match=rf"manifest.csv:3: .*{message}"):
        load_manifest(manifest, get_dataset_spec("pneumoniamnist"))


@pytest.mark.slow
def test_evaluate_cli_names_the_bad_manifest_line(trained_run, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not an image")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\nnotes.txt,normal\n")
    line = medscreen_error_line(
        "evaluate", "--run-id", trained_run[1].run_id, "--manifest", str(manifest)
    )
    assert "manifest.csv:2" in line and "not a PNG, JPEG or DICOM" in line


def test_patient_disjoint_split_keeps_each_patient_in_one_split():
    patients = np.repeat([f"p{number}" for number in range(50)], 3)
    splits = patient_disjoint_split(patients, val_fraction=0.2, test_fraction=0.2, seed=0)
    seen = [set(patients[rows]) for rows in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(150))
    assert len(seen[2]) == 10 and len(seen[1]) == 10


def _runs_show(run_id: str) -> str:
    """The output of `medscreen runs show RUN_ID`, which must succeed."""
    shown = subprocess.run(
        [*medscreen_command(), "runs", "show", run_id], capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


@pytest.mark.slow
def test_evaluation_is_a_linked_run_without_patient_identifiers(
    trained_run, tmp_path, medmnist_dir, shared_datasets
):
    from training.evaluate import evaluate_manifest

    _, training = trained_run
    manifest = _write_manifest(tmp_path, medmnist_dir, shared_datasets)
    result = evaluate_manifest(training.run_id, manifest)
    from training.tracking import configure_tracking

    configure_tracking()
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == training.run_id
    assert run.data.tags["medscreen.evaluates_run_id"] == training.run_id
    assert run.data.tags["medscreen.overlap_check"].startswith("passed")
    metrics = run.data.metrics
    assert metrics["eval_cases"] == 41 and metrics["eval_positives"] == 20
    assert metrics["eval_auc_ci_low"] <= metrics["eval_auc"] <= metrics["eval_auc_ci_high"]
    # The manifest names patients, so the intervals resample patients, not images.
    assert 900 <= metrics["eval_ci_resamples"] <= 1000
    assert metrics["eval_site_north_cases"] == 20 and metrics["eval_site_south_cases"] == 21
    recorded = " ".join([*run.data.params.values(), *run.data.tags.values(), *metrics])
    assert SECRET not in recorded

    # An auditor finds the evaluation from the training run, on the command line.
    shown = _runs_show(training.run_id)
    assert result.run_id in shown and "evaluations of this run" in shown
    commit = run.data.tags["medscreen.git_commit"]
    check_recorded_commit(commit, run.data.tags["medscreen.git_dirty"])
    val_fingerprint = (
        MlflowClient().get_run(training.run_id).data.tags["medscreen.data.val.fingerprint"]
    )
    assert commit in shown and val_fingerprint in shown
    # And the evaluation itself: what it checked, and the threshold and temperature it used.
    shown = _runs_show(result.run_id)
    assert f"evaluates run {training.run_id}" in shown
    assert "overlap check: passed: no row is in the run's training or validation data" in shown
    assert "parameters" in shown and run.data.params["threshold"] in shown
    assert medscreen_error_line("runs", "show", "not-a-run").startswith("error: RUN_ID:")


@pytest.mark.slow
def test_a_run_that_did_not_finish_is_refused(trained_run, tmp_path: Path):
    """A killed run has its recipe (logged first) but no model: one line, not a traceback."""
    import mlflow

    from training.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    finished = client.get_run(trained_run[1].run_id)
    killed = client.create_run(finished.info.experiment_id)
    recipe = mlflow.artifacts.download_artifacts(
        f"runs:/{finished.info.run_id}/recipe.yaml", dst_path=str(tmp_path)
    )
    client.log_artifact(killed.info.run_id, recipe)
    client.set_terminated(killed.info.run_id, "KILLED")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n")
    for command in (
        ["export", "--run-id", killed.info.run_id],
        ["evaluate", "--run-id", killed.info.run_id, "--manifest", str(manifest)],
    ):
        line = medscreen_error_line(*command)
        assert f"run {killed.info.run_id} is killed, not finished" in line, line


@pytest.mark.slow
def test_training_images_are_refused_as_evaluation_data(trained_run, tmp_path, medmnist_dir):
    """A hospital re-using the public training images would measure memory, not skill."""
    from training.runs import load_run_context

    context = load_run_context(trained_run[1].run_id)
    test = load_split(get_dataset_spec("pneumoniamnist"), "test", data_dir=medmnist_dir)
    # Training images and the validation images that chose the checkpoint and the threshold.
    for split in ("train", "val"):
        seen = context.split(split)
        rows = [(test.images[0, 0], "normal"), (test.images[1, 0], "normal")]
        rows.append((seen.images[0, 0], ["normal", "pneumonia"][seen.labels[0]]))
        lines = ["path,label"]
        for number, (pixels, label) in enumerate(rows):
            Image.fromarray(pixels).save(tmp_path / f"{split}{number}.png")
            lines.append(f"{split}{number}.png,{label}")
        manifest = tmp_path / f"{split}.csv"
        manifest.write_text("\n".join(lines) + "\n")
        line = medscreen_error_line(
            "evaluate", "--run-id", trained_run[1].run_id, "--manifest", str(manifest)
        )
        assert f"{split}.csv:4: this image is in the training or validation data" in line, line
        assert "(1 of 3 rows are)" in line


def test_unusable_manifest_paths_are_dataset_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="cannot read manifest"):
        load_manifest(tmp_path / "bad\0name.csv", get_dataset_spec("pneumoniamnist"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text('path,label\n"a\0b.png",normal\n')
    with pytest.raises(DatasetError, match=r"manifest.csv:2: .*null byte"):
        load_manifest(manifest, get_dataset_spec("pneumoniamnist"))
