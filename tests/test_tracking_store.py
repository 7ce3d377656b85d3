"""The embedded MLflow store: several commands may open a new one at the same moment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import medscreen_command


def test_commands_started_together_on_a_new_state_directory_all_work(tmp_path: Path) -> None:
    # MLflow creates its tables on first use: unlocked, racing processes crashed with
    # "duplicate column name" or "table ... already exists".
    environment = {**os.environ, "MEDSCREEN_STATE_DIR": str(tmp_path / "state")}
    environment.pop("MLFLOW_TRACKING_URI", None)
    commands = [
        subprocess.Popen(
            [*medscreen_command(), "models", "list"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for command in commands:
        _, stderr = command.communicate(timeout=300)
        assert command.returncode == 0, stderr
