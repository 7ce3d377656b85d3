"""``medscreen keys`` (per-hospital API keys) and ``medscreen audit`` (the prediction log)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from datasets.download import hide_passwords
from datasets.files import NotRegularFileError, file_kind
from serving.api_keys import KeyStore, KeyStoreError, UnknownKeyError, WrongSecretError
from serving.prediction_log import head_path_for, parse_head, verify_log
from serving.settings import (
    PREDICTION_LOG_ENV,
    key_store_path,
    prediction_log_path,
    tracking_uri,
)

keys_app = typer.Typer(
    help="Per-hospital API keys for the service: create, list, revoke.", no_args_is_help=True
)
audit_app = typer.Typer(help="The tamper-evident prediction log.", no_args_is_help=True)
console = Console()

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Key store file (default: $MEDSCREEN_KEY_STORE or <state dir>/serving/api_keys.json).",
        show_default=False,
    ),
]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _store(path: Path | None, *, new_file_allowed: bool = False) -> KeyStore:
    """The key store at ``--store`` or the default path, refusing what cannot be one.

    Args:
        path: The ``--store`` value; None for ``$MEDSCREEN_KEY_STORE`` or the state dir's.
        new_file_allowed: Whether a missing file is fine (``create`` starts a store). A
            ``--store`` whose folder is missing is refused even then: a mistyped path would
            otherwise hold keys that the service never reads.

    Returns:
        The store.
    """
    store = path or key_store_path()
    with contextlib.suppress(OSError):  # missing or unreadable: named below or by the store
        if kind := file_kind(store.stat().st_mode):
            _fail(f"--store: {store} is {kind}, not a key store file")
    if path is not None and not store.exists():
        if not new_file_allowed:
            _fail(f"--store: {store}: no such key store")
        if not store.parent.is_dir():
            problem = "is not a folder" if store.parent.exists() else "does not exist"
            _fail(f"--store: {store}: {store.parent} {problem}")
    return KeyStore(store)


def _unregistered(names: list[str]) -> list[str]:
    """The names (other than '*') the model registry does not hold; [] if it cannot be read.

    Only a warning depends on it, so it never fails, and a tracking server that does not
    answer costs seconds, not MLflow's minutes of retries.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = tracking_uri()
    missing = []
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for name in sorted(set(names) - {"*"}):
            try:
                client.get_registered_model(name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                missing.append(name)
    except Exception as error:  # an unreadable registry must not hide the key just issued
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        typer.echo(
            hide_passwords(f"warning: cannot read the model registry {uri}: {reason}"), err=True
        )
        return []
    return missing


@keys_app.command("create")
def create_command(
    hospital: Annotated[
        str | None, typer.Option(help="Hospital the key is issued to (required).")
    ] = None,
    region: Annotated[
        str | None, typer.Option(help="Region of the hospital, e.g. eu-west (required).")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Registered model the key may call; repeat for several, '*' for all (required).",
        ),
    ] = None,
    store: StoreOption = None,
) -> None:
    """Issue an API key to one hospital and print it once."""
    # Checked here rather than by click, so that a missing option is one line like every error.
    if not hospital:
        _fail("--hospital: give the hospital the key is issued to")
    if not region:
        _fail("--region: give the hospital's region")
    if not model:
        _fail("--model: give at least one registered model name, or '*' for every model")
    key_store = _store(store, new_file_allowed=True)
    try:
        key, plaintext = key_store.create(hospital, region, model)
    except KeyStoreError as error:
        field, _, reason = str(error).partition(": ")
        option = {"hospital": "--hospital", "region": "--region", "models": "--model"}.get(field)
        _fail(f"{option}: {reason}" if option else str(error))
    # Shown at once: the key is live from here on, and nothing after this may lose it.
    typer.echo(f"key id: {key.key_id}")
    typer.echo(f"hospital: {key.hospital} ({key.region})")
    typer.echo(f"models: {', '.join(key.models)}")
    typer.echo(f"api key: {plaintext}")
    typer.echo(
        "warning: this key is shown only once and cannot be shown again; hand it to the hospital "
        "now (it sends 'Authorization: Bearer <key>'). If it is lost, revoke it with "
        f"`medscreen keys revoke {key.key_id}` and create a new one.",
        err=True,
    )
    for name in _unregistered(list(key.models)):
        # Keys may be issued before their model is registered, so only a warning.
        typer.echo(
            f"warning: --model {name!r} is not a registered model in "
            f"{hide_passwords(tracking_uri())} (yet); "
            "requests naming it get 404 (not served) until a model of that name is registered "
            "and served",
            err=True,
        )


@keys_app.command("list")
def list_command(store: StoreOption = None) -> None:
    """List every key (revoked ones too) without its secret."""
    key_store = _store(store)
    try:
        keys = key_store.list()
    except KeyStoreError as error:
        _fail(str(error))
    if not keys:
        typer.echo(f"no API keys in {key_store.path}")
        return
    # Fold rather than elide: an operator revokes by id and checks grants by name.
    table = Table()
    table.add_column("id", no_wrap=True, min_width=12)
    for header in ("hospital", "region", "models", "created", "revoked"):
        table.add_column(header, overflow="fold")
    for key in keys:
        table.add_row(
            key.key_id,
            key.hospital,
            key.region,
            ", ".join(key.models),
            key.created_at,
            key.revoked_at or "-",
        )
    # Piped output has no terminal width; do not squeeze the table into 80 columns.
    (console if console.is_terminal else Console(width=200)).print(table)


@keys_app.command("revoke")
def revoke_command(
    key_id: Annotated[str, typer.Argument(help="Key id shown by `medscreen keys list`.")],
    store: StoreOption = None,
) -> None:
    """Revoke a key; the running service refuses it from its next request on.

    The whole key (a leaked one, say) may be given instead of its id: it is revoked only if it
    is the stored key itself.
    """
    whole_key = None
    if pasted := re.fullmatch(r"msk_([0-9a-f]{12})_.*", key_id.strip(), flags=re.DOTALL):
        whole_key, key_id = pasted[0], pasted[1]
    elif not re.fullmatch(r"[0-9a-f]{12}", key_id):
        # Not echoed: it may be a secret pasted by mistake.
        _fail("KEY_ID: not a key id (12 hexadecimal digits, as `medscreen keys list` shows)")
    key_store = _store(store)
    try:
        key, already = key_store.revoke_key(key_id, whole_key=whole_key)
    except (UnknownKeyError, WrongSecretError) as error:
        _fail(f"KEY_ID: {error}")
    except KeyStoreError as error:
        _fail(str(error))
    # Exit 0 either way: the key is revoked, as asked; only the wording tells the two apart.
    if already:
        typer.echo(
            f"key {key.key_id} of {key.hospital} ({key.region}) was already revoked at "
            f"{key.revoked_at}"
        )
    else:
        typer.echo(f"revoked key {key.key_id} of {key.hospital} ({key.region}) at {key.revoked_at}")


@audit_app.command("verify")
def verify_command(
    log: Annotated[
        Path | None,
        typer.Option(
            "--log",
            help="Prediction log (default: $MEDSCREEN_PREDICTION_LOG or "
            "<state dir>/serving/predictions.jsonl).",
            show_default=False,
        ),
    ] = None,
    expect_head: Annotated[
        str | None,
        typer.Option(
            "--expect-head",
            help="SEQ:HASH printed by an earlier verification: the log must still hold that "
            "record unchanged (catches a log and head file replaced together).",
        ),
    ] = None,
) -> None:
    """Check the prediction log's hash chain: exit 0 if intact, 1 with one line per problem.

    On success it prints the last record's SEQ:HASH; keep it outside the server, and give it
    to the next verification with ``--expect-head``.
    """
    kept_head = None
    if expect_head is not None:
        try:
            kept_head = parse_head(expect_head)
        except ValueError as error:
            _fail(f"--expect-head: {error}")
    path = log or prediction_log_path()
    # Errors name where the path came from: --log, the variable or the state dir.
    if log is not None:
        named, source = f"--log: {path}", ""
    else:
        named = str(path)
        source = "; the path is from " + (
            f"${PREDICTION_LOG_ENV}"
            if os.environ.get(PREDICTION_LOG_ENV)
            else "the state dir's default; set $MEDSCREEN_STATE_DIR or give --log"
        )
    if not path.exists() and not head_path_for(path).exists():
        # A mistyped path, variable or state dir must not pass as an empty, intact log.
        _fail(f"{named}: no such prediction log (and no head file){source}")
    # /dev/zero would be read for ever and a pipe would block: only a regular file is a log.
    with contextlib.suppress(OSError):  # a log that cannot be read is named just below
        if kind := file_kind(path.stat().st_mode):
            _fail(f"{named} is {kind}, not a prediction log{source}")
    try:
        result = verify_log(path, kept_head=kept_head)
    except NotRegularFileError as error:  # swapped in since the check above
        _fail(f"{named} {error.strerror}{source}")
    except OSError as error:
        _fail(f"{named}: {error.strerror or error}{source}")
    for note in result.notes:
        typer.echo(f"{path}: note: {note}")
    if result.ok:
        typer.echo(
            f"prediction log {path}: {result.records} records, hash chain intact"
            + (f"; head {result.last_seq}:{result.last_hash}" if result.last_seq else "")
        )
        return
    for problem in result.problems:
        typer.echo(f"{path}: {problem}")
    raise typer.Exit(1)
