"""Environment settings of the service (kept import-light for the command line)."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_ENV = "MEDSCREEN_MODEL"
STATE_DIR_ENV = "MEDSCREEN_STATE_DIR"


def state_dir() -> Path:
    """Return the local state directory: ``$MEDSCREEN_STATE_DIR`` or ``./mlruns``."""
    return Path(os.environ.get(STATE_DIR_ENV, "mlruns")).resolve()


def tracking_uri() -> str:
    """Return ``$MLFLOW_TRACKING_URI`` or the embedded store in the state directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"
