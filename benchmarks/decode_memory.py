"""Benchmark: the service's memory under large uploads at once, with and without the budget.

Sends ``--uploads`` copies of one large upload to the service at the same moment, and reports
the worker's peak resident memory (``VmHWM``, reset just before the uploads) above its resident
memory then, the answers and the wall time. The upload is either (``--upload dicom``) a large
DICOM to ``POST /v1/screen`` (16-bit, RLE, with a rescale and a window: about 1.7 MB declaring
6000 x 6000 pixels), or (``--upload json``) a JSON body of ``--json-mb`` MB to ``POST
/v1/screen/array`` whose array is nested single-element lists, the costliest JSON to parse per
byte (answered 422: its shape fits no model). It runs once with the default budget
(``MEDSCREEN_DECODE_MEMORY_MB`` 1024) and once with a budget so large that every decode starts
at once (the service before the budget). The model is the state dir's ``pneumonia-
screening@champion``, trained for one epoch if there is none.

Usage:
    python benchmarks/decode_memory.py [--state-dir DIR] [--uploads 6] [--upload dicom|json]
        [--side 6000] [--json-mb 10]
"""

from __future__ import annotations

import enum
import io
import json
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import pydicom
import requests
import typer
from proc_memory import resident_mib_with_peak_reset, status_mib
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage
from rich.console import Console
from rich.table import Table

# benchmarks/serving.py (this folder comes first on sys.path, as for loadgen there).
import serving as serving_benchmark

MODEL_NAME = "pneumonia-screening"
UNBOUNDED_MB = 1_000_000
RESULTS = serving_benchmark.REPO / "benchmarks" / "results"


class Upload(enum.StrEnum):
    """What is sent at once."""

    dicom = "dicom"
    json = "json"


def large_dicom(side: int) -> bytes:
    """A 16-bit MONOCHROME2 picture of ``side`` x ``side`` pixels, RLE-compressed."""
    rows = np.arange(side, dtype=np.uint32)[:, None] // 64
    columns = np.arange(side, dtype=np.uint32)[None, :] // 64
    pixels = ((rows * 7 + columns * 3) % 200 * 3).astype(np.uint16)
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Rows = dataset.Columns = side
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit, dataset.PixelRepresentation = 15, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1.5, -10
    dataset.WindowCenter, dataset.WindowWidth = 300, 600
    dataset.PixelData = pixels.tobytes()
    dataset.compress(RLELossless, encoding_plugin="pydicom")
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nested_json_array(megabytes: float) -> bytes:
    """A JSON body of about ``megabytes`` MB whose array is (N, 1, 1, 1, 1, 1) nested lists."""
    unit = "[[[[[0]]]]]"
    count = int(megabytes * 1e6) // (len(unit) + 1)
    return ('{"array": [' + ",".join([unit] * count) + "]}").encode()


def measure(
    servers: serving_benchmark.Servers,
    workdir: Path,
    upload: bytes,
    kind: str,
    uploads: int,
    budget_mb: int,
) -> dict[str, Any]:
    """Start the service with ``budget_mb``, send ``uploads`` copies at once, stop it."""
    os.environ["MEDSCREEN_DECODE_MEMORY_MB"] = str(budget_mb)
    port = serving_benchmark.free_port()
    log = workdir / f"serve-{budget_mb}.log"
    command = [*serving_benchmark.medscreen_command(), "serve", "--port", str(port)]
    process = servers.start(command, log)
    try:
        serving_benchmark.wait_ready(process, port, log)
        workers = psutil.Process(process.pid).children(recursive=True)
        before = {worker.pid: resident_mib_with_peak_reset(worker.pid) for worker in workers}
        headers = {"Authorization": f"Bearer {os.environ['BENCH_API_KEY']}"}

        def send(_: int) -> int:
            if kind == "json":
                return requests.post(
                    f"http://{serving_benchmark.HOST}:{port}/v1/screen/array",
                    data=upload,
                    headers={**headers, "Content-Type": "application/json"},
                    timeout=300,
                ).status_code
            return requests.post(
                f"http://{serving_benchmark.HOST}:{port}/v1/screen",
                files={"file": ("large.dcm", upload)},
                headers=headers,
                timeout=120,
            ).status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=uploads) as pool:
            statuses = list(pool.map(send, range(uploads)))
        wall_s = time.perf_counter() - started
        growth = max(status_mib("VmHWM", worker.pid) - before[worker.pid] for worker in workers)
    finally:
        servers.stop(process)
    return {
        "budget_mib": budget_mb,
        "statuses": statuses,
        "wall_s": round(wall_s, 2),
        "worker_peak_growth_mib": round(growth),
    }


def main(
    state_dir: Annotated[
        Path | None, typer.Option(help="State dir (a champion there is reused). Default: temp.")
    ] = None,
    uploads: Annotated[int, typer.Option(min=1, help="Uploads sent at once.")] = 6,
    upload: Annotated[
        Upload, typer.Option(help="A large DICOM picture, or a JSON body of nested lists.")
    ] = Upload.dicom,
    side: Annotated[
        # The picture's steps are 64 pixels wide: under 128, it is one grey level, refused as
        # blank, and nothing is decoded.
        int, typer.Option(min=128, max=6000, help="Pixels per side of the DICOM.")
    ] = 6000,
    json_mb: Annotated[
        float, typer.Option(min=0.1, max=32, help="Size of the JSON body in MB.")
    ] = 10.0,
    data_dir: Annotated[
        Path, typer.Option(help="Local MedMNIST directory (to train a model if needed).")
    ] = serving_benchmark.DEFAULT_DATA_DIR,
    output: Annotated[
        Path | None,
        typer.Option(help="Where to write the JSON result (default: results/decode_memory_KIND)."),
    ] = None,
) -> None:
    """Measure the worker's peak memory under large uploads at once."""
    upload_kind = upload.value
    signal.signal(signal.SIGTERM, serving_benchmark._terminate)
    servers = serving_benchmark.Servers()
    workdir = Path(tempfile.mkdtemp(prefix="medscreen-decode-memory-"))
    try:
        with serving_benchmark.state_directory(state_dir, keep=False) as state:
            serving_benchmark.use_only(state)
            serving_benchmark.set_up_model(MODEL_NAME, data_dir, None)
            os.environ["BENCH_API_KEY"] = serving_benchmark.create_api_key(MODEL_NAME)
            body = large_dicom(side) if upload_kind == "dicom" else nested_json_array(json_mb)
            results = [
                measure(servers, workdir, body, upload_kind, uploads, budget)
                for budget in (1024, UNBOUNDED_MB)
            ]
    finally:
        servers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "uploads": uploads,
        "upload": upload_kind,
        "upload_bytes": len(body),
        **({"side": side} if upload_kind == "dicom" else {}),
        "runs": results,
    }
    refused = sorted({status for result in results for status in result["statuses"]} - {200})
    if refused:  # a refused upload is not decoded: its figures would measure nothing
        raise SystemExit(f"error: the service answered {refused}, not 200: nothing was measured")
    output = output or RESULTS / f"decode_memory_{upload_kind}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    what = f"DICOM, {side} x {side}" if upload_kind == "dicom" else "JSON body of nested lists"
    table = Table(title=f"{uploads} uploads at once of a {len(body) / 1e6:.1f} MB {what}")
    for column in ("decode budget", "answers", "wall time", "worker peak memory growth"):
        table.add_column(column)
    for result in results:
        budget = result["budget_mib"]
        table.add_row(
            "1024 MiB (default)" if budget == 1024 else "unbounded (every decode at once)",
            ", ".join(map(str, result["statuses"])),
            f"{result['wall_s']:.1f} s",
            f"{result['worker_peak_growth_mib']:,} MiB",
        )
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
