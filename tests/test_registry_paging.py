"""More registered models than MLflow answers in one page (100) are all seen."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import medscreen_command

MODELS = 101  # one past MLflow's page


def test_every_registered_model_is_listed_and_served_past_one_page(tmp_path: Path):
    from serving.pool import default_references

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    names = [f"model-{number:03d}" for number in range(MODELS)]
    for name in names:
        client.create_registered_model(name)
        version = client.create_model_version(name, str(tmp_path / "model"))
        client.set_registered_model_alias(name, "champion", version.version)
    assert default_references(uri) == [f"{name}@champion" for name in names]
    listed = subprocess.run(
        [*medscreen_command(), "models", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "COLUMNS": "200"},
    )
    assert listed.returncode == 0, listed.stderr
    assert all(f" {name} " in listed.stdout for name in names), listed.stdout[-2000:]
