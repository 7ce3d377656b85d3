"""The registered models one service serves, kept in step with their registry aliases.

A watcher thread resolves each ``NAME@ALIAS`` every few seconds. When an approved alias moves,
the new version is downloaded, verified and loaded beside the old one, then swapped in; requests
already running finish on the version they started with. A move the service may not follow (no
passed gate, no approval, a bad card) leaves the current version serving and is logged.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from datasets.download import hide_passwords
from serving.batching import MicroBatcher
from serving.errors import ModelLoadError, RequestError, shown
from serving.model import ModelReference, ServedModel, load_served_model, resolve_version

logger = logging.getLogger("medscreen.serving")
DEFAULT_ALIAS = "champion"


@dataclass(frozen=True)
class Served:
    """One loaded model version and the batcher its requests go through."""

    model: ServedModel
    batcher: MicroBatcher


def default_references(tracking: str, alias: str = DEFAULT_ALIAS) -> list[str]:
    """Every registered model that has ``alias``, as ``NAME@ALIAS``."""
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    try:
        registered = client.search_registered_models()
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
        self._current: dict[str, Served] = {}
        self._rejected: set[tuple[str, str]] = set()  # versions not to download again
        self._kept_because: dict[str, str] = {}  # last warning per name: said once, not per poll
        self._swap_lock = threading.Lock()  # a swap and stop() never interleave
        for name, reference in self._references.items():
            self._current[name] = self._load(reference)
        self._reload_seconds = reload_seconds
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _load(self, reference: str) -> Served:
        model = load_served_model(reference, tracking=self._tracking)
        return Served(model, self._make_batcher(model))

    def all(self) -> list[Served]:
        """The models served now, by name."""
        return [self._current[name] for name in sorted(self._current)]

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
        if name:
            served = self._current.get(name)
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
            for served in self.all()
            if served.model.card.is_monitoring == monitoring and allowed(served.model.name)
        ]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
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
        """Resolve every alias again and swap in the versions that moved; return what changed."""
        changes = []
        for name, reference in self._references.items():
            parsed = ModelReference.parse(reference)
            if parsed.is_version:
                continue
            current = self._current[name]
            try:
                _, version = resolve_version(reference, tracking=self._tracking)
                target = (name, str(version.version))
                if target[1] == current.model.version or target in self._rejected:
                    self._kept_because.pop(name, None)
                    continue
                try:
                    replacement = self._load(reference)
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
            except (ModelLoadError, MlflowException, OSError) as error:
                # MLflow's connection errors name the registry's address, password included.
                reason = hide_passwords(str(error))
                if self._kept_because.get(name) != reason:
                    self._kept_because[name] = reason
                    logger.warning("keeping %s version %s: %s", name, current.model.version, reason)
                continue
            with self._swap_lock:
                if self._stop.is_set():  # shutting down: its batchers are being closed
                    replacement.batcher.close()
                    return changes
                self._current[name] = replacement  # one assignment: requests see old or new
            self._kept_because.pop(name, None)
            current.batcher.close()
            change = (
                f"{reference} moved from version {current.model.version} "
                f"to {replacement.model.version} (ONNX SHA-256 {replacement.model.onnx_sha256})"
            )
            logger.info("switched %s", change)
            changes.append(change)
        return changes

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
