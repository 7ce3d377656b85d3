"""The model card: the machine-readable contract between training and serving.

Serving reads ``card.json`` beside ``model.onnx`` in the registry and validates the fields it
needs against ``CARD_SCHEMA``; it never imports this module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_SCHEMA = "medscreen.model-card/v1"
CARD_FILENAME = "card.json"
CARD_MARKDOWN_FILENAME = "card.md"


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Card):
    """One input or output tensor of the ONNX graph."""

    name: str
    dtype: str
    shape: list[int | str]
    value_range: tuple[float, float]
    description: str


class InputSpec(TensorSpec):
    """The image input, with what it depicts."""

    modality: str
    channels: str
    height: int
    width: int
    depth: int | None = None


class SignalSpec(_Card):
    """The ECG input: what the service computes from a raw single-lead signal for the graph."""

    sampling_rate_hz: float = Field(gt=0, description="Signals are resampled to this rate.")
    lead: str
    units: str = "mV"
    window_before_samples: int = Field(gt=0)
    window_after_samples: int = Field(gt=0)
    preprocessing: str
    tensors: list[TensorSpec] = Field(min_length=1)


class OperatingPoint(_Card):
    """The threshold applied to the positive-finding probability."""

    threshold: float = Field(ge=0, le=1)
    sensitivity_target: float
    temperature: float = Field(
        default=1.0, gt=0, description="Softmax temperature fitted on validation (in the graph)."
    )
    chosen_on: str = "validation split"
    rule: str = "positive when the positive-finding probability >= threshold"


class TrainingData(_Card):
    """Where the training data came from, and exactly which rows were used."""

    dataset: str
    url: str
    file_sha256: str = Field(
        description="SHA-256 of the dataset file; for a dataset of many files (WFDB records), "
        "SHA-256 of their SHA256SUMS-format listing, one 'DIGEST NAME' line per file, by name."
    )
    licence: str
    citation: str
    split_fingerprints: dict[str, str]
    split_rows: dict[str, int]
    # WFDB records: each file used to train or select, as PhysioNet's SHA256SUMS lists it.
    files_sha256: dict[str, str] | None = None


class Provenance(_Card):
    """The run and code that produced the model."""

    run_id: str
    experiment_id: str
    recipe: str
    git_commit: str
    git_dirty: str
    seed: int
    versions: dict[str, str]


class OnnxArtifact(_Card):
    """The exported graph and its parity check against its reference model."""

    filename: str = "model.onnx"
    sha256: str
    size_bytes: int
    opset: int
    variant: Literal["float32", "int8"] = "float32"
    parity_reference: str = "PyTorch model of the run"
    parity_max_abs_difference: float
    parity_tolerance: float | None
    parity_cases: int
    parity_decisions_identical: bool


class GateCheck(_Card):
    """One check of the release gate."""

    check: str
    passed: bool
    detail: str


class ChangelogEntry(_Card):
    """One line of the model's history."""

    date: str
    change: str


class ModelCard(_Card):
    """Everything a hospital, a region and an auditor need to know about one model version."""

    card_schema: str = CARD_SCHEMA
    kind: Literal["image-screening", "ecg-monitoring"] = "image-screening"
    model_name: str
    task: str
    intended_use: str
    limitations: list[str]
    classes: list[str]
    positive_finding: str
    positive_classes: list[int]
    input: InputSpec | None = Field(default=None, description="Image models: the image tensor.")
    signal: SignalSpec | None = Field(default=None, description="ECG models: the beat tensors.")
    output: TensorSpec
    operating_point: OperatingPoint
    metrics: dict[str, float]
    confidence_intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="95% intervals: AUC by bootstrap, rates by Wilson."
    )
    release_gate: list[GateCheck]
    training_data: TrainingData
    provenance: Provenance
    onnx: OnnxArtifact
    changelog: list[ChangelogEntry]

    @model_validator(mode="after")
    def _one_input_kind(self) -> ModelCard:
        wanted = "input" if self.kind == "image-screening" else "signal"
        if getattr(self, wanted) is None or (self.input and self.signal):
            raise ValueError(f"a {self.kind} card has exactly the {wanted!r} input section")
        return self

    def _input_markdown(self) -> str:
        if self.input is not None:
            return (
                f"`{self.input.name}`: {self.input.dtype} {self.input.shape}, values "
                f"{self.input.value_range[0]:g} to {self.input.value_range[1]:g}, "
                f"{self.input.channels}, {self.input.modality}. {self.input.description}"
            )
        assert self.signal is not None
        tensors = "; ".join(
            f"`{tensor.name}` {tensor.dtype} {tensor.shape} ({tensor.description})"
            for tensor in self.signal.tensors
        )
        return (
            f"single-lead ECG ({self.signal.lead}) in {self.signal.units}, resampled to "
            f"{self.signal.sampling_rate_hz:g} Hz; beats of {self.signal.window_before_samples} "
            f"samples before and {self.signal.window_after_samples} after each R peak. "
            f"{self.signal.preprocessing} Graph inputs: {tensors}."
        )

    def _interval(self, metric: str) -> str:
        if metric not in self.confidence_intervals:
            return ""
        low, high = self.confidence_intervals[metric]
        return f"{low:.4f} to {high:.4f}"

    def to_markdown(self) -> str:
        """Render the card for people."""
        metrics = "\n".join(
            f"| {name} | {value:.4f} | {self._interval(name)} |"
            for name, value in self.metrics.items()
        )
        gate = "\n".join(
            f"- {'passed' if check.passed else 'FAILED'}: {check.check} ({check.detail})"
            for check in self.release_gate
        )
        limitations = "\n".join(f"- {line}" for line in self.limitations) or "- none stated"
        changes = "\n".join(f"- {entry.date}: {entry.change}" for entry in self.changelog)
        fingerprints = ", ".join(
            f"{split} `{value}`" for split, value in self.training_data.split_fingerprints.items()
        )
        data = self.training_data
        if data.files_sha256:
            digest = (
                f"SHA-256 of the SHA256SUMS listing of its {len(data.files_sha256)} files "
                f"`{data.file_sha256}`; each file, as PhysioNet's SHA256SUMS lists it: "
                + ", ".join(
                    f"{name} `{digest}`" for name, digest in sorted(data.files_sha256.items())
                )
            )
        else:
            digest = f"SHA-256 `{data.file_sha256}`"
        return f"""# Model card: {self.model_name}

**Task.** {self.task}

**Intended use.** {self.intended_use}

**Limitations.**
{limitations}

**Classes.** {", ".join(self.classes)}. **Positive finding:** {self.positive_finding}
(class {", ".join(map(str, self.positive_classes))}).

**Input.** {self._input_markdown()}

**Output.** `{self.output.name}`: {self.output.dtype} {self.output.shape}. {self.output.description}

**Operating point.** threshold {self.operating_point.threshold:.6f}, chosen on the
{self.operating_point.chosen_on} for sensitivity >= {self.operating_point.sensitivity_target:g};
{self.operating_point.rule}.

| metric | value | 95% interval |
|---|---|---|
{metrics}

**Release gate.**
{gate}

**Training data.** {self.training_data.dataset} ({self.training_data.licence}),
{self.training_data.url}, {digest}.
Split fingerprints: {fingerprints}.
Cite: {self.training_data.citation}

**Provenance.** MLflow run `{self.provenance.run_id}`, recipe `{self.provenance.recipe}`, commit
`{self.provenance.git_commit}` (dirty: {self.provenance.git_dirty}), seed {self.provenance.seed}.

**ONNX.** `{self.onnx.filename}` ({self.onnx.variant}, {self.onnx.size_bytes} bytes) SHA-256
`{self.onnx.sha256}`, opset {self.onnx.opset}; against the {self.onnx.parity_reference} on
{self.onnx.parity_cases} validation cases: max abs difference
{self.onnx.parity_max_abs_difference:.2e} (tolerance {self.onnx.parity_tolerance}), decisions
identical: {self.onnx.parity_decisions_identical}.

## Changelog
{changes}
"""
