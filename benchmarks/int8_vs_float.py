"""Benchmark: INT8 against float32 ONNX for one training run: size, speed and AUC.

Exports the run through the release gate (float32), then the INT8 copy, both registered as
versions; then times onnxruntime on the CPU for each graph.

Usage:
    python benchmarks/int8_vs_float.py --run-id RUN_ID [--data-dir ../shared/datasets/medmnist]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import mlflow
import numpy as np
import onnxruntime
import typer
from rich.console import Console
from rich.table import Table

from training import export_and_register
from training.export import ExportError, export_int8


def _timings(path: Path, images: np.ndarray, batch: int, repeats: int) -> float:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"image": images[:batch]}
    for _ in range(5):
        session.run(None, feed)
    started = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    return (time.perf_counter() - started) / repeats


def main(
    run_id: Annotated[str, typer.Option(help="Training run to export.")],
    data_dir: Annotated[Path | None, typer.Option(help="Local MedMNIST directory.")] = None,
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/results/int8_vs_float.json"
    ),
) -> None:
    """Register float32 and INT8 versions of a run and compare them."""
    float_result = export_and_register(run_id, data_dir=data_dir)
    rows = {"float32": float_result}
    try:
        rows["int8"] = export_int8(float_result, data_dir=data_dir)
    except ExportError as error:
        Console().print(f"[red]INT8 not registered[/red]: {error}")
    shape = tuple(int(dim) for dim in float_result.card.input.shape[1:])
    images = np.random.default_rng(0).integers(0, 256, (32, *shape), dtype=np.uint8)
    table = Table(title=f"float32 vs INT8 ONNX, onnxruntime CPU ({os.cpu_count()} cores)")
    for column in (
        "variant",
        "version",
        "size (MiB)",
        "batch 1 (ms)",
        "batch 32 (images/s)",
        "val AUC",
        "test AUC",
        "threshold",
    ):
        table.add_column(column)
    results = {}
    for variant, result in rows.items():
        path = (
            Path(
                mlflow.artifacts.download_artifacts(f"models:/{result.model_name}/{result.version}")
            )
            / "model.onnx"
        )
        single = _timings(path, images, 1, 200)
        batched = _timings(path, images, 32, 30)
        results[variant] = {
            "version": result.version,
            "size_bytes": path.stat().st_size,
            "batch1_ms": single * 1000,
            "batch32_images_per_s": 32 / batched,
            "selected_val_auc": result.card.metrics["selected_val_auc"],
            "test_auc": result.card.metrics["test_auc"],
            "threshold": result.card.operating_point.threshold,
        }
        row = results[variant]
        table.add_row(
            variant,
            row["version"],
            f"{row['size_bytes'] / 2**20:.1f}",
            f"{row['batch1_ms']:.2f}",
            f"{row['batch32_images_per_s']:.0f}",
            f"{row['selected_val_auc']:.4f}",
            f"{row['test_auc']:.4f}",
            f"{row['threshold']:.4f}",
        )
    Console().print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"run_id": run_id, "results": results}, indent=2))


if __name__ == "__main__":
    typer.run(main)
