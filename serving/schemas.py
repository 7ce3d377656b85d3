"""The HTTP API's contract as published in ``/v1/openapi.json``: request and response bodies.

The routes parse requests and build answers themselves (see :mod:`serving.service`), so that
every client mistake gets one JSON form and no answer pays for a second validation. These
models only describe those bodies, for integrators and their code generators; the tests
validate the service's real answers against them, so the document cannot drift from the
service.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_MODEL_FIELD = "Model name; optional when the key may use one model of the route's kind."


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelIdentity(_Body):
    """The registered model version that produced an answer."""

    name: str = Field(description="Registered model name, for example pneumonia-screening.")
    version: str = Field(description="Registered version number.")
    alias: str | None = Field(
        description="The approved alias it was served under (champion), if any."
    )


class ServedModelDescription(_Body):
    """One model this key may use."""

    name: str
    version: str
    alias: str | None
    kind: Literal["image-screening", "ecg-monitoring"]
    task: str
    intended_use: str
    positive_finding: str = Field(description="What a positive decision (or an alert) means.")
    threshold: float = Field(
        ge=0, le=1, description="Probability at or above which the finding is called."
    )
    sensitivity_target: float = Field(
        description="Validation sensitivity the threshold was chosen for."
    )
    routes: list[str] = Field(description="The routes that take this model's input.")
    card: dict[str, Any] = Field(
        description="The model's metadata card (medscreen.model-card/v1) as registered: "
        "input and output, classes, metrics with confidence intervals, training data, "
        "provenance, limitations, changelog."
    )


class ModelList(_Body):
    """``GET /v1/models``."""

    request_id: str
    models: list[ServedModelDescription]


class InputDescription(_Body):
    """What the service read from the upload (never pixel data or patient tags)."""

    format: str = Field(description="png, jpeg, dicom, nifti or array.")
    depth: int | None = Field(default=None, description="Volumes only.")
    height: int
    width: int


class ScreeningAnswer(_Body):
    """``POST /v1/screen`` and ``POST /v1/screen/array``."""

    request_id: str = Field(description="Also the X-Request-ID header and the log record's id.")
    model: ModelIdentity
    finding: str = Field(description="The positive finding of the task, for example pneumonia.")
    probability: float = Field(ge=0, le=1, description="Probability of the positive finding.")
    threshold: float = Field(ge=0, le=1)
    sensitivity_target: float
    decision: Literal["positive", "negative"] = Field(
        description="positive when probability >= threshold."
    )
    class_probabilities: dict[str, float] = Field(description="Every class, by name.")
    input: InputDescription


class SignalQuality(_Body):
    """Whether the signal has distinct QRS complexes to classify."""

    kurtosis: float
    acceptable: bool


class MonitoringFinding(_Body):
    """One finding of a recording, for a clinician to review."""

    finding: str
    priority: Literal["high", "review"]
    beats: int | None = None
    longest_run: int | None = None
    detail: str | None = None
    spans_s: list[list[float]] | None = Field(
        default=None, description="Low-quality spans, [start, end] in seconds."
    )


class MonitoringSummary(_Body):
    """The recording as a whole."""

    beats: int
    class_counts: dict[str, int] = Field(description="Beats per AAMI class (N, S, V, F, Q).")
    ectopic_alert_beats: int = Field(description="Beats whose ectopic probability >= threshold.")
    heart_rate_bpm: float | None
    signal_quality: SignalQuality
    findings: list[MonitoringFinding]


class BeatAnswer(_Body):
    """One detected beat."""

    time_s: float = Field(description="R peak, seconds from the start of the signal as sent.")
    sample: int = Field(description="R peak, sample index in the signal as sent.")
    class_: str = Field(alias="class", description="Most probable AAMI class.")
    probability: float = Field(ge=0, le=1, description="Probability of that class.")
    ectopic_probability: float = Field(ge=0, le=1, description="P(S) + P(V).")
    alert: bool = Field(description="ectopic_probability >= threshold.")


class MonitoringAnswer(_Body):
    """``POST /v1/monitor`` and ``POST /v1/monitor/dicom``."""

    request_id: str
    model: ModelIdentity
    finding: str
    threshold: float = Field(ge=0, le=1)
    sensitivity_target: float
    decision: Literal["alert", "no alert"] = Field(
        description="alert when any beat is an alert or the signal quality is too low."
    )
    summary: MonitoringSummary
    beats: list[BeatAnswer]


class ErrorAnswer(_Body):
    """Every refused request: ``error`` says what to change."""

    error: str = Field(description="What was wrong with the request, and what to send instead.")
    status: int = Field(description="The HTTP status, repeated.")
    request_id: str = Field(description="Quote it when asking about this request.")


class ArrayRequest(_Body):
    """``POST /v1/screen/array``."""

    array: list[Any] = Field(
        description="uint8 values (0-255) nested as the model's input: [height][width] or "
        "[channels][height][width] for images, [depth][height][width] for volumes."
    )
    model: str | None = Field(default=None, description=_MODEL_FIELD)


class MonitorRequest(_Body):
    """``POST /v1/monitor``."""

    samples: list[float] = Field(description="One lead, in millivolts.")
    sampling_rate_hz: float = Field(description="Samples per second; resampled to the model's.")
    lead: str = Field(description="The lead's name, for example MLII or II.")
    model: str | None = Field(default=None, description=_MODEL_FIELD)


def _upload(file: str, **fields: str) -> dict[str, Any]:
    """A multipart body, described by hand: the routes read the raw upload themselves.

    Args:
        file: What the ``file`` part holds.
        **fields: The other text fields besides ``model``, each with its description.
    """
    texts = {"model": _MODEL_FIELD, **fields}
    return {
        "type": "object",
        "required": ["file"],
        "additionalProperties": False,  # refused with 422, as in the JSON bodies
        "properties": {
            "file": {"type": "string", "format": "binary", "description": file},
            **{name: {"type": "string", "description": about} for name, about in texts.items()},
        },
    }


SCREEN_UPLOAD = _upload(
    "PNG, JPEG or DICOM (uncompressed, RLE lossless, JPEG 2000: every transfer syntax with a "
    "decoder installed here; others are refused with 415); NIfTI (.nii, .nii.gz) for 3D models."
)
MONITOR_DICOM_UPLOAD = _upload(
    "A DICOM ECG waveform (12-lead or other).",
    lead="The lead to classify (default: the model's, for example MLII).",
)
