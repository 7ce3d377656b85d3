"""Model governance on the MLflow registry: approvals, alias moves and their history.

MLflow keeps only the current alias of a version (mlflow/mlflow#2169). Every alias change made
here is also appended to the registered model as a tag ``medscreen.alias_event.<ns>.<id>``
holding a JSON event, so the registry itself answers "which version was ``champion`` at time T".
Tags are keyed by time and a random suffix, so concurrent writers never overwrite each other.

MLflow has no transaction over several writes, so a move is ordered so that a process killed at
any point leaves a state that is either invisible or says what it was doing:

1. ``medscreen.alias_pending.<ns>.<id>``: the intended event, with the writing process;
2. the new version's ``medscreen.approval.<alias>.*`` tags (serving trusts them only once the
   alias points at that version, so they change nothing yet);
3. the alias itself: the commit point, after which the service may switch;
4. the event under ``medscreen.alias_event.<ns>.<id>``, the old version's approval tags removed,
   and the pending tag removed.

A pending tag left by a process that died is settled by the next ``promote``, ``rollback``,
``models history`` or ``models show``: finished if the alias reached its version, otherwise
undone (the approval tags withdrawn, the intent kept as ``medscreen.alias_abandoned.<ns>.<id>``
outside the history). Until then the history counts a pending move exactly when its alias
arrived, so it never shows a move that did not happen nor misses one that did.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import socket
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from training.tracking import configure_tracking

EVENT_TAG_PREFIX = "medscreen.alias_event."
PENDING_TAG_PREFIX = "medscreen.alias_pending."
ABANDONED_TAG_PREFIX = "medscreen.alias_abandoned."
APPROVAL_TAG_PREFIX = "medscreen.approval."  # medscreen.approval.<alias>.<field>, on the version
APPROVAL_FIELDS = ("approved_by", "approval_reason", "approved_at")
# A pending move older than this is taken for dead when its process cannot be checked (another
# host, or a PID that may have been reused). A mover slower than that (a stalled registry) finds
# its move settled when it checks again just before the alias write, and stops there.
STALE_MOVE_SECONDS = 600.0
APPROVER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{1,63}")
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
# MLflow refuses these alias names: ``latest`` and ``v<digits>`` name versions.
RESERVED_ALIAS_PATTERN = re.compile(r"latest|v\d+", re.IGNORECASE)

logger = logging.getLogger("medscreen.registry")
# Suffixes of the moves this process is making now: its own pending tags that are not in this
# set were left by an earlier call that failed, and may be settled.
_IN_FLIGHT: set[str] = set()
_IN_FLIGHT_LOCK = threading.Lock()


class GovernanceError(ValueError):
    """A registry action was refused. The message says why."""


class MalformedTagError(GovernanceError):
    """An alias event or pending-move tag that medscreen cannot read (edited by hand, say)."""


@dataclass(frozen=True)
class AliasEvent:
    """One change of an alias, as recorded in the registry."""

    time: str
    action: str
    alias: str
    version: str
    previous_version: str | None
    approver: str
    reason: str

    @property
    def moment(self) -> datetime.datetime:
        """The event time as an aware datetime."""
        return datetime.datetime.fromisoformat(self.time)

    @classmethod
    def from_json(cls, value: str, key: str = "an alias tag") -> AliasEvent:
        """Read an event tag, ignoring fields added after this version of medscreen.

        Raises:
            GovernanceError: naming ``key`` if the value is not such an event (edited by hand,
                say), so that no command dies on it with a traceback.
        """
        try:
            fields = json.loads(value)
            event = cls(**{field.name: fields[field.name] for field in dataclasses.fields(cls)})
            datetime.datetime.fromisoformat(event.time)  # refused here, not where it is read
        except (ValueError, TypeError, KeyError) as error:
            raise MalformedTagError(
                f"registry tag {key} is not an alias event medscreen wrote ({type(error).__name__}"
                f": {error}); restore it from the registry's backup, or delete it if the move it "
                "records never happened"
            ) from error
        return event


@dataclass(frozen=True)
class PendingMove:
    """An alias move that was started and not yet finished: its event and who is writing it."""

    suffix: str  # <time_ns>.<random>, shared by its pending, event and abandoned tags
    event: AliasEvent
    host: str
    pid: int

    def describe(self, name: str) -> str:
        """Name the move in a few words, for one line of output."""
        action = {"promote": "promotion"}.get(self.event.action, self.event.action)
        return (
            f"{action} of {name}@{self.event.alias} to version {self.event.version} "
            f"(approved by {self.event.approver} at {self.event.time})"
        )

    def to_json(self) -> str:
        """The pending tag's value: the event's fields, the host and the process ID."""
        return json.dumps(
            {**asdict(self.event), "host": self.host, "pid": self.pid}, sort_keys=True
        )


@dataclass(frozen=True)
class Step:
    """One registry write of a move, named for error messages and tests."""

    name: str
    run: Callable[[], object]


def _client() -> MlflowClient:
    configure_tracking()
    return MlflowClient()


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        raise GovernanceError(f"no registered model {name!r}") from error


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException as error:
        _registered_model(client, name)  # "no registered model" rather than "no version 1"
        raise GovernanceError(f"model {name!r} has no version {version!r}") from error


def _pending_moves(model: RegisteredModel) -> list[PendingMove]:
    moves = []
    for key, value in sorted(model.tags.items()):
        if key.startswith(PENDING_TAG_PREFIX):
            event = AliasEvent.from_json(value, key)
            fields = json.loads(value)
            try:
                pid = int(fields.get("pid", 0))
            except (TypeError, ValueError) as error:
                raise MalformedTagError(f"registry tag {key}: its pid is not a number") from error
            moves.append(
                PendingMove(
                    suffix=key.removeprefix(PENDING_TAG_PREFIX),
                    event=event,
                    host=str(fields.get("host", "")),
                    pid=pid,
                )
            )
    return moves


def _holder(model: RegisteredModel, alias: str) -> str | None:
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def _history(model: RegisteredModel) -> list[AliasEvent]:
    events = {
        key.removeprefix(EVENT_TAG_PREFIX): AliasEvent.from_json(value, key)
        for key, value in model.tags.items()
        if key.startswith(EVENT_TAG_PREFIX)
    }
    for move in _pending_moves(model):
        # The alias is the commit point: a move whose alias arrived happened, recorded or not.
        if move.suffix not in events and _holder(model, move.event.alias) == move.event.version:
            events[move.suffix] = move.event
    return [events[suffix] for suffix in sorted(events)]


def alias_history(name: str, *, client: MlflowClient | None = None) -> list[AliasEvent]:
    """Return every alias change of a model, oldest first.

    A move still pending counts exactly when its alias already points at its version.
    """
    client = client or _client()
    return _history(_registered_model(client, name))


def version_at(name: str, alias: str, moment: datetime.datetime) -> str | None:
    """Return the version that held ``alias`` at ``moment`` (None if none held it yet).

    Raises:
        GovernanceError: if ``moment`` has no time zone, or ``alias`` was never set on the
            model (a mistyped alias must not read as "no version held it then").
    """
    if moment.tzinfo is None:
        raise GovernanceError("--at: give the time with its zone, for example 2026-11-29T17:00:00Z")
    events = alias_history(name)
    check_alias_in_history(name, alias, events)
    holder = None
    for event in events:
        if event.alias == alias and event.moment <= moment:
            holder = event.version
    return holder


def check_alias_in_history(name: str, alias: str, events: list[AliasEvent]) -> None:
    """Refuse an alias that no recorded promote or rollback of ``name`` ever set.

    Raises:
        GovernanceError: naming the aliases the history does hold.
    """
    recorded = sorted({event.alias for event in events})
    if alias not in recorded:
        held = ", ".join(recorded) if recorded else "none"
        raise GovernanceError(
            f"--alias: {alias!r} was never set on {name} (aliases in its history: {held})"
        )


def _validate_approval(approver: str | None, reason: str | None) -> tuple[str, str]:
    if not approver:
        raise GovernanceError("--approver: an approver ID is required")
    if not APPROVER_PATTERN.fullmatch(approver):
        raise GovernanceError(
            "--approver: an approver ID is 2-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    # Spaces pasted from word processors (no-break, narrow) are spaces.
    reason = "".join(" " if unicodedata.category(c) == "Zs" else c for c in reason or "").strip()
    if not reason:
        raise GovernanceError("--reason: a reason for the change is required")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in reason):
        # Stored for good and shown to auditors: an escape sequence could restyle or hide text
        # in their terminal, a line break could pass for another entry.
        raise GovernanceError(
            "--reason: give one line of text, without line breaks, tabs or control characters"
        )
    return approver, reason


def _this_host() -> str:
    """The host name, with the PID namespace where there is one: containers may share a name."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()} {namespace}"


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe probe (os.kill would end it): left to STALE_MOVE_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        # A killed child its parent has not reaped yet still answers signal 0.
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _interrupted(move: PendingMove) -> bool:
    """Whether the process that started ``move`` can no longer finish it."""
    age = datetime.datetime.now(datetime.UTC) - move.event.moment
    if age.total_seconds() > STALE_MOVE_SECONDS:
        return True
    if move.host != _this_host():
        return False  # its process cannot be checked from here: wait until it is stale
    if move.pid == os.getpid():
        with _IN_FLIGHT_LOCK:
            return move.suffix not in _IN_FLIGHT
    return not _process_alive(move.pid)


def _approval_steps(client: MlflowClient, name: str, move: PendingMove) -> list[Step]:
    event = move.event
    values = {
        "approved_by": event.approver,
        "approval_reason": event.reason,
        "approved_at": event.time,
    }
    return [
        Step(
            f"approve version {event.version} ({field})",
            lambda field=field: client.set_model_version_tag(
                name, event.version, f"{APPROVAL_TAG_PREFIX}{event.alias}.{field}", values[field]
            ),
        )
        for field in APPROVAL_FIELDS
    ]


def _withdraw_steps(client: MlflowClient, name: str, alias: str, version: str) -> list[Step]:
    # Deleting a tag that is already gone is a no-op in MLflow, so these steps may be repeated.
    return [
        Step(
            f"withdraw version {version}'s approval ({field})",
            lambda field=field: client.delete_model_version_tag(
                name, version, f"{APPROVAL_TAG_PREFIX}{alias}.{field}"
            ),
        )
        for field in APPROVAL_FIELDS
    ]


def _delete_pending_step(client: MlflowClient, name: str, move: PendingMove) -> Step:
    return Step(
        "remove the pending move",
        lambda: client.delete_registered_model_tag(name, PENDING_TAG_PREFIX + move.suffix),
    )


def _finish_steps(
    client: MlflowClient, name: str, move: PendingMove, *, reapprove: bool
) -> list[Step]:
    """The writes after the alias moved; each may be repeated, so a repair can run them all."""
    event = move.event
    previous = event.previous_version
    return [
        # A repair writes the approval again: the mover may have died halfway through it.
        *(_approval_steps(client, name, move) if reapprove else []),
        Step(
            "record the event",
            lambda: client.set_registered_model_tag(
                name, EVENT_TAG_PREFIX + move.suffix, json.dumps(asdict(event), sort_keys=True)
            ),
        ),
        # The approval went with the alias: the old version may not be served under it again
        # unless someone approves it again.
        *(
            _withdraw_steps(client, name, event.alias, previous)
            if previous is not None and previous != event.version
            else []
        ),
        _delete_pending_step(client, name, move),
    ]


def _abandon_steps(client: MlflowClient, name: str, move: PendingMove) -> list[Step]:
    """Undo a move whose alias never arrived; each step may be repeated."""
    return [
        *_withdraw_steps(client, name, move.event.alias, move.event.version),
        # Kept for auditors outside the history: who tried which move, and that it was undone.
        Step(
            "keep the abandoned move",
            lambda: client.set_registered_model_tag(
                name, ABANDONED_TAG_PREFIX + move.suffix, move.to_json()
            ),
        ),
        _delete_pending_step(client, name, move),
    ]


def move_steps(client: MlflowClient, name: str, move: PendingMove) -> list[Step]:
    """Every write of an alias move, in order; the process may die after any of them."""
    event = move.event
    return [
        Step(
            "record the pending move",
            lambda: client.set_registered_model_tag(
                name, PENDING_TAG_PREFIX + move.suffix, move.to_json()
            ),
        ),
        Step(
            "check that no other move of the alias is running", lambda: _alone(client, name, move)
        ),
        *_approval_steps(client, name, move),
        Step("check that the move is still pending", lambda: _still_pending(client, name, move)),
        Step(
            f"point {event.alias} at version {event.version}",
            lambda: client.set_registered_model_alias(name, event.alias, event.version),
        ),
        *_finish_steps(client, name, move, reapprove=False),
    ]


def _in_progress(name: str, move: PendingMove) -> str:
    return (
        f"a {move.describe(name)} is in progress (process {move.pid} on {move.host}); "
        "try again when it has finished (a killed one is settled after "
        f"{STALE_MOVE_SECONDS / 60:.0f} minutes)"
    )


class _MoveSettledElsewhereError(GovernanceError):
    """Another command took this move for interrupted and settled it."""


def _still_pending(client: MlflowClient, name: str, move: PendingMove) -> None:
    """Stop before the alias write if another command has settled this move meanwhile."""
    # The client's own call: a registry error must reach the caller's settling, not pass for
    # a missing model (which _registered_model would make of it).
    pending = _pending_moves(client.get_registered_model(name))
    if all(other.suffix != move.suffix for other in pending):
        raise _MoveSettledElsewhereError(
            f"the {move.describe(name)} took so long that another command settled it as "
            "interrupted; the alias was not moved: promote again"
        )


def _alone(client: MlflowClient, name: str, move: PendingMove) -> None:
    """Refuse to go on if another move of the same alias was started meanwhile."""
    others = [
        other
        for other in _pending_moves(client.get_registered_model(name))  # see _still_pending
        if other.event.alias == move.event.alias and other.suffix != move.suffix
    ]
    if others:
        # Both may back off; neither moves the alias, and a retry succeeds.
        raise GovernanceError(_in_progress(name, others[0]))


def _settle(client: MlflowClient, name: str, move: PendingMove) -> bool:
    """Finish ``move`` if its alias arrived, else undo it. Returns whether it was finished."""
    arrived = _holder(_registered_model(client, name), move.event.alias) == move.event.version
    steps = (
        _finish_steps(client, name, move, reapprove=True)
        if arrived
        else _abandon_steps(client, name, move)
    )
    for step in steps:
        step.run()
    return arrived


def repair_interrupted_moves(name: str, *, client: MlflowClient | None = None) -> list[str]:
    """Settle the moves of ``name`` that a dead process left pending; one line for each.

    A move whose alias reached its version is finished (its event recorded, the approval
    written again, the old version's withdrawn); any other is undone and stays out of the
    history. A move whose process may still be running is left alone and named in a note.

    Raises:
        GovernanceError: if there is no such registered model.
    """
    client = client or _client()
    lines = []
    for move in _pending_moves(_registered_model(client, name)):
        if not _interrupted(move):
            lines.append(f"note: a {move.describe(name)} is in progress")
        elif _settle(client, name, move):
            lines.append(
                f"repaired: the interrupted {move.describe(name)} had moved the alias; "
                "its history event and approval are now recorded"
            )
        else:
            current = _holder(_registered_model(client, name), move.event.alias)
            lines.append(
                f"repaired: the interrupted {move.describe(name)} never moved the alias "
                f"(still {'version ' + current if current else 'unset'}); it was undone and is "
                "not in the history"
            )
    return lines


def _repair_before_moving(client: MlflowClient, name: str, notify: Callable[[str], None]) -> None:
    try:
        lines = repair_interrupted_moves(name, client=client)
    except MlflowException as error:  # one line for the CLI, as for the move itself
        detail = " ".join(str(error.message).split())
        raise GovernanceError(
            f"cannot settle an interrupted alias move of {name}: {detail}"
        ) from error
    for line in lines:
        notify(line)


def _log(line: str) -> None:
    logger.warning("%s", line)


def new_move(
    model: RegisteredModel,
    alias: str,
    version: str,
    action: str,
    *,
    approver: str,
    reason: str,
) -> PendingMove:
    """The move of ``alias`` to ``version`` by this process, timed now; nothing is written."""
    event = AliasEvent(
        time=datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
        action=action,
        alias=alias,
        version=version,
        previous_version=_holder(model, alias),
        approver=approver,
        reason=reason,
    )
    return PendingMove(
        suffix=f"{time.time_ns():020d}.{uuid.uuid4().hex[:8]}",
        event=event,
        host=_this_host(),
        pid=os.getpid(),
    )


def _move_alias(
    client: MlflowClient,
    name: str,
    alias: str,
    version: ModelVersion,
    *,
    action: str,
    option: str,
    approver: str,
    reason: str,
) -> AliasEvent:
    model = _registered_model(client, name)
    running = [move for move in _pending_moves(model) if move.event.alias == alias]
    if running:  # the caller settled the interrupted ones: these are alive
        raise GovernanceError(f"{option}: {_in_progress(name, running[0])}")
    move = new_move(model, alias, str(version.version), action, approver=approver, reason=reason)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(move.suffix)
    try:
        for step in move_steps(client, name, move):
            try:
                step.run()
            except _MoveSettledElsewhereError as error:
                # Settling withdrew the approval, which this process may have written after it.
                holder = _holder(_registered_model(client, name), alias)
                if holder != str(version.version):  # never withdraw an approval in force
                    for withdraw in _withdraw_steps(client, name, alias, str(version.version)):
                        withdraw.run()
                raise GovernanceError(f"{option}: {error}") from error
            except GovernanceError as error:  # another move of the alias started meanwhile
                _delete_pending_step(client, name, move).run()  # nothing else was written
                raise GovernanceError(f"{option}: {error}") from error
            except MlflowException as error:
                # Settled now rather than by the next command, and said in the same line.
                outcome = _settle_quietly(client, name, move)
                detail = " ".join(str(error.message).split())  # one line for the CLI
                what = (
                    f"MLflow refused to point {name}@{alias} at version {version.version}"
                    if step.name.startswith("point ")
                    else f"the registry failed to {step.name} for {name}@{alias}"
                )
                raise GovernanceError(
                    f"{option}: {what}: {detail}; the move was {outcome}"
                ) from error
    except GovernanceError:
        raise
    except BaseException:
        # Ctrl-C or anything unforeseen: leave no pending move behind if the registry answers.
        _settle_quietly(client, name, move)
        raise
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(move.suffix)
    return move.event


def _settle_quietly(client: MlflowClient, name: str, move: PendingMove) -> str:
    """Settle a failed move of this process now; say how it ended, for the error line."""
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.discard(move.suffix)
    try:
        pending = _pending_moves(_registered_model(client, name))
        if all(other.suffix != move.suffix for other in pending):
            return "not started"
        if _settle(client, name, move):
            return "finished (the alias had moved)"
        return "undone (the alias did not move)"
    except Exception:  # the registry fails again: the next command settles it
        return "left pending; the next medscreen models command settles it"


def promote(
    name: str,
    version: str,
    *,
    alias: str,
    approver: str | None,
    reason: str | None,
    notify: Callable[[str], None] = _log,
) -> AliasEvent:
    """Point ``alias`` at ``version`` after checking its release gate and the approval.

    Moves of this model that a killed process left unfinished are settled first, each named in
    one line given to ``notify``.

    Raises:
        GovernanceError: if the approval is incomplete, the alias is malformed or reserved, the
            version is unknown, its release gate did not pass, another move of the alias is
            running, or MLflow refused the alias.
    """
    approver, reason = _validate_approval(approver, reason)
    if not ALIAS_PATTERN.fullmatch(alias):
        raise GovernanceError(f"--to: {alias!r} is not an alias (lower-case letters, digits, -_)")
    if RESERVED_ALIAS_PATTERN.fullmatch(alias):
        raise GovernanceError(
            f"--to: {alias!r} is reserved by MLflow ('latest' and 'v<number>' name versions)"
        )
    client = _client()
    model_version = _version(client, name, version)
    _require_passed_gate(model_version, "register it with `medscreen export`")
    _repair_before_moving(client, name, notify)
    return _move_alias(
        client,
        name,
        alias,
        model_version,
        action="promote",
        option="--to",
        approver=approver,
        reason=reason,
    )


def _require_passed_gate(model_version: ModelVersion, remedy: str) -> None:
    """Refuse a version that did not pass its release gate, naming it and the remedy."""
    # Imported here: torch and onnx load with it, and history and repairs need neither.
    from training.export import GATE_PASSED_TAG

    if model_version.tags.get(GATE_PASSED_TAG) != "passed":
        raise GovernanceError(
            f"{model_version.name} version {model_version.version} has no passed release gate "
            f"(tag {GATE_PASSED_TAG}); {remedy}"
        )


def rollback(
    name: str,
    *,
    alias: str,
    approver: str | None,
    reason: str | None,
    notify: Callable[[str], None] = _log,
) -> AliasEvent:
    """Point ``alias`` back at the version it held before its latest recorded change.

    Moves of this model that a killed process left unfinished are settled first, each named in
    one line given to ``notify``.

    Raises:
        GovernanceError: if the approval is incomplete, the alias has no earlier version, that
            version's release gate did not pass (an alias set outside medscreen, say), another
            move of the alias is running, or MLflow refused the alias.
    """
    approver, reason = _validate_approval(approver, reason)
    client = _client()
    _repair_before_moving(client, name, notify)
    events = [event for event in alias_history(name, client=client) if event.alias == alias]
    if not events or events[-1].previous_version is None:
        raise GovernanceError(f"{name}@{alias} has no earlier version to roll back to")
    current = _registered_model(client, name).aliases.get(alias)
    if current is not None and str(current) != events[-1].version:
        raise GovernanceError(
            f"{name}@{alias} points at version {current} but its history says "
            f"{events[-1].version}: it was moved outside medscreen; promote explicitly"
        )
    target = _version(client, name, events[-1].previous_version)
    _require_passed_gate(target, f"promote a version with a passed gate to {alias!r} instead")
    return _move_alias(
        client,
        name,
        alias,
        target,
        action="rollback",
        option="--alias",
        approver=approver,
        reason=reason,
    )


def unrecorded_aliases(name: str) -> dict[str, str]:
    """Aliases whose current version differs from their recorded history (moved elsewhere)."""
    client = _client()
    model = _registered_model(client, name)
    recorded: dict[str, str] = {}
    for event in _history(model):
        recorded[event.alias] = event.version
    return {
        alias: str(version)
        for alias, version in model.aliases.items()
        if recorded.get(alias) != str(version)
    }
