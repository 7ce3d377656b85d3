"""``medscreen serve`` and ``medscreen predict``. Nothing here imports torch or training."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated

import typer

from datasets.download import hide_passwords, sqlite_store_problem, tracking_address_problem
from serving.settings import (
    MODELS_ENV,
    PREDICTION_LOG_ENV,
    STATE_DIR_ENV,
    check_service_settings,
    key_store_path,
    prediction_log_path,
    state_dir,
    tracking_uri,
)
from serving.supervision import SUPERVISOR_PID_ENV


def _check_local_state() -> bool:
    """Refuse to start a service whose every answer would fail on the state dir's files.

    The prediction log is opened only by the first request, and the key store read by each:
    a log that cannot be written would withhold every answer (503), a key store that cannot be
    read would refuse every key. Both are checked here, so that a misplaced path is one line.

    Returns:
        Whether the key store holds a key that is not revoked.
    """
    from serving.api_keys import KeyStore, KeyStoreError
    from serving.prediction_log import PredictionLog

    log_path = prediction_log_path()
    try:
        PredictionLog(log_path).check_writable()
    except OSError as error:
        source = (
            f"${PREDICTION_LOG_ENV}"
            if os.environ.get(PREDICTION_LOG_ENV)
            else f"the state dir's default; set ${STATE_DIR_ENV} or ${PREDICTION_LOG_ENV}"
        )
        typer.echo(
            f"error: prediction log {log_path}: cannot be written "
            f"({error.strerror or error}); the path is from {source}",
            err=True,
        )
        raise typer.Exit(2) from None
    try:
        keys = KeyStore(key_store_path()).list()
    except KeyStoreError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    return any(not key.revoked for key in keys)


def serve_command(
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Registered model to serve, NAME@ALIAS or NAME@VERSION; repeat for several "
            "(default: every model with a 'champion' alias)."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = 3000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    reload_seconds: Annotated[
        float, typer.Option(help="How often aliases are checked for a new version (0: never).")
    ] = 5.0,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server worker processes (each with its own batcher and event loop; the cores "
            "are shared). One is fastest on 2 cores; measure others with benchmarks/serving.py.",
        ),
    ] = 1,
) -> None:
    """Serve registered models over HTTP with BentoML (/v1/screen, /v1/monitor, /v1/models)."""
    from serving.errors import ModelLoadError
    from serving.model import load_served_model
    from serving.pool import default_references, references_by_name

    if not 1 <= port <= 65535:  # checked here, not by click, so the error is one line
        typer.echo(f"error: --port: {port} is not a TCP port (1-65535)", err=True)
        raise typer.Exit(2)
    if not (math.isfinite(reload_seconds) and reload_seconds >= 0):
        # NaN would make the alias watcher spin, infinity would stop it.
        typer.echo(f"error: --reload-seconds: {reload_seconds} is not a number >= 0", err=True)
        raise typer.Exit(2)
    try:
        # BentoML's own failure to bind is a 20-line traceback from its supervisor.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::1" is an address too
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        typer.echo(f"error: {_listen_problem(host, port, error)}", err=True)
        raise typer.Exit(2) from None
    try:
        check_service_settings()
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if state_dir().exists() and not state_dir().is_dir():
        typer.echo(f"error: {STATE_DIR_ENV}: {state_dir()} is not a directory", err=True)
        raise typer.Exit(2)
    uri = tracking_uri()
    try:
        references_by_name(model or [])  # a malformed reference needs no store to be told
    except ModelLoadError as error:
        typer.echo(f"error: --model: {error}", err=True)
        raise typer.Exit(2) from None
    # Checked once here: MLflow's retries would keep the start silent for minutes.
    if problem := _tracking_store_problem(uri, model or []):
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    try:
        references = model or default_references(uri)
        if not references:
            raise ModelLoadError(
                f"no registered model has a 'champion' alias in the tracking store "
                f"{hide_passwords(uri)}; name one with --model NAME@ALIAS"
            )
        # The same checks the service makes at start-up (registry, approvals, card, checksum),
        # so a bad reference is one line here rather than a traceback from BentoML.
        references_by_name(references)  # the pool's own check, before anything loads
        for reference in references:
            load_served_model(reference, tracking=uri)
    except ModelLoadError as error:
        typer.echo(f"error: --model: {error}", err=True)
        raise typer.Exit(2) from None
    # Last: a start refused for another reason must write nothing into the state dir.
    usable_keys = _check_local_state()
    environment = os.environ | {
        MODELS_ENV: ",".join(references),
        "MEDSCREEN_RELOAD_SECONDS": str(reload_seconds),
        "MEDSCREEN_WORKERS": str(workers),
        "MLFLOW_TRACKING_URI": uri,
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(state_dir() / "bentoml")),
        "BENTOML_DO_NOT_TRACK": "true",
        # This process becomes BentoML's supervisor (exec keeps the PID); workers end with it.
        SUPERVISOR_PID_ENV: str(os.getpid()),
    }
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "serving.service:Screening",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if not usable_keys:
        typer.echo(
            f"warning: {key_store_path()} holds no usable API key, so every request will get "
            "a 401; create one with `medscreen keys create`",
            err=True,
        )
    os.execvpe(command[0], command, environment)


def _tracking_store_problem(uri: str, wanted: list[str]) -> str | None:
    """Say, naming the setting, why the service cannot use the tracking store; None if it can.

    The checks training makes at start-up, without its lock or writes: the service only reads
    the store, and a start that is refused writes nothing.

    Args:
        uri: The tracking store.
        wanted: The models asked for (``--model``); none: those with a 'champion' alias.
    """
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else STATE_DIR_ENV
    if not uri.startswith("sqlite:///"):
        if problem := tracking_address_problem(uri):
            return (
                f"MLFLOW_TRACKING_URI={hide_passwords(uri)}: {problem}; or unset the variable "
                f"to use the embedded store in {state_dir()}"
            )
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.exists() and not database.is_symlink():
        # MLflow would create an empty store (and a mistyped directory) and find nothing in it.
        models = ", ".join(wanted) or "model with a 'champion' alias"
        return (
            f"{source}: the tracking store {uri} does not exist, so it holds no {models}; "
            "give the store that `medscreen export` registered models in"
        )
    problem = sqlite_store_problem(database, create=False)
    return f"{source}: {problem}" if problem else None


def _listen_problem(host: str, port: int, error: OSError) -> str:
    """Say which option keeps the server from listening, and why."""
    reason = error.strerror or str(error)
    # create_server re-raises a failed name lookup as a plain OSError with the EAI_ code (< 0).
    if (
        isinstance(error, socket.gaierror)
        or error.errno == errno.EADDRNOTAVAIL
        or (error.errno is not None and error.errno < 0)
    ):
        return f"--host: cannot listen on {host!r}: {reason} (give an address of this machine)"
    if error.errno == errno.EADDRINUSE:
        return f"--port: {host}:{port} is in use: {reason} (is another medscreen serve running?)"
    return f"--port: cannot listen on {host}:{port}: {reason}"


def predict_command(
    upload: Annotated[
        Path, typer.Argument(help="Image (PNG, JPEG, DICOM, NIfTI) or DICOM ECG waveform.")
    ],
    url: Annotated[
        str, typer.Option(help="Base URL of a running service.")
    ] = "http://127.0.0.1:3000",
    api_key: Annotated[
        str | None,
        typer.Option(envvar="MEDSCREEN_API_KEY", help="API key from `medscreen keys create`."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name, when the service serves several.")
    ] = None,
    monitor: Annotated[
        bool, typer.Option(help="Send a DICOM ECG waveform to /v1/monitor/dicom.")
    ] = False,
) -> None:
    """Send one file to a running service and print its JSON answer."""
    import requests

    if not upload.is_file():
        what = "a directory, not a file" if upload.is_dir() else "no such file"
        typer.echo(f"error: {upload}: {what}", err=True)
        raise typer.Exit(2)
    if api_key is not None and not re.fullmatch(r"[!-~]+", api_key):  # visible ASCII only
        # The key itself is never echoed: it is a secret.
        typer.echo(
            "error: --api-key: has spaces or control characters; copy the whole key", err=True
        )
        raise typer.Exit(2)
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError for a port outside 0-65535
    except ValueError:  # an unclosed IPv6 bracket, a bad port
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        typer.echo(
            f"error: --url: {hide_passwords(repr(url))} is not an http(s) URL "
            "(for example http://127.0.0.1:3000)",
            err=True,
        )
        raise typer.Exit(2)
    url = url.rstrip("/")
    route = "/v1/monitor/dicom" if monitor else "/v1/screen"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with upload.open("rb") as stream:
        try:
            response = requests.post(
                f"{url}{route}",
                files={"file": (upload.name, stream)},
                data={"model": model} if model else {},
                headers=headers,
                timeout=60,
            )
        except requests.RequestException as error:
            typer.echo(hide_passwords(f"error: {url}: {error}"), err=True)
            raise typer.Exit(1) from None
    try:
        typer.echo(json.dumps(response.json(), indent=2))
    except ValueError:
        typer.echo(
            f"error: {hide_passwords(url)} answered {response.status_code} without JSON", err=True
        )
        raise typer.Exit(1) from None
    if not response.ok:
        raise typer.Exit(1)
