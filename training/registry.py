"""Model governance on the MLflow registry: approvals, alias moves and their history.

MLflow keeps only the current alias of a version (mlflow/mlflow#2169). Every alias change made
here is also appended to the registered model as a tag ``medscreen.alias_event.<ns>.<id>``
holding a JSON event, so the registry itself answers "which version was ``champion`` at time T".
Tags are keyed by time and a random suffix, so concurrent writers never overwrite each other.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass

from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from training.export import GATE_PASSED_TAG
from training.tracking import configure_tracking

EVENT_TAG_PREFIX = "medscreen.alias_event."
APPROVER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,63}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# MLflow refuses these alias names: ``latest`` and ``v<digits>`` name versions.
RESERVED_ALIAS_PATTERN = re.compile(r"^(?:latest|v\d+)$", re.IGNORECASE)


class GovernanceError(ValueError):
    """A registry action was refused. The message says why."""


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
        raise GovernanceError(f"model {name!r} has no version {version!r}") from error


def alias_history(name: str, *, client: MlflowClient | None = None) -> list[AliasEvent]:
    """Return every recorded alias change of a model, oldest first."""
    client = client or _client()
    model = _registered_model(client, name)
    events = [
        (key, AliasEvent(**json.loads(value)))
        for key, value in model.tags.items()
        if key.startswith(EVENT_TAG_PREFIX)
    ]
    return [event for _, event in sorted(events, key=lambda item: item[0])]


def version_at(name: str, alias: str, moment: datetime.datetime) -> str | None:
    """Return the version that held ``alias`` at ``moment`` (None if none did)."""
    if moment.tzinfo is None:
        raise GovernanceError("give the time with its zone, for example 2026-11-29T17:00:00Z")
    holder = None
    for event in alias_history(name):
        if event.alias == alias and event.moment <= moment:
            holder = event.version
    return holder


def _validate_approval(approver: str | None, reason: str | None) -> tuple[str, str]:
    if not approver or not APPROVER_PATTERN.match(approver):
        raise GovernanceError(
            "--approver: an approver ID is required (2-64 letters, digits, '.', '_', '@', '-')"
        )
    if not reason or not reason.strip():
        raise GovernanceError("--reason: a reason for the change is required")
    return approver, reason.strip()


def _record(client: MlflowClient, name: str, event: AliasEvent) -> str:
    key = f"{EVENT_TAG_PREFIX}{time.time_ns():020d}.{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(name, key, json.dumps(asdict(event), sort_keys=True))
    return key


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
    previous = model.aliases.get(alias)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    event = AliasEvent(
        time=now,
        action=action,
        alias=alias,
        version=str(version.version),
        previous_version=None if previous is None else str(previous),
        approver=approver,
        reason=reason,
    )
    # History first: an alias never moves without its record.
    key = _record(client, name, event)
    try:
        client.set_registered_model_alias(name, alias, str(version.version))
    except MlflowException as error:
        # The alias did not move: its record must not say it did.
        client.delete_registered_model_tag(name, key)
        detail = " ".join(str(error.message).split())  # one line for the CLI
        raise GovernanceError(
            f"{option}: MLflow refused to point {name}@{alias} at version {version.version}: "
            f"{detail}"
        ) from error
    if previous is not None and str(previous) != str(version.version):
        # The approval went with the alias: the old version may not be served under it again
        # unless someone approves it again.
        for field in ("approved_by", "approval_reason", "approved_at"):
            with contextlib.suppress(MlflowException):
                client.delete_model_version_tag(
                    name, str(previous), f"medscreen.approval.{alias}.{field}"
                )
    for field, value in (
        ("approved_by", approver),
        ("approval_reason", reason),
        ("approved_at", now),
    ):
        client.set_model_version_tag(
            name, str(version.version), f"medscreen.approval.{alias}.{field}", value
        )
    return event


def promote(
    name: str, version: str, *, alias: str, approver: str | None, reason: str | None
) -> AliasEvent:
    """Point ``alias`` at ``version`` after checking its release gate and the approval.

    Raises:
        GovernanceError: if the approval is incomplete, the alias is malformed or reserved, the
            version is unknown, its release gate did not pass, or MLflow refused the alias.
    """
    approver, reason = _validate_approval(approver, reason)
    if not ALIAS_PATTERN.match(alias):
        raise GovernanceError(f"--to: {alias!r} is not an alias (lower-case letters, digits, -_)")
    if RESERVED_ALIAS_PATTERN.match(alias):
        raise GovernanceError(
            f"--to: {alias!r} is reserved by MLflow ('latest' and 'v<number>' name versions)"
        )
    client = _client()
    model_version = _version(client, name, version)
    if model_version.tags.get(GATE_PASSED_TAG) != "passed":
        raise GovernanceError(
            f"{name} version {version} has no passed release gate (tag {GATE_PASSED_TAG}); "
            "register it with `medscreen export`"
        )
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


def rollback(name: str, *, alias: str, approver: str | None, reason: str | None) -> AliasEvent:
    """Point ``alias`` back at the version it held before its latest recorded change.

    Raises:
        GovernanceError: if the approval is incomplete, the alias has no earlier version, or
            MLflow refused the alias.
    """
    approver, reason = _validate_approval(approver, reason)
    client = _client()
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
    recorded: dict[str, str] = {}
    for event in alias_history(name, client=client):
        recorded[event.alias] = event.version
    current = _registered_model(client, name).aliases
    return {
        alias: str(version)
        for alias, version in current.items()
        if recorded.get(alias) != str(version)
    }
