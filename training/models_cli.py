"""``medscreen models``: list, show, promote, roll back, and the alias history."""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

app = typer.Typer(
    help="Registered models: approvals, aliases and their history.", no_args_is_help=True
)
_SELECTOR = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))?$")
# No markup: reasons, approvers, descriptions and tags are free text ('[/x]' would crash Rich).
# Piped (to a file, grep, an audit report), full values rather than 80 columns of ellipses.
console = Console(
    markup=False, width=None if Console().is_terminal or "COLUMNS" in os.environ else 200
)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _note(line: str) -> None:
    # On stderr: scripts read promote's and history's answers from stdout.
    typer.echo(line, err=True)


def _repair(name: str) -> None:
    """Settle the moves of ``name`` a killed command left unfinished, one line for each."""
    from mlflow.exceptions import MlflowException

    from training.registry import GovernanceError, MalformedTagError, repair_interrupted_moves

    try:
        lines = repair_interrupted_moves(name)
    except MalformedTagError as error:
        _fail(str(error))
    except GovernanceError:
        return  # no such model: the command itself says so
    except MlflowException as error:  # the registry failed midway: the next command retries
        detail = " ".join(str(error.message).split())
        _note(f"warning: cannot settle an interrupted alias move of {name}: {detail}")
        return
    for line in lines:
        _note(line)


@app.command("list")
def list_command() -> None:
    """List registered models with their latest version and aliases."""
    from mlflow.tracking import MlflowClient

    from training.tracking import configure_tracking

    configure_tracking(writes=False)
    client = MlflowClient()
    table = Table("model", "versions", "aliases", "description")
    page = client.search_registered_models()
    models = list(page)
    while page.token:  # MLflow answers 100 models at a time
        page = client.search_registered_models(page_token=page.token)
        models.extend(page)
    for model in models:
        versions = client.search_model_versions(f"name='{model.name}'")
        aliases = ", ".join(
            f"{alias}→{version}" for alias, version in sorted(model.aliases.items())
        )
        table.add_row(model.name, str(len(versions)), aliases or "-", model.description or "")
    console.print(table)


@app.command("show")
def show_command(
    selector: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME/VERSION.")],
) -> None:
    """Show a model's versions, or one version with its card, gate and approvals."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from training.registry import GovernanceError
    from training.tracking import configure_tracking

    match = _SELECTOR.match(selector)
    if not match:
        _fail(f"{selector!r} is not NAME, NAME@ALIAS or NAME/VERSION")
    configure_tracking()
    client = MlflowClient()
    name = match["name"]
    _repair(name)  # what is shown is then what happened
    try:
        if match["alias"]:
            _show_version(client.get_model_version_by_alias(name, match["alias"]))
        elif match["version"]:
            _show_version(client.get_model_version(name, match["version"]))
        else:
            _show_model(client, client.get_registered_model(name).name)
    except MlflowException as error:
        _fail(f"{selector}: {error.message}")
    except GovernanceError as error:
        _fail(str(error))


def _show_model(client: MlflowClient, name: str) -> None:
    from training.registry import unrecorded_aliases

    table = Table(
        "version", "aliases", "variant", "gate", "threshold", "test AUC", "run", title=name
    )
    # search_model_versions leaves aliases empty; the registered model holds alias→version.
    aliases_by_version: dict[str, list[str]] = {}
    for alias, version in sorted(client.get_registered_model(name).aliases.items()):
        aliases_by_version.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name='{name}'")
    for entry in sorted(versions, key=lambda item: int(item.version)):
        tags = entry.tags
        # Rich renders only strings: MLflow gives the version as an int.
        table.add_row(
            str(entry.version),
            ", ".join(aliases_by_version.get(str(entry.version), [])) or "-",
            tags.get("medscreen.variant", "?"),
            tags.get("medscreen.release_gate", "none"),
            tags.get("medscreen.threshold", "?"),
            tags.get("medscreen.test_auc", "?"),
            entry.run_id or "-",
        )
    console.print(table)
    for alias, held in unrecorded_aliases(name).items():
        console.print(
            f"warning: alias {alias}→{held} was set outside medscreen (no approval recorded)",
            style="red",
        )


def _read_card(version) -> dict:
    """The version's card as JSON, or one line saying why it is not a medscreen card.

    A version registered outside ``medscreen export``, or an artifact store edited by hand,
    ended in a traceback (a binary card, a card without its release gate).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    where = f"{version.name} version {version.version}"
    not_exported = "it was not registered by `medscreen export`, or its card was changed"
    try:
        card_path = mlflow.artifacts.download_artifacts(
            f"models:/{version.name}/{version.version}/extra_files/card.json"
        )
    except (MlflowException, OSError):
        _fail(f"{where} has no card.json: {not_exported}")
    try:
        card = json.loads(Path(card_path).read_bytes())
    except (ValueError, OSError):  # UnicodeDecodeError is a ValueError
        _fail(f"{where}: its card.json is not JSON: {not_exported}")
    shaped = (
        isinstance(card, dict)
        and isinstance(card.get("release_gate"), list)
        and all(isinstance(check, dict) for check in card["release_gate"])
        and isinstance(card.get("metrics"), dict)
        and all(
            isinstance(card.get(section, {}), dict)
            for section in ("provenance", "training_data", "operating_point")
        )
    )
    if not shaped:
        _fail(f"{where}: its card.json has no release gate or metrics: {not_exported}")
    return card


def _show_version(version) -> None:
    card = _read_card(version)
    console.print(
        f"{version.name} version {version.version} "
        f"(aliases: {', '.join(version.aliases) or 'none'})",
        style="bold",
    )
    console.print(version.description or "")
    tags = Table("tag", "value")
    for key, value in sorted(version.tags.items()):
        tags.add_row(key, value)
    console.print(tags)
    # Back to the data: the run, its code and the data fingerprints the version came from.
    lineage = Table("lineage", "value")
    provenance, data = card.get("provenance", {}), card.get("training_data", {})
    for label, value in (
        ("run id", provenance.get("run_id")),
        ("recipe", provenance.get("recipe")),
        ("seed", provenance.get("seed")),
        ("code commit", provenance.get("git_commit")),
        ("uncommitted changes", provenance.get("git_dirty")),
        ("dataset", data.get("dataset")),
        (
            "dataset files' SHA256SUMS listing, SHA-256"
            if data.get("files_sha256")
            else "dataset SHA-256",
            data.get("file_sha256"),
        ),
        *(
            (f"file {name}", digest)
            for name, digest in sorted((data.get("files_sha256") or {}).items())
        ),
        *(
            (f"{split} fingerprint", fingerprint)
            for split, fingerprint in data.get("split_fingerprints", {}).items()
        ),
        ("threshold chosen on", card.get("operating_point", {}).get("chosen_on")),
        ("sensitivity target", card.get("operating_point", {}).get("sensitivity_target")),
    ):
        if value not in (None, ""):
            lineage.add_row(label, str(value))
    console.print(lineage)
    gate = Table("release gate check", "result", "detail")
    for check in card["release_gate"]:
        passed = "passed" if check.get("passed") is True else "FAILED"
        gate.add_row(str(check.get("check", "?")), passed, str(check.get("detail", "")))
    console.print(gate)
    metrics = Table("metric", "value", "95% interval")
    intervals = card.get("confidence_intervals")
    for metric, value in card["metrics"].items():
        interval = intervals.get(metric) if isinstance(intervals, dict) else None
        metrics.add_row(
            metric,
            _figure(value),
            f"{_figure(interval[0])} to {_figure(interval[1])}"
            if isinstance(interval, list) and len(interval) == 2
            else "",
        )
    console.print(metrics)


def _figure(value: float | None) -> str:
    """A card's metric; JSON holds an undefined one (PPV with no positive call) as null."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else repr(value)[:40]
    return f"{value:.4f}"


def _approval_command(action: str):
    def run(function, **kwargs) -> None:
        from training.registry import GovernanceError

        try:
            event = function(**kwargs, notify=_note)
        except GovernanceError as error:
            _fail(str(error))
        typer.echo(
            f"{action}: {kwargs['name']}@{event.alias} -> version {event.version} "
            f"(was {event.previous_version or 'unset'}), approved by {event.approver} "
            f"at {event.time}"
        )

    return run


@app.command("promote")
def promote_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to promote.")],
    to: Annotated[str, typer.Option("--to", help="Alias to point at it, e.g. champion.")],
    approver: Annotated[str | None, typer.Option(help="ID of the approving person.")] = None,
    reason: Annotated[str | None, typer.Option(help="Why this version is approved.")] = None,
) -> None:
    """Point an alias at a version that passed its release gate, recording the approval."""
    from training.registry import promote

    _approval_command("promoted")(
        promote, name=name, version=version, alias=to, approver=approver, reason=reason
    )


@app.command("rollback")
def rollback_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str, typer.Option(help="Alias to roll back, e.g. champion.")],
    approver: Annotated[str | None, typer.Option(help="ID of the approving person.")] = None,
    reason: Annotated[str | None, typer.Option(help="Why the alias goes back.")] = None,
) -> None:
    """Point an alias back at the version it held before its latest change."""
    from training.registry import rollback

    _approval_command("rolled back")(
        rollback, name=name, alias=alias, approver=approver, reason=reason
    )


@app.command("history")
def history_command(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Only this alias.")] = None,
    at: Annotated[
        str | None,
        typer.Option(help="With --alias: which version held it at this ISO time (with zone)."),
    ] = None,
) -> None:
    """Show every recorded alias change; with --alias and --at, the version at that time."""
    from training.registry import (
        GovernanceError,
        alias_history,
        check_alias_in_history,
        version_at,
    )

    if at is not None and alias is None:
        _fail("--at needs --alias")
    _repair(name)  # a killed promote or rollback is finished or undone before it is read
    try:
        if at is not None:
            try:
                moment = datetime.datetime.fromisoformat(at.replace("Z", "+00:00"))
            except ValueError:
                _fail(f"--at: {at!r} is not an ISO 8601 time")
            held = version_at(name, alias, moment)
            typer.echo(
                f"{name}@{alias} at {moment.isoformat()}: "
                f"{'version ' + held if held else 'no version'}"
            )
            return
        events = alias_history(name)
        if alias is not None:
            check_alias_in_history(name, alias, events)
    except GovernanceError as error:
        _fail(str(error))
    table = Table(
        "time (UTC)",
        "action",
        "alias",
        "version",
        "previous",
        "approver",
        "reason",
        title=f"{name}: alias history",
    )
    for event in events:
        if alias is None or event.alias == alias:
            table.add_row(
                event.time,
                event.action,
                event.alias,
                event.version,
                event.previous_version or "-",
                event.approver,
                event.reason,
            )
    console.print(table)
