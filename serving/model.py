"""Loading a registered model version from MLflow and running it with onnxruntime."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from datasets.download import file_sha256, hide_passwords
from datasets.ecg import ECG_INPUTS
from serving.card import CARD_FILENAME, ServedCard
from serving.errors import ModelLoadError
from serving.settings import configured_onnxruntime_threads, tracking_uri, usable_cores

logger = logging.getLogger("medscreen.serving")

GATE_TAG = "medscreen.release_gate"
# Written with the version by `medscreen export`; what the served files must match.
ONNX_SHA256_TAG = "medscreen.onnx_sha256"
CARD_SHA256_TAG = "medscreen.card_sha256"
THRESHOLD_TAG = "medscreen.threshold"
_APPROVAL_PREFIX = "medscreen.approval."  # medscreen.approval.<alias>.approved_by, on the version
# The lengths match what the prediction log records.
_REFERENCE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})@(?P<selector>[A-Za-z0-9_.-]{1,64})$"
)


@dataclass(frozen=True)
class ModelReference:
    """A registered model named by alias or version: ``NAME@ALIAS`` or ``NAME@VERSION``."""

    name: str
    selector: str

    @classmethod
    def parse(cls, text: str) -> ModelReference:
        """Parse ``NAME@ALIAS_OR_VERSION``.

        Raises:
            ModelLoadError: if the text is not of that form.
        """
        match = _REFERENCE.match(text.strip())
        if not match:
            raise ModelLoadError(
                f"model reference {text!r} is not NAME@ALIAS or NAME@VERSION "
                "(for example pneumonia-screening@champion or pneumonia-screening@3)"
            )
        return cls(match["name"], match["selector"])

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}"

    @property
    def is_version(self) -> bool:
        """Whether the selector is a version number rather than an alias."""
        return self.selector.isdigit()


def onnxruntime_threads() -> int:
    """Intra-op threads per session: ``$MEDSCREEN_ORT_THREADS``, else usable cores per worker - 1.

    Each server worker runs one batch at a time, and its event loop (HTTP, decoding, the log)
    keeps about two thirds of a core busy under load. onnxruntime's threads wait for each other
    at every operator, so a pool that shares a core with the loop runs at the speed of its
    slowest thread: on 2 cores, one worker with 2 threads served 0.6x the requests of one with 1.
    """
    configured = configured_onnxruntime_threads()
    if configured:
        return configured
    workers = max(1, int(os.environ.get("MEDSCREEN_WORKERS", "1")))
    return max(1, usable_cores() // workers - 1)


class ServedModel:
    """One registered model version, verified against its card, ready for inference."""

    def __init__(self, card: ServedCard, onnx_path: Path, version: str, alias: str | None) -> None:
        self.card = card
        self.version = version
        self.alias = alias
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = onnxruntime_threads()
        try:
            self.session = onnxruntime.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail)
            raise ModelLoadError(
                f"{card.model_name} version {version}: onnxruntime cannot load the graph: {error}"
            ) from error
        if card.input is not None:
            self.input_names: tuple[str, ...] = (card.input.name,)
            self.input_shape: tuple[int, ...] = tuple(int(dim) for dim in card.input.shape[1:])
        else:
            self.input_names = ECG_INPUTS  # the card lists these names (checked on reading)
            self.input_shape = ()
        self._positive_columns = np.asarray(card.positive_classes, dtype=np.intp)
        self._check_graph()

    def _check_graph(self) -> None:
        """Refuse a graph that the card describes wrongly: it would fail every request.

        Raises:
            ModelLoadError: naming the input or output that differs.
        """
        what = f"{self.card.model_name} version {self.version}"
        graph_inputs = {graph_input.name: graph_input for graph_input in self.session.get_inputs()}
        if set(graph_inputs) != set(self.input_names):
            raise ModelLoadError(
                f"{what}: the graph's inputs {sorted(graph_inputs)} differ from its card's "
                f"{list(self.input_names)}"
            )
        if self.input_shape:
            graph_shape = graph_inputs[self.input_names[0]].shape[1:]
            if len(graph_shape) != len(self.input_shape) or any(
                isinstance(size, int) and size != card_size
                for size, card_size in zip(graph_shape, self.input_shape, strict=False)
            ):
                raise ModelLoadError(
                    f"{what}: the graph takes {graph_shape} per image, its card says "
                    f"{list(self.input_shape)}"
                )
        graph_outputs = {output.name: output for output in self.session.get_outputs()}
        output = graph_outputs.get(self.card.output.name)
        if output is None:
            raise ModelLoadError(
                f"{what}: the card's output {self.card.output.name!r} is not among the graph's "
                f"{sorted(graph_outputs)}"
            )
        width = output.shape[-1] if output.shape else None
        if isinstance(width, int) and width != len(self.card.classes):
            raise ModelLoadError(
                f"{what}: the graph gives {width} class probabilities, the card names "
                f"{len(self.card.classes)} classes"
            )

    @property
    def name(self) -> str:
        """Registered model name."""
        return self.card.model_name

    @property
    def threshold(self) -> float:
        """Threshold of the positive finding."""
        return self.card.operating_point.threshold

    @property
    def onnx_sha256(self) -> str:
        """SHA-256 of the graph, checked against the card and the registration at load."""
        return self.card.onnx.sha256

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Return class probabilities for named input batches (all with the same first axis)."""
        return self.session.run([self.card.output.name], feeds)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Return class probabilities for a uint8 batch of the card's image shape."""
        if images.dtype != np.uint8 or images.shape[1:] != self.input_shape:
            raise ValueError(f"expected uint8 (N, *{self.input_shape}), got {images.shape}")
        return self.run({self.input_names[0]: images})

    def positive_probability(self, probabilities: np.ndarray) -> np.ndarray:
        """Summed probability of the positive finding's classes."""
        # Clipped: a float32 sum of several classes can come out at 1.0000001.
        return np.clip(probabilities[:, self._positive_columns].sum(axis=1), 0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows of this model: identity, operating point and card."""
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "kind": self.card.kind,
            "task": self.card.task,
            "intended_use": self.card.intended_use,
            "positive_finding": self.card.positive_finding,
            "threshold": self.threshold,
            "sensitivity_target": self.card.operating_point.sensitivity_target,
            "routes": (
                ["/v1/monitor", "/v1/monitor/dicom"]
                if self.card.is_monitoring
                else ["/v1/screen", "/v1/screen/array"]
            ),
            "card": _without_local_paths(self.card.model_dump(mode="json")),
        }


LOCAL_PATH_SHOWN_AS = "a file of the training site (its path is not served)"


def _without_local_paths(value: Any) -> Any:
    """The card as served: ``file:`` URIs (a hospital manifest's path) become a placeholder.

    A training site's folder names can carry an MRN or a patient's name, and they are no
    business of other regions; the registry's own card keeps the path for auditors, and the
    file's SHA-256 stays in the served card.
    """
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    if isinstance(value, str) and value[:5].lower() == "file:":
        return LOCAL_PATH_SHOWN_AS
    return value


def check_governance(reference: str, parsed: ModelReference, version: ModelVersion) -> None:
    """Serve only versions that passed the release gate and hold an approved alias.

    A version named by number must hold one too (it is served without following the alias):
    every answer must go back to a recorded approval.
    """
    if version.tags.get(GATE_TAG) != "passed":
        raise ModelLoadError(
            f"{reference!r} (version {version.version}) has no passed release gate; "
            "register models with `medscreen export`"
        )
    if parsed.is_version:
        # An approval counts while its alias still points here: deleting an alias withdraws it.
        if not any(
            version.tags.get(f"{_APPROVAL_PREFIX}{alias}.approved_by") for alias in version.aliases
        ):
            raise ModelLoadError(
                f"{reference!r}: version {version.version} holds no approved alias; approve it "
                "with `medscreen models promote` first, or serve NAME@ALIAS"
            )
        return
    if not version.tags.get(f"{_APPROVAL_PREFIX}{parsed.selector}.approved_by"):
        raise ModelLoadError(
            f"alias {parsed.selector!r} points at version {version.version} without a recorded "
            "approval; move aliases with `medscreen models promote`"
        )


def resolve_version(
    reference: str, *, tracking: str | None = None
) -> tuple[ModelReference, ModelVersion]:
    """Find the registry version a reference names, and check that it may be served.

    Raises:
        ModelLoadError: if the reference is malformed or unknown, the version has no passed
            release gate, or an alias was moved without a recorded approval.
    """
    parsed = ModelReference.parse(reference)
    version = find_version(parsed, tracking=tracking)
    check_governance(reference, parsed, version)
    return parsed, version


def find_version(parsed: ModelReference, *, tracking: str | None = None) -> ModelVersion:
    """The registry version a reference names now, whether or not it may be served.

    Raises:
        ModelLoadError: ``missing`` if the registry says the model, version or alias does not
            exist; ``transient`` if it could not be asked (unreachable, or another error).
    """
    uri = tracking or tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    reference = str(parsed)
    try:
        if parsed.is_version:
            return client.get_model_version(parsed.name, parsed.selector)
        # Not get_model_version_by_alias: MLflow answers a deleted alias with the error code
        # of a malformed request, which cannot be told from other refusals.
        number = client.get_registered_model(parsed.name).aliases.get(parsed.selector)
        if number is None:
            raise ModelLoadError(
                hide_passwords(
                    f"no registered model version {reference!r} in {uri}: model "
                    f"{parsed.name!r} has no alias {parsed.selector!r}"
                ),
                missing=True,
            )
        return client.get_model_version(parsed.name, number)
    except MlflowException as error:
        missing = error.error_code == "RESOURCE_DOES_NOT_EXIST"
        raise ModelLoadError(
            hide_passwords(f"no registered model version {reference!r} in {uri}: {error.message}"),
            transient=not missing,  # also when the registry is unreachable
            missing=missing,
        ) from error


def load_served_model(
    reference: str, *, tracking: str | None = None, version: ModelVersion | None = None
) -> ServedModel:
    """Resolve a registered model, download it, check its card and checksum, and load it.

    Args:
        reference: ``NAME@ALIAS`` or ``NAME@VERSION``.
        tracking: Tracking/registry URI (default: :func:`tracking_uri`).
        version: The version ``reference`` was already resolved to and checked with
            :func:`resolve_version` (default: resolved here). The pool passes it, so that a
            failure is pinned on the version that failed even if the alias moves meanwhile.

    Returns:
        The loaded model.

    Raises:
        ModelLoadError: if the model, version or alias is unknown, or the download fails checks.
    """
    uri = tracking or tracking_uri()
    if version is None:
        parsed, version = resolve_version(reference, tracking=uri)
    else:
        parsed = ModelReference.parse(reference)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # The session holds the graph in memory: the download is removed once it is loaded.
    with tempfile.TemporaryDirectory(prefix="medscreen-model-") as download_dir:
        try:
            model_dir = Path(
                mlflow.artifacts.download_artifacts(
                    f"models:/{parsed.name}/{version.version}", dst_path=download_dir
                )
            )
        except MlflowException as error:
            raise ModelLoadError(
                f"cannot download {reference!r}: {error.message}", transient=True
            ) from error
        card_path = model_dir / "extra_files" / CARD_FILENAME
        try:
            card_bytes = card_path.read_bytes()
            card = ServedCard.model_validate_json(card_bytes)
        except (OSError, ValidationError) as error:
            raise ModelLoadError(
                f"{reference!r}: model card {card_path.name} is unusable: {error}"
            ) from error
        onnx_path = model_dir / card.onnx.filename
        if not onnx_path.is_file() or file_sha256(onnx_path) != card.onnx.sha256:
            raise ModelLoadError(
                f"{reference!r}: {onnx_path.name} is missing or its SHA-256 differs from the card's"
            )
        _check_registered_artifacts(
            reference, version, card, hashlib.sha256(card_bytes).hexdigest()
        )
        return ServedModel(
            card,
            onnx_path,
            version=str(version.version),
            alias=None if parsed.is_version else parsed.selector,
        )


def _check_registered_artifacts(
    reference: str, version: ModelVersion, card: ServedCard, card_sha256: str
) -> None:
    """Serve only the graph, card and threshold the registry recorded when the gate passed.

    The version's tags are written with it in one registry write by ``medscreen export``; the
    artifacts are files that someone with access to the artifact store could replace, card
    and graph together, so that they still agree with each other.

    Raises:
        ModelLoadError: naming what differs from the registered version.
    """
    what = f"{reference!r} (version {version.version})"
    registered_onnx = version.tags.get(ONNX_SHA256_TAG)
    if registered_onnx is None:
        raise ModelLoadError(
            f"{what} has no {ONNX_SHA256_TAG} tag, so its graph cannot be checked against the "
            "registration; register models with `medscreen export`"
        )
    if card.onnx.sha256 != registered_onnx:
        raise ModelLoadError(
            f"{what}: the graph's SHA-256 {card.onnx.sha256} is not the registered "
            f"{registered_onnx}; the artifact was changed after the release gate, so it is not "
            "served"
        )
    registered_card = version.tags.get(CARD_SHA256_TAG)
    if registered_card is None:
        # Versions exported before 2026-11-30 15:00 UTC: refusing them would stop serving them.
        logger.warning(
            "%s: registered before cards were hashed, so only its graph and threshold are checked "
            "against the registration, not the rest of its card (positive classes, say); "
            "re-export it with `medscreen export` to have the whole card checked",
            what,
        )
    elif card_sha256 != registered_card:
        raise ModelLoadError(
            f"{what}: its card's SHA-256 is not the registered {registered_card}; the artifact "
            "was changed after the release gate, so it is not served"
        )
    registered_threshold = version.tags.get(THRESHOLD_TAG)
    try:
        # The tag holds six decimals.
        agrees = abs(float(registered_threshold) - card.operating_point.threshold) <= 5.1e-7
    except (TypeError, ValueError):
        agrees = False
    if not agrees:
        raise ModelLoadError(
            f"{what}: the card's threshold {card.operating_point.threshold:.6f} is not the "
            f"registered {registered_threshold}; the artifact was changed after the release "
            "gate, so it is not served"
        )
