"""Training recipes: YAML files validated with pydantic, with dotted-path overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe file or override is invalid. The message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Strict):
    """Which dataset to train on, and how much of it."""

    dataset: str = Field(description="Catalogue name, for example 'pneumoniamnist'.")
    data_dir: Path | None = Field(
        default=None, description="Local directory with the official file (else cache/download)."
    )
    max_train_samples: int | None = Field(default=None, gt=0)
    max_val_samples: int | None = Field(default=None, gt=0)
    max_test_samples: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=128, gt=0)
    num_workers: int = Field(default=0, ge=0)


class AugmentationSection(_Strict):
    """Random augmentation of training images (MONAI transforms); all zero means none."""

    rotate_degrees: float = Field(default=0.0, ge=0, le=180)
    scale_fraction: float = Field(default=0.0, ge=0, lt=1)
    translate_pixels: float = Field(default=0.0, ge=0)
    horizontal_flip_probability: float = Field(default=0.0, ge=0, le=1)


class ModelSection(_Strict):
    """The MONAI network and the preprocessing that is baked into the exported graph."""

    network: Literal["DenseNet", "DenseNet121", "ResNet"] = "DenseNet121"
    network_params: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the MONAI network."
    )
    network_input_size: int = Field(
        default=32, ge=32, description="Images are resized to this inside the model (MONAI >= 32)."
    )
    intensity_mean: float = Field(default=0.5, description="Applied after scaling to [0, 1].")
    intensity_std: float = Field(default=0.5, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)


class OptimisationSection(_Strict):
    """Optimiser, schedule and class-imbalance handling."""

    max_epochs: int = Field(default=10, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    class_weighting: Literal["none", "balanced"] = "balanced"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    limit_train_batches: int | None = Field(default=None, gt=0)


class EvaluationSection(_Strict):
    """How the operating point is chosen (on validation data only)."""

    sensitivity_target: float = Field(
        default=0.95, gt=0, le=1, description="Minimum validation sensitivity of the threshold."
    )


class RegistrationSection(_Strict):
    """Where the exported model goes in the registry."""

    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    intended_use: str = Field(min_length=1, description="Who may use the model, and for what.")
    limitations: list[str] = Field(default_factory=list)
    parity_tolerance: float = Field(
        default=1e-4, gt=0, description="Max abs difference of ONNX and PyTorch probabilities."
    )
    minimum_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Release gate: run metric name -> the least value a release may have.",
    )
    int8_max_auc_drop: float = Field(
        default=0.005, ge=0, description="An INT8 model may lose at most this much AUC."
    )


class Recipe(_Strict):
    """A complete, validated recipe for an image screening task."""

    kind: Literal["image-screening"] = "image-screening"
    name: str
    description: str = ""
    seed: int = 0
    experiment: str = Field(description="MLflow experiment name.")
    data: DataSection
    augmentation: AugmentationSection = Field(default_factory=AugmentationSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optimisation: OptimisationSection = Field(default_factory=OptimisationSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    registration: RegistrationSection

    def flat(self) -> dict[str, Any]:
        """Return the recipe as dotted keys, the form MLflow params take."""
        return _flatten(self.model_dump(mode="json"))


class EcgDataSection(_Strict):
    """Which WFDB records train and validate, split by record (never by beat)."""

    records_dir: Path | None = Field(
        default=None, description="Directory of WFDB records (else $MEDSCREEN_ECG_DIR)."
    )
    train_records: list[str] = Field(min_length=1)
    val_records: list[str] = Field(min_length=1)
    lead: str = "MLII"
    batch_size: int = Field(default=256, gt=0)
    max_normal_beats_per_record: int | None = Field(
        default=None,
        gt=0,
        description="Training only: keep at most this many N beats of each record (all others).",
    )

    @model_validator(mode="after")
    def _records_do_not_cross(self) -> EcgDataSection:
        shared = sorted(set(self.train_records) & set(self.val_records))
        if shared:
            raise ValueError(f"records {shared} are in both train_records and val_records")
        return self


class EcgModelSection(_Strict):
    """The 1D MONAI network on beat shape, joined with the beat's timing features."""

    init_features: int = Field(default=16, gt=0)
    growth_rate: int = Field(default=12, gt=0)
    block_config: list[int] = Field(default_factory=lambda: [3, 3, 3], min_length=1)
    embedding_features: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)


class EcgRecipe(_Strict):
    """A complete, validated recipe for ECG arrhythmia monitoring (AAMI beat classes)."""

    kind: Literal["ecg-monitoring"]
    name: str
    description: str = ""
    seed: int = 0
    experiment: str
    data: EcgDataSection
    model: EcgModelSection = Field(default_factory=EcgModelSection)
    optimisation: OptimisationSection = Field(default_factory=OptimisationSection)
    registration: RegistrationSection

    def flat(self) -> dict[str, Any]:
        """Return the recipe as dotted keys, the form MLflow params take."""
        return _flatten(self.model_dump(mode="json"))


AnyRecipe = Recipe | EcgRecipe


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: field '{field}': {message}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its path and a YAML-parsed value.

    Raises:
        RecipeError: if the text has no ``=`` or an empty key.
    """
    key, separator, raw_value = text.partition("=")
    if not separator or not key.strip():
        raise RecipeError(f"override {text!r}: expected KEY=VALUE with a dotted KEY")
    try:
        value = yaml.safe_load(raw_value) if raw_value else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise RecipeError(f"override {text!r}: the value is {problem}") from error
    return key.strip().split("."), value


def apply_overrides(
    tree: dict[str, Any], overrides: list[str], recipe_class: type[BaseModel] = Recipe
) -> dict[str, Any]:
    """Set each ``dotted.key=value`` in a recipe tree; the key must name a field of the recipe.

    Raises:
        RecipeError: if an override is malformed or names no field.
    """
    known = recipe_class.model_fields
    for text in overrides:
        path, value = parse_override(text)
        node, model_fields = tree, known
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            field = model_fields.get(part) if model_fields is not None else None
            if model_fields is not None and field is None:
                raise RecipeError(
                    f"override {text!r}: field '{'.'.join(path[: depth + 1])}' "
                    "is not a recipe field"
                )
            if last:
                node[part] = value
                break
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: '{'.'.join(path[: depth + 1])}' is a value")
            node = child
            annotation = field.annotation if field is not None else None
            is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            model_fields = annotation.model_fields if is_section else None
    return tree


def load_recipe(path: Path, overrides: list[str] | None = None) -> AnyRecipe:
    """Read, override and validate a recipe.

    Args:
        path: YAML recipe file.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: naming the file and field when anything is wrong.
    """
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as error:
        raise RecipeError(f"{path}: cannot read recipe ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of fields")
    recipe_class = EcgRecipe if tree.get("kind") == "ecg-monitoring" else Recipe
    tree = apply_overrides(tree, overrides or [], recipe_class)
    try:
        return recipe_class.model_validate(tree)
    except ValidationError as error:
        raise RecipeError(_describe(error, str(path))) from error
