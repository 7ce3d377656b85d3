"""The fields of the model card that serving relies on (the reader's side of the contract)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

SUPPORTED_CARD_SCHEMAS = ("medscreen.model-card/v1",)
CARD_FILENAME = "card.json"


class ServedInput(BaseModel):
    """The ONNX input the service must produce from an upload."""

    model_config = ConfigDict(extra="ignore")

    name: str
    dtype: str
    shape: list[int | str]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    depth: int | None = None
    channels: str


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
    model_name: str
    task: str
    intended_use: str
    classes: list[str]
    positive_finding: str
    positive_classes: list[int] = Field(min_length=1)
    input: ServedInput
    output: ServedOutput
    operating_point: ServedOperatingPoint
    onnx: ServedOnnx

    @model_validator(mode="after")
    def _supported(self) -> ServedCard:
        if self.card_schema not in SUPPORTED_CARD_SCHEMAS:
            raise ValueError(
                f"card schema {self.card_schema!r} is not one of {SUPPORTED_CARD_SCHEMAS}"
            )
        if self.input.dtype != "uint8" or self.input.channels not in ("grayscale", "RGB"):
            raise ValueError("only uint8 grayscale or RGB image inputs are supported")
        if self.input.depth is not None:
            raise ValueError("3D (volume) inputs are not served yet")
        return self
