"""``medscreen runs show``: one tracked run as an auditor reads it, without the MLflow UI."""

from __future__ import annotations

import datetime
import re
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Tracked runs: provenance, data lineage, metrics, evaluations, model versions.",
    no_args_is_help=True,
)
# No markup: tags and run names are free text. Piped output gets a wide page, not 80 columns.
console = Console(markup=False, width=None if Console().is_terminal else 200)
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Tags that say what produced a run and from which data; package versions are listed apart.
_PROVENANCE_PREFIXES = ("medscreen.git_", "medscreen.python_version", "medscreen.seed")
_LINEAGE_PREFIXES = ("medscreen.recipe", "medscreen.dataset", "medscreen.data.", "medscreen.model")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _utc(milliseconds: int | None) -> str:
    if milliseconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(milliseconds / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    if not rows:
        return
    table = Table(title_justify="left")
    table.add_column(title, no_wrap=True)
    table.add_column("value", overflow="fold")  # digests in full: they are compared, not read
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command("show")
def show_command(
    run_id: Annotated[
        str, typer.Argument(help="MLflow run id, as `medscreen train` or `models show` prints it.")
    ],
) -> None:
    """Show a run: who and what produced it, its data, metrics, evaluations and model versions."""
    from mlflow.tracking import MlflowClient

    from training.runs import RunError, get_run
    from training.tracking import configure_tracking

    if not _RUN_ID.match(run_id):
        _fail("RUN_ID: not an MLflow run id (32 hexadecimal digits)")
    configure_tracking(writes=False)
    client = MlflowClient()
    try:
        run = get_run(run_id)
    except RunError as error:
        _fail(f"RUN_ID: {error}")
    tags, info = run.data.tags, run.info
    console.print(
        f"run {run_id} ({tags.get('mlflow.runName', '-')}), experiment {info.experiment_id}: "
        f"{info.status}, {_utc(info.start_time)} to {_utc(info.end_time)}",
        style="bold",
    )
    if evaluated := tags.get("medscreen.evaluates_run_id"):
        console.print(f"evaluates run {evaluated}")
        # Whether the data was checked against what the run trained and selected on.
        console.print(f"overlap check: {tags.get('medscreen.overlap_check', 'not recorded')}")
    _table(
        "provenance",
        sorted((key, value) for key, value in tags.items() if key.startswith(_PROVENANCE_PREFIXES)),
    )
    _table(
        "data lineage",
        [
            *sorted(
                (key, value) for key, value in tags.items() if key.startswith(_LINEAGE_PREFIXES)
            ),
            *(
                (
                    f"input {entry.dataset.name}",
                    next(
                        (tag.value for tag in entry.tags if tag.key == "fingerprint_sha256"),
                        entry.dataset.digest,
                    ),
                )
                for entry in run.inputs.dataset_inputs
            ),
        ],
    )
    _table(
        "package versions",
        sorted(
            (key.removeprefix("medscreen.version."), value)
            for key, value in tags.items()
            if key.startswith("medscreen.version.")
        ),
    )
    _table("parameters", sorted(run.data.params.items()))
    _table("metrics", [(key, f"{value:.4f}") for key, value in sorted(run.data.metrics.items())])
    evaluations = client.search_runs(
        [info.experiment_id], filter_string=f"tags.`medscreen.evaluates_run_id` = '{run_id}'"
    )
    _table(
        "evaluations of this run",
        [
            (
                evaluation.info.run_id,
                f"{evaluation.data.tags.get('mlflow.runName', '-')}, "
                f"{_utc(evaluation.info.start_time)}",
            )
            for evaluation in evaluations
        ],
    )
    versions = client.search_model_versions(f"run_id='{run_id}'")
    _table(
        "registered model versions",
        [
            (
                f"{version.name}/{version.version}",
                f"release gate {version.tags.get('medscreen.release_gate', 'none')}, "
                f"threshold {version.tags.get('medscreen.threshold', '?')}, "
                f"ONNX SHA-256 {version.tags.get('medscreen.onnx_sha256', '?')}",
            )
            for version in sorted(versions, key=lambda version: int(version.version))
        ],
    )
