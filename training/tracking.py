"""MLflow settings and the provenance every run records."""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from datasets.download import (
    TrackingServerError,
    hide_passwords,
    sqlite_store_problem,
    tracking_address_problem,
)

STATE_DIR_ENV = "MEDSCREEN_STATE_DIR"
TRACKED_PACKAGES = (
    "medscreen",
    "torch",
    "pytorch-lightning",
    "monai",
    "torchmetrics",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "mlflow",
    "numpy",
    "scikit-learn",
    # What decodes and conditions the data: a change here changes what a model sees.
    "pillow",
    "pydicom",
    "nibabel",
    "scipy",
    "wfdb",
)


def state_dir() -> Path:
    """Return the local state directory: ``$MEDSCREEN_STATE_DIR`` or ``./mlruns``."""
    return Path(os.environ.get(STATE_DIR_ENV) or "mlruns").resolve()  # empty: unset


def tracking_uri() -> str:
    """Return ``$MLFLOW_TRACKING_URI`` or the embedded sqlite store in the state directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"


# Stores this process has opened (their tables exist) or found answering, each with whether it
# was checked for writing: commands configure tracking often.
_OPENED_STORES: set[tuple[str, bool]] = set()


def configure_tracking(*, writes: bool = True) -> str:
    """Point MLflow at the configured store and return its URI.

    Args:
        writes: Whether the command writes to the store; a read-only store serves those
            that only read (an auditor's archived copy).

    Raises:
        TrackingServerError: if the store cannot be used (see :func:`_check_store`).
    """
    uri = tracking_uri()
    if (uri, True) not in _OPENED_STORES and (uri, writes) not in _OPENED_STORES:
        _check_store(uri, writes=writes)
        _OPENED_STORES.add((uri, writes))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _check_store(uri: str, *, writes: bool) -> None:
    """Open the embedded store, or check once that a server or database answers.

    Raises:
        TrackingServerError: naming the setting, if the store cannot be used.
    """
    if not uri.startswith("sqlite:///"):
        if problem := tracking_address_problem(uri):
            raise TrackingServerError(
                f"MLFLOW_TRACKING_URI={hide_passwords(uri)}: {problem}; or unset the "
                f"variable to use the embedded store in {state_dir()}"
            )
        return
    database = Path(uri.removeprefix("sqlite:///"))
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else STATE_DIR_ENV
    try:
        problem = _open_embedded_store(uri, database, writes=writes)
    except OSError as error:  # the state dir is a file, read-only, or full
        raise TrackingServerError(
            f"{source}: cannot open the tracking store {database} ({error.strerror or error}); "
            "point it at a writable directory"
        ) from error
    if problem:
        raise TrackingServerError(f"{source}: {problem}")


def _open_embedded_store(uri: str, database: Path, *, writes: bool) -> str | None:
    """Open the sqlite store once, holding a lock while MLflow creates or upgrades its tables.

    MLflow creates the schema on first use without a lock: commands started together on a new
    state directory crashed, and the race could leave the schema half upgraded for good.

    Returns:
        Why the file cannot be MLflow's store (see :func:`sqlite_store_problem`), or None once
        MLflow has opened it.
    """
    if database.is_dir():  # said before a lock file is made beside it
        return sqlite_store_problem(database, create=False)
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = database.with_name(f"{database.name}.lock").open("a")
    except OSError:
        # An archived copy in a read-only directory: its tables exist, and reading them needs
        # no lock (it guards their creation).
        if writes or not database.is_file():
            raise
        return sqlite_store_problem(database, create=False)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if problem := sqlite_store_problem(database, create=True):
            return problem
        # sqlite opens a write-protected file read-only without a word, and writes its journal
        # beside it: the first write of a training or an approval was a traceback.
        if writes and (read_only := _first_read_only(database, database.parent)):
            return (
                f"the tracking store {database} is read-only for this user ({read_only} cannot "
                "be written); this command writes to it: make it writable, or point the "
                "setting at another store"
            )
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the registry tables
    return None


def _first_read_only(*paths: Path) -> Path | None:
    return next((path for path in paths if not os.access(path, os.W_OK)), None)


def ensure_experiment(name: str) -> str:
    """Return the id of experiment ``name``, creating it on first use.

    With the embedded store, artifacts go under the state directory; a tracking server decides
    its own artifact location.
    """
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:"):
        artifact_location = (state_dir() / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        # Another process created it since the lookup (trainings started together).
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:  # created, then deleted at once: nothing to train into
        raise MlflowException(f"experiment {name!r} was deleted while being created")
    return experiment.experiment_id


def _git(*args: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def provenance() -> dict[str, str]:
    """Return the code commit, its cleanliness, Python and package versions, as MLflow tags."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "mlflow.source.git.commit": commit or "unknown",
        "medscreen.git_commit": commit or "unknown",
        "medscreen.git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "medscreen.python_version": platform.python_version(),
    }
    for package in TRACKED_PACKAGES:
        try:
            tags[f"medscreen.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"medscreen.version.{package}"] = "not installed"
    return tags


def export_provenance() -> dict[str, str]:
    """The provenance of an export, as model version tags (``medscreen.export.*``).

    The training run's tags say what trained the model; these say what exported it, checked
    its parity and (for ECG) chose its threshold.
    """
    return {
        f"medscreen.export.{key.removeprefix('medscreen.')}": value
        for key, value in provenance().items()
        if key.startswith("medscreen.")
    }


def package_versions(tags: dict[str, str]) -> dict[str, str]:
    """Return ``{package: version}`` from provenance tags."""
    prefix = "medscreen.version."
    return {
        key.removeprefix(prefix): value for key, value in tags.items() if key.startswith(prefix)
    }
