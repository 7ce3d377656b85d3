"""Benchmark: ECG arrhythmia monitoring, S and V sensitivity and positive predictivity.

Trains ``training/recipes/ecg-full.yaml`` on MIT-BIH DS1 (selection on held-out DS1 records)
and reports those validation records, on the annotated beats and on the beats the service's
detector finds; with ``--eval-records`` (DS2, where its records are available) it evaluates on
them once, as a run linked to the training run.

Usage:
    python benchmarks/ecg.py --records-dir ../shared/datasets/mitdb \
        [--eval-records-dir DIR --eval-records 100,103,...]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from training import load_recipe
from training.ecg import evaluate_ecg_records, train_ecg

RECIPE = Path(__file__).resolve().parents[1] / "training" / "recipes" / "ecg-full.yaml"
PUBLISHED = {  # inter-patient DS2 results quoted in the issue: (S Se, S +P, V Se, V +P)
    "de Chazal et al. 2004 / Zhang et al. 2014 (range)": ("76-79", "36-39", "78-86", "82-93"),
}


def _row(label: str, metrics: dict[str, float], prefix: str) -> list[str]:
    def percent(name: str) -> str:
        value = metrics.get(f"{prefix}_{name}")
        return "n/a" if value is None or value != value else f"{100 * value:.1f}"

    return [
        label,
        percent("S_sensitivity"),
        percent("S_ppv"),
        percent("V_sensitivity"),
        percent("V_ppv"),
        f"{int(metrics[f'{prefix}_S_beats'])} / {int(metrics[f'{prefix}_V_beats'])}",
    ]


def main(
    records_dir: Annotated[Path, typer.Option(help="Directory with the DS1 WFDB records.")],
    eval_records_dir: Annotated[Path | None, typer.Option(help="Directory with DS2.")] = None,
    eval_records: Annotated[str | None, typer.Option(help="Comma-separated records.")] = None,
    output: Annotated[Path, typer.Option(help="JSON result.")] = Path(
        "benchmarks/results/ecg.json"
    ),
) -> None:
    """Train once on DS1 and print S/V sensitivity and positive predictivity (%)."""
    recipe = load_recipe(RECIPE, [f"data.records_dir={records_dir}"])
    started = time.perf_counter()
    result = train_ecg(recipe, show_progress=False)
    minutes = (time.perf_counter() - started) / 60
    table = Table(
        title=f"ECG beats, AAMI classes, % ({os.cpu_count()} CPU cores, training {minutes:.1f} min)"
    )
    for column in ("evaluated on", "S Se", "S +P", "V Se", "V +P", "S / V beats"):
        table.add_column(column)
    held_out = f"DS1 held-out records {','.join(recipe.data.val_records)}"
    table.add_row(*_row(f"{held_out}, annotated beats", result.metrics, "val"))
    table.add_row(*_row(f"{held_out}, beats detected as served", result.metrics, "val_served"))
    evaluation = None
    if eval_records_dir and eval_records:
        evaluation = evaluate_ecg_records(result.run_id, eval_records_dir, eval_records.split(","))
        table.add_row(*_row(f"records {eval_records}, annotated beats", evaluation.metrics, "eval"))
        table.add_row(
            *_row(f"records {eval_records}, detected as served", evaluation.metrics, "eval_served")
        )
    for label, values in PUBLISHED.items():
        table.add_row(f"{label} (DS2, published)", *values, "")
    Console(width=140).print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "run_id": result.run_id,
                "training_minutes": minutes,
                "val": result.metrics,
                "eval": None if evaluation is None else evaluation.metrics,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    typer.run(main)
