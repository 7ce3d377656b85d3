"""Stopping `medscreen serve`: killed outright, its workers must not go on serving; stopped
with SIGTERM, it answers and logs the requests it has received first."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

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


@pytest.mark.slow
def test_requests_in_flight_are_answered_and_logged_when_the_service_is_stopped(
    registered_model, service_keys, tmp_path: Path
) -> None:
    """SIGTERM (a deployment stopping the service) lets every request already received finish."""
    from serving.settings import prediction_log_path
    from training.registry import promote

    name = registered_model.model_name
    promote(name, registered_model.version, alias="candidate", approver="ci", reason="shutdown")
    # 16-bit 6000 x 6000 pictures: about 0.7 s each to decode, two at a time in the budget.
    values = np.add.outer(np.arange(6000) // 16, np.arange(6000) // 16) * 37 % 60000
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    upload = buffer.getvalue()
    answers: dict[int, requests.Response | Exception] = {}
    answered_at: list[float] = []

    def screen(url: str, index: int) -> None:
        try:
            answers[index] = requests.post(
                f"{url}/v1/screen",
                files={"file": ("upload.png", upload)},
                headers={"Authorization": f"Bearer {service_keys.all_models}"},
                timeout=60,
            )
            answered_at.append(time.monotonic())
        except requests.RequestException as error:
            answers[index] = error

    with running_server([f"{name}@candidate"], tmp_path) as server:
        senders = [threading.Thread(target=screen, args=(server.url, i)) for i in range(4)]
        for sender in senders:
            sender.start()
        time.sleep(0.3)
        stopped_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        for sender in senders:
            sender.join()
        assert server.process.wait(timeout=60) == 0, server.log()
    assert len(answers) == 4, answers
    assert all(isinstance(answer, requests.Response) for answer in answers.values()), answers
    request_ids = {answer.json()["request_id"] for answer in answers.values()}
    assert {answer.status_code for answer in answers.values()} == {200}
    assert max(answered_at) > stopped_at  # they were in flight when the service was stopped
    records = [json.loads(line) for line in prediction_log_path().read_text().splitlines()]
    logged = {record["request_id"]: record["outcome"] for record in records}
    assert all(logged.get(request_id) == "prediction" for request_id in request_ids)
