"""A shared tracking server is a setting: the pipeline against a real `mlflow server`."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pytest
import requests

from datasets.download import hide_passwords, tracking_address_problem, unreachable_reason
from tests.conftest import (
    QUICK_RECIPE,
    TINY_TRAINING,
    free_port,
    medscreen_command,
    medscreen_error_line,
    running_server,
)


@dataclass
class TrackingServer:
    url: str
    root: Path


@contextlib.contextmanager
def _backend_store(backend: str, root: Path) -> Iterator[str]:
    """The server's backend store: a sqlite file, or a real PostgreSQL 16 server (pgserver)."""
    if backend == "sqlite":
        yield f"sqlite:///{root / 'server.db'}"
        return
    import pgserver

    # Run as root, pgserver runs PostgreSQL as a `pgserver` user (which it adds) and opens every
    # folder above the data to others: a folder of its own in /tmp, which is open already, keeps
    # it from opening pytest's private one.
    folder = Path(tempfile.mkdtemp(prefix="medscreen-postgresql-"))
    database = pgserver.get_server(folder / "pgdata", cleanup_mode="stop")
    try:
        yield database.get_uri()  # postgresql://postgres:@/postgres?host=<its socket folder>
    finally:
        database.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def tracking_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrackingServer]:
    """`mlflow server` on a free port, on each backend store; artifacts proxied into a folder."""
    root = tmp_path_factory.mktemp(f"tracking-server-{request.param}")
    port = free_port()
    log_path = root / "server.log"
    with _backend_store(request.param, root) as backend_store, log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri",
                backend_store,
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while unreachable_reason(f"{url}/health", timeout_s=2) is not None:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield TrackingServer(url=url, root=root)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def _medscreen(*args: str) -> str:
    completed = subprocess.run(
        [*medscreen_command(), *args], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.mark.slow
def test_the_pipeline_runs_against_a_tracking_server_set_by_one_variable(
    tracking_server: TrackingServer,
    medmnist_dir: Path,
    shared_datasets: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.api_keys import KeyStore
    from serving.settings import key_store_path

    state = tmp_path / "state"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(state))
    monkeypatch.setenv("COLUMNS", "300")  # rich tables on one line each
    overrides = [f"data.data_dir={medmnist_dir}", *TINY_TRAINING]
    run_id = _medscreen(
        "train", str(QUICK_RECIPE), *(f"--set={item}" for item in overrides)
    ).split()[-1]
    name, version = _medscreen("export", "--run-id", run_id).splitlines()[-1].split()
    _medscreen(
        "models", "promote", name, version, "--to", "champion",
        "--approver", "ci-tracking-server", "--reason", "release through the shared server",
    )  # fmt: skip
    _, key = KeyStore(key_store_path()).create("Shared Server Hospital", "east", ["*"])

    (tmp_path / "service").mkdir()
    with running_server([f"{name}@champion"], tmp_path / "service") as server:
        dicom = (shared_datasets / "dicom" / "nih_chestxray14_dx_1024.dcm").read_bytes()
        answer = requests.post(
            f"{server.url}/v1/screen",
            files={"file": ("chest.dcm", dicom)},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": name, "version": version, "alias": "champion"}

    # Runs, models and their files are the server's; only the service's own state is local.
    assert not (state / "mlflow.db").exists()
    assert not (state / "artifacts").exists()
    served_graphs = {
        hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (tracking_server.root / "artifacts").rglob("model.onnx")
    }
    shown = " ".join(_medscreen("runs", "show", run_id).split())
    registered = re.search(rf"{name}/{version} │ release gate passed, .*?SHA-256 (\w{{64}})", shown)
    assert registered is not None, shown
    assert registered.group(1) in served_graphs
    verified = _medscreen("audit", "verify")
    assert "1 records, hash chain intact" in verified


@pytest.mark.slow
def test_trainings_started_together_share_the_new_experiment(
    tracking_server: TrackingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from training.tracking import configure_tracking, ensure_experiment

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    configure_tracking()
    outcomes: list[str] = []

    def first_run_of_a_recipe() -> None:
        try:
            outcomes.append(ensure_experiment("started-together"))
        except Exception as error:  # what the race raised: RESOURCE_ALREADY_EXISTS
            outcomes.append(repr(error))

    try:
        trainings = [threading.Thread(target=first_run_of_a_recipe) for _ in range(6)]
        for training in trainings:
            training.start()
        for training in trainings:
            training.join()
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert len(set(outcomes)) == 1 and outcomes[0].isdigit(), outcomes


def test_a_tracking_server_that_does_not_answer_is_one_line_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, medmnist_dir: Path
) -> None:
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", nothing_listens)
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "state"))
    for command in (
        ["models", "show", "pneumonia-screening"],
        ["export", "--run-id", "0" * 32],
        ["train", str(QUICK_RECIPE), f"--set=data.data_dir={medmnist_dir}"],
        ["serve", "--port", str(free_port())],
    ):
        started = time.monotonic()
        line = medscreen_error_line(*command)
        # MLflow's own retries take minutes before any output.
        assert time.monotonic() - started < 60, command
        assert line.startswith(f"error: MLFLOW_TRACKING_URI={nothing_listens}: "), line
        assert "the tracking server does not answer (Connection refused)" in line, line
        assert str(tmp_path / "state") in line, line  # where the embedded store would be
    assert not (tmp_path / "state").exists()  # nothing was written anywhere else instead


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        # A missing scheme: MLflow took it for a store it cannot open (a traceback).
        ("localhost:5000", "not a tracking store medscreen uses: give http(s)://HOST:PORT"),
        ("file:///tmp/mlruns", "not a tracking store medscreen uses"),  # MLflow 3: maintenance
        # MLflow retries a database that does not answer for minutes, silently.
        ("postgresql://u:pw@127.0.0.1:{port}/db", "the database does not answer (Connection"),
    ],
)
def test_a_tracking_address_medscreen_cannot_use_is_one_line(
    uri: str, problem: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uri = uri.format(port=free_port())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "state"))
    for command in (["models", "list"], ["serve", "--port", str(free_port())]):
        started = time.monotonic()
        line = medscreen_error_line(*command)
        assert time.monotonic() - started < 60, command
        assert line.startswith(f"error: MLFLOW_TRACKING_URI={hide_passwords(uri)}: {problem}")
        assert "pw" not in line
    assert not (tmp_path / "state").exists()


def test_a_state_dir_that_is_a_file_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "state").write_text("not a directory")
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    line = medscreen_error_line("models", "list")
    assert line.startswith("error: MEDSCREEN_STATE_DIR: cannot open the tracking store "), line
    line = medscreen_error_line("serve", "--port", str(free_port()))
    assert line == f"error: MEDSCREEN_STATE_DIR: {tmp_path / 'state'} is not a directory"


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no client trusts, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = directory / "server.pem", directory / "server.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_path, key_path


@contextlib.contextmanager
def _answering(status: int, tls_directory: Path | None = None, body: bytes = b"") -> Iterator[str]:
    """A server that answers every GET and POST with ``status`` and ``body``.

    Over TLS (untrusted) given a folder.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.do_GET()

        def log_message(self, *_: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        scheme = "http"
        if tls_directory is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*_self_signed_certificate(tls_directory))
            server.socket = context.wrap_socket(server.socket, server_side=True)
            scheme = "https"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"{scheme}://127.0.0.1:{server.server_address[1]}/health"
        finally:
            server.shutdown()


def test_a_run_the_server_refuses_to_show_is_not_called_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "state"))
    run_id = "0" * 32
    with _answering(HTTPStatus.FORBIDDEN) as url:  # for example, a server behind a login
        server = url.removesuffix("/health")
        # A password in the address is MLflow's basic authentication; it is never shown.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.replace("//", "//alice:s3cret@"))
        for command in (["runs", "show", run_id], ["export", "--run-id", run_id]):
            line = medscreen_error_line(*command)
            shown_server = server.replace("//", "//alice:***@")
            assert f"run '{run_id}': cannot read it from {shown_server}: " in line, line
            assert "403" in line, line
            assert "not found" not in line, line
            assert "s3cret" not in line, line


def test_any_answer_but_a_gateways_failure_counts_as_a_server(tmp_path: Path) -> None:
    tls_directory = tmp_path
    for status, expected in (
        (200, None),
        (404, None),  # a server without /health is still there
        (401, None),
        (500, None),
        (502, "HTTP 502 Bad Gateway"),
        (503, "HTTP 503 Service Unavailable"),
        (504, "HTTP 504 Gateway Timeout"),
    ):
        with _answering(status) as url:
            assert unreachable_reason(url) == expected, status
    with _answering(HTTPStatus.OK, tls_directory=tls_directory) as url:
        # A certificate the check does not trust: a server is there, and the client's TLS
        # settings (a hospital's private CA) are MLflow's.
        assert url.startswith("https://")
        assert unreachable_reason(url) is None
    with _answering(HTTPStatus.OK) as url:
        # An https address for a plain-HTTP server: MLflow would retry the handshake for minutes.
        assert unreachable_reason(url.replace("http://", "https://")) == (
            "the port speaks plain HTTP, not HTTPS: use an http:// address"
        )
    assert unreachable_reason(f"http://127.0.0.1:{free_port()}/") == "Connection refused"


# What a web server that is not MLflow answered the review (any route under /api/2.0/mlflow).
_NO_ROUTE = b'{"error": "no route /api/2.0/mlflow/experiments/search"}'
_NOT_MLFLOW = "answers HTTP but is not an MLflow tracking server (GET /api/2.0/mlflow/"


def test_an_http_server_that_is_not_mlflow_is_one_line_naming_the_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, medmnist_dir: Path
) -> None:
    # It was a RestException traceback, or "no registered model" (blaming the model).
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "state"))
    with _answering(HTTPStatus.NOT_FOUND, body=_NO_ROUTE) as url:
        server = url.removesuffix("/health")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
        for command in (
            ["models", "list"],
            ["models", "history", "pneumonia-screening"],
            ["models", "promote", "pneumonia-screening", "1", "--to", "champion",
             "--approver", "ci-review", "--reason", "the address is wrong"],
            ["train", str(QUICK_RECIPE), f"--set=data.data_dir={medmnist_dir}"],
            ["serve", "--port", str(free_port())],
        ):  # fmt: skip
            line = medscreen_error_line(*command)
            assert line.startswith(
                f"error: MLFLOW_TRACKING_URI={server}: {_NOT_MLFLOW}experiments/search answered "
                "HTTP 404 Not Found); correct the address"
            ), (command, line)
            assert line.endswith(f"use the embedded store in {tmp_path / 'state'}"), line
    assert not (tmp_path / "state").exists()


def test_only_a_server_that_may_be_mlflow_passes_the_check() -> None:
    with _answering(HTTPStatus.OK, body=b"<html>another application</html>") as url:
        problem = tracking_address_problem(url.removesuffix("/health"))
        assert problem is not None and problem.startswith(_NOT_MLFLOW), problem
        assert "HTTP 200 OK, not MLflow's JSON" in problem
    with _answering(HTTPStatus.OK, body=b'{"status": "ok"}') as url:  # JSON, not MLflow's
        problem = tracking_address_problem(url.removesuffix("/health"))
        assert problem is not None and problem.startswith(_NOT_MLFLOW), problem
    for login in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        # MLflow may be behind the login: the client, with its credentials, finds out.
        with _answering(login) as url:
            assert tracking_address_problem(url.removesuffix("/health")) is None


@pytest.mark.slow
def test_a_real_tracking_server_passes_the_check(tracking_server: TrackingServer) -> None:
    assert tracking_address_problem(tracking_server.url) is None
    assert tracking_address_problem(f"{tracking_server.url}/") is None


def test_passwords_in_addresses_are_hidden() -> None:
    assert hide_passwords("MLFLOW_TRACKING_URI=https://alice:s3%40cret@host:5000/x: no") == (
        "MLFLOW_TRACKING_URI=https://alice:***@host:5000/x: no"
    )
    assert hide_passwords("in 'postgresql://u:p@db/mlflow'") == "in 'postgresql://u:***@db/mlflow'"
    # An unescaped "@" in the password: clients read up to the last "@" before the host.
    assert hide_passwords("http://u:p@ss@h:1/x@y and http://v:w@k/") == (
        "http://u:***@h:1/x@y and http://v:***@k/"
    )
    # Without a password, the user information may be a token: hidden whole.
    assert hide_passwords("https://ghp_T0ken@host:5000/x@y, http://t@k@h/") == (
        "https://***@host:5000/x@y, http://***@h/"
    )
    for unchanged in ("http://host:5000/a@b", "http://[::1]:5000/", "sqlite:///tmp/mlflow.db"):
        assert hide_passwords(unchanged) == unchanged


def test_a_password_in_the_tracking_address_is_never_printed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "state"))
    for command in (["models", "show", "x"], ["serve", "--port", str(free_port())]):
        line = medscreen_error_line(*command)
        assert line.startswith(f"error: MLFLOW_TRACKING_URI=http://alice:***@127.0.0.1:{port}: "), (
            line
        )
        assert "s3cret" not in line, line


def test_a_password_in_a_download_or_service_address_is_never_printed(tmp_path: Path) -> None:
    nothing_listens = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    upload = tmp_path / "image.png"
    upload.write_bytes(b"not sent: the connection fails first")
    fetch = ["datasets", "fetch", "--cache-dir", str(tmp_path)]
    for command in (
        [*fetch, "mitdb", "--records", "100", "--url", f"{nothing_listens}/mitdb"],
        [*fetch, "pneumoniamnist", "--url", f"{nothing_listens}/pneumonia.npz"],
        ["predict", str(upload), "--url", nothing_listens],
        ["predict", str(upload), "--url", "http://alice:s3cret@[::1"],  # not a URL
    ):
        completed = subprocess.run(
            [*medscreen_command(), *command],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode in (1, 2), completed.stderr
        assert completed.stderr.startswith("error: ") and "alice:***@" in completed.stderr, (
            completed.stderr
        )
        assert "s3cret" not in completed.stdout + completed.stderr, completed.stderr
