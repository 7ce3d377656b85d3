"""``medscreen serve`` and ``medscreen predict``. Nothing here imports torch or training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from serving.settings import MODEL_ENV, state_dir, tracking_uri


def serve_command(
    model: Annotated[str, typer.Option(help="Registered model: NAME@ALIAS or NAME@VERSION.")],
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Serve a registered model over HTTP with BentoML (POST /v1/screen)."""
    from serving.errors import ModelLoadError
    from serving.model import load_served_model

    uri = tracking_uri()
    try:
        # The same checks the service makes at start-up (registry, approvals, card, checksum),
        # so a bad reference is one line here rather than a traceback from BentoML.
        load_served_model(model, tracking=uri)
    except ModelLoadError as error:
        typer.echo(f"error: --model: {error}", err=True)
        raise typer.Exit(2) from None
    environment = os.environ | {
        MODEL_ENV: model,
        "MLFLOW_TRACKING_URI": uri,
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(state_dir() / "bentoml")),
        "BENTOML_DO_NOT_TRACK": "true",
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
    os.execvpe(command[0], command, environment)


def predict_command(
    image: Annotated[Path, typer.Argument(help="PNG, JPEG or DICOM file to screen.")],
    url: Annotated[
        str, typer.Option(help="Base URL of a running service.")
    ] = "http://127.0.0.1:3000",
) -> None:
    """Send one image to a running service and print its JSON answer."""
    import requests

    if not image.is_file():
        typer.echo(f"error: {image}: no such file", err=True)
        raise typer.Exit(2)
    with image.open("rb") as stream:
        try:
            response = requests.post(f"{url}/v1/screen", files={"file": stream}, timeout=60)
        except requests.RequestException as error:
            typer.echo(f"error: {url}: {error}", err=True)
            raise typer.Exit(1) from None
    try:
        typer.echo(json.dumps(response.json(), indent=2))
    except ValueError:
        typer.echo(f"error: {url} answered {response.status_code} without JSON", err=True)
        raise typer.Exit(1) from None
    if not response.ok:
        raise typer.Exit(1)
