"""Shared fixtures: the real data, a temporary MLflow store, one trained and registered model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("MEDSCREEN_SHARED_DATASETS", PROJECT_ROOT.parent / "shared" / "datasets")
)
QUICK_RECIPE = PROJECT_ROOT / "training" / "recipes" / "pneumonia-quick.yaml"
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def medscreen_command() -> list[str]:
    return [str(Path(sys.executable).with_name("medscreen"))]


def medscreen_error_line(*args: str) -> str:
    """Run a `medscreen` command that must fail on bad input; return its one error line."""
    completed = subprocess.run(
        [*medscreen_command(), *args], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    return lines[0]


@dataclass
class RunningServer:
    url: str
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def served_model(registered_model, tmp_path_factory: pytest.TempPathFactory):
    """The real BentoML server, started by `medscreen serve` on a free port, by alias."""
    from training.registry import promote

    promote(
        registered_model.model_name,
        registered_model.version,
        alias="candidate",
        approver="ci-serving-tests",
        reason="serve the test model by alias",
    )
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *medscreen_command(),
                "serve",
                "--model",
                f"{registered_model.model_name}@candidate",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path_factory.mktemp("cwd"),
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
