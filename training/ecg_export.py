"""Export stage for ECG monitoring runs: beat graph → release gate → registered ONNX version.

The graph takes what the service computes from a raw single-lead signal with the shared code
in ``datasets.ecg`` and ``datasets.waveforms`` (high-passed beat windows in mV, the record's
median beat, RR intervals in seconds); centring, the difference from the template and the RR
ratios happen inside the graph. The alert threshold on the ectopic (S or V) probability is
chosen on the validation records for the recipe's sensitivity target.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec
from torch import nn

from datasets.download import file_sha256
from datasets.ecg import (
    AAMI_CLASSES,
    ECG_INPUTS,
    SAMPLING_RATE_HZ,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    BeatSet,
    load_beats,
    load_detected_beats,
)
from training.card import (
    ChangelogEntry,
    ModelCard,
    OnnxArtifact,
    OperatingPoint,
    Provenance,
    SignalSpec,
    TensorSpec,
    TrainingData,
)
from training.ecg import EcgNetwork, load_ecg_run, records_dir_of
from training.evaluation import (
    choose_threshold,
    is_positive,
    metric_intervals,
    operating_point_metrics,
    positive_scores,
)
from training.export import (
    ExportError,
    ExportResult,
    case_count_checks,
    check_onnx,
    enforce_gate,
    minimum_metric_checks,
    parity_checks,
    register_version,
    utc_now,
    write_onnx,
)
from training.tracking import package_versions
from training.train import LINEAGE_ARTIFACT, read_run_json

ECG_OUTPUT = "probabilities"
NEVER_ALERTED_SCORE = -1.0  # below any threshold: a beat the detector missed raises no alert
ECTOPIC_CLASSES = (AAMI_CLASSES.index("S"), AAMI_CLASSES.index("V"))
MITDB_URL = "https://physionet.org/content/mitdb/1.0.0/"
MITDB_LICENCE = "ODC-By 1.0"
MITDB_CITATION = (
    "Moody GB, Mark RG. The impact of the MIT-BIH Arrhythmia Database. IEEE Eng Med Biol "
    "20(3):45-50 (2001); Goldberger AL et al. PhysioBank, PhysioToolkit, and PhysioNet. "
    "Circulation 101(23):e215-e220 (2000)."
)
WINDOW = WINDOW_BEFORE + WINDOW_AFTER


class EcgProbabilityModel(nn.Module):
    """The beat network with a softmax: the graph that is exported."""

    def __init__(self, network: EcgNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(
        self, beats: torch.Tensor, templates: torch.Tensor, rr_seconds: torch.Tensor
    ) -> torch.Tensor:
        """Return AAMI class probabilities (N, 5)."""
        return torch.softmax(self.network(beats, templates, rr_seconds), dim=1)


def export_ecg_onnx(network: EcgNetwork, path: Path) -> None:
    """Write the probability graph (three float32 inputs, dynamic beat count) to ``path``."""
    examples = (
        torch.zeros((2, 1, WINDOW)),
        torch.zeros((2, 1, WINDOW)),
        torch.ones((2, 4)),
    )
    batch = torch.export.Dim("beats")
    write_onnx(
        EcgProbabilityModel(network),
        examples,
        path,
        input_names=list(ECG_INPUTS),
        output_names=[ECG_OUTPUT],
        dynamic_shapes=({0: batch}, {0: batch}, {0: batch}),
    )


def ecg_onnx_probabilities(path: Path, beats: BeatSet, batch_size: int = 2048) -> np.ndarray:
    """Run an exported ECG graph with onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = []
    for start in range(0, len(beats), batch_size):
        rows = slice(start, start + batch_size)
        feeds = dict(
            zip(
                ECG_INPUTS,
                (beats.windows[rows], beats.templates[rows], beats.rr_seconds[rows]),
                strict=True,
            )
        )
        outputs.append(session.run([ECG_OUTPUT], feeds)[0])
    return np.concatenate(outputs)


@torch.no_grad()
def _torch_probabilities(network: EcgNetwork, beats: BeatSet) -> np.ndarray:
    model = EcgProbabilityModel(network).eval()
    return model(
        torch.from_numpy(beats.windows),
        torch.from_numpy(beats.templates),
        torch.from_numpy(beats.rr_seconds),
    ).numpy()


def listing_sha256(files_sha256: dict[str, str]) -> str:
    """SHA-256 of a SHA256SUMS-format listing (``DIGEST NAME`` lines, sorted by name).

    PhysioNet publishes such a list for each database, so an auditor can rebuild this digest
    from its lines for the same files.
    """
    listing = "".join(f"{files_sha256[name]} {name}\n" for name in sorted(files_sha256))
    return hashlib.sha256(listing.encode()).hexdigest()


def _signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema(
            [
                MlflowTensorSpec(np.dtype(np.float32), (-1, 1, WINDOW), ECG_INPUTS[0]),
                MlflowTensorSpec(np.dtype(np.float32), (-1, 1, WINDOW), ECG_INPUTS[1]),
                MlflowTensorSpec(np.dtype(np.float32), (-1, 4), ECG_INPUTS[2]),
            ]
        ),
        outputs=Schema(
            [MlflowTensorSpec(np.dtype(np.float32), (-1, len(AAMI_CLASSES)), ECG_OUTPUT)]
        ),
    )


def _signal_spec(lead: str) -> SignalSpec:
    beat_shape: list[int | str] = ["beats", 1, WINDOW]
    return SignalSpec(
        sampling_rate_hz=SAMPLING_RATE_HZ,
        lead=lead,
        window_before_samples=WINDOW_BEFORE,
        window_after_samples=WINDOW_AFTER,
        preprocessing=(
            "The service resamples to the model's rate, removes baseline wander with a zero-phase "
            "0.5 Hz Butterworth high-pass, detects R peaks (wfdb GQRS), cuts a window around each "
            "peak and uses the median beat of the signal as the patient's template "
            "(datasets.ecg and datasets.waveforms, shared with training)."
        ),
        tensors=[
            TensorSpec(
                name=ECG_INPUTS[0],
                dtype="float32",
                shape=beat_shape,
                value_range=(-20, 20),
                description="High-passed beat windows in mV around each R peak.",
            ),
            TensorSpec(
                name=ECG_INPUTS[1],
                dtype="float32",
                shape=beat_shape,
                value_range=(-20, 20),
                description="The signal's median beat, repeated for each beat.",
            ),
            TensorSpec(
                name=ECG_INPUTS[2],
                dtype="float32",
                shape=["beats", 4],
                value_range=(0.05, 10),
                description="RR intervals in seconds: previous, next, mean of the previous 10, "
                "mean of the signal.",
            ),
        ],
    )


def export_ecg_and_register(run_id: str, *, records_dir: Path | None = None) -> ExportResult:
    """Export an ECG run to ONNX, pass it through the release gate and register it.

    Args:
        run_id: The MLflow run of ``medscreen train`` with an ``ecg-monitoring`` recipe.
        records_dir: Directory of WFDB records (default: the recipe's or ``$MEDSCREEN_ECG_DIR``).

    Returns:
        The registered model name, version and card.

    Raises:
        ExportError: naming each check that failed, and by how much.
        RunError: if the run is not an ECG run.
        DatasetError: if the validation records are missing or changed.
    """
    run, recipe, network = load_ecg_run(run_id)
    directory = records_dir_of(recipe, records_dir)
    val = load_beats(directory, recipe.data.val_records, recipe.data.lead)
    recorded = run.data.tags.get("medscreen.data.val.fingerprint")
    if recorded and recorded != val.fingerprint:
        raise ExportError(
            f"the validation records differ from those run {run_id} used "
            f"(fingerprint {val.fingerprint[:12]} vs {recorded[:12]}); nothing was registered"
        )
    # The threshold is chosen on the beats the service will see: found by its detector, which
    # cuts some (ventricular, mostly) elsewhere than the annotations that training used. A
    # detection of no annotated beat is a negative case; an annotated beat the detector missed
    # is a case never alerted on (scored below any threshold).
    served, missed = load_detected_beats(directory, recipe.data.val_records, recipe.data.lead)
    truth = np.concatenate(
        [is_positive(served.labels, ECTOPIC_CLASSES), is_positive(missed.labels, ECTOPIC_CLASSES)]
    )
    groups = np.concatenate([served.records, missed.records])
    with tempfile.TemporaryDirectory() as work_dir:
        onnx_path = Path(work_dir) / "model.onnx"
        export_ecg_onnx(network, onnx_path)
        onnx_model, checker = check_onnx(onnx_path)
        torch_probabilities = _torch_probabilities(network, val)
        runtime_probabilities = ecg_onnx_probabilities(onnx_path, val)
        scores = np.concatenate(
            [
                positive_scores(ecg_onnx_probabilities(onnx_path, served), ECTOPIC_CLASSES),
                np.full(len(missed.labels), NEVER_ALERTED_SCORE),
            ]
        )
        target = recipe.evaluation.sensitivity_target
        threshold = choose_threshold(truth, scores, target)
        if threshold < 0:
            raise ExportError(
                f"the beat detector misses so many ectopic validation beats that no threshold "
                f"reaches sensitivity {target:g}; nothing was registered"
            )
        difference, parity = parity_checks(
            torch_probabilities,
            runtime_probabilities,
            ECTOPIC_CLASSES,
            threshold,
            recipe.registration.parity_tolerance,
            cases=f"{len(val)} validation beats",
            compare_classes=True,
        )
        tolerance = recipe.registration.parity_tolerance
        counts = {"selected_val_cases": len(truth), "selected_val_positives": int(truth.sum())}
        gate = [
            checker,
            *parity,
            *case_count_checks(
                counts,
                recipe.registration.minimum_cases_per_class,
                splits=(("selected_val", "validation"),),
            ),
            *minimum_metric_checks(run.data.metrics, recipe.registration.minimum_metrics),
        ]
        enforce_gate(gate)
        metrics = {
            key: float(value)
            for key, value in run.data.metrics.items()
            # Per-epoch curves (loss, the selection score) hold their last epoch, not the
            # selected one; the selection score is recorded as selected_val_sv_f1.
            if np.isfinite(value)
            and (
                (key.startswith("val_") and key not in ("val_loss", "val_sv_f1"))
                or key == "selected_val_sv_f1"
            )
        }
        metrics |= operating_point_metrics(truth, scores, threshold).as_dict("selected_val")
        # Beats of one record (one patient) are not independent: resample records.
        intervals_flat = metric_intervals(
            truth, scores, threshold, "selected_val", recipe.seed, groups=groups
        )
        for counted in ("ci_resamples", "ppv_ci_resamples", "npv_ci_resamples"):
            metrics[f"selected_val_{counted}"] = intervals_flat[f"selected_val_{counted}"]
        intervals = {
            name.removesuffix("_ci_low"): (value, intervals_flat[f"{name[:-7]}_ci_high"])
            for name, value in intervals_flat.items()
            if name.endswith("_ci_low")
        }
        tags = run.data.tags
        lineage = read_run_json(run_id, LINEAGE_ARTIFACT)
        files_sha256 = {
            name: digest
            for files in lineage.get("record_files_sha256", {}).values()
            for name, digest in files.items()
        }
        card = ModelCard(
            kind="ecg-monitoring",
            model_name=recipe.registration.model_name,
            task="ECG arrhythmia monitoring: AAMI EC57 beat classes N, S, V, F, Q",
            intended_use=recipe.registration.intended_use,
            limitations=recipe.registration.limitations,
            classes=list(AAMI_CLASSES),
            positive_finding="ectopic beat (supraventricular S or ventricular V)",
            positive_classes=list(ECTOPIC_CLASSES),
            signal=_signal_spec(recipe.data.lead),
            output=TensorSpec(
                name=ECG_OUTPUT,
                dtype="float32",
                shape=["beats", len(AAMI_CLASSES)],
                value_range=(0, 1),
                description=f"Softmax probability of each AAMI class, in order {AAMI_CLASSES}.",
            ),
            operating_point=OperatingPoint(
                threshold=threshold,
                sensitivity_target=target,
                chosen_on="validation records, beats found by the service's detector",
                rule="a beat raises an ectopic alert when P(S) + P(V) >= threshold; "
                "its class is the most probable one",
            ),
            metrics=metrics,
            confidence_intervals=intervals,
            release_gate=gate,
            training_data=TrainingData(
                dataset="MIT-BIH Arrhythmia Database 1.0.0 (DS1)",
                url=MITDB_URL,
                file_sha256=(
                    listing_sha256(files_sha256)
                    if files_sha256
                    else tags.get("medscreen.data.train.fingerprint", "")  # runs before them
                ),
                files_sha256=files_sha256 or None,
                licence=MITDB_LICENCE,
                citation=MITDB_CITATION,
                split_fingerprints={
                    "train": tags.get("medscreen.data.train.fingerprint", ""),
                    "val": val.fingerprint,
                },
                split_rows={
                    "val": len(val),
                    "val_detected": len(served),
                    "val_missed_by_detector": len(missed.labels),
                },
            ),
            provenance=Provenance(
                run_id=run_id,
                experiment_id=run.info.experiment_id,
                recipe=recipe.name,
                git_commit=tags.get("medscreen.git_commit", "unknown"),
                git_dirty=tags.get("medscreen.git_dirty", "unknown"),
                seed=recipe.seed,
                versions=package_versions(tags),
            ),
            onnx=OnnxArtifact(
                sha256=file_sha256(onnx_path),
                size_bytes=onnx_path.stat().st_size,
                opset=max(entry.version for entry in onnx_model.opset_import if not entry.domain),
                parity_max_abs_difference=difference,
                parity_tolerance=tolerance,
                parity_cases=len(val),
                parity_decisions_identical=True,
            ),
            changelog=[
                ChangelogEntry(
                    date=utc_now(), change=f"Exported from run {run_id} (recipe {recipe.name})."
                )
            ],
        )
        return register_version(
            onnx_model,
            card,
            _signature(),
            description=(
                f"{card.task}; ectopic alert threshold {threshold:.4f} for sensitivity >= "
                f"{target:g} on the validation records' detected beats; run {run_id}"
            ),
            extra_tags={"medscreen.sampling_rate_hz": f"{SAMPLING_RATE_HZ}"},
        )
