"""Benchmark: the medscreen service on 127.0.0.1 against the in-process limit and eager FastAPI.

In a state directory of its own: trains the pneumonia-full recipe (DenseNet121) for one epoch,
exports and registers it, approves it as @champion and creates an API key. Then measures
(a) onnxruntime in-process on the registered model.onnx at batch 1-128 (the limit), (b) a plain
FastAPI endpoint with eager PyTorch on the same run (benchmarks/eager_endpoint.py) and (c)
``medscreen serve``, at each concurrency level, with uploads of real 28 px PneumoniaMNIST test
PNGs; then burst recovery of the service (concurrency 1, a burst at 64, concurrency 1 again).
Prints one markdown table and the goals; writes benchmarks/results/serving.json.

Usage:
    python benchmarks/serving.py [--duration 5] [--levels 1,8,32,64] [--state-dir DIR]
        [--workers N] [--ort-threads N] [--max-batch N] [--no-auth] [--eager-threads N]
        [--client auto|wrk|aiohttp] [--run-id RUN_ID] [--burst-seconds 10]

The load generator is wrk (apt-get install -y wrk) when present, else aiohttp in this process.
A --state-dir that already holds pneumonia-screening@champion is reused (no training).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import typer
import yaml
from loadgen import (
    LevelResult,
    Sample,
    Upload,
    WrkRunner,
    aiohttp_level,
    make_workdir,
    rolling_recovery,
    sequential,
    window_p50,
    wrk_path,
)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "training" / "recipes" / "pneumonia-full.yaml"
DEFAULT_DATA_DIR = REPO.parent / "shared" / "datasets" / "medmnist"
HOST = "127.0.0.1"
ROUTE = "/v1/screen"
BATCH_SIZES = (1, 8, 16, 32, 64, 128)
KNOBS = ("MEDSCREEN_WORKERS", "MEDSCREEN_ORT_THREADS", "MEDSCREEN_MAX_BATCH")
# Settings that would point the benchmark at someone else's store, keys or logs.
FOREIGN_SETTINGS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MEDSCREEN_KEY_STORE",
    "MEDSCREEN_PREDICTION_LOG",
    "MEDSCREEN_MODEL",
    "BENTOML_HOME",
)
# Goals of the "hospital-facing serving" issue.
GOAL_OF_LIMIT = 0.5
GOAL_OVER_EAGER = 3.0
GOAL_LEVEL = 32
ERROR_LEVEL = 64
RECOVERY_MS = 10.0
RECOVERY_WITHIN_S = 5.0
BURST_CONCURRENCY = 64
# Above this share of CPU busy before the start, the run shares its cores with other work.
BUSY_WARNING_PERCENT = 25.0
# Above this many cores used by other processes during a measurement, likewise.
OTHER_WORK_WARNING_CORES = 0.25


def say(text: str) -> None:
    print(text, flush=True)


def medscreen_command() -> list[str]:
    script = Path(sys.executable).with_name("medscreen")
    return [str(script)] if script.exists() else [sys.executable, "-m", "medscreen_cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


# --- subprocesses -------------------------------------------------------------------------


class Servers:
    """Every server this benchmark starts; all are stopped on exit, whatever happens."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []

    def start(self, command: list[str], log: Path) -> subprocess.Popen:
        with log.open("ab") as handle:
            # A session of its own: its process group is exactly the server and its workers.
            process = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen, grace_s: float = 15) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # workers the leader left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process)


def wait_ready(process: subprocess.Popen, port: int, log: Path, timeout_s: float = 300) -> float:
    """Poll GET /readyz; return seconds waited. Fails with the log's tail if the server dies."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"server exited ({process.returncode}):\n" + "\n".join(tail))
        connection = http.client.HTTPConnection(HOST, port, timeout=2)
        try:
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return time.perf_counter() - started
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not ready after {timeout_s:.0f} s (log: {log})")


def check_one(port: int, upload: Upload) -> dict[str, Any]:
    """One request before measuring: a target that answers with errors is not benchmarked."""
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        connection.request("POST", ROUTE, body=upload.bodies[0], headers=upload.headers)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"POST {ROUTE} on port {port} answered {response.status}: {body}")
    return json.loads(body)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (server CPU per level)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


# --- setup: model, key, uploads -----------------------------------------------------------


def run_medscreen(arguments: list[str]) -> str:
    """Run a medscreen command; return its stdout, or fail with its stderr."""
    command = medscreen_command() + arguments
    say(f"$ medscreen {' '.join(arguments)}")
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"medscreen {arguments[0]} failed ({completed.returncode}):\n"
            + (completed.stderr or completed.stdout)[-4000:]
        )
    return completed.stdout


def serve_has_workers_option() -> bool:
    completed = subprocess.run(
        [*medscreen_command(), "serve", "--help"], cwd=REPO, capture_output=True, text=True
    )
    return "--workers" in completed.stdout


def champion_version(model_name: str) -> Any:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
            model_name, "champion"
        )
    except MlflowException:
        return None


def set_up_model(model_name: str, data_dir: Path, run_id: str | None) -> tuple[Any, bool]:
    """Reuse the state dir's champion, else train (unless given a run), export and promote."""
    version = champion_version(model_name)
    if version is not None:
        say(f"reusing {model_name}@champion = version {version.version} (run {version.run_id})")
        return version, True
    if run_id is None:
        stdout = run_medscreen(
            [
                "train",
                str(RECIPE),
                "--set",
                "optimisation.max_epochs=1",
                "--set",
                f"data.data_dir={data_dir}",
                # Speed does not depend on accuracy: waive the metric minimums of this
                # throwaway store (the ONNX checker and parity checks still run).
                "--set",
                "registration.minimum_metrics={}",
                "--no-progress",
            ]
        )
        run_id = stdout.strip().splitlines()[-1].strip()
    exported = run_medscreen(["export", "--run-id", run_id, "--data-dir", str(data_dir)])
    name, number = exported.strip().splitlines()[-1].split()  # "NAME VERSION"
    run_medscreen(
        [
            "models",
            "promote",
            name,
            number,
            "--to",
            "champion",
            "--approver",
            "serving-benchmark",
            "--reason",
            "serving benchmark in a throwaway state dir",
        ]
    )
    version = champion_version(model_name)
    if version is None:
        raise RuntimeError(f"{model_name}@champion missing after promote")
    return version, False


def create_api_key(model_name: str) -> str:
    """``medscreen keys create``; else serving.api_keys directly; else fail (use --no-auth)."""
    arguments = ["keys", "create", "--hospital", "bench", "--region", "bench"]
    command = [*medscreen_command(), *arguments, "--model", model_name]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if completed.returncode == 0 and completed.stdout.strip():
        lines = completed.stdout.strip().splitlines()
        # "api key: <key>" among other lines; else the last word printed.
        labelled = [line for line in lines if line.lower().startswith("api key:")]
        return (labelled or lines)[-1].split()[-1]
    code = (
        "from serving.api_keys import KeyStore\n"
        "from serving.settings import key_store_path\n"
        f"_, key = KeyStore(key_store_path()).create('bench', 'bench', [{model_name!r}])\n"
        "print(key)\n"
    )
    fallback = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    if fallback.returncode == 0 and fallback.stdout.strip():
        return fallback.stdout.strip().splitlines()[-1]
    raise RuntimeError(
        "cannot create an API key: `medscreen keys create` said "
        f"{(completed.stderr or completed.stdout).strip()[-300:]!r} and serving.api_keys said "
        f"{fallback.stderr.strip()[-300:]!r}; run with --no-auth against a service without keys"
    )


def test_pngs(data_dir: Path, count: int) -> list[bytes]:
    """Real PneumoniaMNIST test images, 28x28 grayscale, as PNG files."""
    with np.load(data_dir / "pneumoniamnist.npz") as archive:
        images = archive["test_images"][:count]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def download_model(version: Any, destination: Path) -> tuple[Path, dict]:
    import mlflow

    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{version.name}/{version.version}", dst_path=str(destination)
        )
    )
    card = json.loads((model_dir / "extra_files" / "card.json").read_text())
    return model_dir / card["onnx"]["filename"], card


# --- (a) the in-process limit -------------------------------------------------------------


def images_per_second(call: Callable[[], object], batch: int, seconds: float) -> float:
    for _ in range(2):
        call()
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        call()
        calls += 1
    return batch * calls / (time.perf_counter() - started)


def in_process_limit(onnx_path: Path, card: dict, pngs: list[bytes], seconds: float) -> list[dict]:
    """onnxruntime on this process's CPU (default threads), without and with PNG decoding."""
    import onnxruntime

    from datasets.images import decode_image  # the service's own decoder

    spec = card["input"]
    channels = 1 if spec["channels"] == "grayscale" else 3

    def decode(data: bytes) -> np.ndarray:
        decoded = decode_image(data, channels=channels, height=spec["height"], width=spec["width"])
        return decoded.pixels

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    decoded = np.stack([decode(png) for png in pngs])
    rows = []
    for batch in BATCH_SIZES:
        indices = np.arange(batch) % len(pngs)
        images = np.ascontiguousarray(decoded[indices])

        def model_only(images: np.ndarray = images) -> object:
            return session.run(None, {spec["name"]: images})

        def with_decode(indices: np.ndarray = indices) -> object:
            batch_images = np.stack([decode(pngs[index]) for index in indices])
            return session.run(None, {spec["name"]: batch_images})

        excluded = images_per_second(model_only, batch, seconds)
        included = images_per_second(with_decode, batch, seconds)
        rows.append(
            {
                "batch": batch,
                "images_per_s_decode_excluded": excluded,
                "images_per_s_decode_included": included,
                "ms_per_batch_decode_excluded": batch / excluded * 1000,
            }
        )
        say(
            f"  batch {batch:>3}: {excluded:8.0f} images/s (decode excluded), "
            f"{included:8.0f} (decode included)"
        )
    return rows


# --- (b, c) HTTP targets --------------------------------------------------------------------


class Load:
    """One closed-loop load generator for all targets: wrk, else aiohttp."""

    def __init__(self, upload: Upload, workdir: Path, client: str) -> None:
        if client == "auto":
            client = "wrk" if wrk_path() else "aiohttp"
        if client == "wrk" and not wrk_path():
            raise RuntimeError("wrk not found (apt-get install -y wrk), or use --client aiohttp")
        self.client = client
        self.upload = upload
        self.wrk = WrkRunner(upload, ROUTE, workdir) if client == "wrk" else None

    def run(self, port: int, concurrency: int, seconds: float, target: str) -> LevelResult:
        if self.wrk is not None:
            return self.wrk.run(f"http://{HOST}:{port}", concurrency, seconds, target)
        return aiohttp_level(
            f"http://{HOST}:{port}{ROUTE}", self.upload, concurrency, seconds, target
        )


def measure_levels(
    load: Load,
    target: str,
    server: subprocess.Popen,
    port: int,
    levels: list[int],
    warmup_s: float,
    duration_s: float,
) -> list[LevelResult]:
    results = []
    for concurrency in levels:
        if warmup_s > 0:
            load.run(port, concurrency, warmup_s, target)
        cpu_before, started = tree_cpu_seconds(server.pid), time.perf_counter()
        busy_before = system_busy_seconds()
        result = load.run(port, concurrency, duration_s, target)
        wall = time.perf_counter() - started
        result.server_cpu_cores = (tree_cpu_seconds(server.pid) - cpu_before) / wall
        result.other_cpu_cores = other_work_cores(
            busy_before, wall, result.server_cpu_cores + result.client_cpu_cores
        )
        results.append(result)
        say(
            f"  {target} c={concurrency}: {result.requests_per_s:.0f} req/s, "
            f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, errors {result.errors}, "
            f"CPU client {result.client_cpu_cores:.2f} / server {result.server_cpu_cores:.2f} "
            f"/ other {result.other_cpu_cores:.2f}"
        )
    return results


def burst_recovery(
    load: Load, port: int, baseline_s: float, burst_s: float, after_s: float
) -> dict[str, Any]:
    """Concurrency 1, a burst at 64, then concurrency 1 timed from the burst's end."""
    upload = load.upload
    baseline = sequential(HOST, port, ROUTE, upload, baseline_s, origin=time.perf_counter())
    burst = load.run(port, BURST_CONCURRENCY, burst_s, "service burst")
    burst_end = time.perf_counter()
    after = sequential(HOST, port, ROUTE, upload, after_s, origin=burst_end)
    recovered = rolling_recovery(after, RECOVERY_MS)
    windows = {
        f"{start}-{start + 1}s": window_p50(after, start, start + 1)
        for start in range(int(min(after_s, RECOVERY_WITHIN_S)))
    }
    return {
        "baseline_p50_ms": window_p50(baseline, 0, baseline_s + 60),
        "baseline_requests": len(baseline),
        "burst": burst.as_dict(),
        "after_requests": len(after),
        "baseline_errors": _errors_of(baseline),
        "after_errors": _errors_of(after),
        "first_request_after_ms": after[0].latency_ms if after else None,
        "recovered_after_s": recovered,
        "window_p50_ms": windows,
        "samples": [[round(s.start_s, 4), round(s.latency_ms, 3), s.status] for s in after],
    }


def _errors_of(samples: list[Sample]) -> int:
    return sum(sample.status == 0 or sample.status >= 300 for sample in samples)


# --- report ---------------------------------------------------------------------------------


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_info(client: str, cpu_busy_at_start: float) -> dict[str, Any]:
    wrk_version = None
    if wrk_path():
        completed = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        wrk_version = (completed.stdout or completed.stderr).split("[")[0].strip()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_busy_percent_at_start": cpu_busy_at_start,
        "load_average_at_start": os.getloadavg(),
        "client": client,
        "wrk": wrk_version,
        "versions": {
            name: version_of(name)
            for name in (
                "torch",
                "onnxruntime",
                "bentoml",
                "fastapi",
                "uvicorn",
                "pillow",
                "numpy",
                "monai",
            )
        },
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def at(results: list[LevelResult], concurrency: int) -> LevelResult | None:
    return next((row for row in results if row.concurrency == concurrency), None)


def report(summary: dict[str, Any], service: list[LevelResult], eager: list[LevelResult]) -> None:
    limit = summary["limit"]
    say("")
    say("## Serving benchmark (127.0.0.1, closed loop)")
    say("")
    say(
        "| target | concurrency | req/s | p50 ms | p99 ms | errors | client CPU | server CPU "
        "| other CPU |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    if limit:
        other = summary["other_work_cpu_cores"]["the in-process limit"]
        say(
            f"| onnxruntime in-process, batch {limit['batch']} (limit) | - | "
            f"{limit['images_per_s_decode_excluded']:.0f} images/s | - | - | - | - | - | "
            f"{other:.2f} |"
        )
    for row in [*service, *eager]:
        say(
            f"| {row.target} | {row.concurrency} | {row.requests_per_s:.0f} | {row.p50_ms:.1f} | "
            f"{row.p99_ms:.1f} | {row.errors} | {row.client_cpu_cores:.2f} | "
            f"{row.server_cpu_cores or 0:.2f} | {row.other_cpu_cores or 0:.2f} |"
        )
    say("")
    say(
        "CPU columns: cores busy on average (user + system) during the measurement; other: by "
        "processes other than the client and the server (the limit: other than this script)."
    )
    if summary["in_process"]:
        say("")
        say("In-process onnxruntime (default threads), images/s:")
        say("")
        say("| batch | decode excluded | decode included | ms/batch |")
        say("|---:|---:|---:|---:|")
        for row in summary["in_process"]:
            say(
                f"| {row['batch']} | {row['images_per_s_decode_excluded']:.0f} | "
                f"{row['images_per_s_decode_included']:.0f} | "
                f"{row['ms_per_batch_decode_excluded']:.2f} |"
            )
        say(
            f"\nThe limit: batch {limit['batch']}, decode excluded, "
            f"{limit['images_per_s_decode_excluded']:.0f} images/s."
        )
    say("")
    for line in summary["goals"]["lines"]:
        say(line)
    burst = summary.get("burst")
    if burst:
        windows = ", ".join(
            f"{name} {value:.1f}" if value is not None else f"{name} -"
            for name, value in burst["window_p50_ms"].items()
        )
        say(
            f"burst recovery: baseline p50 {_ms(burst['baseline_p50_ms'])}; burst c="
            f"{BURST_CONCURRENCY} {burst['burst']['requests_per_s']:.0f} req/s, "
            f"errors {burst['burst']['errors']}; after it p50 per window (ms): {windows}; first "
            f"request {_ms(burst['first_request_after_ms'])}; errors at c=1 after it "
            f"{burst['after_errors']}"
        )
    say("")
    machine = summary["machine"]
    say(
        f"machine: {machine['cpus_usable']} usable of {machine['cpu_count']} CPUs "
        f"({machine['cpu_model']}), {machine['platform']}, Python {machine['python']}; "
        f"{machine['cpu_busy_percent_at_start']:.0f}% busy before the run; load average at "
        f"start {', '.join(f'{v:.2f}' for v in machine['load_average_at_start'])}"
        f", at end {', '.join(f'{v:.2f}' for v in summary['load_average_at_end'])}"
    )
    say(
        "versions: "
        + ", ".join(f"{name} {value}" for name, value in machine["versions"].items())
        + f"; client {machine['client']}"
        + (f" ({machine['wrk']})" if machine["wrk"] else "")
    )
    say("service knobs: " + ", ".join(f"{k}={v}" for k, v in summary["knobs"].items()))
    say(f"eager endpoint torch threads: {summary['eager_torch_threads']}")
    say(f"model: {summary['model']}; {summary['note']}")
    if busy := busy_warning(machine["cpu_busy_percent_at_start"], machine["cpus_usable"]):
        say(busy)
    if busy := other_work_warning(summary["other_work_cpu_cores"]):
        say(busy)


def cpu_busy_percent(seconds: float = 3.0) -> float:
    """Share of all usable cores busy over the next few seconds, whatever is running them."""
    # A sample, not the load average: that trails by minutes and warns after any recent work.
    return psutil.cpu_percent(interval=seconds)


def system_busy_seconds() -> float:
    """CPU seconds all processes have used so far, summed over cores (not idle, not stolen)."""
    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq"))


def other_work_cores(busy_before: float, wall_s: float, own_cores: float) -> float:
    """Cores used since ``busy_before`` by processes other than the measured ones."""
    return max(0.0, (system_busy_seconds() - busy_before) / wall_s - own_cores)


def other_work_warning(other_cores: dict[str, float]) -> str | None:
    # A sample before the run misses work that starts during it; this is measured throughout.
    busiest = max(other_cores, key=other_cores.__getitem__, default=None)
    if busiest is None or other_cores[busiest] <= OTHER_WORK_WARNING_CORES:
        return None
    return (
        f"WARNING: other processes kept {other_cores[busiest]:.2f} cores busy during {busiest}: "
        "these numbers are not comparable with a quiet machine's"
    )


def busy_warning(busy_percent: float, cpus: int) -> str | None:
    # Closed-loop numbers on shared cores measure the neighbours as much as the service.
    if busy_percent <= BUSY_WARNING_PERCENT:
        return None
    return (
        f"WARNING: the {cpus} CPUs were {busy_percent:.0f}% busy in the seconds before the "
        "benchmark: other work shared the cores, so these numbers are not comparable with a "
        "quiet machine's"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def goals(
    limit: dict | None,
    service: list[LevelResult],
    eager: list[LevelResult],
    burst: dict | None,
) -> dict[str, Any]:
    service_32, eager_32 = at(service, GOAL_LEVEL), at(eager, GOAL_LEVEL)
    service_64 = at(service, ERROR_LEVEL)
    of_limit = (
        service_32.requests_per_s / limit["images_per_s_decode_excluded"]
        if service_32 and limit
        else None
    )
    over_eager = (
        service_32.requests_per_s / eager_32.requests_per_s
        if service_32 and eager_32 and eager_32.requests_per_s
        else None
    )
    recovered = burst["recovered_after_s"] if burst else None
    checks = {
        "service_over_limit_at_32": (
            of_limit,
            None if of_limit is None else of_limit >= GOAL_OF_LIMIT,
        ),
        "service_over_eager_at_32": (
            over_eager,
            None if over_eager is None else over_eager >= GOAL_OVER_EAGER,
        ),
        "service_errors_at_64": (
            service_64.errors if service_64 else None,
            None if service_64 is None else service_64.errors == 0,
        ),
        "recovery_s": (
            recovered,
            None if burst is None else recovered is not None and recovered <= RECOVERY_WITHIN_S,
        ),
    }
    lines = [
        # Three decimals: 0.497 printed as "0.50 ... FAIL" reads as a contradiction.
        f"service / limit at c={GOAL_LEVEL}: {_ratio(of_limit, 3)} (goal >= {GOAL_OF_LIMIT:.2f}) "
        f"{verdict(checks['service_over_limit_at_32'][1])}",
        f"service / eager at c={GOAL_LEVEL}: {_ratio(over_eager)} (goal >= {GOAL_OVER_EAGER:.1f}) "
        f"{verdict(checks['service_over_eager_at_32'][1])}",
        f"service errors at c={ERROR_LEVEL}: "
        + ("not measured" if service_64 is None else str(service_64.errors))
        + f" (goal 0) {verdict(checks['service_errors_at_64'][1])}",
        f"after a {BURST_CONCURRENCY}-burst, rolling 0.5 s p50 stays under {RECOVERY_MS:.0f} ms "
        "after: "
        + (
            "not measured"
            if burst is None
            else ("never" if recovered is None else f"{recovered:.2f} s")
        )
        + f" (goal <= {RECOVERY_WITHIN_S:.0f} s) {verdict(checks['recovery_s'][1])}",
    ]
    return {
        "checks": {name: {"value": v, "pass": ok} for name, (v, ok) in checks.items()},
        "lines": lines,
    }


def _ratio(value: float | None, decimals: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def state_directory(given: Path | None, keep: bool) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    created = Path(tempfile.mkdtemp(prefix="medscreen-serving-bench-"))
    try:
        yield created
    finally:
        if keep:
            say(f"state kept in {created}")
        else:
            shutil.rmtree(created, ignore_errors=True)


def use_only(state: Path) -> None:
    """Point this process, and every subprocess, at ``state`` and nothing else."""
    for name in FOREIGN_SETTINGS:
        os.environ.pop(name, None)
    os.environ["MEDSCREEN_STATE_DIR"] = str(state)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{state / 'mlflow.db'}"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that every finally block runs


def main(
    duration: Annotated[float, typer.Option(help="Measured seconds per level.")] = 5.0,
    warmup: Annotated[float, typer.Option(help="Unmeasured seconds before each level.")] = 2.0,
    levels: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = (
        "1,8,32,64"
    ),
    targets: Annotated[str, typer.Option(help="HTTP targets: service, eager.")] = ("service,eager"),
    state_dir: Annotated[
        Path | None,
        typer.Option(help="State dir to use (kept; a champion there is reused). Default: temp."),
    ] = None,
    keep_state: Annotated[bool, typer.Option(help="Keep the temporary state dir.")] = False,
    run_id: Annotated[
        str | None, typer.Option(help="Export this run (of the state dir) instead of training.")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Local MedMNIST directory.")] = DEFAULT_DATA_DIR,
    workers: Annotated[int | None, typer.Option(help="MEDSCREEN_WORKERS for the service.")] = None,
    ort_threads: Annotated[
        int | None, typer.Option(help="MEDSCREEN_ORT_THREADS for the service.")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="MEDSCREEN_MAX_BATCH for the service.")
    ] = None,
    eager_threads: Annotated[
        int, typer.Option(help="torch intra-op threads of the eager endpoint (0: torch default).")
    ] = 0,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Send no API key (a service without keys).")
    ] = False,
    client: Annotated[str, typer.Option(help="Load generator: auto, wrk or aiohttp.")] = "auto",
    images: Annotated[int, typer.Option(help="Distinct test images to upload in turn.")] = 32,
    limit_seconds: Annotated[
        float, typer.Option(help="Seconds per batch size (and per decode mode) in-process.")
    ] = 2.0,
    burst_baseline: Annotated[float, typer.Option(help="Seconds at c=1 before a burst.")] = 3.0,
    burst_seconds: Annotated[float, typer.Option(help="Burst at c=64 (0: skip).")] = 10.0,
    burst_after: Annotated[float, typer.Option(help="Seconds at c=1 after the burst.")] = 10.0,
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "benchmarks/results/serving.json"
    ),
) -> None:
    """Measure the service, the eager endpoint and the in-process limit on this machine."""
    level_list = [int(level) for level in levels.split(",") if level.strip()]
    target_list = [target.strip() for target in targets.split(",") if target.strip()]
    if unknown := set(target_list) - {"service", "eager"}:
        raise typer.BadParameter(f"unknown targets {sorted(unknown)}", param_hint="--targets")
    output = output.resolve()
    data_dir = data_dir.resolve()
    signal.signal(signal.SIGTERM, _terminate)
    servers = Servers()
    workdir = make_workdir()
    try:
        with state_directory(state_dir, keep_state) as state:
            _run(
                state=state,
                servers=servers,
                workdir=workdir,
                level_list=level_list,
                target_list=target_list,
                duration=duration,
                warmup=warmup,
                run_id=run_id,
                data_dir=data_dir,
                knob_values=dict(zip(KNOBS, (workers, ort_threads, max_batch), strict=True)),
                auth=not no_auth,
                eager_threads=eager_threads,
                client=client,
                image_count=images,
                limit_seconds=limit_seconds,
                burst=(burst_baseline, burst_seconds, burst_after),
                output=output,
            )
    except RuntimeError as error:
        say(f"error: {error}")
        raise typer.Exit(1) from None
    finally:
        servers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    *,
    state: Path,
    servers: Servers,
    workdir: Path,
    level_list: list[int],
    target_list: list[str],
    duration: float,
    warmup: float,
    run_id: str | None,
    data_dir: Path,
    knob_values: dict[str, int | None],
    auth: bool,
    eager_threads: int,
    client: str,
    image_count: int,
    limit_seconds: float,
    burst: tuple[float, float, float],
    output: Path,
) -> None:
    use_only(state)
    for name, value in knob_values.items():
        if value is not None:
            os.environ[name] = str(value)
    knobs = {name: os.environ.get(name, "unset (service default)") for name in KNOBS}
    model_name = yaml.safe_load(RECIPE.read_text())["registration"]["model_name"]
    say(f"state dir: {state}")
    cpu_busy_at_start = cpu_busy_percent()
    if busy := busy_warning(cpu_busy_at_start, len(os.sched_getaffinity(0))):
        say(busy)
    say("service knobs: " + ", ".join(f"{k}={v}" for k, v in knobs.items()))

    say("== setup: model (pneumonia-full, 1 epoch; speed does not depend on accuracy)")
    version, reused = set_up_model(model_name, data_dir, run_id)
    onnx_path, card = download_model(version, state / "bench-model")
    model = f"{model_name}@champion = version {version.version} (run {version.run_id})"
    say(f"model: {model}; ONNX {onnx_path.stat().st_size / 1e6:.1f} MB")
    pngs = test_pngs(data_dir, image_count)
    say(f"uploads: {len(pngs)} PneumoniaMNIST test PNGs, {np.mean([len(p) for p in pngs]):.0f} B")
    authorization = None
    if auth and "service" in target_list:
        authorization = f"Bearer {create_api_key(model_name)}"
        say("API key created for hospital 'bench'")

    summary: dict[str, Any] = {
        "model": model,
        "note": (
            "trained 1 epoch with the metric minimums of the release gate waived in a throwaway "
            "store: speed does not depend on accuracy"
            + (" (reused from the state dir)" if reused else "")
        ),
        "knobs": knobs,
        "levels": level_list,
        "duration_s": duration,
        "warmup_s": warmup,
        "auth": authorization is not None,
        "eager_torch_threads": eager_threads or "torch default",
    }

    say(f"== (a) in-process limit: onnxruntime {version_of('onnxruntime')}, {limit_seconds} s each")
    busy_before, own_before = system_busy_seconds(), time.process_time()
    started = time.perf_counter()
    in_process = in_process_limit(onnx_path, card, pngs, limit_seconds)
    wall = time.perf_counter() - started
    other_cores = {
        "the in-process limit": other_work_cores(
            busy_before, wall, (time.process_time() - own_before) / wall
        )
    }
    limit = max(in_process, key=lambda row: row["images_per_s_decode_excluded"])
    summary["in_process"] = in_process
    summary["limit"] = limit

    load = Load(Upload.from_pngs(pngs, authorization), workdir, client)
    summary["machine"] = machine_info(load.client, cpu_busy_at_start)
    eager_results: list[LevelResult] = []
    service_results: list[LevelResult] = []

    if "eager" in target_list:
        say("== (b) eager endpoint: FastAPI + PyTorch eager, uvicorn, 1 process")
        port = free_port()
        log = state / "eager.log"
        process = servers.start(
            [
                sys.executable,
                "-P",  # no script dir on sys.path: benchmarks/serving.py would shadow serving/
                str(REPO / "benchmarks" / "eager_endpoint.py"),
                "--run-id",
                version.run_id,
                "--port",
                str(port),
                "--threads",
                str(eager_threads),
            ],
            log,
        )
        say(f"  ready after {wait_ready(process, port, log):.1f} s (log: {log})")
        check_one(port, load.upload)  # the same requests (it ignores the API key)
        eager_results = measure_levels(
            load, "eager FastAPI", process, port, level_list, warmup, duration
        )
        servers.stop(process)

    burst_result = None
    if "service" in target_list:
        say(f"== (c) medscreen serve --model {model_name}@champion")
        port = free_port()
        log = state / "serve.log"
        command = [*medscreen_command(), "serve", "--model", f"{model_name}@champion"]
        workers = os.environ.get("MEDSCREEN_WORKERS")
        if workers and serve_has_workers_option():
            command += ["--workers", workers]  # the option, when there is one, sets the env var
        process = servers.start([*command, "--port", str(port)], log)
        say(f"  $ medscreen {' '.join(command[len(medscreen_command()) :])} --port {port}")
        say(f"  ready after {wait_ready(process, port, log):.1f} s (log: {log})")
        answer = check_one(port, load.upload)
        say(f"  first answer: {json.dumps(answer)[:160]}")
        service_results = measure_levels(
            load, "medscreen service", process, port, level_list, warmup, duration
        )
        baseline_s, burst_s, after_s = burst
        if burst_s > 0:
            say(
                f"  burst recovery: c=1 {baseline_s:g} s, c={BURST_CONCURRENCY} {burst_s:g} s, "
                f"c=1 {after_s:g} s"
            )
            burst_result = burst_recovery(load, port, baseline_s, burst_s, after_s)
        servers.stop(process)

    summary["burst"] = burst_result
    summary["service"] = [row.as_dict() for row in service_results]
    summary["eager"] = [row.as_dict() for row in eager_results]
    summary["goals"] = goals(limit, service_results, eager_results, burst_result)
    for row in [*eager_results, *service_results]:
        other_cores[f"{row.target} c={row.concurrency}"] = row.other_cpu_cores or 0.0
    summary["other_work_cpu_cores"] = other_cores
    summary["load_average_at_end"] = os.getloadavg()
    report(summary, service_results, eager_results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2, default=str))
    say(f"\nJSON: {output}")


if __name__ == "__main__":
    typer.run(main)
