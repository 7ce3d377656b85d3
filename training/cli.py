"""``medscreen train`` and ``medscreen export``. Heavy imports wait until a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table


def train_command(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe, for example training/recipes/pneumonia-quick.yaml.")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field: dotted.key=value (repeatable)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show the training progress bar.")] = True,
) -> None:
    """Train a recipe, track everything in MLflow, and print the run id."""
    from datasets import DatasetError
    from training.recipe import RecipeError, load_recipe

    try:
        resolved = load_recipe(recipe, overrides or [])
    except RecipeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    from rich.table import Table

    from training.recipe import EcgRecipe
    from training.train import TrainingDivergedError

    try:
        if isinstance(resolved, EcgRecipe):
            from training.ecg import train_ecg

            result = train_ecg(resolved, show_progress=progress)
            shown = [f"val_{name}_{rate}" for name in ("S", "V") for rate in ("sensitivity", "ppv")]
        else:
            from training.train import train_recipe

            result = train_recipe(resolved, show_progress=progress)
            shown = [
                "selected_val_auc",
                "val_accuracy",
                "threshold",
                "test_auc",
                "test_sensitivity",
                "test_specificity",
                "test_accuracy",
            ]
    except (DatasetError, RecipeError, TrainingDivergedError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    table = Table("metric", "value")
    for name in shown:
        table.add_row(name, f"{result.metrics[name]:.4f}")
    _print_summary(f"run {result.run_id} ({resolved.name})", table)
    typer.echo(result.run_id)


def _print_summary(heading: str, table: Table) -> None:
    """Print a heading and a table to stderr; the heading on its own line, never wrapped."""
    from rich.console import Console

    # A table title wraps to the table's width, which split run ids over two lines.
    console = Console(stderr=True)
    console.print(heading, soft_wrap=True, highlight=False)
    console.print(table)


def export_command(
    run_id: Annotated[str, typer.Option(help="MLflow run id printed by `medscreen train`.")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Local directory with the dataset (default: the recipe's).")
    ] = None,
    records_dir: Annotated[
        Path | None,
        typer.Option(help="ECG runs: directory of WFDB records (default: the recipe's)."),
    ] = None,
    int8: Annotated[
        bool, typer.Option(help="Also register an INT8 copy if its AUC holds (own version).")
    ] = False,
) -> None:
    """Export a run to ONNX through the release gate and register a new model version.

    Prints ``NAME VERSION`` of the float model; with --int8, a second line for the INT8 copy.
    """
    from datasets import DatasetError
    from training.runs import RunError, read_run_recipe
    from training.tracking import configure_tracking

    configure_tracking()
    try:
        if read_run_recipe(run_id).get("kind") == "ecg-monitoring":
            if int8:
                raise RunError("--int8 is for image models; ECG graphs are exported as float32")
            if data_dir is not None:
                raise RunError("--data-dir is for image runs; give an ECG run's --records-dir")
            from training.ecg_export import export_ecg_and_register

            result = export_ecg_and_register(run_id, records_dir=records_dir)
        else:
            if records_dir is not None:  # silently ignored before: not the data it was told
                raise RunError("--records-dir is for ECG runs; give an image run's --data-dir")
            from training.export import export_and_register

            result = export_and_register(run_id, data_dir=data_dir)
    except (RunError, DatasetError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"parity: max abs difference {result.card.onnx.parity_max_abs_difference:.2e} on "
        f"{result.card.onnx.parity_cases} validation cases; threshold "
        f"{result.card.operating_point.threshold:.6f}",
        err=True,
    )
    typer.echo(f"{result.model_name} {result.version}")
    if int8:
        from training.export import export_int8

        try:
            quantised = export_int8(result, data_dir=data_dir)
        except (RunError, DatasetError) as error:
            typer.echo(f"error: int8: {error}", err=True)
            raise typer.Exit(3) from None
        typer.echo(f"{quantised.model_name} {quantised.version}")


def evaluate_command(
    run_id: Annotated[str, typer.Option(help="Training run whose model is evaluated.")],
    manifest: Annotated[
        Path | None,
        typer.Option(help="Images: CSV of path,label[,patient_id][,site] (paths relative to it)."),
    ] = None,
    records_dir: Annotated[
        Path | None, typer.Option(help="ECG: directory of WFDB records.")
    ] = None,
    records: Annotated[
        str | None, typer.Option(help="ECG: comma-separated record names, e.g. 100,103,105.")
    ] = None,
) -> None:
    """Evaluate a trained model on data it has never seen; log a run linked to the model's."""
    from rich.table import Table

    from datasets import DatasetError
    from training.runs import RunError

    if (manifest is None) == (records_dir is None):
        typer.echo(
            "error: give either --manifest (images) or --records-dir and --records (ECG)", err=True
        )
        raise typer.Exit(2)
    table = Table("metric", "value", "95% interval")
    try:
        if manifest is not None:
            from training.evaluate import evaluate_manifest

            result = evaluate_manifest(run_id, manifest)
            for name in ("auc", "sensitivity", "specificity", "ppv", "npv"):
                low = result.metrics[f"eval_{name}_ci_low"]
                high = result.metrics[f"eval_{name}_ci_high"]
                table.add_row(
                    name, f"{result.metrics[f'eval_{name}']:.4f}", f"{low:.4f} to {high:.4f}"
                )
        else:
            from datasets.ecg import check_record_names
            from training.ecg import evaluate_ecg_records

            try:
                if not records:
                    raise ValueError("give the record names to evaluate")
                names = check_record_names(records.split(","))
            except ValueError as error:
                typer.echo(f"error: --records: {error}", err=True)
                raise typer.Exit(2) from None
            result = evaluate_ecg_records(run_id, records_dir, names)
            for name in ("S", "V"):
                for rate in ("sensitivity", "ppv"):
                    table.add_row(
                        f"{name} {rate}", f"{result.metrics[f'eval_{name}_{rate}']:.4f}", ""
                    )
    except (DatasetError, RunError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    _print_summary(f"evaluation run {result.run_id}", table)
    typer.echo(result.run_id)
