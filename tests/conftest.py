"""Shared fixtures: the real data, a temporary MLflow store, one trained and registered model."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from mlflow.tracking import MlflowClient
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("MEDSCREEN_SHARED_DATASETS", PROJECT_ROOT.parent / "shared" / "datasets")
)
RECIPES = PROJECT_ROOT / "training" / "recipes"
QUICK_RECIPE = RECIPES / "pneumonia-quick.yaml"
# Small enough for a few seconds of CPU training, large enough for a meaningful AUC.
TINY_TRAINING = [
    "data.max_train_samples=384",
    "data.max_val_samples=160",
    "data.max_test_samples=160",
    "optimisation.max_epochs=2",
    # A two-epoch model on a subset cannot meet the shipped release gate; this one it can.
    "registration.minimum_metrics={test_auc: 0.6}",
    "registration.int8_max_auc_drop=0.05",
]


# A one-epoch beat network on a few DS1 records: it runs, it is not a clinical model.
TINY_ECG = [
    'data.train_records=["106", "118", "207", "209"]',
    'data.val_records=["220"]',
    "data.max_normal_beats_per_record=80",
    "optimisation.max_epochs=1",
    "model.block_config=[2, 2]",
    "registration.minimum_metrics={val_accuracy: 0.0}",
]
# network_params of a MONAI DenseNet small enough to build and run in milliseconds.
TINY_DENSENET = {"init_features": 8, "growth_rate": 4, "block_config": [2, 2]}
# A small DenseNet for one epoch (2D or 3D), on part of the data.
TINY_VOLUME = [
    "model.network=DenseNet",
    "model.network_params={init_features: 8, growth_rate: 8, block_config: [2, 2]}",
    "model.network_input_size=32",
    "optimisation.max_epochs=1",
    "data.max_train_samples=160",
    "data.max_test_samples=120",
    "data.batch_size=32",
    "registration.minimum_metrics={}",
]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED_DATASETS / "medmnist" / "pneumoniamnist.npz").is_file():
        pytest.fail(f"real test data missing: {SHARED_DATASETS} (set MEDSCREEN_SHARED_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def medmnist_dir(shared_datasets: Path) -> Path:
    return shared_datasets / "medmnist"


@pytest.fixture(scope="session", autouse=True)
def isolated_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test session gets its own MLflow store and BentoML home."""
    state = tmp_path_factory.mktemp("state")
    saved = {
        key: os.environ.get(key)
        for key in (
            "MEDSCREEN_STATE_DIR",
            "MLFLOW_TRACKING_URI",
            "MEDSCREEN_DATA_DIR",
            "MEDSCREEN_ECG_DIR",
            "BENTOML_HOME",
        )
    }
    os.environ["MEDSCREEN_STATE_DIR"] = str(state)
    os.environ["BENTOML_HOME"] = str(state / "bentoml")
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MEDSCREEN_DATA_DIR", None)
    os.environ.pop("MEDSCREEN_ECG_DIR", None)
    yield state
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def trained_run(medmnist_dir: Path):
    from training import load_recipe, train_recipe

    recipe = load_recipe(QUICK_RECIPE, [f"data.data_dir={medmnist_dir}", *TINY_TRAINING])
    return recipe, train_recipe(recipe, show_progress=False)


@pytest.fixture(scope="session")
def registered_model(trained_run):
    from training import export_and_register

    _, result = trained_run
    return export_and_register(result.run_id)


@pytest.fixture(scope="session")
def ecg_run(shared_datasets: Path):
    from training import load_recipe
    from training.ecg import train_ecg

    recipe = load_recipe(
        RECIPES / "ecg-full.yaml", [f"data.records_dir={shared_datasets / 'mitdb'}", *TINY_ECG]
    )
    return train_ecg(recipe, show_progress=False)


@pytest.fixture(scope="session")
def ecg_model(ecg_run, shared_datasets: Path):
    from training.ecg_export import export_ecg_and_register

    return export_ecg_and_register(ecg_run.run_id, records_dir=shared_datasets / "mitdb")


@pytest.fixture(scope="session")
def volume_model(medmnist_dir: Path):
    from training import export_and_register, load_recipe, train_recipe

    recipe = load_recipe(
        RECIPES / "vessel3d-full.yaml", [f"data.data_dir={medmnist_dir}", *TINY_VOLUME]
    )
    return export_and_register(train_recipe(recipe, show_progress=False).run_id)


def registration_tags(name: str, version: str) -> dict[str, str]:
    """The tags `medscreen export` gave a version (gate, hashes, threshold), without approvals.

    For tests that register the same graph again as further versions.
    """
    from training.tracking import configure_tracking

    configure_tracking()
    tags = MlflowClient().get_model_version(name, version).tags
    governance = ("medscreen.approval.", "medscreen.alias_")
    return {key: value for key, value in tags.items() if not key.startswith(governance)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def medscreen_command() -> list[str]:
    return [str(Path(sys.executable).with_name("medscreen"))]


def medscreen_error_line(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a `medscreen` command that must fail on bad input; return its one error line.

    ``env`` holds variables added to the environment.
    """
    completed = subprocess.run(
        [*medscreen_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    return lines[0]


def check_recorded_commit(commit: str, dirty: str) -> None:
    """A recorded commit is one of this checkout's, whenever git can read the checkout."""
    try:
        readable = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, timeout=30
            ).returncode
            == 0
        )
    except OSError:  # no git at all
        readable = False
    if not readable:  # a copy without its history, or one git refuses: nothing to name
        assert (commit, dirty) == ("unknown", "unknown")
        return
    assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
    subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=PROJECT_ROOT, check=True)
    assert dirty in ("true", "false")


def logged_refusal(error: Exception, directory: Path, route: str = "/x") -> str:
    """The prediction log's text once the service has refused a request with ``error``.

    Through the service's own refusal path and a real log, without a server.
    """
    from serving.prediction_log import PredictionLog
    from serving.service import Screening, _Exchange

    screening = object.__new__(Screening.inner)  # only its log is needed to refuse
    screening.log = PredictionLog(directory / "predictions.jsonl")
    try:
        response = asyncio.run(screening._refuse(_Exchange(route), error))
    finally:
        screening.log.close()
    assert response.status_code == error.status
    return (directory / "predictions.jsonl").read_text()


@dataclass
class RunningServer:
    url: str
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class ServiceKeys:
    """Plain keys for the served models: every model, or the pneumonia model only."""

    all_models: str
    pneumonia_only: str
    revoked: str


@pytest.fixture(scope="session")
def service_keys(registered_model) -> ServiceKeys:
    from serving.api_keys import KeyStore
    from serving.settings import key_store_path

    store = KeyStore(key_store_path())
    _, all_models = store.create("St Elsewhere", "north", ["*"])
    _, pneumonia_only = store.create("County General", "south", [registered_model.model_name])
    revoked_key, revoked = store.create("Closed Clinic", "south", ["*"])
    store.revoke(revoked_key.key_id)
    return ServiceKeys(all_models=all_models, pneumonia_only=pneumonia_only, revoked=revoked)


@pytest.fixture(scope="session")
def served_model(registered_model, ecg_model, volume_model, service_keys, tmp_path_factory):
    """The real BentoML server, started by `medscreen serve` on a free port, by alias.

    It serves the pneumonia, ECG and 3D models, and checks aliases every second.
    """
    from training.registry import promote

    for model in (registered_model, ecg_model, volume_model):
        promote(
            model.model_name,
            model.version,
            alias="candidate",
            approver="ci-serving-tests",
            reason="serve the test model by alias",
        )
    references = [
        f"{model.model_name}@candidate" for model in (registered_model, ecg_model, volume_model)
    ]
    with running_server(
        references, tmp_path_factory.mktemp("server"), "--reload-seconds", "1"
    ) as server:
        yield server


@contextlib.contextmanager
def running_server(
    references: list[str], work_dir: Path, *arguments: str
) -> Iterator[RunningServer]:
    """Start `medscreen serve` for ``references`` on a free port; stop it (and its group) after."""
    port = free_port()
    log_path = work_dir / "server.log"
    (work_dir / "cwd").mkdir(exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *medscreen_command(),
                "serve",
                *(argument for reference in references for argument in ("--model", reference)),
                "--port",
                str(port),
                *arguments,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=work_dir / "cwd",
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in 120 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield RunningServer(url=url, log_path=log_path, process=process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def grayscale_dicom(rows: int, columns: int, bits: int, pixel_data: bytes, syntax: str) -> bytes:
    """A minimal grayscale DICOM image (secondary capture) around ``pixel_data``."""
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = bits
    dataset.HighBit, dataset.PixelRepresentation = bits - 1, 0
    dataset.PixelData = pixel_data
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
