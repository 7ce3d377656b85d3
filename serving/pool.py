"""The registered models one service serves, kept in step with their registry aliases.

A watcher thread resolves each ``NAME@ALIAS`` (and checks each ``NAME@VERSION``) every few
seconds. When an approved alias moves, the new version is downloaded, verified and loaded beside
the old one, then swapped in; requests already running finish on the version they started with.
A move the service may not follow (no passed gate, no approval, a bad card) leaves the current
version serving and is logged. A withdrawal stops the model: its alias deleted, or the served
version itself no longer approved (a pinned version whose alias moved on, approval tags
removed). Its requests get 503 until an approved version is back, which the watcher then loads.
"""

from __future__ import annotations

import datetime
import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http import HTTPStatus

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from datasets.download import hide_passwords
from serving.batching import MicroBatcher
from serving.errors import ModelLoadError, RequestError, shown
from serving.model import (
    ModelReference,
    ServedModel,
    check_governance,
    find_version,
    load_served_model,
)

logger = logging.getLogger("medscreen.serving")
DEFAULT_ALIAS = "champion"
# Why a model was withdrawn, as its 503 says it to a hospital.
_DELETED = "its alias or registered model was deleted from the registry"
_UNAPPROVED = "the version it served is no longer approved"
_ALIAS_UNAPPROVED = "its alias points at a version without an approval"


@dataclass(frozen=True)
class Served:
    """One loaded model version and the batcher its requests go through."""

    model: ServedModel
    batcher: MicroBatcher


@dataclass(frozen=True)
class Withdrawal:
    """A model the service stopped answering with, and why."""

    reason: str  # for the operator's log: names the registry's refusal
    cause: str  # for the client's 503: what happened, without registry details
    since: str  # ISO 8601, UTC
    is_monitoring: bool


def _registered_models(client: MlflowClient) -> Iterator:
    """Every registered model, page by page (MLflow returns at most 100 at a time)."""
    token = None
    while True:
        page = client.search_registered_models(page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def default_references(tracking: str, alias: str = DEFAULT_ALIAS) -> list[str]:
    """Every registered model that has ``alias``, as ``NAME@ALIAS``."""
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    try:
        registered = list(_registered_models(client))
    except MlflowException as error:
        raise ModelLoadError(
            hide_passwords(f"cannot list registered models in {tracking}: {error}")
        ) from error
    return sorted(f"{model.name}@{alias}" for model in registered if alias in model.aliases)


def references_by_name(references: list[str]) -> dict[str, str]:
    """Map each served model's name to its reference; each model may be named once.

    Raises:
        ModelLoadError: for a malformed reference, or a model named twice (requests name a
            model, not a version: one of the two could never answer).
    """
    named: dict[str, str] = {}
    for reference in references:
        name = ModelReference.parse(reference).name
        if earlier := named.get(name):
            raise ModelLoadError(
                f"model {name!r} is named twice ({earlier} and {reference}); serve one version "
                "of each model"
            )
        named[name] = reference
    return named


class ModelPool:
    """The served models by registered name, switched in place when their alias moves.

    Args:
        references: ``NAME@ALIAS`` or ``NAME@VERSION`` of each model, one per name.
        tracking: Tracking/registry URI.
        make_batcher: Builds the batcher of a newly loaded model.
        reload_seconds: How often aliases are resolved again (0: never).
    """

    def __init__(
        self,
        references: list[str],
        *,
        tracking: str,
        make_batcher: Callable[[ServedModel], MicroBatcher],
        reload_seconds: float = 5.0,
    ) -> None:
        if not references:
            raise ModelLoadError(
                "no model to serve: register and promote one "
                f"(`medscreen models promote … --alias {DEFAULT_ALIAS}`) or name one with --model"
            )
        self._tracking = tracking
        self._make_batcher = make_batcher
        self._references = references_by_name(references)
        # Replaced whole, never changed in place: requests read it while the watcher swaps.
        self._current: dict[str, Served] = {}
        self._withdrawn: dict[str, Withdrawal] = {}  # the same
        self._rejected: set[tuple[str, str]] = set()  # versions not to download again
        self._kept_because: dict[str, str] = {}  # last warning per name: said once, not per poll
        self._swap_lock = threading.Lock()  # a swap and stop() never interleave
        self._current = {name: self._load(ref) for name, ref in self._references.items()}
        self._reload_seconds = reload_seconds
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _load(self, reference: str, version: ModelVersion | None = None) -> Served:
        model = load_served_model(reference, tracking=self._tracking, version=version)
        return Served(model, self._make_batcher(model))

    def all(self) -> list[Served]:
        """The models served now, by name."""
        current = self._current
        return [current[name] for name in sorted(current)]

    def withdrawn(self) -> dict[str, Withdrawal]:
        """The models the service stopped answering with, by name."""
        return dict(self._withdrawn)

    def select(
        self,
        name: str | None,
        *,
        monitoring: bool,
        allowed: Callable[[str], bool] = lambda _: True,
    ) -> Served:
        """The model a request names, or the only one of its kind that the caller may use.

        Raises:
            RequestError: 404 for an unknown name, 422 when the route does not fit the model or
                the request must name one of several models, 403 when the caller may use none
                of the models of its kind that are served.
        """
        route_kind = "ECG monitoring" if monitoring else "image screening"
        current, withdrawn = self._current, self._withdrawn
        if name:
            served = current.get(name)
            if served is None and name in withdrawn:
                raise _withdrawn_error(name, withdrawn[name])
            if served is None:
                raise RequestError(
                    f"model {shown(name)} is not served here; GET /v1/models lists those that are",
                    HTTPStatus.NOT_FOUND,
                )
            if served.model.card.is_monitoring != monitoring:
                right = "/v1/monitor" if served.model.card.is_monitoring else "/v1/screen"
                raise RequestError(
                    f"model {shown(name)} is not an {route_kind} model; send its input to {right}",
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                )
            return served
        candidates = [
            served
            for served in (current[known] for known in sorted(current))
            if served.model.card.is_monitoring == monitoring and allowed(served.model.name)
        ]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            for withdrawn_name, withdrawal in sorted(withdrawn.items()):
                if withdrawal.is_monitoring == monitoring and allowed(withdrawn_name):
                    raise _withdrawn_error(withdrawn_name, withdrawal)
            if any(served.model.card.is_monitoring == monitoring for served in self.all()):
                # One is served, but not for this key: the key is the thing to change.
                raise RequestError(
                    f"this API key is not granted any {route_kind} model served here; ask for a "
                    "key that grants one",
                    HTTPStatus.FORBIDDEN,
                )
            raise RequestError(
                f"no {route_kind} model is served here", HTTPStatus.UNPROCESSABLE_ENTITY
            )
        names = [served.model.name for served in candidates]
        raise RequestError(
            f"several {route_kind} models are served; name one in field 'model': {names}",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )

    def refresh(self) -> list[str]:
        """Resolve every alias again and swap in the versions that moved; return what changed.

        A withdrawn model (see the module's docstring) stops being served; one whose approved
        version is back is loaded again.
        """
        changes = []
        for name, reference in self._references.items():
            if self._stop.is_set():  # shutting down: its batchers are being closed
                return changes
            current = self._current.get(name)  # None: withdrawn
            try:
                change = self._follow(name, reference, current)
            except (ModelLoadError, MlflowException, OSError) as error:
                # MLflow's connection errors name the registry's address, password included.
                reason = hide_passwords(str(error))
                if self._kept_because.get(name) != reason:
                    self._kept_because[name] = reason
                    if current is None:
                        logger.error("%s stays withdrawn: %s", name, reason)
                    else:
                        logger.warning(
                            "keeping %s version %s: %s", name, current.model.version, reason
                        )
                continue
            if name in self._current:
                self._kept_because.pop(name, None)
            if change:
                changes.append(change)
        return changes

    def _follow(self, name: str, reference: str, current: Served | None) -> str | None:
        """Bring one model in step with the registry; return the change made, if any."""
        parsed = ModelReference.parse(reference)
        try:
            version = find_version(parsed, tracking=self._tracking)
        except ModelLoadError as error:
            if error.missing and current is not None:
                return self._withdraw(name, current, str(error), cause=_DELETED)
            if error.missing:  # withdrawn for another cause, and now deleted as well
                self._still_withdrawn(name, str(error), cause=_DELETED)
            raise
        target = (name, str(version.version))
        try:
            check_governance(reference, parsed, version)
        except ModelLoadError as error:
            if current is not None and target[1] == current.model.version:
                return self._withdraw(name, current, str(error), cause=_UNAPPROVED)
            if current is None:  # e.g. an alias recreated by hand: the 503 says so now
                cause = _UNAPPROVED if parsed.is_version else _ALIAS_UNAPPROVED
                self._still_withdrawn(name, str(error), cause=cause)
            raise  # a move it may not follow: the current version stays
        if current is not None and target[1] == current.model.version:
            return None
        if target in self._rejected:
            return None
        try:
            replacement = self._load(reference, version)
        except ModelLoadError as error:
            if not error.transient:
                self._rejected.add(target)  # a broken version stays broken
            raise
        except (MlflowException, OSError):
            raise  # the registry, the network or the disk: tried again at the next poll
        except Exception as error:  # unforeseen: it must not hold up the other models
            self._rejected.add(target)
            raise ModelLoadError(
                f"version {target[1]} cannot be loaded ({type(error).__name__}: {error})"
            ) from error
        with self._swap_lock:
            if self._stop.is_set():
                replacement.batcher.close()
                return None
            # One assignment each: requests see the old state or the new.
            self._current = {**self._current, name: replacement}
            self._withdrawn = {
                other: withdrawal for other, withdrawal in self._withdrawn.items() if other != name
            }
        if current is None:
            change = (
                f"{reference} is served again, by version {replacement.model.version} "
                f"(ONNX SHA-256 {replacement.model.onnx_sha256})"
            )
            logger.warning("reinstated: %s", change)
            return change
        current.batcher.close()
        change = (
            f"{reference} moved from version {current.model.version} "
            f"to {replacement.model.version} (ONNX SHA-256 {replacement.model.onnx_sha256})"
        )
        logger.info("switched %s", change)
        return change

    def _withdraw(self, name: str, current: Served, reason: str, *, cause: str) -> str | None:
        """Stop answering with ``name``; requests already running finish on it."""
        reason = hide_passwords(reason)
        withdrawal = Withdrawal(
            reason=reason,
            cause=cause,
            since=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            is_monitoring=current.model.card.is_monitoring,
        )
        with self._swap_lock:
            if self._stop.is_set():
                return None
            self._withdrawn = {**self._withdrawn, name: withdrawal}
            self._current = {
                other: served for other, served in self._current.items() if other != name
            }
        current.batcher.close()
        self._kept_because[name] = reason  # said once, here
        change = f"{name} version {current.model.version} withdrawn: {reason}"
        logger.error("%s; its requests get 503 until an approved version is back", change)
        return change

    def _still_withdrawn(self, name: str, reason: str, *, cause: str) -> None:
        """Keep a withdrawn model's 503 true to the registry as it is now, not as it was."""
        with self._swap_lock:
            withdrawal = self._withdrawn.get(name)
            if withdrawal is None or withdrawal.cause == cause or self._stop.is_set():
                return
            updated = replace(withdrawal, reason=hide_passwords(reason), cause=cause)
            self._withdrawn = {**self._withdrawn, name: updated}

    def start_watching(self) -> None:
        """Start the thread that follows alias moves."""
        if self._reload_seconds <= 0 or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, name="registry-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(self._reload_seconds):
            try:
                self.refresh()
            except Exception as error:  # the watcher must outlive a registry hiccup
                # The traceback as text: MLflow's messages can carry the registry's password.
                trace = hide_passwords("".join(traceback.format_exception(error)))
                logger.error("registry watch failed; retrying\n%s", trace.rstrip())

    def stop(self) -> None:
        """Stop following alias moves; after this, :meth:`all` no longer changes."""
        with self._swap_lock:
            self._stop.set()


def _withdrawn_error(name: str, withdrawal: Withdrawal) -> RequestError:
    return RequestError(
        f"model {shown(name)} was withdrawn from this service at {withdrawal.since} "
        f"({withdrawal.cause}); the service operator must approve a version before it answers "
        "again",
        HTTPStatus.SERVICE_UNAVAILABLE,
    )
