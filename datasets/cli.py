"""``medscreen datasets``: list and fetch catalogue datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from datasets.catalogue import get_dataset_spec, list_datasets
from datasets.download import fetch_dataset, hide_passwords
from datasets.errors import DatasetError
from datasets.records import fetch_records, get_record_database, list_record_databases, record_list

app = typer.Typer(help="List and fetch the raw datasets of the catalogue.", no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """List the catalogue: name, task, positive finding, licence."""
    table = Table("name", "task", "classes", "positive finding", "licence")
    for spec in list_datasets():
        table.add_row(
            spec.name, spec.task, ", ".join(spec.classes), spec.positive_finding, spec.licence
        )
    for database in list_record_databases():
        table.add_row(
            database.name,
            database.task,
            ", ".join(database.classes),
            database.positive_finding,
            database.licence,
        )
    Console().print(table)


@app.command("fetch")
def fetch_command(
    name: Annotated[
        str, typer.Argument(help="Catalogue name, for example pneumoniamnist or mitdb.")
    ],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Check the official files in this local directory instead of downloading; "
            "nothing is written there (MedMNIST files: also $MEDSCREEN_DATA_DIR, unless "
            "--cache-dir or --url is given)."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Download cache (default $MEDSCREEN_CACHE_DIR, else "
            "~/.cache/medscreen/datasets); records go to CACHE/NAME/."
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Download from this mirror instead of the official URL.")
    ] = None,
    records: Annotated[
        str | None,
        typer.Option(
            help="Records of a WFDB database, comma-separated; DS1 and DS2 name MIT-BIH's "
            "inter-patient sets (default: DS1,DS2)."
        ),
    ] = None,
) -> None:
    """Download a dataset into the cache with its checksums checked, or verify a local copy."""
    if data_dir is not None and (cache_dir is not None or url is not None):
        # Ignored, they would suggest a download that never happens.
        typer.echo(
            "error: --data-dir: give it alone; --cache-dir and --url are for downloads", err=True
        )
        raise typer.Exit(2)
    try:
        if (database := get_record_database(name)) is not None:
            fetched = fetch_records(
                database,
                record_list(database, records),
                data_dir=data_dir,
                cache_dir=cache_dir,
                url=url,
                show_progress=True,
            )
            downloaded = "" if data_dir else f"; {fetched.files_downloaded} downloaded"
            typer.echo(
                f"{database.name}: {len(fetched.records)} records in {fetched.directory} "
                f"({fetched.files_checked} files, SHA-256 verified{downloaded})"
            )
            return
        if records is not None:
            raise DatasetError(f"--records: {name} is not a database of WFDB records")
        spec = get_dataset_spec(name)
        path = fetch_dataset(
            spec, data_dir=data_dir, cache_dir=cache_dir, url=url, show_progress=True
        )
    except DatasetError as error:
        # --url may name a mirror behind a login.
        typer.echo(f"error: {hide_passwords(str(error))}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{spec.name}: {path} (SHA-256 verified)")
