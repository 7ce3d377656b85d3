"""Smoke tests of benchmarks/: each script runs small, as a subprocess, and its figures make sense.

The README quotes these scripts' figures; nothing else runs them, so a benchmark could break
unnoticed. Each one runs here with the smallest settings its options allow, and its JSON (or
table) is checked for the keys and plausible values, not only for exit code 0.

The image benchmarks use a state dir of their own, not the session's: serving.py and
decode_memory.py serve ``pneumonia-screening@champion``, and a champion (or two more versions)
in the session's store would change what test_governance.py finds there. Its only training run
comes from image_tasks.py with a tiny copy of the quick recipe, so nothing trains twice.

Not run: benchmarks/ecg.py trains the whole ecg-full recipe on MIT-BIH DS1, and has no option
to shorten it. loadgen.py, proc_memory.py and eager_endpoint.py are helpers: serving.py,
decode_memory.py and ecg_batch_memory.py run them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from tests.conftest import PROJECT_ROOT, QUICK_RECIPE, TINY_TRAINING, medscreen_command
from training.recipe import apply_overrides

pytestmark = pytest.mark.slow

MODEL_NAME = "pneumonia-screening"
# The most one benchmark may take here; past it, it is stopped and the test fails.
BENCHMARK_TIMEOUT_S = 300


def run_benchmark(
    script: str, *arguments: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` from the project root; fail with its output unless it exits 0.

    ``env`` replaces the environment (default: this session's, with its state dir).
    """
    command = [sys.executable, f"benchmarks/{script}", *arguments]
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env or dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=BENCHMARK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: serving.py and decode_memory.py then stop the servers they started.
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(
            f"{script} ran past {BENCHMARK_TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    completed = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert completed.returncode == 0, (
        f"{script} exited {completed.returncode}:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    )
    return completed


def assert_probability(value: Any) -> None:
    assert isinstance(value, float) and 0.0 <= value <= 1.0, value


@dataclass
class BenchState:
    """The benchmarks' own state dir, the environment that selects it and its training run."""

    path: Path
    env: dict[str, str]
    run_id: str
    image_tasks: dict[str, Any]
    stdout: str


@pytest.fixture(scope="module")
def bench_state(tmp_path_factory: pytest.TempPathFactory, medmnist_dir: Path) -> BenchState:
    """Run image_tasks.py on a tiny copy of the quick recipe, in a state dir of its own."""
    state = tmp_path_factory.mktemp("bench-state")
    env = {
        **os.environ,
        "MEDSCREEN_STATE_DIR": str(state),
        "BENTOML_HOME": str(state / "bentoml"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    recipe = yaml.safe_load(QUICK_RECIPE.read_text())
    recipe["name"] = "pneumonia-tiny"
    recipe["data"]["data_dir"] = str(medmnist_dir)
    # image_tasks.py takes no --set: the session's tiny settings go into the recipe file.
    recipe = apply_overrides(recipe, list(TINY_TRAINING))
    recipe_path = state / "pneumonia-tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    output = state / "image_tasks.json"
    completed = run_benchmark(
        "image_tasks.py", "--recipe", str(recipe_path), "--output", str(output), env=env
    )
    result = json.loads(output.read_text())
    return BenchState(
        path=state,
        env=env,
        run_id=result["results"][0]["run_id"],
        image_tasks=result,
        stdout=completed.stdout,
    )


@pytest.fixture(scope="module")
def int8_result(bench_state: BenchState, medmnist_dir: Path) -> dict[str, Any]:
    """int8_vs_float.py on the tiny run: registers a float32 and an INT8 version."""
    output = bench_state.path / "int8_vs_float.json"
    run_benchmark(
        "int8_vs_float.py",
        "--run-id",
        bench_state.run_id,
        "--data-dir",
        str(medmnist_dir),
        "--output",
        str(output),
        env=bench_state.env,
    )
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def champion(bench_state: BenchState, int8_result: dict[str, Any]) -> str:
    """The float32 version, promoted to @champion: the serving benchmarks reuse it, not train."""
    version = int8_result["results"]["float32"]["version"]
    promoted = subprocess.run(
        [
            *medscreen_command(),
            "models",
            "promote",
            MODEL_NAME,
            version,
            "--to",
            "champion",
            "--approver",
            "benchmark-tests",
            "--reason",
            "serve the tiny run in the benchmarks' own state dir",
        ],
        env=bench_state.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert promoted.returncode == 0, promoted.stderr
    return version


def test_image_tasks_reports_the_recipe_test_metrics_beside_the_baselines(
    bench_state: BenchState,
):
    """One row per recipe, with its run, a test AUC the gate passes and the published baselines."""
    result = bench_state.image_tasks
    [row] = result["results"]
    assert (row["recipe"], row["dataset"]) == ("pneumonia-tiny", "pneumoniamnist")
    assert re.fullmatch(r"[0-9a-f]{32}", row["run_id"]), row["run_id"]
    assert 0 < row["wall_minutes"] < 5
    metrics = row["metrics"]
    # The tiny run's release gate asks 0.6; a model this small still ranks well above chance.
    assert 0.6 <= metrics["test_auc"] <= 1.0, metrics["test_auc"]
    for name in ("test_accuracy", "test_sensitivity", "test_specificity", "threshold"):
        assert_probability(metrics[name])
    assert metrics["test_cases"] == 160  # data.max_test_samples of TINY_TRAINING
    assert "medscreen pneumonia-tiny (DenseNet)" in bench_state.stdout
    assert "MedMNIST v2 ResNet-18 (28)" in bench_state.stdout


def test_int8_vs_float_registers_both_and_the_int8_graph_is_smaller(
    int8_result: dict[str, Any], bench_state: BenchState
):
    """Both variants are registered as versions of their own; INT8 is smaller, its AUC holds."""
    assert int8_result["run_id"] == bench_state.run_id
    results = int8_result["results"]
    assert set(results) == {"float32", "int8"}, "INT8 not registered (see the script's output)"
    float32, int8 = results["float32"], results["int8"]
    assert float32["version"] != int8["version"]
    assert 0 < int8["size_bytes"] < float32["size_bytes"]
    for row in (float32, int8):
        assert 0 < row["batch1_ms"] < 1000
        assert row["batch32_images_per_s"] > 0
        assert 0.6 <= row["test_auc"] <= 1.0
        assert_probability(row["selected_val_auc"])
        assert_probability(row["threshold"])
    # registration.int8_max_auc_drop of TINY_TRAINING: a larger drop is not registered.
    assert float32["test_auc"] - int8["test_auc"] <= 0.05


def test_serving_measures_each_level_without_errors(
    champion: str, bench_state: BenchState, medmnist_dir: Path, tmp_path: Path
):
    """The service and the eager endpoint answer every request at each level; nothing trains."""
    output = tmp_path / "serving.json"
    completed = run_benchmark(
        "serving.py",
        *("--duration", "1", "--warmup", "0.5", "--levels", "1,2"),
        *("--targets", "service,eager", "--client", "aiohttp", "--images", "4"),
        *("--limit-seconds", "0", "--burst-seconds", "0"),
        *("--state-dir", str(bench_state.path), "--run-id", bench_state.run_id),
        *("--data-dir", str(medmnist_dir), "--output", str(output)),
        env=bench_state.env,
    )
    assert f"reusing {MODEL_NAME}@champion = version {champion}" in completed.stdout
    assert "$ medscreen train" not in completed.stdout
    summary = json.loads(output.read_text())
    assert summary["levels"] == [1, 2]
    assert summary["auth"] is True
    assert summary["model"].startswith(f"{MODEL_NAME}@champion = version {champion} ")
    assert [row["batch"] for row in summary["in_process"]] == [1, 8, 16, 32, 64, 128]
    assert summary["limit"]["images_per_s_decode_excluded"] > 0
    for target, rows in (("medscreen service", summary["service"]), ("eager", summary["eager"])):
        assert [row["concurrency"] for row in rows] == [1, 2], target
        for row in rows:
            assert row["target"].startswith(target)
            assert (row["errors"], row["non_2xx"], row["socket_errors"]) == (0, 0, 0), row
            assert row["requests"] > 0 and row["requests_per_s"] > 0, row
            assert 0 < row["p50_ms"] <= row["p99_ms"], row
    assert summary["burst"] is None  # --burst-seconds 0
    checks = summary["goals"]["checks"]
    # c=32 and c=64 were not measured: their goals say so rather than pass or fail.
    assert checks["service_errors_at_64"] == {"value": None, "pass": None}


def test_decode_memory_answers_each_upload_under_both_budgets(
    champion: str, bench_state: BenchState, medmnist_dir: Path
):
    """One DICOM upload per budget is screened (200); the worker's peak growth is reported."""
    # The smallest side the option allows (128): a picture with more than one grey level.
    output = bench_state.path / "decode_memory.json"
    run_benchmark(
        "decode_memory.py",
        *("--state-dir", str(bench_state.path), "--data-dir", str(medmnist_dir)),
        *("--uploads", "1", "--upload", "dicom", "--side", "128", "--output", str(output)),
        env=bench_state.env,
    )
    summary = json.loads(output.read_text())
    assert (summary["uploads"], summary["upload"], summary["side"]) == (1, "dicom", 128)
    assert 0 < summary["upload_bytes"] < 128 * 128 * 2  # RLE-compressed 16-bit pixels
    assert [run["budget_mib"] for run in summary["runs"]] == [1024, 1_000_000]
    for run in summary["runs"]:
        assert run["statuses"] == [200], run
        assert 0 <= run["wall_s"] < 60, run
        assert isinstance(run["worker_peak_growth_mib"], int), run
        assert 0 <= run["worker_peak_growth_mib"] < 1024, run


def test_ecg_batch_memory_reports_a_peak_per_batch_size(ecg_model, tmp_path: Path):
    """A few hundred beats, in pieces and whole: each batch size has its time and peak memory."""
    from training.tracking import configure_tracking

    configure_tracking()
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{ecg_model.model_name}/{ecg_model.version}", dst_path=str(tmp_path)
        )
    )
    onnx = model_dir / ecg_model.card.onnx.filename
    output = tmp_path / "ecg_batch_memory.json"
    completed = run_benchmark(
        "ecg_batch_memory.py",
        *("--onnx", str(onnx), "--beats", "300", "--pieces", "64,300", "--output", str(output)),
    )
    rows = json.loads(output.read_text())
    assert [row["piece"] for row in rows] == [64, 300]
    for row in rows:
        assert set(row) == {"piece", "seconds", "peak_growth_mib"}
        assert 0 < row["seconds"] < 30, row
        assert 0 <= row["peak_growth_mib"] < 1024, row
    assert "one ECG of 300 beats through the batcher" in completed.stdout


def test_recipe_variants_reports_each_variant_on_validation(medmnist_dir: Path, tmp_path: Path):
    """One seed of a tiny quick recipe: the recipe's weights and both moving averages, scored."""
    output = tmp_path / "variants.json"
    run_benchmark(
        "recipe_variants.py",
        *("--recipe", str(QUICK_RECIPE), "--seeds", "0", "--data-dir", str(medmnist_dir)),
        *("--set", "data.max_train_samples=256", "--set", "data.max_val_samples=128"),
        *("--set", "data.max_test_samples=64", "--set", "optimisation.max_epochs=2"),
        *("--output", str(output)),
    )
    variants = json.loads(output.read_text())["0"]
    assert set(variants) == {"recipe", "ema 1 epoch", "ema 3 epoch"}
    for name, figures in variants.items():
        assert_probability(figures["val_auc"])
        assert_probability(figures["val_accuracy"])
        assert figures["best_epoch"] in (0, 1), name
        assert figures["temperature"] > 0, name
        # The temperature is fitted to minimise this very log loss: it cannot be higher.
        assert figures["val_log_loss_calibrated"] <= figures["val_log_loss"] + 1e-6, name
    recipe = variants["recipe"]
    # Scored again from its kept weights, the recipe's checkpoint has the AUC it was chosen by.
    assert recipe["val_auc"] == pytest.approx(recipe["best_val_auc_during_training"], abs=1e-3)
