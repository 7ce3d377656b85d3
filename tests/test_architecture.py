"""The contract between training and serving: serving never imports the training stack."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import PROJECT_ROOT

FORBIDDEN = ("torch", "monai", "pytorch_lightning", "lightning", "torchmetrics", "training")


def _imported_roots(path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_serving_source_imports_nothing_from_the_training_stack():
    for path in sorted((PROJECT_ROOT / "serving").rglob("*.py")):
        assert not _imported_roots(path) & set(FORBIDDEN), path


def test_loading_the_service_loads_no_training_module():
    code = (
        "import sys, serving, serving.service, serving.cli\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert completed.stdout.strip() == ""


def test_datasets_package_needs_no_torch():
    code = "import sys, datasets, datasets.cli\nprint('torch' in sys.modules)\n"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert completed.stdout.strip() == "False"


def test_the_command_line_starts_without_the_heavy_stacks():
    # MLflow alone took a second of every start, `--help` and `audit verify` included.
    heavy = ("torch", "monai", "pytorch_lightning", "lightning", "mlflow", "bentoml", "onnxruntime")
    code = (
        "import sys, medscreen_cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=PROJECT_ROOT,
    )
    assert completed.stdout.strip() == "[]"
