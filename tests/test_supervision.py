"""`medscreen serve` killed outright: its workers must not go on serving without it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import running_server


def test_a_worker_whose_supervisor_died_before_it_started_stops() -> None:
    # Reparented while it imported, its parent is already init: the PID it was given tells.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; from serving.supervision import end_with_supervisor; "
            "end_with_supervisor(); time.sleep(30)",
        ],
        env={**os.environ, "MEDSCREEN_SUPERVISOR_PID": str(gone.pid)},
        timeout=60,
    )
    assert worker.returncode == -signal.SIGTERM


@pytest.mark.slow
def test_workers_end_when_their_supervisor_is_killed(registered_model, tmp_path: Path) -> None:
    from training.registry import promote

    name = registered_model.model_name
    promote(name, registered_model.version, alias="candidate", approver="ci", reason="supervision")
    with running_server([f"{name}@candidate"], tmp_path, "--reload-seconds", "0") as server:
        workers = psutil.Process(server.process.pid).children(recursive=True)
        assert workers
        port = int(server.url.rsplit(":", 1)[1])
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [process.cmdline() for process in alive]
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    probe.bind(("127.0.0.1", port))  # the port is free for the next server
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"port {port} still held"
                    time.sleep(0.2)
