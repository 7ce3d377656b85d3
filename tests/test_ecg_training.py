"""ECG monitoring: a short real training run on DS1 records, and evaluation on unseen records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from datasets import DatasetError
from tests.conftest import PROJECT_ROOT, TINY_ECG, medscreen_error_line

SUFFIXES = (".hea", ".dat", ".atr")
ECG_RECIPE = PROJECT_ROOT / "training" / "recipes" / "ecg-full.yaml"


def _published_sha256(shared_datasets: Path) -> dict[str, str]:
    """PhysioNet's SHA256SUMS for the MIT-BIH files here, by file name."""
    lines = (shared_datasets / "mitdb" / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines)}


def _client() -> MlflowClient:
    from training.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


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
    # The same records with beats found as the service finds them.
    assert metrics["val_served_S_beats"] == 94
    assert 0 <= metrics["val_served_S_sensitivity"] <= 1
    history = client.get_metric_history(ecg_run.run_id, "val_sv_f1")
    assert [point.step for point in history] == [0]
    # The selected checkpoint's score has its own metric (the curve holds the last epoch's).
    assert metrics["selected_val_sv_f1"] == pytest.approx(max(point.value for point in history))
    per_record = json.loads(
        mlflow.artifacts.load_text(f"runs:/{ecg_run.run_id}/evaluation/val_per_record.json")
    )
    assert set(per_record) == {"220"}
    lineage = json.loads(mlflow.artifacts.load_text(f"runs:/{ecg_run.run_id}/data/lineage.json"))
    assert lineage["train_records"] == ["106", "118", "207", "209"]
    assert lineage["train_beats_per_class"]["S"] == 96 + 107 + 383
    assert lineage["train_synthetic_premature_beats"] == 4 * 50  # the recipe's 50 per record
    assert lineage["published_checksums"] == "15 of 15 files checked against SHA256SUMS"
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
    assert run.data.tags["medscreen.data.published_checksums"] == (
        "6 of 6 files checked against SHA256SUMS"
    )
    per_record = json.loads(
        mlflow.artifacts.load_text(f"runs:/{result.run_id}/evaluation/eval_per_record.json")
    )
    assert set(per_record) == {"201", "223"}
    # 209 trained the run and 220 selected its checkpoint: neither is unseen.
    for seen in ("209", "220"):
        with pytest.raises(DatasetError, match=rf"\['{seen}'\] were used to train or select"):
            evaluate_ecg_records(ecg_run.run_id, shared_datasets / "mitdb", [seen, "223"])
    # With spaces, a training record is still that record; named by a path, it is no record
    # name at all. Either way it is refused, each for its own reason.
    refusals = {
        " 209": f"records ['209'] were used to train or select run {ecg_run.run_id}; "
        "evaluate on records it has never seen",
        "./209": "records: './209' is not a record name: give the name of the record in its "
        "directory (for example 118), without a path or a suffix",
    }
    for spelling, refusal in refusals.items():
        with pytest.raises(DatasetError) as failure:
            evaluate_ecg_records(ecg_run.run_id, shared_datasets / "mitdb", [spelling, "223"])
        assert str(failure.value) == refusal, spelling
    with pytest.raises(DatasetError, match=r"records: record 223 is listed twice"):
        evaluate_ecg_records(ecg_run.run_id, shared_datasets / "mitdb", ["223", "223"])
    assert run.data.tags["medscreen.overlap_check"].startswith(
        "passed: no record has a signal or annotation file"
    )
    assert run.data.tags["medscreen.same_subject_check"] == (
        "none of the records is from a subject of a record the run saw"
    )


def test_records_of_one_subject_are_paired():
    from datasets.ecg import DS1_RECORDS, DS2_RECORDS, same_subject_pairs

    assert same_subject_pairs(DS2_RECORDS, DS1_RECORDS) == [("202", "201")]
    assert same_subject_pairs(["201", "100"], ["202", "118"]) == [("201", "202")]
    assert same_subject_pairs(["202"], ["202", "118"]) == []  # the same record is refused elsewhere


@pytest.mark.slow
def test_ecg_evaluation_tags_and_warns_of_a_record_from_a_subject_the_run_saw(
    shared_datasets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from training import load_recipe
    from training.ecg import evaluate_ecg_records, train_ecg

    overrides = [*TINY_ECG, f"data.records_dir={shared_datasets / 'mitdb'}"]
    overrides += ['data.train_records=["106"]', 'data.val_records=["201"]']
    run_id = train_ecg(load_recipe(ECG_RECIPE, overrides), show_progress=False).run_id
    # DS2's 202 is not here; record 119 stands in for it under that name.
    source = shared_datasets / "mitdb" / "119"
    for suffix in (".dat", ".atr"):
        (tmp_path / f"202{suffix}").write_bytes(source.with_suffix(suffix).read_bytes())
    (tmp_path / "202.hea").write_text(source.with_suffix(".hea").read_text().replace("119", "202"))
    with caplog.at_level("WARNING", logger="training.ecg"):
        result = evaluate_ecg_records(run_id, tmp_path, ["202"])
    said = "record 202 is from the subject of record 201, which the run trained or selected on"
    assert _client().get_run(result.run_id).data.tags["medscreen.same_subject_check"] == said
    assert said in caplog.text


def test_ecg_evaluation_refuses_a_renamed_copy_of_a_training_record(
    ecg_run, shared_datasets: Path, tmp_path: Path
):
    from training.ecg import evaluate_ecg_records

    # 209 trained the run and 220 selected its checkpoint; 909 and 920 are their copies,
    # renamed as wfdb needs: the header names the record and its signal file.
    for original, copy in (("209", "909"), ("220", "920")):
        source = shared_datasets / "mitdb" / original
        for suffix in (".dat", ".atr"):
            (tmp_path / f"{copy}{suffix}").write_bytes(source.with_suffix(suffix).read_bytes())
        header = source.with_suffix(".hea").read_text().replace(original, copy)
        (tmp_path / f"{copy}.hea").write_text(header)
        with pytest.raises(DatasetError) as failure:
            evaluate_ecg_records(ecg_run.run_id, tmp_path, [copy])
        assert str(failure.value) == (
            f"{tmp_path / copy}.dat: the same file as in record {original}, which run "
            f"{ecg_run.run_id} trained or selected on; evaluate on records it has never seen"
        )
    lineage = json.loads(mlflow.artifacts.load_text(f"runs:/{ecg_run.run_id}/data/lineage.json"))
    # File by file, comparable with PhysioNet's own SHA256SUMS list.
    published = _published_sha256(shared_datasets)
    kept = lineage["record_files_sha256"]
    assert set(kept) == {"106", "118", "207", "209", "220"}
    for record, files in kept.items():
        # Every file of the record, so that the loop below has each one to check.
        assert set(files) == {f"{record}{suffix}" for suffix in SUFFIXES}, record
        for name, digest in files.items():
            assert digest == published[name], name


def _records_with_a_flat_signal(shared_datasets: Path, directory: Path, flat: str, *others: str):
    """Links to the shared records, and a copy of ``flat`` whose signal is all zeros.

    Its annotated beats load (windows of zeros), but the detector finds no beat in it.
    """
    for record in (flat, *others):
        for suffix in SUFFIXES:
            (directory / f"{record}{suffix}").symlink_to(
                shared_datasets / "mitdb" / f"{record}{suffix}"
            )
    signal = directory / f"{flat}.dat"
    size = signal.stat().st_size
    signal.unlink()
    signal.write_bytes(bytes(size))
    return signal


def _run_count() -> int:
    client = _client()  # the session's store, not MLflow's default in the working directory
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return len(client.search_runs(experiments)) if experiments else 0


def test_a_validation_record_the_detector_cannot_use_fails_before_the_run(
    shared_datasets: Path, tmp_path: Path
):
    from training import load_recipe
    from training.ecg import train_ecg

    signal = _records_with_a_flat_signal(shared_datasets, tmp_path, "220", "106")
    overrides = [*TINY_ECG, f"data.records_dir={tmp_path}", 'data.train_records=["106"]']
    recipe = load_recipe(ECG_RECIPE, overrides)
    runs = _run_count()
    with pytest.raises(DatasetError, match=f"^{signal}: fewer than two beats detected"):
        train_ecg(recipe, show_progress=False)
    assert _run_count() == runs  # no run trained for minutes, then failed


@pytest.mark.slow
def test_an_evaluation_record_the_detector_cannot_use_fails_before_the_run(
    ecg_run, shared_datasets: Path, tmp_path: Path
):
    from training.ecg import evaluate_ecg_records

    signal = _records_with_a_flat_signal(shared_datasets, tmp_path, "119")
    runs = _run_count()
    with pytest.raises(DatasetError, match=f"^{signal}: fewer than two beats detected"):
        evaluate_ecg_records(ecg_run.run_id, tmp_path, ["119"])
    assert _run_count() == runs  # no FAILED evaluation run left under the training run


def test_ecg_recipe_errors_are_one_line(shared_datasets: Path):
    line = medscreen_error_line("train", str(ECG_RECIPE))
    assert "records_dir" in line
    line = medscreen_error_line("train", str(ECG_RECIPE), "--set", 'data.val_records=["101"]')
    assert "are in both train_records and val_records" in line
    line = medscreen_error_line("train", str(ECG_RECIPE), "--set", 'data.train_records=["202"]')
    assert "record 201 (val_records) and record 202 (train_records) are one subject's" in line
    line = medscreen_error_line("train", str(ECG_RECIPE), "--set", 'data.val_records=["./118"]')
    assert "data.val_records" in line and "'./118' is not a record name" in line
    mitdb = str(shared_datasets / "mitdb")
    for records, message in (
        ("118,,119", "--records: an empty record name (a stray comma?)"),
        ("118,../mitdb/101", "--records: '../mitdb/101' is not a record name"),
        ("118, 118", "--records: record 118 is listed twice"),
    ):
        arguments = ["--run-id", "0" * 32, "--records-dir", mitdb, "--records", records]
        assert message in medscreen_error_line("evaluate", *arguments)
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


@pytest.mark.slow
def test_ecg_export_registers_a_beat_graph_with_its_card(ecg_model, shared_datasets: Path):
    import onnxruntime

    from datasets.ecg import load_beats, load_detected_beats
    from training.ecg_export import (
        ECG_INPUTS,
        ECTOPIC_CLASSES,
        NEVER_ALERTED_SCORE,
        ecg_onnx_probabilities,
    )

    result = ecg_model
    card = result.card
    assert card.kind == "ecg-monitoring" and card.input is None
    assert card.signal.sampling_rate_hz == 360 and card.signal.lead == "MLII"
    assert [tensor.name for tensor in card.signal.tensors] == list(ECG_INPUTS)
    assert card.positive_classes == list(ECTOPIC_CLASSES)
    assert card.onnx.parity_max_abs_difference <= 1e-4
    # Chosen on the beats the service will see: those its detector finds.
    assert card.operating_point.chosen_on == (
        "validation records, beats found by the service's detector"
    )
    rows = card.training_data.split_rows
    assert rows["val_detected"] > 0.9 * rows["val"]
    # Each annotated beat is matched to one detected beat or counted as missed; detections
    # with no annotated beat count too, hence >=.
    assert rows["val_missed_by_detector"] < 0.1 * rows["val"]
    assert rows["val_detected"] + rows["val_missed_by_detector"] >= rows["val"]
    assert "val_served_S_sensitivity" in card.metrics
    assert [check.check for check in card.release_gate] == [
        "onnx_checker",
        "parity probabilities",
        "parity decisions",
        "validation cases",
        "minimum val_accuracy",
    ]
    (counted,) = [check for check in card.release_gate if check.check == "validation cases"]
    assert counted.passed and "at least 10 of each held" in counted.detail
    assert card.metrics["selected_val_sensitivity"] >= card.operating_point.sensitivity_target
    # Intervals resample records (patients), and the per-epoch curve is not a card figure.
    assert "selected_val_ci_resamples" in card.metrics and "val_sv_f1" not in card.metrics
    assert "360 Hz" in card.to_markdown()
    # The data, file by file as PhysioNet lists it, and one digest of that listing.
    published = _published_sha256(shared_datasets)
    files = card.training_data.files_sha256
    records = ("106", "118", "207", "209", "220")
    assert set(files) == {f"{record}{suffix}" for record in records for suffix in SUFFIXES}
    assert all(files[name] == published[name] for name in files)
    listing = "".join(f"{published[name]} {name}\n" for name in sorted(files))
    assert card.training_data.file_sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert f"209.dat `{published['209.dat']}`" in card.to_markdown()

    version = MlflowClient().get_model_version(result.model_name, result.version)
    assert version.tags["medscreen.kind"] == "ecg-monitoring"
    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{result.model_name}/{result.version}")
    )
    stored = json.loads((model_dir / "extra_files" / "card.json").read_text())
    assert stored["signal"]["window_before_samples"] == 90
    # The registered graph classifies real beats of the validation record.
    beats = load_beats(shared_datasets / "mitdb", ["220"])
    session = onnxruntime.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(
        None,
        dict(zip(ECG_INPUTS, (beats.windows, beats.templates, beats.rr_seconds), strict=True)),
    )
    assert probabilities.shape == (len(beats), 5)
    assert abs(float(probabilities.sum(axis=1).mean()) - 1) < 1e-5

    # The alert threshold, recomputed from its definition on the validation record's beats as
    # the detector finds them (a missed ectopic beat is never alerted): the registered graph's
    # scores reach the target there, a threshold just above the lowest alerted ectopic beat
    # would not, and the threshold lies midway between that beat and the next lower score.
    served, missed = load_detected_beats(shared_datasets / "mitdb", ["220"])
    served_scores = ecg_onnx_probabilities(model_dir / "model.onnx", served)[
        :, list(ECTOPIC_CLASSES)
    ].sum(axis=1)
    scores = np.concatenate([served_scores, np.full(len(missed.labels), NEVER_ALERTED_SCORE)])
    truth = np.isin(np.concatenate([served.labels, missed.labels]), ECTOPIC_CLASSES)
    threshold = card.operating_point.threshold
    target = card.operating_point.sensitivity_target
    assert (scores[truth] >= threshold).mean() >= target
    lowest_alerted = scores[truth & (scores >= threshold)].min()
    assert (scores[truth] > lowest_alerted).mean() < target
    next_lower = scores[scores < lowest_alerted].max(initial=0.0)
    assert threshold == pytest.approx((lowest_alerted + next_lower) / 2, abs=1e-7)


@pytest.mark.slow
def test_export_command_refuses_int8_for_ecg(ecg_run, shared_datasets: Path):
    line = medscreen_error_line(
        "export", "--run-id", ecg_run.run_id, "--int8", "--records-dir", str(shared_datasets)
    )
    assert "--int8 is for image models" in line


def test_aami_report_counts_missed_beats_and_detections_of_no_beat():
    from training.ecg import aami_report

    truth = np.array([0, 0, 1, 1, -1])  # the last detection is no annotated beat
    predicted = np.array([0, 1, 1, 0, 1])
    report = aami_report(truth, predicted, "x", missed=np.array([0, 2, 0, 0, 0]))
    assert report["x_S_beats"] == 4  # two detected, two never detected
    assert report["x_S_sensitivity"] == pytest.approx(1 / 4)
    assert report["x_S_ppv"] == pytest.approx(1 / 3)  # called S: one right, one N, one noise
    assert report["x_missed_beats"] == 2 and report["x_unannotated_detections"] == 1
    plain = aami_report(truth[:4], predicted[:4], "y")
    assert plain["y_S_sensitivity"] == pytest.approx(1 / 2) and "y_missed_beats" not in plain


def test_synthetic_premature_beats_are_early_copies_of_normal_beats_labelled_s():
    from datasets.ecg import AAMI_CLASSES, BeatSet
    from training.ecg import (
        PREMATURE_FOLLOWING_RR,
        PREMATURE_PREVIOUS_RR,
        with_synthetic_premature_beats,
    )

    rng = np.random.default_rng(0)
    count = 40
    beats = BeatSet(
        windows=rng.normal(size=(count, 1, 8)).astype(np.float32),
        templates=np.zeros((count, 1, 8), np.float32),
        rr_seconds=np.tile(np.array([0.8, 0.8, 0.8, 0.8], np.float32), (count, 1)),
        labels=np.array([0] * 30 + [2] * 10),  # 30 N and 10 V beats
        records=np.array(["100"] * 20 + ["101"] * 20),
        fingerprint="f",
    )
    augmented = with_synthetic_premature_beats(beats, per_record=5, seed=0)
    added = slice(count, None)
    assert len(augmented) == count + 10  # five of each record's N beats
    assert (augmented.labels[added] == AAMI_CLASSES.index("S")).all()
    assert sorted(augmented.records[added].tolist()) == ["100"] * 5 + ["101"] * 5
    # Each copy keeps the shape of one of its record's N beats and only its timing changes.
    normal_shapes = {beats.windows[row].tobytes() for row in np.flatnonzero(beats.labels == 0)}
    assert all(window.tobytes() in normal_shapes for window in augmented.windows[added])
    previous, following, local, overall = augmented.rr_seconds[added].T
    assert np.all(previous / local >= PREMATURE_PREVIOUS_RR[0] - 1e-6)
    assert np.all(previous / local <= PREMATURE_PREVIOUS_RR[1] + 1e-6)
    assert np.all(following / local >= PREMATURE_FOLLOWING_RR[0] - 1e-6)
    assert np.all(overall == 0.8)
    # The source beats are untouched, and no copies are made unless the recipe asks.
    assert np.array_equal(augmented.labels[:count], beats.labels)
    assert with_synthetic_premature_beats(beats, per_record=0, seed=0) is beats
