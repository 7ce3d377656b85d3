"""The real BentoML server on a free port: input formats, keys, the prediction log, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from datasets import get_dataset_spec, load_split
from serving.schemas import ErrorAnswer, ModelList, MonitoringAnswer, ScreeningAnswer
from tests.conftest import (
    PROJECT_ROOT,
    free_port,
    grayscale_dicom,
    medscreen_command,
    medscreen_error_line,
    running_server,
)

pytestmark = pytest.mark.slow

CHEST_XRAY_DICOM = "dicom/nih_chestxray14_dx_1024.dcm"
ECG_RECORD = "223"  # DS1, used by neither the tiny model's training nor its validation


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _screen(
    server, key: str, content: bytes, filename: str = "upload", model: str | None = None
) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/screen",
        files={"file": (filename, content)},
        data={"model": model} if model else {},
        headers=_auth(key),
        timeout=60,
    )


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _log_records() -> list[dict]:
    from serving.settings import prediction_log_path

    return [json.loads(line) for line in prediction_log_path().read_text().splitlines()]


def _check_answer(body: dict, registered_model) -> None:
    ScreeningAnswer.model_validate(body)  # the published contract, no field more or less
    assert body["model"] == {
        "name": registered_model.model_name,
        "version": registered_model.version,
        "alias": "candidate",
    }
    assert body["finding"] == "pneumonia"
    assert body["threshold"] == pytest.approx(registered_model.card.operating_point.threshold)
    assert 0.0 <= body["probability"] <= 1.0
    expected = "positive" if body["probability"] >= body["threshold"] else "negative"
    assert body["decision"] == expected
    assert len(body["request_id"]) == 36


@pytest.fixture(scope="module")
def pneumonia_case(medmnist_dir: Path) -> np.ndarray:
    test = load_split(get_dataset_spec("pneumoniamnist"), "test", data_dir=medmnist_dir)
    return test.images[int(np.flatnonzero(test.labels == 1)[0])]


def test_png_answer_matches_the_registered_onnx_model(
    served_model, service_keys, registered_model, pneumonia_case: np.ndarray
):
    content = _png(pneumonia_case[0])
    response = _screen(
        served_model, service_keys.all_models, content, "case.png", registered_model.model_name
    )
    assert response.status_code == 200, response.text
    body = response.json()
    _check_answer(body, registered_model)
    assert body["input"] == {"format": "png", "height": 28, "width": 28}
    assert response.headers["X-Request-ID"] == body["request_id"]
    # Same pixels through the registered graph in-process: the service adds no drift.
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{registered_model.model_name}/{registered_model.version}"
        )
    )
    session = onnxruntime.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(None, {"image": pneumonia_case[None]})
    assert body["probability"] == pytest.approx(float(probabilities[0, 1]), abs=1e-6)

    # The prediction log holds the record, durable before the answer arrived.
    (record,) = [r for r in _log_records() if r["request_id"] == body["request_id"]]
    assert record["outcome"] == "prediction" and record["status"] == 200
    assert (record["hospital"], record["region"]) == ("St Elsewhere", "north")
    assert record["model_name"] == registered_model.model_name
    assert record["model_version"] == registered_model.version
    assert record["model_alias"] == "candidate"
    # The exact graph that answered, as its registration recorded it.
    from training.tracking import configure_tracking

    configure_tracking()
    version = mlflow.MlflowClient().get_model_version(
        registered_model.model_name, registered_model.version
    )
    assert record["model_sha256"] == version.tags["medscreen.onnx_sha256"]
    graph_bytes = (model_dir / "model.onnx").read_bytes()
    assert record["model_sha256"] == hashlib.sha256(graph_bytes).hexdigest()
    assert record["input_sha256"] == hashlib.sha256(content).hexdigest()
    assert record["score"] == pytest.approx(body["probability"])
    assert record["threshold"] == pytest.approx(body["threshold"])
    assert record["decision"] == body["decision"] and record["latency_ms"] > 0


def test_numpy_array_in_json_gives_the_same_answer_as_the_png(
    served_model, service_keys, registered_model, pneumonia_case: np.ndarray
):
    url = f"{served_model.url}/v1/screen/array"
    payload = {"model": registered_model.model_name, "array": pneumonia_case[0].tolist()}
    response = requests.post(url, json=payload, headers=_auth(service_keys.all_models), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    _check_answer(body, registered_model)
    assert body["input"]["format"] == "array"
    png = _screen(
        served_model,
        service_keys.all_models,
        _png(pneumonia_case[0]),
        "case.png",
        registered_model.model_name,
    )
    assert body["probability"] == pytest.approx(png.json()["probability"], abs=1e-6)

    bad = {"model": registered_model.model_name, "array": [[300.0] * 28] * 28}
    response = requests.post(url, json=bad, headers=_auth(service_keys.all_models), timeout=60)
    assert response.status_code == 422 and "0" in response.json()["error"]
    for body, status in (({"model": registered_model.model_name}, 422), ([1, 2], 422)):
        response = requests.post(url, json=body, headers=_auth(service_keys.all_models), timeout=60)
        assert response.status_code == status, response.text
    response = requests.post(
        url,
        data=b"{not json",
        headers={**_auth(service_keys.all_models), "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def test_the_same_picture_scores_the_same_at_any_bit_depth(
    served_model, service_keys, registered_model, pneumonia_case: np.ndarray
):
    # 16-bit pixels are stretched to 0-255 on decoding, 8-bit ones are not: the graph scales
    # each image by its own range, so the picture's depth must not change its score.
    picture = pneumonia_case[0]
    assert picture.min() > 0 and picture.max() < 255, "a case that does not span 0-255"
    sixteen_bit = picture.astype(np.uint16) * 257
    uploads = {
        "8-bit PNG": (_png(picture), "case.png"),
        "16-bit PNG": (_png(sixteen_bit), "case16.png"),
        "16-bit DICOM": (
            grayscale_dicom(
                *sixteen_bit.shape, 16, sixteen_bit.astype("<u2").tobytes(), ExplicitVRLittleEndian
            ),
            "case16.dcm",
        ),
    }
    scores = {}
    for kind, (content, filename) in uploads.items():
        response = _screen(
            served_model, service_keys.all_models, content, filename, registered_model.model_name
        )
        assert response.status_code == 200, (kind, response.text)
        scores[kind] = response.json()["probability"]
    # Only the rounding of the stretched copies to 8 bits differs (dividing by 255 instead
    # moved the tiny test model's score by about 0.02 on this case).
    assert max(scores.values()) - min(scores.values()) < 0.003, scores


def test_jpeg_and_compressed_dicom_are_accepted(
    served_model, service_keys, registered_model, shared_datasets: Path
):
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))).save(buffer, "JPEG")
    name = registered_model.model_name
    response = _screen(served_model, service_keys.all_models, buffer.getvalue(), "a.jpg", name)
    assert response.status_code == 200, response.text
    _check_answer(response.json(), registered_model)
    assert response.json()["input"]["format"] == "jpeg"
    rle = (shared_datasets / "dicom" / "pydicom_MR_small_RLE.dcm").read_bytes()
    response = _screen(served_model, service_keys.all_models, rle, "mr.dcm", name)
    assert response.status_code == 200, response.text
    assert response.json()["input"] == {"format": "dicom", "height": 64, "width": 64}
    # JPEG 2000 decodes with the OpenJPEG build inside Pillow's wheels.
    jpeg2000 = (shared_datasets / "dicom" / "pydicom_JPEG2000.dcm").read_bytes()
    response = _screen(served_model, service_keys.all_models, jpeg2000, "j2k.dcm", name)
    assert response.status_code == 200, response.text


def test_real_dicom_is_screened_without_leaking_patient_tags(
    served_model, service_keys, registered_model, shared_datasets: Path
):
    from serving.settings import prediction_log_path

    path = shared_datasets / CHEST_XRAY_DICOM
    dataset = pydicom.dcmread(path)
    identifiers = [str(dataset.PatientName), str(dataset.PatientID)]
    assert all(identifiers)
    response = _screen(
        served_model,
        service_keys.all_models,
        path.read_bytes(),
        "study.dcm",
        registered_model.model_name,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    _check_answer(body, registered_model)
    assert body["input"] == {"format": "dicom", "height": 1024, "width": 1024}
    for identifier in identifiers:
        assert identifier not in response.text
        assert identifier not in served_model.log()
        assert identifier not in prediction_log_path().read_text()
    assert body["request_id"] in prediction_log_path().read_text()


def test_nifti_volume_is_screened_by_the_3d_model(
    served_model, service_keys, volume_model, shared_datasets: Path
):
    shared = shared_datasets / "nifti"
    anatomy = (shared / "someones_anatomy.nii.gz").read_bytes()
    response = _screen(
        served_model, service_keys.all_models, anatomy, "t1.nii.gz", volume_model.model_name
    )
    assert response.status_code == 200, response.text
    body = response.json()
    ScreeningAnswer.model_validate(body)
    assert body["model"]["name"] == volume_model.model_name
    assert body["input"]["format"] == "nifti" and body["input"]["depth"] > 1
    assert body["decision"] in ("positive", "negative")
    # A time series, a 2D picture and a flat array are refused with what to send instead.
    series = (shared / "example4d.nii.gz").read_bytes()
    response = _screen(
        served_model, service_keys.all_models, series, "fmri.nii.gz", volume_model.model_name
    )
    assert response.status_code == 422 and "4D" in response.json()["error"]
    picture = _png(np.zeros((28, 28), dtype=np.uint8))
    response = _screen(
        served_model, service_keys.all_models, picture, "x.png", volume_model.model_name
    )
    assert response.status_code == 415 and "NIfTI" in response.json()["error"]
    response = requests.post(
        f"{served_model.url}/v1/screen/array",
        json={
            "model": volume_model.model_name,
            "array": (np.arange(28**3).reshape(28, 28, 28) % 200).astype(np.uint8).tolist(),
        },
        headers=_auth(service_keys.all_models),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["input"]["depth"] == 28


def _ecg_payload(shared_datasets: Path, seconds: int, rate: int) -> tuple[dict, int]:
    import wfdb
    from scipy.signal import resample_poly

    record = wfdb.rdrecord(
        str(shared_datasets / "mitdb" / ECG_RECORD), channel_names=["MLII"], sampto=360 * seconds
    )
    annotation = wfdb.rdann(
        str(shared_datasets / "mitdb" / ECG_RECORD), "atr", sampto=360 * seconds
    )
    samples = record.p_signal[:, 0]
    if rate != 360:
        samples = resample_poly(samples, rate, 360)
    beats = sum(symbol in "NLRejAaJSVEF/fQ" for symbol in annotation.symbol)
    payload = {"samples": samples.round(4).tolist(), "sampling_rate_hz": rate, "lead": "MLII"}
    return payload, beats


@pytest.mark.parametrize("rate", [360, 250])
def test_ecg_samples_get_per_beat_classes_and_an_alert_summary(
    served_model, service_keys, ecg_model, shared_datasets: Path, rate: int
):
    payload, annotated = _ecg_payload(shared_datasets, 60, rate)
    response = requests.post(
        f"{served_model.url}/v1/monitor",
        json=payload,
        headers=_auth(service_keys.all_models),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    MonitoringAnswer.model_validate(body)
    assert body["model"] == {
        "name": ecg_model.model_name,
        "version": ecg_model.version,
        "alias": "candidate",
    }
    assert body["threshold"] == pytest.approx(ecg_model.card.operating_point.threshold)
    summary = body["summary"]
    assert abs(summary["beats"] - annotated) <= 0.05 * annotated
    assert sum(summary["class_counts"].values()) == summary["beats"] == len(body["beats"])
    assert 30 < summary["heart_rate_bpm"] < 200
    beat = body["beats"][10]
    assert beat["class"] in ("N", "S", "V", "F", "Q") and 0 <= beat["ectopic_probability"] <= 1
    assert beat["alert"] == (beat["ectopic_probability"] >= body["threshold"])
    assert body["decision"] == ("alert" if summary["ectopic_alert_beats"] else "no alert")
    assert 0 <= beat["sample"] < len(payload["samples"])
    assert summary["signal_quality"]["acceptable"] is True
    (record,) = [r for r in _log_records() if r["request_id"] == body["request_id"]]
    assert record["summary"]["beats"] == summary["beats"] and record["input_format"] == "json"
    assert record["summary"]["signal_kurtosis"] == summary["signal_quality"]["kurtosis"]


def test_a_client_that_hangs_up_before_its_answer_is_logged_as_failed(
    served_model, service_keys, shared_datasets: Path
):
    """A gone client's answer is never delivered: no record may say it was, or carry a score."""
    payload, _ = _ecg_payload(shared_datasets, 1800, 360)  # half an hour: seconds of decoding
    body = json.dumps(payload).encode()
    head = (
        "POST /v1/monitor HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {service_keys.all_models}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    host, port = served_model.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(head.encode() + body)
        time.sleep(0.5)  # the upload is in; its decoding has begun
    from serving.settings import prediction_log_path

    digest, deadline = hashlib.sha256(body).hexdigest(), time.monotonic() + 60
    while not prediction_log_path().exists() or not (
        records := [r for r in _log_records() if r["input_sha256"] == digest]
    ):
        assert time.monotonic() < deadline, "the request left no record"
        time.sleep(0.2)
    (record,) = records
    assert (record["outcome"], record["status"]) == ("failed", 400)
    assert record["error"] == "the client disconnected before its answer was ready"
    assert record["score"] is None and record["decision"] is None


def test_noise_is_a_signal_quality_alarm_not_a_beat_report(served_model, service_keys):
    # Gaussian noise has "beats" for a QRS detector; it used to come back as ectopic beats.
    noise = np.random.default_rng(0).normal(0.0, 0.3, 360 * 30)
    response = requests.post(
        f"{served_model.url}/v1/monitor",
        json={"samples": noise.round(4).tolist(), "sampling_rate_hz": 360, "lead": "MLII"},
        headers=_auth(service_keys.all_models),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    MonitoringAnswer.model_validate(body)
    assert body["decision"] == "alert"
    assert body["summary"]["signal_quality"]["acceptable"] is False
    first = body["summary"]["findings"][0]
    assert first["finding"] == "signal quality too low to classify beats"
    assert first["priority"] == "high" and "do not rely on the beat classes" in first["detail"]


def test_ecg_dicom_waveform_and_bad_ecg_input(
    served_model, service_keys, ecg_model, shared_datasets: Path
):
    waveform = (shared_datasets / "dicom" / "pydicom_waveform_ecg.dcm").read_bytes()
    response = requests.post(
        f"{served_model.url}/v1/monitor/dicom",
        files={"file": ("ecg.dcm", waveform)},
        headers=_auth(service_keys.all_models),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert MonitoringAnswer.model_validate(response.json()).summary.beats >= 3
    truncated = requests.post(
        f"{served_model.url}/v1/monitor/dicom",
        files={"file": ("ecg.dcm", waveform[:-100])},
        headers=_auth(service_keys.all_models),
        timeout=60,
    )
    assert truncated.status_code == 422, truncated.text
    payload, _ = _ecg_payload(shared_datasets, 20, 360)
    url = f"{served_model.url}/v1/monitor"
    for bad, status, message in (
        ({**payload, "lead": "V1"}, 422, "trained on lead MLII"),
        ({k: v for k, v in payload.items() if k != "sampling_rate_hz"}, 422, "sampling_rate_hz"),
        ({**payload, "samples": payload["samples"][:360]}, 422, "10 s"),
        # Refused at once: the lead's regexes once ran seconds on the event loop for this.
        ({**payload, "lead": "(" * 30_000}, 422, "'lead' is 30000 characters long"),
    ):
        response = requests.post(url, json=bad, headers=_auth(service_keys.all_models), timeout=60)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    # A picture sent to the monitor, or an ECG model named on the screening route.
    response = _screen(
        served_model, service_keys.all_models, b"\x89PNG", "x.png", ecg_model.model_name
    )
    assert response.status_code == 422 and "/v1/monitor" in response.json()["error"]


def test_a_beat_alerts_exactly_when_its_ectopic_probability_reaches_the_threshold(
    served_model, ecg_model
):
    from datasets.waveforms import EcgBeats
    from serving.model import load_served_model
    from serving.monitoring import monitoring_answer

    model = load_served_model(f"{ecg_model.model_name}@candidate")  # as the service loads it
    # A threshold just over a multiple of 1e-6, where a score rounded to 6 decimals falls under.
    point = model.card.operating_point.model_copy(update={"threshold": 0.4300001})
    model.card = model.card.model_copy(update={"operating_point": point})
    classes = list(model.card.classes)
    # Ectopic (S + V) probabilities a hair under, at and over the threshold, as float32 gives.
    ectopic = np.array([0.4299999, 0.4300001, 0.4300003], np.float32)
    probabilities = np.zeros((3, len(classes)), np.float32)
    probabilities[:, classes.index("N")] = 1 - ectopic
    probabilities[:, classes.index("V")] = ectopic
    beats = EcgBeats(
        windows=np.zeros((3, 1, 256), np.float32),
        templates=np.zeros((3, 1, 256), np.float32),
        rr_seconds=np.ones((3, 4), np.float32),
        peak_samples=np.array([0, 360, 720]),
        peak_times_s=np.array([0.0, 1.0, 2.0]),
        signal_kurtosis=10.0,
    )
    answer, _, _ = monitoring_answer(model, beats, probabilities)
    for beat in answer["beats"]:
        assert beat["alert"] == (beat["ectopic_probability"] >= answer["threshold"]), beat
    assert [answer["beats"][index]["alert"] for index in (0, 2)] == [False, True]


def test_a_field_the_route_does_not_take_is_refused_not_ignored(
    served_model, service_keys, registered_model, shared_datasets: Path
):
    # Ignored, a misspelt 'lead' would have classified the model's default lead instead.
    waveform = (shared_datasets / "dicom" / "pydicom_waveform_ecg.dcm").read_bytes()
    payload, _ = _ecg_payload(shared_datasets, 20, 360)
    picture = _png((np.arange(28 * 28).reshape(28, 28) % 251).astype(np.uint8))
    name = registered_model.model_name
    cases = [
        (
            "/v1/screen",
            {"files": {"file": ("x.png", picture)}, "data": {"model": name, "Jane Doe": "1"}},
            "'Jane Doe'",
            "file, model",
        ),
        (
            "/v1/screen/array",
            {"json": {"array": [[7] * 28] * 28, "model": name, "arrray": [], "shape": [28, 28]}},
            "'arrray' (and 1 more)",
            "array, model",
        ),
        (
            "/v1/monitor",
            {"json": {**payload, "leed": "V1"}},
            "'leed'",
            "samples, sampling_rate_hz, lead, model",
        ),
        (
            "/v1/monitor/dicom",
            {"files": {"file": ("ecg.dcm", waveform)}, "data": {"leed": "V1"}},
            "'leed'",
            "file, model, lead",
        ),
    ]
    for route, body, named, accepted in cases:
        response = requests.post(
            f"{served_model.url}{route}", headers=_auth(service_keys.all_models), timeout=60, **body
        )
        assert response.status_code == 422, (route, response.text)
        error = ErrorAnswer.model_validate(response.json()).error
        assert f"{route} takes no field {named}; its fields are {accepted}" == error, error
        (record,) = [r for r in _log_records() if r["request_id"] == response.json()["request_id"]]
        assert record["outcome"] == "failed" and record["status"] == 422
        assert "Jane" not in record["error"] and "leed" not in record["error"]  # masked


def test_a_field_sent_as_a_file_or_in_the_query_is_refused_not_ignored(
    served_model, service_keys, registered_model, shared_datasets: Path
):
    # Ignored, the model or lead would have fallen back to the key's model or the model's lead.
    waveform = (shared_datasets / "dicom" / "pydicom_waveform_ecg.dcm").read_bytes()
    picture = _png((np.arange(28 * 28).reshape(28, 28) % 251).astype(np.uint8))
    name = registered_model.model_name
    cases = [
        (
            "/v1/screen",
            {"files": {"file": ("x.png", picture), "model": ("m.txt", name.encode())}},
            "field 'model' arrived as a file part: send it as a text field",
        ),
        (
            "/v1/monitor/dicom",
            {"files": {"file": ("ecg.dcm", waveform), "lead": ("lead.txt", b"V1")}},
            "field 'lead' arrived as a file part: send it as a text field",
        ),
        (
            "/v1/screen?model=Jane%20Doe",
            {"files": {"file": ("x.png", picture)}},
            "/v1/screen takes no query parameters (got 'model'): send every field in the body",
        ),
        (
            "/v1/monitor/dicom?lead=V1",
            {"files": {"file": ("ecg.dcm", waveform)}},
            "/v1/monitor/dicom takes no query parameters (got 'lead')",
        ),
        (
            "/v1/screen/array?" + name,
            {"json": {"array": [[7] * 28] * 28}},
            f"/v1/screen/array takes no query parameters (got '{name}')",
        ),
    ]
    for route, body, message in cases:
        response = requests.post(
            f"{served_model.url}{route}", headers=_auth(service_keys.all_models), timeout=60, **body
        )
        assert response.status_code == 422, (route, response.text)
        assert message in ErrorAnswer.model_validate(response.json()).error, response.text
        (record,) = [r for r in _log_records() if r["request_id"] == response.json()["request_id"]]
        assert record["outcome"] == "failed" and "Jane" not in record["error"]


def _jpeg_ls_dicom(shared_datasets: Path) -> bytes:
    """A CT slice re-labelled JPEG-LS: a transfer syntax this service has no decoder for."""
    from pydicom.encaps import encapsulate

    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_CT_small.dcm")
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("filename", "content", "status", "message"),
    [
        ("empty.png", b"", 400, "empty"),
        ("notes.txt", b"this is not an image", 415, "not a PNG, JPEG or DICOM"),
        ("truncated.dcm", None, 422, "pixel data"),
        ("waveform.dcm", None, 422, "no pixel data"),
        ("jpeg-ls.dcm", None, 415, "1.2.840.10008.1.2.4.80 (JPEG-LS"),
        ("truncated.png", None, 400, "truncated or corrupt"),
        ("strip.png", None, 422, "would keep 0.3% of itself"),
    ],
)
def test_bad_uploads_get_a_clear_4xx(
    served_model,
    service_keys,
    registered_model,
    shared_datasets: Path,
    filename: str,
    content: bytes | None,
    status: int,
    message: str,
):
    files = {
        "truncated.dcm": "pydicom_MR_truncated.dcm",
        "waveform.dcm": "pydicom_waveform_ecg.dcm",
    }
    if filename in files:
        content = (shared_datasets / "dicom" / files[filename]).read_bytes()
    elif filename == "jpeg-ls.dcm":
        content = _jpeg_ls_dicom(shared_datasets)
    elif filename == "truncated.png":
        content = _png(np.full((64, 64), 7, dtype=np.uint8))[:-40]
    elif filename == "strip.png":  # frames laid side by side, say: 3,000 x 10 pixels
        content = _png((np.arange(30_000).reshape(10, 3_000) % 251).astype(np.uint8))
    response = _screen(
        served_model, service_keys.all_models, content, filename, registered_model.model_name
    )
    assert response.status_code == status, response.text
    assert message in ErrorAnswer.model_validate(response.json()).error
    (record,) = [r for r in _log_records() if r["request_id"] == response.json()["request_id"]]
    assert record["outcome"] == "failed" and record["status"] == status
    assert record.get("score") is None and record.get("decision") is None


def test_malformed_requests_get_a_4xx(served_model, service_keys, registered_model):
    url, headers = f"{served_model.url}/v1/screen", _auth(service_keys.all_models)
    no_field = requests.post(url, files={"image": ("x.png", b"abc")}, headers=headers, timeout=30)
    assert no_field.status_code == 422 and "'file'" in no_field.json()["error"]
    # A part without a filename is a text field to the parser: say so, not "no field 'file'".
    text_part = requests.post(url, files={"file": (None, b"abc")}, headers=headers, timeout=30)
    assert text_part.status_code == 422 and "filename" in text_part.json()["error"]
    for response in (
        requests.post(url, json={"file": "x"}, headers=headers, timeout=30),
        requests.post(
            url,
            data=b"garbage",
            headers={**headers, "Content-Type": "multipart/form-data"},
            timeout=30,
        ),
        requests.post(url, headers=headers, timeout=30),
    ):
        assert response.status_code == 415, response.text
        assert "multipart/form-data" in response.json()["error"]
    too_large = requests.post(
        url, files={"file": ("big.png", b"\0" * (33 * 1024 * 1024))}, headers=headers, timeout=60
    )
    assert too_large.status_code == 413 and "limit" in too_large.json()["error"]
    # Which model: two screening models are served, so a request must name one.
    unnamed = _screen(served_model, service_keys.all_models, _png(np.zeros((28, 28), np.uint8)))
    assert unnamed.status_code == 422 and registered_model.model_name in unnamed.json()["error"]
    unknown = _screen(served_model, service_keys.all_models, b"x", "x.png", "no-such-model")
    assert unknown.status_code == 404 and "GET /v1/models" in unknown.json()["error"]
    # A key that may not use a name learns nothing about whether it exists.
    hidden = _screen(served_model, service_keys.pneumonia_only, b"x", "x.png", "no-such-model")
    assert hidden.status_code == 403
    route = requests.get(f"{served_model.url}/v1/no-such-route", headers=headers, timeout=30)
    assert route.status_code == 404 and "no route" in route.json()["error"]
    outside = requests.get(f"{served_model.url}/no-such-path", headers=headers, timeout=30)
    assert outside.status_code == 404 and "no route /no-such-path" in outside.json()["error"]
    method = requests.get(url, headers=headers, timeout=30)
    assert method.status_code == 405 and "GET is not allowed" in method.json()["error"]
    nested = requests.post(
        f"{served_model.url}/v1/screen/array",
        data=b'{"array":' + b"[" * 100_000,
        headers={**headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert nested.status_code == 400 and "not valid JSON" in nested.json()["error"]


def test_the_openapi_document_publishes_each_route_s_body_answers_and_key(served_model):
    document = requests.get(f"{served_model.url}/v1/openapi.json", timeout=30).json()
    assert document["servers"] == [{"url": "/v1"}]
    schemes = document["components"]["securitySchemes"]
    assert (schemes["bearerAuth"]["type"], schemes["bearerAuth"]["scheme"]) == ("http", "bearer")
    header = schemes["apiKeyHeader"]
    assert (header["type"], header["in"], header["name"]) == ("apiKey", "header", "X-API-Key")
    either_key = [{"bearerAuth": []}, {"apiKeyHeader": []}]
    bodies = {
        "/screen": ("multipart/form-data", ["file"], "ScreeningAnswer"),
        "/screen/array": ("application/json", ["array"], "ScreeningAnswer"),
        "/monitor": (
            "application/json",
            ["samples", "sampling_rate_hz", "lead"],
            "MonitoringAnswer",
        ),
        "/monitor/dicom": ("multipart/form-data", ["file"], "MonitoringAnswer"),
    }
    for path, (media_type, required, answer) in bodies.items():
        operation = document["paths"][path]["post"]
        assert operation["security"] == either_key, path
        assert list(operation["requestBody"]["content"]) == [media_type], path
        schema = operation["requestBody"]["content"][media_type]["schema"]
        assert schema["required"] == required, path
        assert "model" in schema["properties"], path
        responses = operation["responses"]
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"] == (
            f"#/components/schemas/{answer}"
        )
        for status in ("400", "401", "403", "404", "413", "415", "422", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == (
                "#/components/schemas/ErrorAnswer"
            ), (path, status)
    listing = document["paths"]["/models"]["get"]
    assert listing["security"] == either_key
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == (
        "#/components/schemas/ModelList"
    )
    # The answers' fields as published: what the tests above validate real answers against.
    published = document["components"]["schemas"]
    assert set(published["ScreeningAnswer"]["required"]) == {
        name for name, field in ScreeningAnswer.model_fields.items() if field.is_required()
    }
    assert set(published["BeatAnswer"]["properties"]) >= {"class", "ectopic_probability", "alert"}


def test_keys_are_required_and_bound_to_their_models(
    served_model, service_keys, registered_model, ecg_model, volume_model
):
    picture = _png(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    url = f"{served_model.url}/v1/screen"
    files = {"file": ("x.png", picture)}
    data = {"model": registered_model.model_name}
    missing = requests.post(url, files=files, data=data, timeout=30)
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    for key in ("msk_0123456789ab_wrong", "garbage", service_keys.revoked):
        response = requests.post(url, files=files, data=data, headers=_auth(key), timeout=30)
        assert response.status_code == 401, response.text
    granted = requests.post(
        url, files=files, data=data, headers=_auth(service_keys.pneumonia_only), timeout=30
    )
    assert granted.status_code == 200, granted.text
    # X-API-Key alone, and beside a proxy's own Authorization, which hid it before.
    for headers in (
        {"X-API-Key": service_keys.pneumonia_only},
        {"X-API-Key": service_keys.pneumonia_only, "Authorization": "Basic cHJveHk6c2VjcmV0"},
    ):
        response = requests.post(url, files=files, data=data, headers=headers, timeout=30)
        assert response.status_code == 200, (headers.keys(), response.text)
    proxy_only = requests.post(
        url, files=files, data=data, headers={"Authorization": "Basic cHJveHk6c2VjcmV0"}, timeout=30
    )
    assert proxy_only.status_code == 401 and "malformed API key" in proxy_only.json()["error"]
    # A key in Authorization, bare or Bearer, is the one checked: a revoked one is not passed
    # over for another in X-API-Key.
    for authorization in (service_keys.revoked, f"Bearer {service_keys.revoked}"):
        both = requests.post(
            url,
            files=files,
            data=data,
            headers={"Authorization": authorization, "X-API-Key": service_keys.all_models},
            timeout=30,
        )
        assert both.status_code == 401 and "revoked" in both.json()["error"], both.text
    forbidden = requests.post(
        url,
        files=files,
        data={"model": volume_model.model_name},
        headers=_auth(service_keys.pneumonia_only),
        timeout=30,
    )
    assert forbidden.status_code == 403
    assert "County General" in forbidden.json()["error"]
    assert volume_model.model_name in forbidden.json()["error"]
    # Not naming one: an ECG is monitored here, just not for this key.
    unmonitored = requests.post(
        f"{served_model.url}/v1/monitor",
        json={"samples": [0.0] * 3600, "sampling_rate_hz": 360, "lead": "II"},
        headers=_auth(service_keys.pneumonia_only),
        timeout=30,
    )
    assert unmonitored.status_code == 403, unmonitored.text
    assert "not granted any ECG monitoring model" in unmonitored.json()["error"]

    listed = requests.get(
        f"{served_model.url}/v1/models", headers=_auth(service_keys.pneumonia_only), timeout=30
    )
    assert [model["name"] for model in listed.json()["models"]] == [registered_model.model_name]
    everything = ModelList.model_validate(
        requests.get(
            f"{served_model.url}/v1/models", headers=_auth(service_keys.all_models), timeout=30
        ).json()
    ).model_dump()["models"]
    by_name = {model["name"]: model for model in everything}
    assert set(by_name) == {
        registered_model.model_name,
        ecg_model.model_name,
        volume_model.model_name,
    }
    pneumonia = by_name[registered_model.model_name]
    assert pneumonia["version"] == registered_model.version and pneumonia["alias"] == "candidate"
    assert pneumonia["threshold"] == pytest.approx(registered_model.card.operating_point.threshold)
    assert pneumonia["card"]["intended_use"] == registered_model.card.intended_use
    assert "test_auc" in pneumonia["card"]["metrics"]
    assert by_name[ecg_model.model_name]["routes"] == ["/v1/monitor", "/v1/monitor/dicom"]
    unauthorised = requests.get(f"{served_model.url}/v1/models", timeout=30)
    assert unauthorised.status_code == 401
    # A refused request is logged as failed, with who was refused and nothing else.
    (record,) = [r for r in _log_records() if r["request_id"] == forbidden.json()["request_id"]]
    assert record["outcome"] == "failed" and record["status"] == 403
    assert record["hospital"] == "County General" and record.get("score") is None
    # Whatever the client puts in a field never reaches the log, even with both kinds of quote.
    named = """x'Doe"Jane Smith 1956-03-02"""
    refused = requests.post(
        url,
        files=files,
        data={"model": named},
        headers=_auth(service_keys.pneumonia_only),
        timeout=30,
    )
    assert refused.status_code == 403 and "Jane Smith 1956-03-02" in refused.json()["error"]
    (record,) = [r for r in _log_records() if r["request_id"] == refused.json()["request_id"]]
    assert "Jane Smith" not in record["error"] and "Jane Smith" not in served_model.log()


def test_prediction_log_verifies_and_catches_tampering(
    served_model, service_keys, registered_model, pneumonia_case: np.ndarray, tmp_path: Path
):
    from serving.settings import prediction_log_path

    # Two predictions of this test's own, so that it needs no other test's records.
    request_ids = []
    for _ in range(2):
        answer = requests.post(
            f"{served_model.url}/v1/screen",
            files={"file": ("case.png", _png(pneumonia_case[0]))},
            data={"model": registered_model.model_name},
            headers=_auth(service_keys.all_models),
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        request_ids.append(answer.json()["request_id"])
    log = prediction_log_path()
    verified = subprocess.run(
        [*medscreen_command(), "audit", "verify"], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "hash chain intact" in verified.stdout
    copy = tmp_path / "predictions.jsonl"
    shutil.copy(log, copy)
    shutil.copy(log.with_name(log.name + ".head.json"), tmp_path / (copy.name + ".head.json"))
    lines = copy.read_text().splitlines()
    (at,) = [i for i, line in enumerate(lines) if json.loads(line)["request_id"] == request_ids[0]]
    edited = json.loads(lines[at])
    assert edited["outcome"] == "prediction"
    edited["decision"] = "negative" if edited["decision"] == "positive" else "positive"
    lines[at] = json.dumps(edited)
    copy.write_text("\n".join(lines) + "\n")
    tampered = subprocess.run(
        [*medscreen_command(), "audit", "verify", "--log", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tampered.returncode == 1 and f"line {at + 1}" in tampered.stdout, tampered.stdout


def test_alias_move_switches_version_without_restart_or_failed_requests(
    served_model, service_keys, registered_model, trained_run, pneumonia_case: np.ndarray
):
    from training import export_and_register
    from training.registry import promote

    _, run = trained_run
    second = export_and_register(run.run_id)
    content, name = _png(pneumonia_case[0]), registered_model.model_name
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(
                        f"{served_model.url}/v1/screen",
                        files={"file": ("case.png", content)},
                        data={"model": name},
                        headers=_auth(service_keys.all_models),
                        timeout=60,
                    )
                    version = response.json().get("model", {}).get("version")
                except Exception as error:  # a reset or a body that is no JSON: a failure too
                    seen.append((repr(error), None))
                    return
                seen.append((response.status_code, version))

    def serving_version() -> str:
        models = requests.get(
            f"{served_model.url}/v1/models", headers=_auth(service_keys.all_models), timeout=30
        ).json()["models"]
        return next(model["version"] for model in models if model["name"] == name)

    senders = [threading.Thread(target=traffic) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(1)
        for target in (second.version, registered_model.version):  # there and back again
            promote(name, target, alias="candidate", approver="ci", reason="hot switch test")
            deadline = time.monotonic() + 30
            while serving_version() != target:
                assert time.monotonic() < deadline, f"still not serving version {target}"
                time.sleep(0.3)
            time.sleep(1)
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    assert seen and all(status == 200 for status, _ in seen), seen
    assert {version for _, version in seen} == {registered_model.version, second.version}
    switched_to_second = (
        f"{name}@candidate moved from version {registered_model.version} to {second.version} "
        f"(ONNX SHA-256 {second.card.onnx.sha256})"
    )
    assert switched_to_second in served_model.log()


def test_a_withdrawn_model_answers_503_until_an_approved_version_is_back(
    served_model, service_keys, registered_model, pneumonia_case: np.ndarray
):
    from training.registry import promote
    from training.tracking import configure_tracking

    configure_tracking()
    name, client = registered_model.model_name, mlflow.MlflowClient()
    version = str(client.get_model_version_by_alias(name, "candidate").version)
    content = _png(pneumonia_case[0])

    def wait_for(status: int) -> requests.Response:
        deadline = time.monotonic() + 30
        while (
            response := _screen(served_model, service_keys.all_models, content, model=name)
        ).status_code != status:
            assert time.monotonic() < deadline, f"still {response.status_code}, not {status}"
            time.sleep(0.3)
        return response

    client.delete_registered_model_alias(name, "candidate")
    try:
        refused = wait_for(503)
        message = refused.json()["error"]
        assert "withdrawn from this service" in message and "approve a version" in message
        assert "alias or registered model was deleted" in message
        record = next(
            record
            for record in reversed(_log_records())
            if record["request_id"] == refused.headers["X-Request-ID"]
        )
        assert (record["outcome"], record["status"]) == ("failed", 503)
        assert f"{name} version {version} withdrawn" in served_model.log()
    finally:
        promote(name, version, alias="candidate", approver="ci", reason="withdrawal test")
    assert wait_for(200).json()["model"]["version"] == version


def test_health_and_metrics_endpoints_stay_on(served_model):
    assert requests.get(f"{served_model.url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{served_model.url}/livez", timeout=10).status_code == 200
    metrics = requests.get(f"{served_model.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text
    # BentoML's index page (it loads Google Tag Manager) and its key-less OpenAPI: ours instead.
    for page, ours in (("/", "/v1/docs"), ("/docs.json", "/v1/openapi.json")):
        moved = requests.get(f"{served_model.url}{page}", timeout=10, allow_redirects=False)
        assert (moved.status_code, moved.headers["location"]) == (307, ours), moved.text
        followed = requests.get(f"{served_model.url}{page}", timeout=10)
        assert followed.status_code == 200 and "googletagmanager" not in followed.text
    assert "bearer" in json.dumps(requests.get(f"{served_model.url}/docs.json", timeout=10).json())
    # The docs page loads Swagger UI from the service itself, not from a CDN.
    page = requests.get(f"{served_model.url}/v1/docs", timeout=10).text
    assets = re.findall(r"(?:src|href)=[\'\"]([^\'\"]+)", page)
    assert len(assets) >= 3 and "//" not in "".join(assets), assets
    for asset in assets:
        assert requests.get(f"{served_model.url}{asset}", timeout=10).status_code == 200, asset
    assert "/v1/openapi.json" in page


def test_predict_cli_prints_the_answer(
    served_model, service_keys, registered_model, shared_datasets: Path
):
    completed = subprocess.run(
        [
            *medscreen_command(),
            "predict",
            str(shared_datasets / CHEST_XRAY_DICOM),
            "--url",
            served_model.url + "/",  # a trailing slash is how many people write a base URL
            "--model",
            registered_model.model_name,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MEDSCREEN_API_KEY": service_keys.all_models},
    )
    assert completed.returncode == 0, completed.stderr
    body = json.loads(completed.stdout)
    _check_answer(body, registered_model)
    assert body["input"]["format"] == "dicom"
    assert "Covid0000" not in completed.stdout  # the file's PatientName and PatientID
    (record,) = [r for r in _log_records() if r["request_id"] == body["request_id"]]
    assert record["decision"] == body["decision"]
    assert record["score"] == pytest.approx(body["probability"])


def test_serve_cli_names_an_unknown_model_or_a_bad_reference():
    port = str(free_port())
    line = medscreen_error_line("serve", "--model", "no-such-model@champion", "--port", port)
    assert "no-such-model@champion" in line
    line = medscreen_error_line("serve", "--model", "pneumonia-screening", "--port", port)
    assert "NAME@ALIAS or NAME@VERSION" in line
    line = medscreen_error_line("serve", "--port", "99999")
    assert line == "error: --port: 99999 is not a TCP port (1-65535)"
    line = medscreen_error_line("serve", "--reload-seconds", "nan")
    assert line == "error: --reload-seconds: nan is not a number >= 0"
    for host in ("999.1.1.1", "192.0.2.1"):  # not an address; not one of this machine's
        line = medscreen_error_line("serve", "--host", host, "--port", port)
        assert line.startswith(f"error: --host: cannot listen on '{host}': ")
        assert line.endswith("(give an address of this machine)")


@pytest.mark.parametrize(
    ("variable", "value", "wanted"),
    [
        ("MEDSCREEN_MAX_BATCH", "abc", "a whole number of requests, at least 1 (default: 64)"),
        ("MEDSCREEN_MAX_BATCH", "0", "a whole number of requests, at least 1 (default: 64)"),
        ("MEDSCREEN_ORT_THREADS", "-1", "a whole number of threads, at least 1 (default: the "),
        ("MEDSCREEN_DECODE_MEMORY_MB", "1.5", "a whole number of MiB, at least 1 (default: 1024)"),
        ("MEDSCREEN_ACCESS_LOG", "ture", "true or false (default: false)"),
    ],
)
def test_serve_cli_names_a_bad_setting_before_anything_starts(variable, value, wanted):
    # These are read by the service's worker, which BentoML restarted again and again.
    line = medscreen_error_line("serve", "--port", str(free_port()), env={variable: value})
    assert line.startswith(f"error: {variable}={value!r}: give {wanted}"), line


def test_the_default_threads_follow_the_cores_this_process_may_use(tmp_path: Path):
    # os.cpu_count() is the host's: a 2-CPU container on a large node started a thread per
    # host core.
    from serving.settings import usable_cores

    affinity = len(os.sched_getaffinity(0))
    pod = tmp_path / "kubepods" / "pod1"
    (pod / "container").mkdir(parents=True)
    for written, cores in (
        ("50000 100000\n", 1),  # half a core: one
        ("150000 100000\n", min(2, affinity)),
        ("max 100000\n", affinity),
        ("not a quota\n", affinity),
    ):
        (pod / "cpu.max").write_text(written)  # the pod's quota, one level above the process
        (pod / "container" / "cpu.max").write_text("max 100000\n")
        assert usable_cores(tmp_path, "/kubepods/pod1/container") == cores, written
    assert usable_cores(tmp_path / "absent", "/") == affinity
    taskset = shutil.which("taskset")
    if taskset is None or affinity < 2:
        pytest.skip("taskset, and 2 CPUs, are needed to pin the command to one")
    pinned = subprocess.run(
        [
            taskset,
            "-c",
            str(min(os.sched_getaffinity(0))),
            sys.executable,
            "-c",
            "from serving.settings import usable_cores; print(usable_cores())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=PROJECT_ROOT,
    )
    assert pinned.stdout.strip() == "1"


def test_serve_cli_refuses_a_prediction_log_or_key_store_it_cannot_use(
    registered_model, tmp_path: Path
):
    """Found only by the first request, they would fail every answer (503, 401)."""
    from serving.settings import tracking_uri
    from training.registry import promote

    name = registered_model.model_name
    promote(name, registered_model.version, alias="candidate", approver="ci", reason="serve")
    serve = ("serve", "--model", f"{name}@candidate", "--port", str(free_port()))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    line = medscreen_error_line(*serve, env={"MEDSCREEN_PREDICTION_LOG": str(folder)})
    assert line == (
        f"error: prediction log {folder}: cannot be written (Is a directory); the path is "
        "from $MEDSCREEN_PREDICTION_LOG"
    )
    under_a_file = tmp_path / "a-file"
    under_a_file.write_text("")
    line = medscreen_error_line(
        *serve,
        env={
            "MEDSCREEN_STATE_DIR": str(under_a_file / "state"),
            "MLFLOW_TRACKING_URI": tracking_uri(),
        },
    )
    assert line.startswith(f"error: prediction log {under_a_file}/state/serving/predictions.jsonl")
    assert line.endswith("set $MEDSCREEN_STATE_DIR or $MEDSCREEN_PREDICTION_LOG")
    not_a_store = tmp_path / "keys.json"
    not_a_store.write_text('{"keys": "none"}')
    line = medscreen_error_line(*serve, env={"MEDSCREEN_KEY_STORE": str(not_a_store)})
    assert line.startswith(f"error: {not_a_store}: not a valid key store: ")


def test_serve_cli_warns_of_a_key_store_without_a_usable_key(
    registered_model, tmp_path: Path, monkeypatch
):
    from serving.api_keys import KeyStore
    from serving.cli import _check_local_state
    from training.registry import promote

    store_path = tmp_path / "keys.json"
    monkeypatch.setenv("MEDSCREEN_KEY_STORE", str(store_path))
    monkeypatch.setenv("MEDSCREEN_PREDICTION_LOG", str(tmp_path / "log" / "predictions.jsonl"))
    assert _check_local_state() is False  # no store yet: no key
    store = KeyStore(store_path)
    revoked, revoked_plain = store.create("Closed Clinic", "south", ["*"])
    store.revoke(revoked.key_id)
    assert _check_local_state() is False
    # The operator is told at start, and the service still starts: keys can be added live.
    name = registered_model.model_name
    promote(name, registered_model.version, alias="candidate", approver="ci", reason="serve")
    with monkeypatch.context() as served:
        served.setenv("MEDSCREEN_PREDICTION_LOG", str(tmp_path / "served" / "predictions.jsonl"))
        with running_server([f"{name}@candidate"], tmp_path) as server:
            assert "holds no usable API key, so every request will get a 401" in server.log()
            refused = requests.get(
                f"{server.url}/v1/models", headers=_auth(revoked_plain), timeout=30
            )
            assert refused.status_code == 401, refused.text
    store.create("St Elsewhere", "north", ["*"])
    assert _check_local_state() is True
    # The check opens what the first record needs, and writes no log.
    assert (tmp_path / "log").is_dir() and not (tmp_path / "log" / "predictions.jsonl").exists()


def test_serve_cli_refuses_a_model_named_twice():
    """Requests name a model, not a version: one of two versions could never answer."""
    port = str(free_port())
    line = medscreen_error_line("serve", "--model", "x@champion", "--model", "x@2", "--port", port)
    assert line == (
        "error: --model: model 'x' is named twice (x@champion and x@2); serve one version of "
        "each model"
    )


def test_serve_cli_names_a_port_in_use_in_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = medscreen_error_line("serve", "--model", "any@champion", "--port", str(port))
    assert line.startswith(f"error: --port: 127.0.0.1:{port} is in use: ")
    assert "another medscreen serve" in line


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["serve", "--port", "abc"], "error: Invalid value for '--port'"),
        (["serve", "--workers", "0"], "error: Invalid value for '--workers'"),
        (["keys", "revoke"], "error: Missing argument 'key_id'"),
        (["datasets", "list", "--bogus"], "error: No such option: --bogus"),
        (["predict", __file__, "--url", "localhost:3000"], "error: --url: 'localhost:3000' is not"),
        (["predict", __file__, "--url", "http://[::1"], "error: --url: 'http://[::1' is not"),
        (["predict", __file__, "--url", "http://127.0.0.1:99999"], "error: --url: 'http://127"),
        # "no such file" misled about a folder that is there.
        (["predict", str(Path(__file__).parent)], f"error: {Path(__file__).parent}: a directory"),
        # "has no version '1'" blamed the version of a model that does not exist.
        (
            [
                "models",
                "promote",
                "no-such-model",
                "1",
                "--to",
                "champion",
                "--approver",
                "qa",
                "--reason",
                "r",
            ],
            "error: no registered model 'no-such-model'",
        ),
    ],
)
def test_usage_errors_are_one_line_naming_the_option(arguments: list[str], expected: str):
    assert medscreen_error_line(*arguments).startswith(expected)


def test_predict_cli_never_echoes_a_malformed_key(shared_datasets: Path):
    secret = "msk_0123456789ab_secret\npart"
    line = medscreen_error_line(
        "predict", str(shared_datasets / CHEST_XRAY_DICOM), "--api-key", secret
    )
    assert line.startswith("error: --api-key:") and "secret" not in line
