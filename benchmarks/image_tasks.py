"""Benchmark: each image task's full recipe on this machine, beside the MedMNIST v2 baselines.

Trains each recipe once (checkpoint and threshold chosen on validation, test reported once),
logs to MLflow like any run, and prints one table of test AUC, accuracy and wall time.

Usage:
    python benchmarks/image_tasks.py --data-dir ../shared/datasets/medmnist \
        [--recipe training/recipes/pneumonia-full.yaml ...]
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

from training import load_recipe, train_recipe

RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"
DEFAULT_RECIPES = [
    RECIPES / f"{name}-full.yaml" for name in ("pneumonia", "breast", "retina", "vessel3d")
]
# MedMNIST v2 (Yang et al., Scientific Data 10, 41, 2023), Table 3: test AUC / ACC.
# RetinaMNIST's AUC and ACC there are over the 5 grades; ours are given for both.
BASELINES = {
    "pneumoniamnist": {
        "ResNet-18 (28)": (0.944, 0.854),
        "ResNet-50 (224)": (0.962, 0.884),
        "Google AutoML Vision": (0.991, 0.946),
    },
    "breastmnist": {
        "ResNet-18 (28)": (0.901, 0.863),
        "ResNet-50 (224)": (0.866, 0.842),
        "Google AutoML Vision": (0.919, 0.861),
    },
    "retinamnist": {
        "ResNet-18 (28)": (0.717, 0.524),
        "ResNet-50 (224)": (0.716, 0.511),
        "Google AutoML Vision": (0.750, 0.531),
    },
}


def main(
    data_dir: Annotated[Path | None, typer.Option(help="Local MedMNIST directory.")] = None,
    recipe: Annotated[list[Path] | None, typer.Option(help="Recipes (default: all -full).")] = None,
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "benchmarks/results/image_tasks.json"
    ),
) -> None:
    """Train each recipe once and print its test metrics beside the published baselines."""
    overrides = [f"data.data_dir={data_dir}"] if data_dir else []
    table = Table(title=f"Image tasks: test split, this machine ({os.cpu_count()} CPU cores)")
    for column in (
        "task",
        "model",
        "test AUC",
        "test ACC",
        "sens / spec at threshold",
        "wall time",
    ):
        table.add_column(column)
    results = []
    for path in recipe or DEFAULT_RECIPES:
        resolved = load_recipe(path, overrides)
        started = time.perf_counter()
        result = train_recipe(resolved, show_progress=False)
        minutes = (time.perf_counter() - started) / 60
        metrics = result.metrics
        dataset = resolved.data.dataset
        auc = f"{metrics['test_auc']:.3f}"
        if "test_multiclass_auc" in metrics:
            auc += f" (5-grade {metrics['test_multiclass_auc']:.3f})"
        members = resolved.model.ensemble_members
        network = f"{members} x {resolved.model.network}" if members > 1 else resolved.model.network
        table.add_row(
            dataset,
            f"medscreen {resolved.name} ({network})",
            auc,
            f"{metrics['test_accuracy']:.3f}",
            f"{metrics['test_sensitivity']:.3f} / {metrics['test_specificity']:.3f} "
            f"(target {resolved.evaluation.sensitivity_target:g})",
            f"{minutes:.1f} min",
        )
        for name, (baseline_auc, baseline_accuracy) in BASELINES.get(dataset, {}).items():
            table.add_row(
                "",
                f"MedMNIST v2 {name}",
                f"{baseline_auc:.3f}",
                f"{baseline_accuracy:.3f}",
                "",
                "(published)",
            )
        results.append(
            {
                "recipe": resolved.name,
                "dataset": dataset,
                "run_id": result.run_id,
                "wall_minutes": minutes,
                "metrics": metrics,
            }
        )
    Console(width=160).print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    typer.run(main)
