"""Benchmark: onnxruntime's memory and time for one long ECG, in one batch or in pieces.

An hour of ECG at 200 beats per minute, the longest the service takes, is 12,000 beats. The
service's batcher ran a request larger than its batch size as one batch; it now splits it into
pieces of ``MEDSCREEN_MAX_BATCH`` rows (64 by default). Each configuration runs in a fresh
process through ``serving.batching.MicroBatcher`` with the ECG model's onnxruntime session (one
thread, as a 2-core worker's), and reports the process's peak resident memory (``VmHWM``, reset
just before the request) above its resident memory then, and the request's wall time. The inputs
are random arrays of the model's input shapes: onnxruntime's memory and time depend on the
shapes, not the values.

Usage:
    python benchmarks/ecg_batch_memory.py --onnx PATH [--beats 12000] [--pieces 64,256,12000]
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from proc_memory import resident_mib_with_peak_reset, status_mib
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def measure(onnx_path: str, beats: int, piece: int) -> dict[str, float]:
    """Run one request of ``beats`` rows through a batcher of batch size ``piece``."""
    import numpy as np
    import onnxruntime

    # This folder's serving.py (the serving benchmark) would hide the serving package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    from serving.batching import MicroBatcher

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    random = np.random.default_rng(0)

    def feeds(rows: int) -> dict[str, np.ndarray]:
        return {
            spec.name: random.standard_normal((rows, *spec.shape[1:]), dtype=np.float32)
            for spec in session.get_inputs()
        }

    batcher = MicroBatcher(lambda batch: session.run([output], batch)[0], max_batch_size=piece)
    asyncio.run(batcher.submit(feeds(2)))  # warm up
    request = feeds(beats)
    # Reset: else memory freed while the inputs were made would hide the request's.
    before = resident_mib_with_peak_reset()
    started = time.perf_counter()
    rows = asyncio.run(batcher.submit(request))
    seconds = time.perf_counter() - started
    batcher.close()
    assert len(rows) == beats
    return {"seconds": seconds, "peak_growth_mib": status_mib("VmHWM") - before}


def main(
    onnx: Annotated[Path, typer.Option(help="The ECG model's ONNX file (a registry artifact).")],
    beats: Annotated[int, typer.Option(help="Beats in the one request.")] = 12_000,
    pieces: Annotated[str, typer.Option(help="Batch sizes to compare, comma-separated.")] = (
        "64,256,12000"
    ),
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = (
        RESULTS / "ecg_batch_memory.json"
    ),
) -> None:
    """Measure each batch size in a fresh process; print a table and save it as JSON."""
    results = []
    for piece in (int(size) for size in pieces.split(",")):
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(onnx), str(beats), str(piece)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append({"piece": piece, **json.loads(child.stdout.strip().splitlines()[-1])})
    table = Table(title=f"one ECG of {beats} beats through the batcher")
    for column in ("batch size", "wall time (s)", "peak memory growth (MiB)"):
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            str(result["piece"]), f"{result['seconds']:.2f}", f"{result['peak_growth_mib']:.0f}"
        )
    Console().print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        typer.run(main)
