"""The dataset catalogue: one YAML metadata file per raw dataset, validated with pydantic."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from datasets.errors import DatasetError

SplitName = Literal["train", "val", "test"]


class DatasetSpec(BaseModel):
    """What medscreen knows about one raw dataset: its source, checksums, licence and labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    title: str
    task: str
    modality: str
    format: Literal["medmnist-npz"]
    url: str
    filename: str
    md5: str = Field(pattern=r"^[0-9a-f]{32}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    licence: str
    citation: str
    image_shape: tuple[int, ...]
    classes: tuple[str, ...]
    positive_finding: str
    positive_classes: tuple[int, ...] = Field(min_length=1)
    split_sizes: dict[SplitName, int]

    @model_validator(mode="after")
    def _positive_classes_exist(self) -> DatasetSpec:
        for index in self.positive_classes:
            if not 0 <= index < len(self.classes):
                raise ValueError(f"positive class {index} is not one of {list(self.classes)}")
        return self


@cache
def _load_catalogue() -> dict[str, DatasetSpec]:
    specs = {}
    for entry in resources.files("datasets").joinpath("metadata").iterdir():
        if entry.name.endswith(".yaml"):
            spec = DatasetSpec.model_validate(yaml.safe_load(entry.read_text()))
            specs[spec.name] = spec
    return specs


def list_datasets() -> list[DatasetSpec]:
    """Return every catalogue entry, sorted by name."""
    return sorted(_load_catalogue().values(), key=lambda spec: spec.name)


def get_dataset_spec(name: str) -> DatasetSpec:
    """Return the catalogue entry called ``name``.

    Raises:
        DatasetError: if the catalogue has no such dataset.
    """
    catalogue = _load_catalogue()
    if name not in catalogue:
        from datasets.records import list_record_databases

        known = sorted([*catalogue, *(database.name for database in list_record_databases())])
        raise DatasetError(f"unknown dataset {name!r}; the catalogue has {known}")
    return catalogue[name]
