"""Benchmark: the full pneumonia recipe on this machine, beside the MedMNIST v2 baselines.

Trains ``training/recipes/pneumonia-full.yaml`` once (threshold chosen on validation, test
reported once), logs to MLflow like any run, and prints test AUC, accuracy and wall time.

Usage:
    python benchmarks/pneumonia_full.py --data-dir ../shared/datasets/medmnist
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from training import load_recipe, train_recipe

RECIPE = Path(__file__).resolve().parents[1] / "training" / "recipes" / "pneumonia-full.yaml"
# MedMNIST v2 (Yang et al., Scientific Data 2023), PneumoniaMNIST test AUC / ACC.
BASELINES = {
    "ResNet-18 (28)": (0.944, 0.854),
    "ResNet-18 (224)": (0.956, 0.864),
    "ResNet-50 (28)": (0.948, 0.854),
    "ResNet-50 (224)": (0.962, 0.884),
    "auto-sklearn": (0.942, 0.855),
    "AutoKeras": (0.947, 0.878),
    "Google AutoML Vision": (0.991, 0.946),
}


def main(
    data_dir: Annotated[Path | None, typer.Option(help="Local MedMNIST directory.")] = None,
    recipe: Annotated[Path, typer.Option(help="Recipe to benchmark.")] = RECIPE,
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/results/pneumonia_full.json"
    ),
) -> None:
    """Train the full recipe once and print its test metrics beside the published baselines."""
    overrides = [f"data.data_dir={data_dir}"] if data_dir else []
    resolved = load_recipe(recipe, overrides)
    started = time.perf_counter()
    result = train_recipe(resolved, show_progress=False)
    wall_seconds = time.perf_counter() - started
    metrics = result.metrics
    table = Table(title="PneumoniaMNIST test set (624 images)")
    for column in ("model", "test AUC", "test ACC", "wall time"):
        table.add_column(column)
    table.add_row(
        f"medscreen {resolved.name} ({resolved.model.network})",
        f"{metrics['test_auc']:.3f}",
        f"{metrics['test_accuracy']:.3f}",
        f"{wall_seconds / 60:.1f} min on {os.cpu_count()} CPU cores",
    )
    for name, (auc, accuracy) in BASELINES.items():
        table.add_row(f"MedMNIST v2 {name}", f"{auc:.3f}", f"{accuracy:.3f}", "(published)")
    console = Console()
    console.print(table)
    console.print(
        f"operating point (chosen on validation for sensitivity >= "
        f"{resolved.evaluation.sensitivity_target}): threshold {metrics['threshold']:.4f}, "
        f"test sensitivity {metrics['test_sensitivity']:.3f}, "
        f"specificity {metrics['test_specificity']:.3f}; run {result.run_id}"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "recipe": resolved.name,
                "run_id": result.run_id,
                "wall_seconds": wall_seconds,
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.platform(),
                "metrics": metrics,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    typer.run(main)
