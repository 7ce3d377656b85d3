"""Environment settings of the service (kept import-light for the command line)."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "MEDSCREEN_STATE_DIR"


def state_dir() -> Path:
    """Return the local state directory: ``$MEDSCREEN_STATE_DIR`` or ``./mlruns``."""
    return Path(os.environ.get(STATE_DIR_ENV) or "mlruns").resolve()  # empty: unset


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
MAX_BATCH_ENV = "MEDSCREEN_MAX_BATCH"
ORT_THREADS_ENV = "MEDSCREEN_ORT_THREADS"
DECODE_MEMORY_ENV = "MEDSCREEN_DECODE_MEMORY_MB"
ACCESS_LOG_ENV = "MEDSCREEN_ACCESS_LOG"
DEFAULT_MAX_BATCH = 64
DEFAULT_DECODE_MEMORY_MB = 1024
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _whole_number(variable: str, unit: str, default: str) -> int | None:
    """Read a setting that is a whole number of at least 1; None when it is unset.

    Raises:
        ValueError: one line naming the variable and what to give.
    """
    configured = os.environ.get(variable, "").strip()
    if not configured:
        return None
    try:
        value = int(configured)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{variable}={configured!r}: give a whole number of {unit}, at least 1 "
            f"(default: {default})"
        )
    return value


def max_batch_size() -> int:
    """Return the largest batch the service's batcher forms: ``$MEDSCREEN_MAX_BATCH`` or 64."""
    configured = _whole_number(MAX_BATCH_ENV, "requests", str(DEFAULT_MAX_BATCH))
    return configured or DEFAULT_MAX_BATCH


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup() -> str:
    """This process's cgroup v2 path: ``/`` in a container with a cgroup namespace of its own."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line.removeprefix("0::")
    except OSError:
        pass
    return "/"


def usable_cores(cgroup_root: Path = CGROUP_ROOT, own_cgroup: str | None = None) -> int:
    """CPUs this process may use: its affinity, capped by any cgroup v2 CPU quota above it.

    ``os.cpu_count()`` is the host's: a pod limited to 2 CPUs on a 64-core node would start 63
    onnxruntime threads that take turns on 2.

    Args:
        cgroup_root: Where the cgroup v2 hierarchy is mounted.
        own_cgroup: The process's cgroup path under it (default: read from ``/proc``).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity, and no cgroups
        return os.cpu_count() or 1
    group = cgroup_root / (own_cgroup or _own_cgroup()).strip("/")
    # A quota on the process's own cgroup or on any above it (a pod's, a systemd slice's).
    for directory in (group, *group.parents):
        if not directory.is_relative_to(cgroup_root):
            break
        try:
            quota, period = (directory / "cpu.max").read_text().split()
            if quota != "max":
                cores = min(cores, max(1, -(-int(quota) // int(period))))  # part cores count
        except (OSError, ValueError):
            continue  # no quota file here, or none set
    return cores


def configured_onnxruntime_threads() -> int | None:
    """Return ``$MEDSCREEN_ORT_THREADS``, or None for the service's default."""
    return _whole_number(ORT_THREADS_ENV, "threads", "the usable cores per worker less one")


def decode_memory_bytes() -> int:
    """Return the memory budget of one worker's large decodes: ``$MEDSCREEN_DECODE_MEMORY_MB``."""
    configured = _whole_number(DECODE_MEMORY_ENV, "MiB", str(DEFAULT_DECODE_MEMORY_MB))
    return (configured or DEFAULT_DECODE_MEMORY_MB) * 2**20


def access_log_enabled() -> bool:
    """Return whether BentoML's access log is on: ``$MEDSCREEN_ACCESS_LOG`` (off by default).

    Raises:
        ValueError: naming the variable, for a value that is neither true nor false.
    """
    configured = os.environ.get(ACCESS_LOG_ENV, "").strip()
    if configured.lower() in (*_TRUE, *_FALSE, ""):
        return configured.lower() in _TRUE
    raise ValueError(f"{ACCESS_LOG_ENV}={configured!r}: give true or false (default: false)")


def check_service_settings() -> None:
    """Read every setting of the service once, so that a bad one is refused before it starts.

    Raises:
        ValueError: naming the first variable whose value is not valid.
    """
    max_batch_size()
    configured_onnxruntime_threads()
    decode_memory_bytes()
    access_log_enabled()
