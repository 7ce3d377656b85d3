"""The fields of the model card that serving relies on (the reader's side of the contract)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from datasets.ecg import ECG_INPUTS, SAMPLING_RATE_HZ, WINDOW_AFTER, WINDOW_BEFORE

SUPPORTED_CARD_SCHEMAS = ("medscreen.model-card/v1",)
CARD_FILENAME = "card.json"


class ServedInput(BaseModel):
    """The ONNX input the service must produce from an upload."""

    model_config = ConfigDict(extra="ignore")

    name: str
    dtype: str
    shape: list[int | str] = Field(min_length=3)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    depth: int | None = None
    channels: str

    @model_validator(mode="after")
    def _sizes_agree(self) -> ServedInput:
        sizes = self.shape[1:]  # the first axis is the batch, named or sized
        if not all(isinstance(size, int) and size > 0 for size in sizes):
            raise ValueError(f"input shape {self.shape}: every axis after the first needs a size")
        spatial = (
            (self.height, self.width)
            if self.depth is None
            else (self.depth, self.height, self.width)
        )
        channels = 1 if self.channels == "grayscale" else 3
        if tuple(sizes) != (channels, *spatial):
            raise ValueError(
                f"input shape {self.shape} disagrees with {self.channels} "
                f"{'x'.join(map(str, spatial))}"
            )
        return self


class ServedTensor(BaseModel):
    """One named graph input of an ECG model."""

    model_config = ConfigDict(extra="ignore")

    name: str
    dtype: str


class ServedSignal(BaseModel):
    """The ECG input the service must produce from a raw single-lead signal."""

    model_config = ConfigDict(extra="ignore")

    sampling_rate_hz: float = Field(gt=0)
    lead: str
    window_before_samples: int = Field(gt=0)
    window_after_samples: int = Field(gt=0)
    tensors: list[ServedTensor] = Field(min_length=3, max_length=3)


class ServedOutput(BaseModel):
    """The ONNX output holding class probabilities."""

    model_config = ConfigDict(extra="ignore")

    name: str


class ServedOperatingPoint(BaseModel):
    """The threshold of the positive finding."""

    model_config = ConfigDict(extra="ignore")

    threshold: float = Field(ge=0, le=1)
    sensitivity_target: float


class ServedOnnx(BaseModel):
    """The graph file and its checksum."""

    model_config = ConfigDict(extra="ignore")

    filename: str
    sha256: str


class ServedCard(BaseModel):
    """The card as the service reads it; unknown fields are kept for ``GET`` listings."""

    model_config = ConfigDict(extra="allow")

    card_schema: str
    kind: str = "image-screening"
    model_name: str
    task: str
    intended_use: str
    classes: list[str]
    positive_finding: str
    positive_classes: list[int] = Field(min_length=1)
    input: ServedInput | None = None
    signal: ServedSignal | None = None
    output: ServedOutput
    operating_point: ServedOperatingPoint
    onnx: ServedOnnx

    @model_validator(mode="after")
    def _supported(self) -> ServedCard:
        if self.card_schema not in SUPPORTED_CARD_SCHEMAS:
            raise ValueError(
                f"card schema {self.card_schema!r} is not one of {SUPPORTED_CARD_SCHEMAS}"
            )
        columns = range(len(self.classes))
        if len(set(self.positive_classes)) != len(self.positive_classes) or not set(
            self.positive_classes
        ) <= set(columns):
            raise ValueError(
                f"positive classes {self.positive_classes} are not distinct indices of the "
                f"{len(self.classes)} classes"
            )
        if self.kind == "image-screening":
            if self.input is None:
                raise ValueError("an image-screening card needs an 'input' section")
            if self.input.dtype != "uint8" or self.input.channels not in ("grayscale", "RGB"):
                raise ValueError("only uint8 grayscale or RGB image inputs are supported")
            if self.input.depth is not None and self.input.channels != "grayscale":
                raise ValueError("only single-channel volumes are supported")
        elif self.kind == "ecg-monitoring":
            if self.signal is None:
                raise ValueError("an ecg-monitoring card needs a 'signal' section")
            names = [tensor.name for tensor in self.signal.tensors]
            if sorted(names) != sorted(ECG_INPUTS):
                raise ValueError(f"the ECG inputs {names} are not {list(ECG_INPUTS)}")
            if self.signal.sampling_rate_hz != SAMPLING_RATE_HZ or (
                self.signal.window_before_samples,
                self.signal.window_after_samples,
            ) != (WINDOW_BEFORE, WINDOW_AFTER):
                raise ValueError(
                    f"the card's beats ({self.signal.sampling_rate_hz:g} Hz, window "
                    f"{self.signal.window_before_samples}+{self.signal.window_after_samples}) "
                    f"differ from this service's beat extraction ({SAMPLING_RATE_HZ} Hz, "
                    f"{WINDOW_BEFORE}+{WINDOW_AFTER}); upgrade the service"
                )
        else:
            raise ValueError(f"model kind {self.kind!r} is not served")
        return self

    @property
    def is_monitoring(self) -> bool:
        """Whether the model takes ECG beats (``POST /v1/monitor``) rather than images."""
        return self.kind == "ecg-monitoring"

    @property
    def is_volume(self) -> bool:
        """Whether the model takes 3D volumes (NIfTI or arrays) rather than 2D images."""
        return self.input is not None and self.input.depth is not None
