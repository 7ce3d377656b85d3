"""The dataset catalogue: one YAML metadata file per raw dataset, validated with pydantic."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from datasets.errors import DatasetError

SplitName = Literal["train", "val", "test"]


class MetadataSpec(BaseModel):
    """What every raw dataset's metadata file holds: a name, checked strictly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str


SpecT = TypeVar("SpecT", bound=MetadataSpec)


class DatasetSpec(MetadataSpec):
    """What medscreen knows about one raw dataset: its source, checksums, licence and labels."""

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


def load_metadata_files(folder: str, spec_type: type[SpecT]) -> dict[str, SpecT]:
    """Validate each YAML metadata file in a folder of ``datasets/metadata``, by its name."""
    specs = {}
    for entry in resources.files("datasets").joinpath("metadata", folder).iterdir():
        if entry.name.endswith(".yaml"):
            spec = spec_type.model_validate(yaml.safe_load(entry.read_text()))
            specs[spec.name] = spec
    return specs


@cache
def _load_catalogue() -> dict[str, DatasetSpec]:
    return load_metadata_files("", DatasetSpec)


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
