"""The embedded MLflow store: several commands may open a new one at the same moment."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, medscreen_command


def test_commands_started_together_on_a_new_state_directory_all_work(tmp_path: Path) -> None:
    # MLflow creates its tables on first use: unlocked, racing processes crashed with
    # "duplicate column name" or "table ... already exists".
    environment = {**os.environ, "MEDSCREEN_STATE_DIR": str(tmp_path / "state")}
    environment.pop("MLFLOW_TRACKING_URI", None)
    commands = [
        subprocess.Popen(
            [*medscreen_command(), "models", "list"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for command in commands:
        _, stderr = command.communicate(timeout=300)
        assert command.returncode == 0, stderr


def _error_line(*args: str, env: dict[str, str], prefix: tuple[str, ...] = ()) -> str:
    """Run a command that must fail at once on the tracking store; return its one error line."""
    environment = {**os.environ, **env}
    if "MLFLOW_TRACKING_URI" not in env:
        environment.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    completed = subprocess.run(
        [*prefix, *medscreen_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    # MLflow retried a store it could not open for minutes, a warning a time.
    assert time.monotonic() - started < 60, args
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    return lines[0]


def _new_store(state: Path) -> None:
    """Create an empty embedded store in ``state``, as any command does."""
    environment = {**os.environ, "MEDSCREEN_STATE_DIR": str(state)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        [*medscreen_command(), "models", "list"],
        env=environment,
        capture_output=True,
        check=True,
        timeout=120,
    )


def _without_permission_override() -> tuple[str, ...]:
    """A prefix under which file permissions hold: root's override of them dropped."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("run as root, and setpriv (util-linux) is not there to drop its override")
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search")


def test_a_file_that_is_not_an_sqlite_store_is_one_line(tmp_path: Path) -> None:
    # It was a traceback: "(sqlite3.DatabaseError) file is not a database".
    state = tmp_path / "state"
    state.mkdir()
    database = state / "mlflow.db"
    noise = random.Random(7).randbytes(4096)  # no sqlite header: never a database
    database.write_bytes(noise)
    notes = tmp_path / "notes.txt"
    notes.write_text("a text file, given as the store by mistake\n" * 40)
    for env, source, file in (
        ({"MEDSCREEN_STATE_DIR": str(state)}, "MEDSCREEN_STATE_DIR", database),
        ({"MLFLOW_TRACKING_URI": f"sqlite:///{notes}"}, "MLFLOW_TRACKING_URI", notes),
    ):
        for command in (["models", "list"], ["serve", "--port", str(free_port())]):
            line = _error_line(*command, env=env)
            assert line == (
                f"error: {source}: {file} is not an MLflow sqlite store (file is not a "
                "database); point the setting at another store"
            ), line
    assert database.read_bytes() == noise


def test_another_applications_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    database = tmp_path / "clinic.db"
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{database}"}
    for command in (["models", "list"], ["serve", "--port", str(free_port())]):
        line = _error_line(*command, env=env)
        assert line.startswith(
            f"error: MLFLOW_TRACKING_URI: {database} is not an MLflow sqlite store (it holds "
            "another application's tables: patients)"
        ), line
    with contextlib.closing(sqlite3.connect(database)) as connection:
        tables = connection.execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("patients",)]  # MLflow added none of its own


def test_a_store_that_cannot_be_opened_is_one_line_at_once(tmp_path: Path) -> None:
    # MLflow retried "unable to open database file" for minutes before its traceback.
    directory = tmp_path / "a-directory"
    directory.mkdir()
    for command in (["models", "list"], ["serve", "--port", str(free_port())]):
        line = _error_line(*command, env={"MLFLOW_TRACKING_URI": f"sqlite:///{directory}"})
        assert line == (
            f"error: MLFLOW_TRACKING_URI: {directory} is a directory, not an sqlite file; give "
            "the path of a file"
        ), line
    assert sorted(tmp_path.iterdir()) == [directory]  # no lock file beside it

    prefix = _without_permission_override()
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    env = {"MEDSCREEN_STATE_DIR": str(read_only)}
    line = _error_line("models", "list", env=env, prefix=prefix)
    assert line.startswith(
        f"error: MEDSCREEN_STATE_DIR: cannot open the tracking store {read_only}/mlflow.db "
        "(Permission denied)"
    ), line
    line = _error_line("serve", "--port", str(free_port()), env=env, prefix=prefix)
    assert line.startswith(
        f"error: MEDSCREEN_STATE_DIR: the tracking store sqlite:///{read_only}/mlflow.db does "
        "not exist"
    ), line

    unreadable = tmp_path / "unreadable"
    _new_store(unreadable)
    (unreadable / "mlflow.db").chmod(0)
    env = {"MEDSCREEN_STATE_DIR": str(unreadable)}
    for command in (["models", "list"], ["serve", "--port", str(free_port())]):
        line = _error_line(*command, env=env, prefix=prefix)
        assert line.startswith(
            f"error: MEDSCREEN_STATE_DIR: cannot open the tracking store {unreadable}/mlflow.db "
            "(unable to open database file); check the permissions"
        ), line


def test_serve_names_the_store_it_looked_in(tmp_path: Path) -> None:
    # A mistyped state directory was made, with a new store, and then found to hold no model.
    typo = tmp_path / "tyop"
    env = {"MEDSCREEN_STATE_DIR": str(typo)}
    store = f"sqlite:///{typo}/mlflow.db"
    line = _error_line("serve", "--port", str(free_port()), env=env)
    assert line == (
        f"error: MEDSCREEN_STATE_DIR: the tracking store {store} does not exist, so it holds no "
        "model with a 'champion' alias; give the store that `medscreen export` registered "
        "models in"
    ), line
    line = _error_line("serve", "--model", "x@champion", "--port", str(free_port()), env=env)
    assert "so it holds no x@champion;" in line, line
    assert not typo.exists()

    empty = tmp_path / "empty"
    _new_store(empty)
    line = _error_line("serve", "--port", str(free_port()), env={"MEDSCREEN_STATE_DIR": str(empty)})
    assert line == (
        "error: --model: no registered model has a 'champion' alias in the tracking store "
        f"sqlite:///{empty}/mlflow.db; name one with --model NAME@ALIAS"
    ), line


def test_a_read_only_store_serves_readers_and_refuses_writers_in_one_line(tmp_path: Path) -> None:
    # sqlite opened the write-protected file read-only without a word, and a training's first
    # write was a traceback ("attempt to write a readonly database").
    prefix = _without_permission_override()
    recipe = Path(__file__).parents[1] / "training" / "recipes" / "pneumonia-quick.yaml"
    writers = (["train", str(recipe), "--no-progress"], ["export", "--run-id", "0" * 32])
    state = tmp_path / "archived"
    _new_store(state)
    database = state / "mlflow.db"
    before = database.read_bytes()

    def refusal(read_only: Path) -> str:
        return (
            f"error: MEDSCREEN_STATE_DIR: the tracking store {database} is read-only for this "
            f"user ({read_only} cannot be written); this command writes to it: make it "
            "writable, or point the setting at another store"
        )

    def reads() -> None:  # an auditor's archived copy still reads
        environment = {**os.environ, "MEDSCREEN_STATE_DIR": str(state)}
        environment.pop("MLFLOW_TRACKING_URI", None)
        for command in (["models", "list"], ["runs", "show", "0" * 32]):
            completed = subprocess.run(
                [*prefix, *medscreen_command(), *command],
                env=environment,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert "not found in sqlite" in completed.stderr or completed.returncode == 0, (
                command,
                completed.stderr,
            )

    env = {"MEDSCREEN_STATE_DIR": str(state)}
    database.chmod(0o444)  # the file
    reads()
    for command in writers:
        assert _error_line(*command, env=env, prefix=prefix) == refusal(database), command
    database.chmod(0o644)
    state.chmod(0o555)  # its directory, where sqlite writes its journal (the lock file exists)
    try:
        reads()
        for command in writers:
            assert _error_line(*command, env=env, prefix=prefix) == refusal(state), command
        (state / "mlflow.db.lock").chmod(0o444)  # no lock to take either: reads go on without
        reads()
    finally:
        state.chmod(0o755)
    assert database.read_bytes() == before
