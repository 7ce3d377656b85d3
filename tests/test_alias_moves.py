"""Alias moves killed after any registry write: invisible, or settled by the next command.

The kills are real: a separate process makes the first writes of a move against the same MLflow
store, then SIGKILLs itself (no finally, no cleanup), exactly as `kill -9` mid-command would.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT, medscreen_command, registration_tags

pytestmark = pytest.mark.slow

# Makes the first CUT writes of a move in its own process, then dies like `kill -9`. With HOLD
# it stays alive instead, as a command still running would.
_CUT_MOVE = textwrap.dedent(
    """
    import os, signal, sys, time
    from training import registry

    name, alias, version, action, cut, hold = sys.argv[1:7]
    client = registry._client()
    move = registry.new_move(
        client.get_registered_model(name), alias, version, action,
        approver="killed", reason="cut after " + cut + " writes",
    )
    for step in registry.move_steps(client, name, move)[: int(cut)]:
        step.run()
    print(move.suffix, flush=True)
    if hold == "hold":
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)
# Settles a pending move of a dead process but dies after the first CUT writes of the repair.
_CUT_REPAIR = textwrap.dedent(
    """
    import os, signal, sys
    from training import registry

    name, cut = sys.argv[1:3]
    client = registry._client()
    (move,) = registry._pending_moves(client.get_registered_model(name))
    arrived = registry._holder(client.get_registered_model(name), move.event.alias) == (
        move.event.version
    )
    steps = (
        registry._finish_steps(client, name, move, reapprove=True)
        if arrived
        else registry._abandon_steps(client, name, move)
    )
    for step in steps[: int(cut)]:
        step.run()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _move_step_names() -> list[str]:
    """The writes of a promotion that replaces a version, in order (built, not run)."""
    from training.registry import AliasEvent, PendingMove, move_steps

    event = AliasEvent("2026-01-01T00:00:00+00:00", "promote", "a", "2", "1", "ci", "count")
    return [step.name for step in move_steps(None, "m", PendingMove("0.0", event, "h", 1))]


MOVE_STEPS = _move_step_names()
ALIAS_STEP = next(i for i, name in enumerate(MOVE_STEPS) if name.startswith("point ")) + 1


def _client() -> MlflowClient:
    from training.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


def _now() -> datetime.datetime:
    time.sleep(0.01)
    return datetime.datetime.now(datetime.UTC)


def _python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_midway(name: str, alias: str, version: str, cut: int, action: str = "promote") -> None:
    process = _python(_CUT_MOVE, name, alias, version, action, str(cut), "die")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, stderr


def _repair_line(completed, name: str, alias: str, version: str) -> str:
    """The one line a command printed on settling an interrupted promotion to ``version``."""
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith(
        f"repaired: the interrupted promotion of {name}@{alias} to version {version}"
    )
    return line


def _approvals(name: str, version: str, alias: str) -> dict[str, str]:
    prefix = f"medscreen.approval.{alias}."
    tags = _client().get_model_version(name, version).tags
    return {
        key.removeprefix(prefix): value for key, value in tags.items() if key.startswith(prefix)
    }


def _pending(name: str) -> list[str]:
    tags = _client().get_registered_model(name).tags
    return [key for key in tags if key.startswith("medscreen.alias_pending.")]


def _served(name: str, alias: str) -> str:
    """The version `medscreen serve` would load for NAME@ALIAS, after its governance checks."""
    from serving.model import resolve_version

    _, version = resolve_version(f"{name}@{alias}")
    return str(version.version)


def _assert_consistent(name: str, alias: str, holder: str, other: str) -> None:
    """The alias, its history, its approval and serving all say ``holder``; nothing is pending."""
    from training.registry import alias_history, version_at

    assert _pending(name) == []
    assert str(_client().get_registered_model(name).aliases[alias]) == holder
    assert _served(name, alias) == holder
    assert version_at(name, alias, _now()) == holder
    last = [event for event in alias_history(name) if event.alias == alias][-1]
    approval = _approvals(name, holder, alias)
    assert (approval["approved_by"], approval["approved_at"]) == (last.approver, last.time)
    assert _approvals(name, other, alias) == {}  # the approval left with the alias


@pytest.fixture(scope="module")
def versions(registered_model) -> tuple[str, str, str, str]:
    """The model name and three gated versions of it (one graph, registered three times)."""
    name, first = registered_model.model_name, registered_model.version
    client = _client()
    source = client.get_model_version(name, first).source
    gated = registration_tags(name, first)  # as `medscreen export` wrote them
    second = client.create_model_version(name, source, tags=gated).version
    third = client.create_model_version(name, source, tags=gated).version
    return name, str(first), str(second), str(third)


@pytest.mark.parametrize(
    "cut", range(len(MOVE_STEPS) + 1), ids=["none", *(f"after-{n}" for n in MOVE_STEPS)]
)
def test_a_promotion_killed_after_any_write_is_invisible_or_repaired(versions, cut: int):
    from training.registry import alias_history, promote, repair_interrupted_moves, version_at

    name, first, second, _ = versions
    alias = f"cut-{cut}"
    promote(name, first, alias=alias, approver="ci", reason="before the kill")
    _kill_midway(name, alias, second, cut)
    moved = cut >= ALIAS_STEP

    # Before any repair: serving, the history and the alias already agree.
    held = second if moved else first
    assert _served(name, alias) == held
    assert version_at(name, alias, _now()) == held
    assert [event.version for event in alias_history(name) if event.alias == alias] == (
        [first, second] if moved else [first]
    )

    lines = repair_interrupted_moves(name)
    if cut in (0, len(MOVE_STEPS)):
        assert lines == []  # nothing was written, or everything was
    else:
        assert len(lines) == 1, lines
        assert f"interrupted promotion of {name}@{alias} to version {second}" in lines[0]
        assert ("had moved the alias" if moved else "never moved the alias") in lines[0]
    _assert_consistent(name, alias, held, first if moved else second)
    assert repair_interrupted_moves(name) == []

    # And the next promotion goes through with nothing left to repair.
    notes: list[str] = []
    promote(
        name,
        first if moved else second,
        alias=alias,
        approver="ci",
        reason="after",
        notify=notes.append,
    )
    assert notes == []
    _assert_consistent(name, alias, first if moved else second, held)


@pytest.mark.parametrize("outcome", ["finish", "abandon"])
def test_a_repair_killed_midway_is_finished_by_the_next_one(versions, outcome: str):
    from training.registry import alias_history, promote, repair_interrupted_moves

    name, first, second, _ = versions
    alias = f"repair-{outcome}"
    promote(name, first, alias=alias, approver="ci", reason="before the kill")
    _kill_midway(name, alias, second, ALIAS_STEP if outcome == "finish" else ALIAS_STEP - 1)
    held, other = (second, first) if outcome == "finish" else (first, second)
    cut = 1
    while _pending(name):  # kill the repair after 1, 2, ... of its writes, until none is left
        process = _python(_CUT_REPAIR, name, str(cut))
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == -signal.SIGKILL, stderr
        assert _served(name, alias) == held
        cut += 1
    assert cut > 3
    assert repair_interrupted_moves(name) == []
    _assert_consistent(name, alias, held, other)
    # Each repeated write of the event went to the same tag: the move is recorded once.
    assert [event.version for event in alias_history(name) if event.alias == alias] == (
        [first, second] if outcome == "finish" else [first]
    )


def test_a_move_still_running_is_left_alone_and_blocks_its_alias(versions):
    from training.registry import GovernanceError, promote, repair_interrupted_moves

    name, first, second, _ = versions
    alias = "in-flight"
    promote(name, first, alias=alias, approver="ci", reason="before")
    running = _python(_CUT_MOVE, name, alias, second, "promote", str(ALIAS_STEP - 1), "hold")
    try:
        assert running.stdout.readline().strip(), running.stderr.read()
        lines = repair_interrupted_moves(name)
        assert len(lines) == 1 and lines[0].startswith("note: a promotion of "), lines
        assert len(_pending(name)) == 1  # not undone under the feet of a live process
        with pytest.raises(GovernanceError, match=f"--to: a promotion of {name}@{alias} .* is in"):
            promote(name, first, alias=alias, approver="ci", reason="overtaking")
        promote(name, second, alias="in-flight-other", approver="ci", reason="other alias")
    finally:
        running.kill()
        running.wait()
    lines = repair_interrupted_moves(name)
    assert len(lines) == 1 and "never moved the alias (still version" in lines[0], lines
    _assert_consistent(name, alias, first, second)


def _medscreen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*medscreen_command(), "models", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "300"},
    )


def test_killed_before_the_alias_moved_the_history_never_shows_it(versions):
    """The reviewer's case (a): `history --at now` said 2 while 3 served; rollback refused."""
    from training.registry import promote

    name, first, second, third = versions
    alias = "champion-a"
    promote(name, first, alias=alias, approver="ci", reason="first")
    promote(name, second, alias=alias, approver="ci", reason="second")
    _kill_midway(name, alias, third, ALIAS_STEP - 1)  # approved, never pointed at
    at = _medscreen("history", name, "--alias", alias, "--at", _now().isoformat())
    assert at.returncode == 0, at.stderr
    assert at.stdout.strip().endswith(f"version {second}")
    line = _repair_line(at, name, alias, third)
    assert "never moved the alias (still version " + second in line
    rolled = _medscreen(
        "rollback", name, "--alias", alias, "--approver", "qa", "--reason", "after the kill"
    )
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stderr == ""  # nothing left to repair
    assert f"-> version {first} (was {second})" in rolled.stdout
    _assert_consistent(name, alias, first, second)
    assert _approvals(name, third, alias) == {}


def test_killed_after_the_alias_moved_serving_follows_and_promote_records_it(versions):
    """The reviewer's case (b): the alias pointed at a version without approval."""
    import mlflow

    from serving.batching import MicroBatcher
    from serving.pool import ModelPool
    from training.registry import alias_history, promote

    name, first, second, third = versions
    alias = "champion-b"
    promote(name, first, alias=alias, approver="ci", reason="first")
    pool = ModelPool(
        [f"{name}@{alias}"],
        tracking=mlflow.get_tracking_uri(),
        make_batcher=lambda model: MicroBatcher(model.run, name=f"runner-{model.version}"),
        reload_seconds=0,  # refreshed by hand
    )
    try:
        _kill_midway(name, alias, second, ALIAS_STEP)  # pointed at, nothing recorded after
        # A running service follows the move at its next poll; a new one starts on it.
        assert len(pool.refresh()) == 1
        assert pool.all()[0].model.version == second
        assert _served(name, alias) == second
    finally:
        pool.stop()
    promoted = _medscreen(
        "promote", name, third, "--to", alias, "--approver", "qa", "--reason", "after the kill"
    )
    assert promoted.returncode == 0, promoted.stderr
    line = _repair_line(promoted, name, alias, second)
    assert "had moved the alias" in line
    assert f"-> version {third} (was {second})" in promoted.stdout
    events = [event for event in alias_history(name) if event.alias == alias]
    assert [(event.version, event.previous_version) for event in events] == [
        (first, None),
        (second, first),
        (third, second),
    ]
    _assert_consistent(name, alias, third, second)
    assert _approvals(name, first, alias) == {}


def test_show_settles_an_interrupted_move_and_warns_of_nothing(versions):
    from training.registry import promote

    name, first, second, _ = versions
    alias = "shown-after-kill"
    promote(name, first, alias=alias, approver="ci", reason="first")
    _kill_midway(name, alias, second, ALIAS_STEP + 1)  # the event recorded, nothing after
    shown = _medscreen("show", name)
    assert shown.returncode == 0, shown.stderr
    _repair_line(shown, name, alias, second)
    assert "set outside medscreen" not in shown.stdout
    _assert_consistent(name, alias, second, first)


def test_a_killed_rollback_is_settled_like_a_promotion(versions):
    from training.registry import alias_history, promote, rollback

    name, first, second, _ = versions
    alias = "rolled-after-kill"
    promote(name, first, alias=alias, approver="ci", reason="first")
    promote(name, second, alias=alias, approver="ci", reason="second")
    _kill_midway(name, alias, first, ALIAS_STEP, action="rollback")
    notes: list[str] = []
    event = promote(name, second, alias=alias, approver="ci", reason="again", notify=notes.append)
    assert (
        len(notes) == 1
        and f"interrupted rollback of {name}@{alias} to version {first}" in (notes[0])
    )
    assert event.previous_version == first  # the rollback had happened, and is recorded
    assert [e.action for e in alias_history(name) if e.alias == alias] == [
        "promote",
        "promote",
        "rollback",
        "promote",
    ]
    rollback(name, alias=alias, approver="ci", reason="back again")
    _assert_consistent(name, alias, first, second)


def test_a_mover_whose_move_was_settled_as_interrupted_stops_before_the_alias(versions):
    """A stalled mover, taken for dead by another command, must not move the alias after all."""
    from training import registry

    name, first, second, _ = versions
    alias = "stalled"
    registry.promote(name, first, alias=alias, approver="ci", reason="start")
    client = _client()
    model = client.get_registered_model(name)
    move = registry.new_move(model, alias, second, "promote", approver="slow", reason="stalls")
    steps = registry.move_steps(client, name, move)
    check = next(i for i, step in enumerate(steps) if step.name.startswith("check that the move"))
    for step in steps[:check]:
        step.run()
    # Meanwhile another command settles it as interrupted (what STALE_MOVE_SECONDS leads to).
    for step in registry._abandon_steps(client, name, move):
        step.run()
    with pytest.raises(registry.GovernanceError, match="another command settled it"):
        steps[check].run()
    _assert_consistent(name, alias, first, second)
    abandoned = [key for key in _client().get_registered_model(name).tags if "abandoned" in key]
    assert f"medscreen.alias_abandoned.{move.suffix}" in abandoned
