"""Training recipes: YAML files validated with pydantic, with dotted-path overrides."""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# numpy's seeds (and so MONAI's set_determinism) take 0 to 2**32 - 1.
SEED_MAX = 2**32 - 1


class RecipeError(ValueError):
    """A recipe file or override is invalid. The message names the field."""


class _FieldError(ValueError):
    """A cross-field check failed; ``field`` is the dotted field, relative to the section."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_number(annotation: Any) -> bool:
    """Whether a field holds numbers only (``int``, ``float``, optional or annotated)."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_number(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return all(_is_number(arg) or arg is type(None) for arg in typing.get_args(annotation))
    return False


def _holds_numbers(annotation: Any) -> bool:
    """Whether a field holds numbers: itself, or each item of a list or tuple, or each value."""
    if _is_number(annotation):
        return True
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        return all(_is_number(argument) for argument in arguments if argument is not Ellipsis)
    if origin is dict:  # minimum_metrics: a gate of `false` would be 0, passing any model
        return _is_number(arguments[1])
    return False


def _holds_booleans(value: Any) -> bool:
    items = list(value.values()) if isinstance(value, dict) else value
    return isinstance(items, bool) or (
        isinstance(items, list | tuple) and any(isinstance(item, bool) for item in items)
    )


class _Strict(BaseModel):
    # Infinity passes a lower bound, and NaN any field without one (an intensity mean).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 and false as 0: `max_epochs: true` would train one epoch.
        if _holds_numbers(cls.model_fields[info.field_name].annotation) and _holds_booleans(value):
            raise ValueError("expected a number, not true or false")
        return value


DEFAULT_SPLIT_FRACTION = 0.15
# Image and ECG networks alike: copies of the network, averaged in the exported graph.
EnsembleMembers = Annotated[
    int,
    Field(
        ge=1,
        le=8,
        description=(
            "Copies of the network, each with its own initial weights, trained side by side on "
            "the same batches; the graph averages their logits (a deep ensemble)."
        ),
    ),
]


class ManifestTaskSection(_Strict):
    """What a manifest's images are for: what a catalogue entry says of a MedMNIST dataset."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        description="Name of the data in lineage and model cards, for example 'stmarys-cxr-2024'.",
    )
    task: str = Field(min_length=1, description="The screening task, in words.")
    modality: str = Field(min_length=1, description="Imaging modality, for example 'chest X-ray'.")
    image_shape: tuple[int, ...] = Field(
        description="Model input: [channels, height, width] (1 or 3 channels) or [1, D, H, W]."
    )
    classes: list[str] = Field(min_length=2, description="Class names, in output order.")
    positive_finding: str = Field(min_length=1, description="What a positive call means.")
    positive_classes: list[str] = Field(
        min_length=1, description="Names of the classes whose summed probability is the finding."
    )
    licence: str = Field(
        default="owned by the data provider; used under its data-use agreement", min_length=1
    )
    citation: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ManifestTaskSection:
        shape = self.image_shape
        if len(shape) not in (3, 4) or any(size < 1 for size in shape):
            raise _FieldError("image_shape", f"{list(shape)} is not [C, H, W] or [1, D, H, W]")
        if len(shape) == 3 and shape[0] not in (1, 3):
            raise _FieldError("image_shape", f"2D images have 1 or 3 channels, not {shape[0]}")
        if len(shape) == 4 and shape[0] != 1:
            raise _FieldError("image_shape", f"volumes have 1 channel, not {shape[0]}")
        # Manifest labels match class names case-insensitively, so names must differ that way.
        lowered = [name.strip().lower() for name in self.classes]
        if "" in lowered or len(set(lowered)) != len(lowered):
            raise _FieldError("classes", f"names must be distinct and non-empty: {self.classes}")
        unknown = [name for name in self.positive_classes if name.strip().lower() not in lowered]
        if unknown:
            raise _FieldError("positive_classes", f"{unknown} not in classes {self.classes}")
        if len({name.strip().lower() for name in self.positive_classes}) == len(self.classes):
            raise _FieldError("positive_classes", "at least one class must be negative")
        return self

    def positive_indices(self) -> tuple[int, ...]:
        """Indices of the positive classes, in class order."""
        positive = {name.strip().lower() for name in self.positive_classes}
        return tuple(
            index for index, name in enumerate(self.classes) if name.strip().lower() in positive
        )


class DataSection(_Strict):
    """Which data to train on: a catalogue dataset, or a hospital's CSV manifest."""

    dataset: str | None = Field(
        default=None, description="Catalogue name, for example 'pneumoniamnist'."
    )
    data_dir: Path | None = Field(
        default=None, description="Local directory with the official file (else cache/download)."
    )
    manifest: Path | None = Field(
        default=None,
        description="CSV of path,label[,patient_id][,site] instead of a catalogue dataset "
        "(relative to the working directory; recorded absolute).",
    )
    manifest_task: ManifestTaskSection | None = Field(
        default=None, description="Classes, finding and input shape of the manifest's task."
    )
    val_fraction: float | None = Field(
        default=None, gt=0, lt=1, description="Manifests: share of patients for validation."
    )
    test_fraction: float | None = Field(
        default=None, gt=0, lt=1, description="Manifests: share of patients for test."
    )
    max_train_samples: int | None = Field(default=None, gt=0)
    max_val_samples: int | None = Field(default=None, gt=0)
    max_test_samples: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=128, gt=0)
    num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if self.manifest is None:
            if self.dataset is None:
                raise _FieldError(
                    "dataset", "give a catalogue dataset, or data.manifest for your own images"
                )
            for name in ("manifest_task", "val_fraction", "test_fraction"):
                if getattr(self, name) is not None:
                    raise _FieldError(name, "only used with data.manifest")
            return self
        if self.dataset is not None:
            raise _FieldError("manifest", "give data.dataset or data.manifest, not both")
        if self.manifest_task is None:
            raise _FieldError("manifest_task", "required with data.manifest")
        # The manifest is the data: catalogue download and subsampling do not apply.
        for name in ("data_dir", "max_train_samples", "max_val_samples", "max_test_samples"):
            if getattr(self, name) is not None:
                raise _FieldError(name, "not used with data.manifest")
        self.val_fraction = self.val_fraction or DEFAULT_SPLIT_FRACTION
        self.test_fraction = self.test_fraction or DEFAULT_SPLIT_FRACTION
        if self.val_fraction + self.test_fraction >= 1:
            raise _FieldError(
                "test_fraction", "val_fraction + test_fraction must be below 1 (train needs some)"
            )
        # Recorded absolute, so export and evaluation find the same file from anywhere.
        self.manifest = self.manifest.expanduser().resolve()
        return self


class AugmentationSection(_Strict):
    """Random augmentation of training images (MONAI transforms); all zero means none."""

    rotate_degrees: float = Field(default=0.0, ge=0, le=180)
    scale_fraction: float = Field(default=0.0, ge=0, lt=1)
    translate_pixels: float = Field(default=0.0, ge=0)
    horizontal_flip_probability: float = Field(default=0.0, ge=0, le=1)


# Arguments that ``training.models.build_network`` passes to each MONAI constructor itself;
# giving one in ``model.network_params`` as well would be a duplicate keyword argument.
_SET_BY_MEDSCREEN: dict[str, dict[str, str]] = {
    "DenseNet": {
        "spatial_dims": "the data",
        "in_channels": "the data",
        "out_channels": "the data",
        "dropout_prob": "model.dropout",
    },
    "ResNet": {
        "spatial_dims": "the data",
        "n_input_channels": "the data",
        "num_classes": "the data",
    },
}
_SET_BY_MEDSCREEN["DenseNet121"] = _SET_BY_MEDSCREEN["DenseNet"]


@functools.cache
def _network_parameters(network: str) -> frozenset[str]:
    """Keyword arguments the MONAI constructor of ``network`` takes, following ``**kwargs``.

    MONAI (and with it torch) is imported only here, when a recipe gives network_params.
    """
    from monai.networks import nets

    names: set[str] = set()
    for cls in getattr(nets, network).__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        names.update(
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
        # DenseNet121(**kwargs) hands the rest to DenseNet.__init__: read that one too.
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return frozenset(names)


class ModelSection(_Strict):
    """The MONAI network and the preprocessing that is baked into the exported graph."""

    network: Literal["DenseNet", "DenseNet121", "ResNet"] = "DenseNet121"
    network_params: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the MONAI network."
    )
    network_input_size: int = Field(
        default=32, ge=32, description="Images are resized to this inside the model (MONAI >= 32)."
    )
    intensity_scaling: Literal["per_image", "fixed"] = Field(
        default="per_image",
        description=(
            "How the graph maps pixel values to [0, 1]. per_image: each image's own minimum "
            "and maximum (as MONAI's ScaleIntensity), so the same picture scores the same at "
            "any bit depth or contrast stretch; fixed: value / 255 (runs logged without this "
            "field were trained this way)."
        ),
    )
    intensity_mean: float = Field(default=0.5, description="Applied after scaling to [0, 1].")
    intensity_std: float = Field(default=0.5, gt=0)
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout of the DenseNet networks (MONAI's ResNet has none).",
    )
    ensemble_members: EnsembleMembers = 1

    @model_validator(mode="after")
    def _dropout_only_where_used(self) -> ModelSection:
        if self.network == "ResNet" and self.dropout > 0:
            raise ValueError(
                "model.dropout applies to DenseNet networks only; MONAI's ResNet has none"
            )
        return self

    def check_network_params(self) -> None:
        """Refuse network_params the MONAI constructor does not take, or medscreen sets itself.

        Raises:
            _FieldError: naming ``network_params.KEY``.
        """
        if not self.network_params:
            return
        set_by_medscreen = _SET_BY_MEDSCREEN[self.network]
        accepted = sorted(_network_parameters(self.network) - set_by_medscreen.keys())
        for key in self.network_params:
            if key in set_by_medscreen:
                raise _FieldError(
                    f"network_params.{key}", f"set by medscreen from {set_by_medscreen[key]}"
                )
            if key not in accepted:
                raise _FieldError(
                    f"network_params.{key}",
                    f"not a parameter of MONAI's {self.network}; accepted: {', '.join(accepted)}",
                )


class OptimisationSection(_Strict):
    """Optimiser, schedule and class-imbalance handling."""

    max_epochs: int = Field(default=10, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    class_weighting: Literal["none", "balanced"] = "balanced"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    mixup_alpha: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description=(
            "Mixup (Zhang et al. 2018; MONAI's MixUp): train on convex combinations of pairs "
            "of the batch's images and of their labels, weights drawn from Beta(alpha, alpha). "
            "0 turns it off."
        ),
    )
    limit_train_batches: int | None = Field(default=None, gt=0)
    channels_last: bool = Field(
        default=False,
        description=(
            "Train with the weights in channels-last memory layout: faster convolutions on "
            "the CPU, but other float rounding, so a run's figures differ from the default "
            "layout's. The exported graph is unaffected."
        ),
    )


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
    minimum_cases_per_class: int = Field(
        default=10,
        ge=1,
        description=(
            "Release gate: the fewest positive and the fewest negative cases that the validation "
            "split (the threshold) and the test split (the metrics) may each hold."
        ),
    )


# Release-gate metrics: the run metrics of which a higher value is better, by recipe kind.
# tests/test_recipe.py checks these against what the evaluation code really logs.
_RATES = r"(auc|sensitivity|specificity|ppv|npv)"
_IMAGE_GATE_METRIC = re.compile(
    rf"selected_val_(accuracy_at_threshold|cases|positives|{_RATES})"
    rf"|test(_site_[A-Za-z0-9_-]+)?_(accuracy_at_threshold|cases|positives|{_RATES}"
    rf"|{_RATES}_ci_(low|high))|(val|test)_accuracy|test_multiclass_auc"
)
_ECG_GATE_METRIC = re.compile(
    r"val(_served)?_([NSVFQ]_(sensitivity|ppv|beats)|accuracy)|selected_val_sv_f1"
)
_GATE_METRIC_EXAMPLES = {
    "image-screening": "test_auc, test_sensitivity, test_specificity_ci_low, selected_val_ppv",
    "ecg-monitoring": "val_V_sensitivity, val_S_ppv, val_served_V_ppv, selected_val_sv_f1",
}


def _check_gate_metrics(kind: str, minimums: dict[str, float]) -> None:
    """Refuse a release-gate metric that runs of this kind never log (a typo, say)."""
    grammar = _IMAGE_GATE_METRIC if kind == "image-screening" else _ECG_GATE_METRIC
    for name in minimums:
        if not grammar.fullmatch(name):
            raise _FieldError(
                f"registration.minimum_metrics.{name}",
                f"not a metric that {kind} runs log with higher being better; "
                f"for example {_GATE_METRIC_EXAMPLES[kind]}",
            )


class Recipe(_Strict):
    """A complete, validated recipe for an image screening task."""

    kind: Literal["image-screening"] = "image-screening"
    name: str
    description: str = ""
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Seeds every random choice.")
    experiment: str = Field(
        min_length=1, max_length=500, pattern=r"\S", description="MLflow experiment name."
    )
    data: DataSection
    augmentation: AugmentationSection = Field(default_factory=AugmentationSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optimisation: OptimisationSection = Field(default_factory=OptimisationSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    registration: RegistrationSection

    @model_validator(mode="after")
    def _network_params_are_arguments(self) -> Recipe:
        # Here, not on ModelSection: a model validator runs only once every field is valid, so
        # MONAI (seconds to import) is imported only for a recipe that is otherwise good.
        try:
            self.model.check_network_params()
        except _FieldError as error:
            raise _FieldError(f"model.{error.field}", str(error)) from None
        return self

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
    synthetic_premature_per_record: int = Field(
        default=0,
        ge=0,
        description=(
            "Training only: copies of this many N beats of each record, given premature timing "
            "and labelled S (supraventricular ectopic: normal shape, early)."
        ),
    )

    @field_validator("train_records", "val_records")
    @classmethod
    def _record_names(cls, records: list[str]) -> list[str]:
        from datasets.ecg import check_record_names  # scipy: only ECG recipes pay its import

        return check_record_names(records)

    @model_validator(mode="after")
    def _records_do_not_cross(self) -> EcgDataSection:
        shared = sorted(set(self.train_records) & set(self.val_records))
        if shared:
            raise ValueError(f"records {shared} are in both train_records and val_records")
        from datasets.ecg import same_subject_pairs

        if pairs := same_subject_pairs(self.val_records, self.train_records):
            held_out, trained = pairs[0]
            raise ValueError(
                f"record {held_out} (val_records) and record {trained} (train_records) are one "
                "subject's: keep a subject's records on one side of the split"
            )
        return self


class EcgModelSection(_Strict):
    """The 1D MONAI network on beat shape, joined with the beat's timing features."""

    init_features: int = Field(default=16, gt=0)
    growth_rate: int = Field(default=12, gt=0)
    block_config: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [3, 3, 3], min_length=1, description="Layers of each dense block."
    )
    embedding_features: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    ensemble_members: EnsembleMembers = 1


class EcgRecipe(_Strict):
    """A complete, validated recipe for ECG arrhythmia monitoring (AAMI beat classes)."""

    kind: Literal["ecg-monitoring"]
    name: str
    description: str = ""
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Seeds every random choice.")
    experiment: str = Field(
        min_length=1, max_length=500, pattern=r"\S", description="MLflow experiment name."
    )
    data: EcgDataSection
    model: EcgModelSection = Field(default_factory=EcgModelSection)
    optimisation: OptimisationSection = Field(default_factory=OptimisationSection)
    # The ectopic-beat (S or V) alert threshold is chosen on the validation records.
    evaluation: EvaluationSection = Field(
        default_factory=lambda: EvaluationSection(sensitivity_target=0.9)
    )
    registration: RegistrationSection

    @model_validator(mode="after")
    def _no_image_only_options(self) -> EcgRecipe:
        # Refused rather than ignored: the run's params would claim a training it did not have.
        if self.optimisation.mixup_alpha > 0:
            raise _FieldError("optimisation.mixup_alpha", "image recipes only; set it to 0")
        if self.optimisation.channels_last:
            raise _FieldError(
                "optimisation.channels_last",
                "image recipes only (the beat network's convolutions are 1D); set it to false",
            )
        return self

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
    location = [str(part) for part in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        location.append(cause.field)
        message = str(cause)
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    else:
        message = first["msg"].removeprefix("Value error, ")
    field = ".".join(location) or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: field '{field}': {message}{more}"


def _source_of(error: ValidationError, path: str, overrides: list[str]) -> str:
    """The override that set the first failing field (or one of its sections), else the file."""
    location = [str(part) for part in error.errors()[0]["loc"]]
    for text in reversed(overrides):  # the last override of a field is the one that counts
        key = text.partition("=")[0].strip().split(".")
        if location and (location[: len(key)] == key or key[: len(location)] == location):
            return f"override {text!r}"
    return path


def _line_and_column(text: str | bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset`` in ``text``."""
    newline = "\n" if isinstance(text, str) else b"\n"
    start = text.rfind(newline, 0, offset) + 1
    return text.count(newline, 0, offset) + 1, offset - start + 1


def _describe_yaml(error: yaml.YAMLError, path: Path, text: str) -> str:
    """``file:line:col: not valid YAML: problem``, on one line."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}"
        problem = error.problem or error.context or "not valid YAML"
    elif isinstance(error, yaml.reader.ReaderError):
        line, column = _line_and_column(text, error.position)
        where = f"{path}:{line}:{column}"
        code = error.character if isinstance(error.character, int) else ord(error.character)
        problem = f"character {code:#06x}: {error.reason}"
    else:
        where, problem = str(path), "not valid YAML"
    return f"{where}: not valid YAML: {' '.join(str(problem).split())}"


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last of duplicate keys silently: a recipe trained on a value that its
    reader, reading from the top, did not see.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> Any:
    """Parse recipe YAML with :class:`_RecipeLoader`.

    Raises:
        yaml.YAMLError: if the text is not valid YAML or repeats a key.
        RecursionError: if it nests deeper than Python's recursion limit.
    """
    return yaml.load(text, Loader=_RecipeLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its path and a YAML-parsed value.

    Raises:
        RecipeError: if the text has no ``=`` or an empty key.
    """
    key, separator, raw_value = text.partition("=")
    if not separator or not key.strip():
        raise RecipeError(f"override {text!r}: expected KEY=VALUE with a dotted KEY")
    try:
        value = _parse_yaml(raw_value) if raw_value else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise RecipeError(f"override {text!r}: the value is {problem}") from error
    except RecursionError:
        raise RecipeError(f"override {text[:80]!r}...: the value is nested too deeply") from None
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
            section = _section_class(field.annotation) if field is not None else None
            model_fields = section.model_fields if section is not None else None
    return tree


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The recipe section a field holds, also when it is optional (``Section | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        sections = [arg for arg in typing.get_args(annotation) if _section_class(arg)]
        return sections[0] if len(sections) == 1 else None
    return None


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
        data = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read recipe ({error.strerror})") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line, column = _line_and_column(data, error.start)
        raise RecipeError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
            "save the recipe as UTF-8"
        ) from error
    try:
        tree = _parse_yaml(text)
    except yaml.YAMLError as error:
        raise RecipeError(_describe_yaml(error, path, text)) from error
    except RecursionError:
        raise RecipeError(f"{path}: not valid YAML: nested too deeply for a recipe") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of fields")
    recipe_class = EcgRecipe if tree.get("kind") == "ecg-monitoring" else Recipe
    overrides = overrides or []
    tree = apply_overrides(tree, overrides, recipe_class)
    try:
        recipe = recipe_class.model_validate(tree)
    except ValidationError as error:
        raise RecipeError(_describe(error, _source_of(error, str(path), overrides))) from error
    except RecursionError:
        raise RecipeError(f"{path}: a field is nested too deeply for a recipe") from None
    # Here, not in the model: the recipe a run logged is read as it was trained, so that runs
    # from before this check can still be exported and evaluated.
    try:
        _check_gate_metrics(recipe.kind, recipe.registration.minimum_metrics)
    except _FieldError as error:
        raise RecipeError(f"{path}: field '{error.field}': {error}") from error
    return recipe
