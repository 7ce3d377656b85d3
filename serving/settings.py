"""Environment settings of the service (kept import-light for the command line)."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "MEDSCREEN_STATE_DIR"


def state_dir() -> Path:
    """Return the local state directory: ``$MEDSCREEN_STATE_DIR`` or ``./mlruns``."""
    return Path(os.environ.get(STATE_DIR_ENV, "mlruns")).resolve()


def tracking_uri() -> str:
    """Return ``$MLFLOW_TRACKING_URI`` or the embedded store in the state directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"


KEY_STORE_ENV = "MEDSCREEN_KEY_STORE"
PREDICTION_LOG_ENV = "MEDSCREEN_PREDICTION_LOG"


def serving_dir() -> Path:
    """Return the directory for the service's own state: ``state_dir() / "serving"``."""
    return state_dir() / "serving"


def key_store_path() -> Path:
    """Return the API key store: ``$MEDSCREEN_KEY_STORE`` or ``serving_dir()/api_keys.json``."""
    configured = os.environ.get(KEY_STORE_ENV)
    return Path(configured).resolve() if configured else serving_dir() / "api_keys.json"


def prediction_log_path() -> Path:
    """Return the prediction log: ``$MEDSCREEN_PREDICTION_LOG`` or the default in ``serving_dir()``.

    The default is ``serving_dir() / "predictions.jsonl"``.
    """
    configured = os.environ.get(PREDICTION_LOG_ENV)
    return Path(configured).resolve() if configured else serving_dir() / "predictions.jsonl"


MODELS_ENV = "MEDSCREEN_MODELS"
DECODE_MEMORY_ENV = "MEDSCREEN_DECODE_MEMORY_MB"
DEFAULT_DECODE_MEMORY_MB = 1024


def decode_memory_bytes() -> int:
    """Return the memory budget of one worker's large decodes: ``$MEDSCREEN_DECODE_MEMORY_MB``.

    Raises:
        ValueError: naming the variable, if it is not a whole number of MiB of at least 1.
    """
    configured = os.environ.get(DECODE_MEMORY_ENV, "").strip()
    if not configured:
        return DEFAULT_DECODE_MEMORY_MB * 2**20
    try:
        mib = int(configured)
    except ValueError:
        mib = 0
    if mib < 1:
        raise ValueError(
            f"{DECODE_MEMORY_ENV}={configured!r}: give a whole number of MiB, at least 1 "
            f"(default {DEFAULT_DECODE_MEMORY_MB})"
        )
    return mib * 2**20
