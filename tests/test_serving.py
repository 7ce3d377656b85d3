"""The real BentoML server on a free port: real uploads, real DICOM parsing, bad inputs."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pydicom
import pytest
import requests
from PIL import Image

from datasets import get_dataset_spec, load_split
from tests.conftest import medscreen_command, medscreen_error_line

pytestmark = pytest.mark.slow

CHEST_XRAY_DICOM = "dicom/nih_chestxray14_dx_1024.dcm"


def _screen(server, content: bytes, filename: str = "upload") -> requests.Response:
    return requests.post(f"{server.url}/v1/screen", files={"file": (filename, content)}, timeout=60)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_answer(body: dict, registered_model) -> None:
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


def test_png_answer_matches_the_registered_onnx_model(
    served_model, registered_model, medmnist_dir: Path
):
    test = load_split(get_dataset_spec("pneumoniamnist"), "test", data_dir=medmnist_dir)
    image = test.images[int(np.flatnonzero(test.labels == 1)[0])]
    response = _screen(served_model, _png(image[0]), "case.png")
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
    (probabilities,) = session.run(None, {"image": image[None]})
    assert body["probability"] == pytest.approx(float(probabilities[0, 1]), abs=1e-6)


def test_jpeg_is_accepted(served_model, registered_model):
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))).save(buffer, "JPEG")
    response = _screen(served_model, buffer.getvalue(), "case.jpg")
    assert response.status_code == 200, response.text
    _check_answer(response.json(), registered_model)
    assert response.json()["input"]["format"] == "jpeg"


def test_real_dicom_is_screened_without_leaking_patient_tags(
    served_model, registered_model, shared_datasets: Path
):
    path = shared_datasets / CHEST_XRAY_DICOM
    dataset = pydicom.dcmread(path)
    identifiers = [str(dataset.PatientName), str(dataset.PatientID)]
    assert all(identifiers)
    response = _screen(served_model, path.read_bytes(), "study.dcm")
    assert response.status_code == 200, response.text
    body = response.json()
    _check_answer(body, registered_model)
    assert body["input"] == {"format": "dicom", "height": 1024, "width": 1024}
    for identifier in identifiers:
        assert identifier not in response.text
        assert identifier not in served_model.log()
    assert body["request_id"] in served_model.log()


@pytest.mark.parametrize(
    ("filename", "content", "status", "message"),
    [
        ("empty.png", b"", 400, "empty"),
        ("notes.txt", b"this is not an image", 415, "not a PNG, JPEG or DICOM"),
        ("truncated.dcm", None, 422, "pixel data cannot be decoded"),
        ("waveform.dcm", None, 422, "no pixel data"),
        ("truncated.png", None, 400, "truncated or corrupt"),
    ],
)
def test_bad_uploads_get_a_clear_4xx(
    served_model,
    shared_datasets: Path,
    filename: str,
    content: bytes | None,
    status: int,
    message: str,
):
    if filename == "truncated.dcm":
        content = (shared_datasets / "dicom" / "pydicom_MR_truncated.dcm").read_bytes()
    elif filename == "waveform.dcm":
        content = (shared_datasets / "dicom" / "pydicom_waveform_ecg.dcm").read_bytes()
    elif filename == "truncated.png":
        content = _png(np.full((64, 64), 7, dtype=np.uint8))[:-40]
    response = _screen(served_model, content, filename)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_malformed_requests_get_a_4xx(served_model):
    url = f"{served_model.url}/v1/screen"
    no_field = requests.post(url, files={"image": ("x.png", b"abc")}, timeout=30)
    assert no_field.status_code == 400 and "file" in no_field.text
    for response in (
        requests.post(url, json={"file": "x"}, timeout=30),
        requests.post(
            url, data=b"garbage", headers={"Content-Type": "multipart/form-data"}, timeout=30
        ),
        requests.post(url, timeout=30),
    ):
        assert response.status_code == 415, response.text
        assert "multipart/form-data" in response.json()["error"]


def test_health_and_metrics_endpoints_stay_on(served_model):
    assert requests.get(f"{served_model.url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{served_model.url}/livez", timeout=10).status_code == 200
    metrics = requests.get(f"{served_model.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text


def test_predict_cli_prints_the_answer(served_model, shared_datasets: Path):
    completed = subprocess.run(
        [
            *medscreen_command(),
            "predict",
            str(shared_datasets / CHEST_XRAY_DICOM),
            "--url",
            served_model.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert '"decision"' in completed.stdout


def test_serve_cli_names_an_unknown_model_or_a_bad_reference():
    line = medscreen_error_line("serve", "--model", "no-such-model@champion", "--port", "1")
    assert "no-such-model@champion" in line
    line = medscreen_error_line("serve", "--model", "pneumonia-screening", "--port", "1")
    assert "NAME@ALIAS or NAME@VERSION" in line
