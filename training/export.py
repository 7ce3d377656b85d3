"""Export stage: a run's best weights through the release gate to a registered ONNX version.

The release gate: the ONNX checker; parity of onnxruntime with PyTorch on the run's whole
validation split (max abs difference of probabilities, and identical decisions at the
threshold); and the minimum metrics the recipe states. A failed gate registers nothing and says
which check failed and by how much. Optionally, an INT8 copy is registered as its own version
when its validation AUC stays within the recipe's allowance of the float model's.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import torch
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from datasets.download import file_sha256
from training.card import (
    CARD_FILENAME,
    CARD_MARKDOWN_FILENAME,
    ChangelogEntry,
    GateCheck,
    InputSpec,
    ModelCard,
    OnnxArtifact,
    OperatingPoint,
    Provenance,
    TensorSpec,
    TrainingData,
)
from training.evaluation import (
    choose_threshold,
    is_positive,
    operating_point_metrics,
    positive_scores,
    release_metrics,
)
from training.models import ProbabilityModel, predict_probabilities
from training.runs import RunContext, RunError, load_run_context
from training.tracking import export_provenance, package_versions

ONNX_INPUT, ONNX_OUTPUT = "image", "probabilities"
REGISTRY_ARTIFACT_NAME = "onnx-model"
GATE_PASSED_TAG = "medscreen.release_gate"
# The service refuses a version whose files differ from these (serving.model's tags).
CARD_SHA256_TAG = "medscreen.card_sha256"
_CALIBRATION_IMAGES = 512


class ExportError(RunError):
    """The model could not be exported or failed a check; nothing was registered."""


@dataclass(frozen=True)
class ExportResult:
    """A registered model version."""

    model_name: str
    version: str
    card: ModelCard


def write_onnx(
    module: torch.nn.Module,
    examples: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[dict[int, torch.export.Dim], ...],
) -> None:
    """Export ``module`` with torch's dynamo exporter to one self-contained ONNX file."""
    # The exporter warns about every torchvision op it cannot register; none is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # torch's own pytree code, copied while tracing; nothing the caller can act on.
        warnings.filterwarnings(
            "ignore",
            message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            category=FutureWarning,
        )
        torch.onnx.export(
            module.eval(),
            examples,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def export_onnx(
    network: torch.nn.Module, image_shape: tuple[int, ...], path: Path, temperature: float = 1.0
) -> None:
    """Write the probability graph (uint8 images in, dynamic batch) to ``path``."""
    write_onnx(
        ProbabilityModel(network, temperature),
        (torch.zeros((2, *image_shape), dtype=torch.uint8),),
        path,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )


def onnx_probabilities(path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run an exported graph with onnxruntime on the CPU."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [
        session.run([ONNX_OUTPUT], {ONNX_INPUT: images[start : start + batch_size]})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches)


def check_onnx(path: Path) -> tuple[onnx.ModelProto, GateCheck]:
    """Load a graph and run the full ONNX checker (the gate's first check)."""
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(
            f"release gate failed: ONNX checker: {error}; nothing was registered"
        ) from error
    return model, GateCheck(check="onnx_checker", passed=True, detail="valid ONNX model")


def minimum_metric_checks(metrics: dict[str, float], minimums: dict[str, float]) -> list[GateCheck]:
    """Compare metrics with the recipe's minimums; a metric the run lacks fails its check."""
    checks = []
    for name, minimum in minimums.items():
        value = metrics.get(name)
        if value is None:
            checks.append(
                GateCheck(
                    check=f"minimum {name}", passed=False, detail=f"the run has no metric {name!r}"
                )
            )
        elif value >= minimum:
            checks.append(
                GateCheck(
                    check=f"minimum {name}", passed=True, detail=f"{value:.4f} >= {minimum:g}"
                )
            )
        else:
            checks.append(
                GateCheck(
                    check=f"minimum {name}",
                    passed=False,
                    detail=f"{value:.4f} < {minimum:g} (short by {minimum - value:.4f})",
                )
            )
    return checks


IMAGE_GATE_SPLITS = (("selected_val", "validation"), ("test", "test"))


def case_count_checks(
    metrics: dict[str, float], minimum: int, splits: tuple[tuple[str, str], ...] = IMAGE_GATE_SPLITS
) -> list[GateCheck]:
    """Check that the threshold and the metrics rest on enough cases of each kind.

    A metric from a handful of cases is not evidence: two test images give an AUC of 1.0 with
    an interval of 1.0 to 1.0.

    Args:
        metrics: Holds ``{prefix}_cases`` and ``{prefix}_positives`` for each split.
        minimum: The fewest positive and the fewest negative cases each split may hold.
        splits: (metric prefix, split name) pairs to check.
    """
    checks = []
    for prefix, split in splits:
        cases, positives = metrics.get(f"{prefix}_cases"), metrics.get(f"{prefix}_positives")
        if cases is None or positives is None:
            detail, passed = f"the run has no metric {prefix}_cases or {prefix}_positives", False
        else:
            negatives = cases - positives
            passed = min(positives, negatives) >= minimum
            detail = (
                f"{positives:.0f} positive and {negatives:.0f} negative case(s); at least "
                f"{minimum} of each {'held' if passed else 'needed'}"
            )
        checks.append(GateCheck(check=f"{split} cases", passed=passed, detail=detail))
    return checks


def enforce_gate(checks: list[GateCheck]) -> None:
    """Raise :class:`ExportError` naming every failed check; nothing is registered then."""
    failed = [check for check in checks if not check.passed]
    if failed:
        reasons = "; ".join(f"{check.check}: {check.detail}" for check in failed)
        raise ExportError(f"release gate failed: {reasons}; nothing was registered")


def utc_now() -> str:
    """The current UTC time, to the second, for changelogs."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def parity_checks(
    reference: np.ndarray,
    runtime: np.ndarray,
    positive_classes: tuple[int, ...],
    threshold: float,
    tolerance: float,
    *,
    cases: str,
    compare_classes: bool = False,
) -> tuple[float, list[GateCheck]]:
    """The gate's parity checks of onnxruntime's probabilities against the reference model's.

    Args:
        reference: Probabilities of the reference (PyTorch) model.
        runtime: Probabilities of the exported graph on the same inputs.
        positive_classes: Classes summed into the positive-finding score.
        threshold: Threshold on that score.
        tolerance: Largest allowed absolute difference of a probability.
        cases: What was compared, for the detail ("524 validation images").
        compare_classes: Also require the same most probable class (multi-class outputs).

    Returns:
        The largest absolute difference, and the checks of probabilities and of decisions.
    """
    difference = float(np.abs(reference - runtime).max())
    differing = int(
        (
            (positive_scores(reference, positive_classes) >= threshold)
            != (positive_scores(runtime, positive_classes) >= threshold)
        ).sum()
    )
    what = f"decisions at threshold {threshold:.6f}"
    if compare_classes:
        differing += int((reference.argmax(axis=1) != runtime.argmax(axis=1)).sum())
        what += " or most probable classes"
    return difference, [
        GateCheck(
            check="parity probabilities",
            passed=difference <= tolerance,
            detail=f"max abs difference {difference:.3g} on {cases} (tolerance {tolerance:g})",
        ),
        GateCheck(
            check="parity decisions",
            passed=differing == 0,
            detail=f"{differing} {what} differ on {cases}",
        ),
    ]


def _split_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, tuple]]:
    """Separate point metrics from ``*_ci_low``/``*_ci_high`` into intervals."""
    values, intervals = {}, {}
    for key, value in metrics.items():
        if not key.startswith(("selected_val_", "test_")):
            continue
        if key.endswith("_ci_low"):
            name = key.removesuffix("_ci_low")
            intervals[name] = (float(value), float(metrics[f"{name}_ci_high"]))
        elif not key.endswith("_ci_high"):
            values[key] = float(value)
    return values, intervals


def _build_card(
    context: RunContext,
    *,
    threshold: float,
    metrics: dict[str, float],
    onnx_artifact: OnnxArtifact,
    gate: list[GateCheck],
    change: str,
) -> ModelCard:
    spec, recipe, tags = context.spec, context.recipe, context.run.data.tags
    values, intervals = _split_metrics(metrics)
    return ModelCard(
        model_name=recipe.registration.model_name,
        task=spec.task,
        intended_use=recipe.registration.intended_use,
        limitations=recipe.registration.limitations,
        classes=list(spec.classes),
        positive_finding=spec.positive_finding,
        positive_classes=list(spec.positive_classes),
        input=InputSpec(
            name=ONNX_INPUT,
            dtype="uint8",
            shape=["batch", *spec.image_shape],
            value_range=(0, 255),
            description=(
                "Raw pixel values; scaling to [0, 1] "
                + (
                    "by each image's own minimum and maximum"
                    if recipe.model.intensity_scaling == "per_image"
                    else "by 255"
                )
                + ", normalisation and resizing to the network's "
                f"{recipe.model.network_input_size} px happen inside the graph. "
                + (
                    "Volumes are reoriented to the closest canonical RAS+ orientation, with "
                    "axes (depth, height, width) = (left to right, posterior to anterior, "
                    "inferior to superior), and each axis is resized to this shape by the "
                    "service (no crop)."
                    if len(spec.image_shape) == 4
                    else "Larger images are centre-cropped and resized to this shape by the "
                    "service."
                )
            ),
            modality=spec.modality,
            channels="grayscale" if spec.image_shape[0] == 1 else "RGB",
            height=spec.image_shape[-2],
            width=spec.image_shape[-1],
            depth=spec.image_shape[-3] if len(spec.image_shape) == 4 else None,
        ),
        output=TensorSpec(
            name=ONNX_OUTPUT,
            dtype="float32",
            shape=["batch", len(spec.classes)],
            value_range=(0, 1),
            description=f"Softmax probability of each class, in order {list(spec.classes)}.",
        ),
        operating_point=OperatingPoint(
            threshold=threshold,
            sensitivity_target=context.operating_point["sensitivity_target"],
            temperature=context.operating_point.get("temperature", 1.0),
        ),
        metrics=values,
        confidence_intervals=intervals,
        release_gate=gate,
        training_data=TrainingData(
            dataset=spec.name,
            url=spec.url,
            file_sha256=spec.sha256,
            licence=spec.licence,
            citation=spec.citation,
            split_fingerprints={
                name: split["fingerprint_sha256"]
                for name, split in context.lineage["splits"].items()
            },
            split_rows={name: split["rows"] for name, split in context.lineage["splits"].items()},
        ),
        provenance=Provenance(
            run_id=context.run.info.run_id,
            experiment_id=context.run.info.experiment_id,
            recipe=recipe.name,
            git_commit=tags.get("medscreen.git_commit", "unknown"),
            git_dirty=tags.get("medscreen.git_dirty", "unknown"),
            seed=recipe.seed,
            versions=package_versions(tags),
        ),
        onnx=onnx_artifact,
        changelog=[ChangelogEntry(date=utc_now(), change=change)],
    )


def image_signature(image_shape: tuple[int, ...], num_classes: int) -> ModelSignature:
    """The explicit MLflow signature of an image graph (uint8 inputs need one)."""
    return ModelSignature(
        inputs=Schema([MlflowTensorSpec(np.dtype(np.uint8), (-1, *image_shape), ONNX_INPUT)]),
        outputs=Schema([MlflowTensorSpec(np.dtype(np.float32), (-1, num_classes), ONNX_OUTPUT)]),
    )


def register_version(
    onnx_model: onnx.ModelProto,
    card: ModelCard,
    signature: ModelSignature,
    *,
    description: str,
    extra_tags: dict[str, str],
) -> ExportResult:
    """Log a graph, its card and signature to the card's run and register them as a version.

    The version carries the tags that serving and governance check (release gate passed,
    threshold, variant, ONNX SHA-256, run and training-data fingerprint).
    """
    client = MlflowClient()
    run = client.get_run(card.provenance.run_id)
    # Created in the training run's experiment: left to log_model, an MLFLOW_EXPERIMENT_NAME
    # or _ID in the environment would put the logged model in another experiment.
    logged_model = mlflow.initialize_logged_model(
        name=f"{REGISTRY_ARTIFACT_NAME}-{card.onnx.variant}",
        source_run_id=run.info.run_id,
        params=run.data.params,
        experiment_id=run.info.experiment_id,
    )
    with _failed_unless_registered(logged_model.model_id, card.model_name):
        return _log_and_register(
            client, logged_model, onnx_model, card, signature, description, extra_tags
        )


def _log_and_register(
    client: MlflowClient,
    logged_model: LoggedModel,
    onnx_model: onnx.ModelProto,
    card: ModelCard,
    signature: ModelSignature,
    description: str,
    extra_tags: dict[str, str],
) -> ExportResult:
    """:func:`register_version`'s steps, into a logged model already created."""
    run_id = card.provenance.run_id
    # Logged to the finished training run without reopening it: a reopened run is RUNNING until
    # closed (FAILED if an error closes it), so an interrupted export left it unusable.
    with tempfile.TemporaryDirectory() as card_dir:
        card_path = Path(card_dir) / CARD_FILENAME
        card_path.write_text(card.model_dump_json(indent=2))
        card_sha256 = file_sha256(card_path)
        markdown_path = Path(card_dir) / CARD_MARKDOWN_FILENAME
        markdown_path.write_text(card.to_markdown())
        model_info = mlflow.onnx.log_model(
            onnx_model,
            name=f"{REGISTRY_ARTIFACT_NAME}-{card.onnx.variant}",
            signature=signature,
            run_id=run_id,
            model_id=logged_model.model_id,
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
            extra_files=[str(card_path), str(markdown_path)],
            metadata={"medscreen_card_schema": card.card_schema, "medscreen_kind": card.kind},
        )
        # MLflow writes the graph again from the proto: register it only if those bytes are the
        # ones that passed the gate, or serving would refuse the version later.
        logged_graph = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{logged_model.artifact_location}/{card.onnx.filename}",
                dst_path=card_dir,
            )
        )
        if (logged_sha256 := file_sha256(logged_graph)) != card.onnx.sha256:
            raise ExportError(
                f"the logged {card.onnx.filename} (SHA-256 {logged_sha256}) is not the graph that "
                f"passed the gate (SHA-256 {card.onnx.sha256}); nothing was registered"
            )
        # One folder per export: a second export of the run must not replace the first's card.
        run_card_dir = f"card/{card.onnx.variant}/{model_info.model_id}"
        client.log_artifact(run_id, str(card_path), run_card_dir)
        client.log_artifact(run_id, str(markdown_path), run_card_dir)

    tags = {
        GATE_PASSED_TAG: "passed",
        "medscreen.kind": card.kind,
        "medscreen.threshold": f"{card.operating_point.threshold:.6f}",
        "medscreen.sensitivity_target": str(card.operating_point.sensitivity_target),
        "medscreen.positive_finding": card.positive_finding,
        "medscreen.card_schema": card.card_schema,
        "medscreen.variant": card.onnx.variant,
        "medscreen.onnx_sha256": card.onnx.sha256,
        CARD_SHA256_TAG: card_sha256,
        "medscreen.test_auc": f"{card.metrics.get('test_auc', float('nan')):.4f}",
        "medscreen.run_id": run_id,
        "medscreen.data.train.fingerprint": card.training_data.split_fingerprints["train"],
        **export_provenance(),
        **extra_tags,
    }
    try:
        client.create_registered_model(card.model_name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # One write: a version never exists without the tags that say it passed the gate.
    created = client.create_model_version(
        card.model_name,
        source=model_info.model_uri,
        run_id=run_id,
        tags=tags,
        description=description,
        model_id=model_info.model_id,
    )
    version = str(created.version)
    return ExportResult(model_name=card.model_name, version=version, card=card)


@contextlib.contextmanager
def _failed_unless_registered(model_id: str, model_name: str) -> Iterator[None]:
    """Mark a logged model FAILED if its version is not registered (an error, Ctrl-C, SIGTERM).

    Left alone, an interrupted export's logged model stayed PENDING for good in the run's
    experiment, a model that looks on its way to the registry but never arrives.
    """
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            # Cut after the registry's write (or a server that wrote but did not answer): the
            # version exists and serves from this logged model, which must not read FAILED.
            # (A version's model_id reads None from the sqlite store; its source names it.)
            versions = MlflowClient().search_model_versions(f"name='{model_name}'")
            if f"models:/{model_id}" not in {version.source for version in versions}:
                mlflow.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        raise


def _register(
    context: RunContext, onnx_model: onnx.ModelProto, card: ModelCard, extra_tags: dict[str, str]
) -> ExportResult:
    """Register an image model version of a training run."""
    return register_version(
        onnx_model,
        card,
        image_signature(context.spec.image_shape, len(context.spec.classes)),
        description=(
            f"{card.task} ({card.onnx.variant}); threshold {card.operating_point.threshold:.4f} "
            f"for sensitivity >= {card.operating_point.sensitivity_target:g} (validation); "
            f"test AUC {card.metrics.get('test_auc', float('nan')):.4f}; "
            f"run {card.provenance.run_id}"
        ),
        extra_tags=extra_tags,
    )


def export_and_register(run_id: str, *, data_dir: Path | None = None) -> ExportResult:
    """Export a training run's model to ONNX, pass it through the release gate, register it.

    Args:
        run_id: The MLflow run of ``medscreen train``.
        data_dir: Local directory with the dataset file (default: the recipe's).

    Returns:
        The registered model name, version and card.

    Raises:
        ExportError: naming each check that failed, and by how much.
    """
    context = load_run_context(run_id, data_dir)
    spec, recipe = context.spec, context.recipe
    network = context.network()
    val = context.split("val")
    threshold = float(context.operating_point["threshold"])
    temperature = float(context.operating_point.get("temperature", 1.0))

    with tempfile.TemporaryDirectory() as work_dir:
        onnx_path = Path(work_dir) / "model.onnx"
        export_onnx(network, spec.image_shape, onnx_path, temperature)
        onnx_model, checker = check_onnx(onnx_path)

        torch_probabilities = predict_probabilities(network, val.images, temperature)
        runtime_probabilities = onnx_probabilities(onnx_path, val.images)
        tolerance = recipe.registration.parity_tolerance
        difference, parity = parity_checks(
            torch_probabilities,
            runtime_probabilities,
            spec.positive_classes,
            threshold,
            tolerance,
            cases=f"{len(val)} validation images",
        )
        gate = [
            checker,
            *parity,
            *case_count_checks(
                context.run.data.metrics, recipe.registration.minimum_cases_per_class
            ),
            *minimum_metric_checks(context.run.data.metrics, recipe.registration.minimum_metrics),
        ]
        enforce_gate(gate)
        card = _build_card(
            context,
            threshold=threshold,
            metrics=context.operating_point["metrics"],
            onnx_artifact=OnnxArtifact(
                sha256=file_sha256(onnx_path),
                size_bytes=onnx_path.stat().st_size,
                opset=max(entry.version for entry in onnx_model.opset_import if not entry.domain),
                parity_max_abs_difference=difference,
                parity_tolerance=tolerance,
                parity_cases=len(val),
                parity_decisions_identical=True,
            ),
            gate=gate,
            change=f"Exported from run {run_id} (recipe {recipe.name}).",
        )
        return _register(context, onnx_model, card, {})


class _CalibrationImages(CalibrationDataReader):
    """Feeds training images to onnxruntime's static quantisation calibrator."""

    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter(
            [
                {ONNX_INPUT: images[start : start + batch_size]}
                for start in range(0, len(images), batch_size)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@contextlib.contextmanager
def _quiet_per_channel_warnings() -> Iterator[None]:
    """Onnxruntime warns on the root logger for each 1-D weight it keeps per-tensor."""
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()

    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantise_int8(float_path: Path, calibration_images: np.ndarray, output_path: Path) -> None:
    """Static INT8 quantisation (QDQ, per-channel weights) calibrated on training images.

    Only the compute-heavy operators are quantised: a quantised softmax would give the
    positive-finding probability a resolution of 1/255, too coarse for a threshold.
    """
    prepared = output_path.with_name("prepared.onnx")
    # onnxruntime's symbolic shape inference has no rule for the per-image ReduceMin/ReduceMax
    # of the preprocessing; ONNX's own shape inference (still run) handles them.
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    with _quiet_per_channel_warnings():
        quantize_static(
            str(prepared),
            str(output_path),
            _CalibrationImages(calibration_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
        )


def export_int8(float_result: ExportResult, *, data_dir: Path | None = None) -> ExportResult:
    """Quantise a registered float version and register the INT8 copy as its own version.

    The INT8 model is registered only if its validation AUC is within the recipe's
    ``int8_max_auc_drop`` of the float model's. Its threshold is chosen again on validation for
    the same sensitivity target; its test metrics must meet the recipe's minimums.

    Raises:
        ExportError: if quantisation fails or the INT8 model fails its gate.
    """
    context = load_run_context(float_result.card.provenance.run_id, data_dir)
    spec, recipe = context.spec, context.recipe
    train, val, test = context.split("train"), context.split("val"), context.split("test")
    positive = spec.positive_classes
    with tempfile.TemporaryDirectory() as work_dir:
        float_dir = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{float_result.model_name}/{float_result.version}",
                dst_path=str(Path(work_dir) / "float"),
            )
        )
        int8_path = Path(work_dir) / "model.onnx"
        rows = np.random.default_rng(recipe.seed).permutation(len(train))[:_CALIBRATION_IMAGES]
        quantise_int8(float_dir / "model.onnx", train.images[np.sort(rows)], int8_path)
        onnx_model, checker = check_onnx(int8_path)

        float_val = onnx_probabilities(float_dir / "model.onnx", val.images)
        int8_val = onnx_probabilities(int8_path, val.images)
        val_truth = is_positive(val.labels, positive)
        float_auc = operating_point_metrics(
            val_truth, positive_scores(float_val, positive), 0.5
        ).auc
        int8_scores = positive_scores(int8_val, positive)
        int8_auc = operating_point_metrics(val_truth, int8_scores, 0.5).auc
        allowance = recipe.registration.int8_max_auc_drop
        drop = float_auc - int8_auc
        auc_check = GateCheck(
            check="int8 validation AUC",
            passed=drop <= allowance,
            detail=f"{int8_auc:.4f} vs float {float_auc:.4f}: drop {drop:.4f} "
            f"(allowed {allowance:g})",
        )
        enforce_gate([checker, auc_check])

        target = recipe.evaluation.sensitivity_target
        threshold = choose_threshold(val_truth, int8_scores, target)
        # As the training run reports them, so that every gate metric the recipe names exists.
        metrics = release_metrics(
            val.labels,
            int8_val,
            test.labels,
            onnx_probabilities(int8_path, test.images),
            positive,
            threshold,
            seed=recipe.seed,
            sites=test.sites,
            groups=test.groups,
        )
        gate = [
            checker,
            auc_check,
            *case_count_checks(metrics, recipe.registration.minimum_cases_per_class),
            *minimum_metric_checks(metrics, recipe.registration.minimum_metrics),
        ]
        enforce_gate(gate)
        card = _build_card(
            context,
            threshold=threshold,
            metrics=metrics,
            onnx_artifact=OnnxArtifact(
                sha256=file_sha256(int8_path),
                size_bytes=int8_path.stat().st_size,
                opset=max(entry.version for entry in onnx_model.opset_import if not entry.domain),
                variant="int8",
                parity_reference=f"float32 ONNX model (version {float_result.version})",
                parity_max_abs_difference=float(np.abs(float_val - int8_val).max()),
                parity_tolerance=None,
                parity_cases=len(val),
                parity_decisions_identical=bool(
                    np.array_equal(
                        positive_scores(float_val, positive)
                        >= float_result.card.operating_point.threshold,
                        int8_scores >= float_result.card.operating_point.threshold,
                    )
                ),
            ),
            gate=gate,
            change=(
                f"INT8 static quantisation of version {float_result.version} "
                f"(run {context.run.info.run_id}); threshold chosen again on validation."
            ),
        )
        for key, value in {"int8_val_auc": int8_auc, "int8_val_auc_drop": drop}.items():
            MlflowClient().log_metric(context.run.info.run_id, key, value)
        return _register(
            context, onnx_model, card, {"medscreen.float_version": float_result.version}
        )
