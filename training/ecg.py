"""ECG arrhythmia monitoring: AAMI beat classes from beat shape and the patient's own rhythm.

A beat is judged against the patient, not against other patients: the network sees the beat,
its difference from the record's median beat, and its RR intervals relative to the record's
local and overall rhythm. Supraventricular (S) beats are told apart mostly by their timing.
Models are selected on validation records of DS1 only; DS2 is for evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from monai.networks import nets
from monai.utils import set_determinism
from pytorch_lightning.callbacks import ModelCheckpoint
from sklearn.metrics import confusion_matrix
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from datasets import DatasetError
from datasets.checksums import published_checksums
from datasets.ecg import (
    AAMI_CLASSES,
    NO_ANNOTATED_BEAT,
    SAMPLING_RATE_HZ,
    BeatSet,
    MissedBeats,
    checked_records,
    load_beats,
    load_detected_beats,
    published_checksum_summary,
    record_digest,
    record_file_digests,
    same_subject_pairs,
)
from training.evaluate import OVERLAP_CHECK_TAG
from training.models import LogitAverage, logits_per_member
from training.plots import confusion_figure, log_figures
from training.recipe import EcgModelSection, EcgRecipe
from training.runs import RunError, get_run, read_run_recipe
from training.tracking import configure_tracking, ensure_experiment, provenance
from training.train import (
    LINEAGE_ARTIFACT,
    RECIPE_ARTIFACT,
    WEIGHTS_ARTIFACT,
    EpochMetricsToMlflow,
    build_trainer,
    read_run_json,
)

logger = logging.getLogger(__name__)

ECG_DIR_ENV = "MEDSCREEN_ECG_DIR"
# Whether the records matched the checksum list published with them (PhysioNet's SHA256SUMS).
PUBLISHED_CHECKSUMS_TAG = "medscreen.data.published_checksums"
# Whether an evaluated record shares its subject with a record the run saw (MIT-BIH 201, 202).
SAME_SUBJECT_TAG = "medscreen.same_subject_check"
MAX_CLASS_WEIGHT = 50.0  # Q has 8 beats in DS1: an uncapped inverse frequency swamps the loss


class EcgBeatNetwork(nn.Module):
    """Beat, record template and RR intervals in; AAMI class logits out.

    Inputs are what the service can compute from a raw signal: high-passed windows in mV and RR
    intervals in seconds. Centring, the difference from the template and the RR ratios are
    computed here, inside the exported graph.
    """

    def __init__(self, section: EcgModelSection) -> None:
        super().__init__()
        self.morphology = nets.DenseNet(
            spatial_dims=1,
            in_channels=2,
            out_channels=section.embedding_features,
            init_features=section.init_features,
            growth_rate=section.growth_rate,
            block_config=tuple(section.block_config),
            dropout_prob=section.dropout,
        )
        self.head = nn.Sequential(
            nn.Linear(section.embedding_features + 4, 32),
            nn.ReLU(),
            nn.Dropout(section.dropout),
            nn.Linear(32, len(AAMI_CLASSES)),
        )

    def forward(
        self, beats: torch.Tensor, templates: torch.Tensor, rr: torch.Tensor
    ) -> torch.Tensor:
        """Return logits (N, 5) for beats and templates (N, 1, L) and RR seconds (N, 4)."""
        beats = beats - beats.mean(dim=2, keepdim=True)
        templates = templates - templates.mean(dim=2, keepdim=True)
        shape = torch.cat([beats, beats - templates], dim=1)
        previous, following, local, overall = rr.unbind(dim=1)
        timing = (
            torch.stack(
                [previous / local, following / previous, previous / overall, local / overall], dim=1
            )
            - 1.0
        )
        return self.head(torch.cat([self.morphology(shape), timing], dim=1))


# One beat network, or a deep ensemble of them (the mean of their logits).
EcgNetwork = EcgBeatNetwork | LogitAverage


def build_ecg_network(section: EcgModelSection) -> EcgNetwork:
    """The recipe's beat network, or a deep ensemble of ``section.ensemble_members`` of them."""
    # Built one after another, so each member draws its own initial weights.
    members = [EcgBeatNetwork(section) for _ in range(section.ensemble_members)]
    return members[0] if len(members) == 1 else LogitAverage(members)


def aami_report(
    truth: np.ndarray, predicted: np.ndarray, prefix: str, missed: np.ndarray | None = None
) -> dict[str, float]:
    """Sensitivity and positive predictivity of each AAMI class (EC57 style), and accuracy.

    Args:
        truth: AAMI class index per beat; :data:`NO_ANNOTATED_BEAT` for a detected beat that
            is no annotated beat (it counts against the predicted class's predictivity).
        predicted: Predicted class index per beat.
        prefix: Metric name prefix.
        missed: Annotated beats per class that were never detected (they count against
            sensitivity); none when the beats are the annotated ones.
    """
    missed = np.zeros(len(AAMI_CLASSES), dtype=np.int64) if missed is None else missed
    annotated = truth != NO_ANNOTATED_BEAT
    matrix = confusion_matrix(
        truth[annotated], predicted[annotated], labels=list(range(len(AAMI_CLASSES)))
    )
    extra_calls = np.bincount(predicted[~annotated], minlength=len(AAMI_CLASSES))
    report = {f"{prefix}_accuracy": float(np.trace(matrix) / max(matrix.sum() + missed.sum(), 1))}
    for index, name in enumerate(AAMI_CLASSES):
        true_positive = matrix[index, index]
        actual = matrix[index].sum() + missed[index]
        called = matrix[:, index].sum() + extra_calls[index]
        report[f"{prefix}_{name}_beats"] = float(actual)
        report[f"{prefix}_{name}_sensitivity"] = float(true_positive / actual) if actual else np.nan
        report[f"{prefix}_{name}_ppv"] = float(true_positive / called) if called else np.nan
    if missed.any() or not annotated.all():
        report[f"{prefix}_missed_beats"] = float(missed.sum())
        report[f"{prefix}_unannotated_detections"] = float((~annotated).sum())
    return report


def per_record_report(beats: BeatSet, predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """The AAMI report of each record: where a model fails, patient by patient."""
    return {
        str(record): aami_report(beats.labels[rows], predicted[rows], "record")
        for record in dict.fromkeys(beats.records.tolist())
        for rows in [beats.records == record]
    }


class BeatClassifier(pl.LightningModule):
    """Class-weighted cross-entropy on beats; validation reports S and V F1 for selection."""

    def __init__(
        self,
        network: EcgNetwork,
        learning_rate: float,
        weight_decay: float,
        max_epochs: int,
        class_weights: torch.Tensor | None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.network = network
        self.label_smoothing = label_smoothing
        self.learning_rate, self.weight_decay, self.max_epochs = (
            learning_rate,
            weight_decay,
            max_epochs,
        )
        self.register_buffer("class_weights", class_weights)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(
        self, beats: torch.Tensor, templates: torch.Tensor, rr: torch.Tensor
    ) -> torch.Tensor:
        """Return logits."""
        return self.network(beats, templates, rr)

    def training_step(self, batch: tuple[torch.Tensor, ...], _: int) -> torch.Tensor:
        """One optimisation step; an ensemble's loss is the mean of its members' own losses."""
        *inputs, labels = batch
        logits_of_members = logits_per_member(self.network, *inputs)
        loss = sum(
            functional.cross_entropy(
                logits,
                labels,
                weight=self.class_weights,
                label_smoothing=self.label_smoothing,
            )
            for logits in logits_of_members
        ) / len(logits_of_members)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], _: int) -> None:
        """Collect validation predictions."""
        *inputs, labels = batch
        logits = self(*inputs)
        self.log(
            "val_loss",
            functional.cross_entropy(logits, labels, weight=self.class_weights),
            on_epoch=True,
            prog_bar=True,
        )
        self._val_outputs.append((logits.argmax(dim=1), labels))

    def on_validation_epoch_end(self) -> None:
        """F1 of S and V beats on the validation records: the selection metric."""
        predicted = torch.cat([p for p, _ in self._val_outputs]).cpu().numpy()
        truth = torch.cat([t for _, t in self._val_outputs]).cpu().numpy()
        self._val_outputs.clear()
        report = aami_report(truth, predicted, "val")
        scores = []
        for name in ("S", "V"):
            sensitivity = np.nan_to_num(report[f"val_{name}_sensitivity"])
            ppv = np.nan_to_num(report[f"val_{name}_ppv"])
            scores.append(2 * sensitivity * ppv / (sensitivity + ppv) if sensitivity + ppv else 0)
        self.log("val_sv_f1", float(np.mean(scores)), prog_bar=True)

    def configure_optimizers(self) -> dict:
        """AdamW with cosine annealing."""
        optimiser = torch.optim.AdamW(
            self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=self.max_epochs)
        return {"optimizer": optimiser, "lr_scheduler": schedule}


def records_dir_of(recipe: EcgRecipe, override: Path | None = None) -> Path:
    """The directory of WFDB records: an override, the recipe's, or ``$MEDSCREEN_ECG_DIR``."""
    configured = override or recipe.data.records_dir or os.environ.get(ECG_DIR_ENV)
    if not configured:
        raise DatasetError(
            f"set data.records_dir or ${ECG_DIR_ENV} to a directory of WFDB records "
            "(`medscreen datasets fetch mitdb` downloads MIT-BIH's)"
        )
    return Path(configured)


def _limit_normal_beats(beats: BeatSet, limit: int | None, seed: int) -> BeatSet:
    """Keep every ectopic beat but at most ``limit`` normal (N) beats of each record."""
    if limit is None:
        return beats
    rng = np.random.default_rng(seed)
    keep = []
    for record in dict.fromkeys(beats.records.tolist()):
        rows = beats.records == record
        normal = np.flatnonzero(rows & (beats.labels == 0))
        keep.append(rng.permutation(normal)[:limit])
        keep.append(np.flatnonzero(rows & (beats.labels != 0)))
    return beats.subset(np.sort(np.concatenate(keep)))


# Timing of a synthetic supraventricular premature beat, relative to the local mean RR: the
# beat comes early, and the sinus node, reset by it, gives a roughly normal interval after it.
PREMATURE_PREVIOUS_RR = (0.55, 0.85)
PREMATURE_FOLLOWING_RR = (0.95, 1.25)


def with_synthetic_premature_beats(beats: BeatSet, per_record: int, seed: int) -> BeatSet:
    """Add copies of ``per_record`` N beats of each record with premature timing, labelled S.

    S beats differ from N beats mostly by timing, and the DS1 training records hold them mostly
    as runs of tachycardia in two patients; these copies show the network single premature
    beats in every training patient's own beat shape.
    """
    if per_record == 0:
        return beats
    rng = np.random.default_rng(seed)
    chosen = []
    for record in dict.fromkeys(beats.records.tolist()):
        normal = np.flatnonzero((beats.records == record) & (beats.labels == 0))
        chosen.append(rng.permutation(normal)[:per_record])
    copies = beats.subset(np.sort(np.concatenate(chosen)))
    rr = copies.rr_seconds.copy()
    local = rr[:, 2]
    rr[:, 0] = local * rng.uniform(*PREMATURE_PREVIOUS_RR, size=len(rr))
    rr[:, 1] = local * rng.uniform(*PREMATURE_FOLLOWING_RR, size=len(rr))
    supraventricular = np.full(len(copies), AAMI_CLASSES.index("S"), dtype=beats.labels.dtype)
    return beats.extended(dataclasses.replace(copies, rr_seconds=rr, labels=supraventricular))


def _tensors(beats: BeatSet) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(beats.windows),
        torch.from_numpy(beats.templates),
        torch.from_numpy(beats.rr_seconds),
        torch.from_numpy(beats.labels),
    )


@torch.no_grad()
def predict_beats(network: EcgNetwork, beats: BeatSet, batch_size: int = 2048) -> np.ndarray:
    """Class probabilities of each beat."""
    network.eval()
    outputs = [
        torch.softmax(network(windows, templates, rr), dim=1)
        for windows, templates, rr, _ in DataLoader(_tensors(beats), batch_size=batch_size)
    ]
    return torch.cat(outputs).numpy()


def _log_evaluation(beats: BeatSet, probabilities: np.ndarray, prefix: str) -> dict[str, float]:
    predicted = probabilities.argmax(axis=1)
    metrics = aami_report(beats.labels, predicted, prefix)
    mlflow.log_metrics({key: value for key, value in metrics.items() if np.isfinite(value)})
    mlflow.log_dict(per_record_report(beats, predicted), f"evaluation/{prefix}_per_record.json")
    log_figures(
        {
            f"plots/{prefix}_confusion.png": confusion_figure(
                beats.labels, predicted, list(AAMI_CLASSES), f"{prefix}: AAMI beat classes"
            )
        }
    )
    return metrics


def _log_served_evaluation(
    network: EcgNetwork, detected: tuple[BeatSet, MissedBeats], prefix: str
) -> dict[str, float]:
    """Log the AAMI report on beats found as the service finds them (``{prefix}_served_*``).

    Training and selection use the annotated beats; the service detects its beats, and cuts
    some (ventricular, mostly) elsewhere. This is what a hospital gets. ``detected`` is
    :func:`load_detected_beats`' answer, loaded before the run starts so that a record the
    detector cannot use is an error before training, not a failed run after it.
    """
    beats, missed = detected
    predicted = predict_beats(network, beats).argmax(axis=1)
    metrics = aami_report(beats.labels, predicted, f"{prefix}_served", missed.per_class())
    mlflow.log_metrics({key: value for key, value in metrics.items() if np.isfinite(value)})
    return metrics


@dataclass(frozen=True)
class EcgTrainingResult:
    """What an ECG training run produced."""

    run_id: str
    metrics: dict[str, float]


def train_ecg(recipe: EcgRecipe, *, show_progress: bool = True) -> EcgTrainingResult:
    """Train the beat classifier on the recipe's records and record everything in MLflow.

    Raises:
        DatasetError: naming a record that is missing or corrupt, before training starts.
    """
    configure_tracking()
    set_determinism(seed=recipe.seed)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    records_dir = records_dir_of(recipe)
    recorded = _limit_normal_beats(
        load_beats(records_dir, recipe.data.train_records, recipe.data.lead),
        recipe.data.max_normal_beats_per_record,
        recipe.seed,
    )
    train = with_synthetic_premature_beats(
        recorded, recipe.data.synthetic_premature_per_record, recipe.seed
    )
    val = load_beats(records_dir, recipe.data.val_records, recipe.data.lead)
    val_detected = load_detected_beats(records_dir, recipe.data.val_records, recipe.data.lead)
    counts = np.bincount(train.labels, minlength=len(AAMI_CLASSES))
    class_weights = None
    if recipe.optimisation.class_weighting == "balanced":
        weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
        class_weights = torch.tensor(np.minimum(weights, MAX_CLASS_WEIGHT), dtype=torch.float32)
    network = build_ecg_network(recipe.model)
    module = BeatClassifier(
        network,
        recipe.optimisation.learning_rate,
        recipe.optimisation.weight_decay,
        recipe.optimisation.max_epochs,
        class_weights,
        recipe.optimisation.label_smoothing,
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader = DataLoader(
        _tensors(train), batch_size=recipe.data.batch_size, shuffle=True, generator=generator
    )
    val_loader = DataLoader(_tensors(val), batch_size=2048)

    with mlflow.start_run(
        experiment_id=ensure_experiment(recipe.experiment), run_name=recipe.name
    ) as run:
        mlflow.set_tags(
            provenance()
            | {
                "medscreen.recipe": recipe.name,
                "medscreen.dataset": "mitdb",
                "medscreen.model_name": recipe.registration.model_name,
                "medscreen.seed": str(recipe.seed),
                "medscreen.data.train.fingerprint": train.fingerprint,
                "medscreen.data.val.fingerprint": val.fingerprint,
            }
        )
        mlflow.log_params(recipe.flat())
        mlflow.log_text(
            yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), RECIPE_ARTIFACT
        )
        mlflow.log_dict(
            {
                "database": "MIT-BIH Arrhythmia Database 1.0.0 (PhysioNet)",
                "sampling_rate_hz": SAMPLING_RATE_HZ,
                "lead": recipe.data.lead,
                "classes": list(AAMI_CLASSES),
                "train_records": recipe.data.train_records,
                "val_records": recipe.data.val_records,
                "train_beats_per_class": dict(
                    zip(
                        AAMI_CLASSES,
                        np.bincount(recorded.labels, minlength=len(AAMI_CLASSES)).tolist(),
                        strict=True,
                    )
                ),
                # Copies of recorded N beats given premature timing, trained on as S.
                "train_synthetic_premature_beats": len(train) - len(recorded),
                "fingerprints": {"train": train.fingerprint, "val": val.fingerprint},
                # Per file, as PhysioNet's SHA256SUMS lists them; evaluation refuses a renamed
                # copy of a record by its signal or annotation file.
                "record_files_sha256": record_file_digests(
                    records_dir, [*recipe.data.train_records, *recipe.data.val_records]
                ),
                "published_checksums": published_checksum_summary(
                    records_dir, [*recipe.data.train_records, *recipe.data.val_records]
                ),
            },
            LINEAGE_ARTIFACT,
        )
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            best = ModelCheckpoint(
                dirpath=checkpoint_dir, monitor="val_sv_f1", mode="max", save_top_k=1
            )
            trainer = build_trainer(
                recipe.optimisation,
                [best, EpochMetricsToMlflow(names=("train_loss", "val_loss", "val_sv_f1"))],
                show_progress=show_progress,
            )
            trainer.fit(module, train_loader, val_loader)
            state = torch.load(best.best_model_path, weights_only=True)["state_dict"]
            module.load_state_dict(state)
            # val_sv_f1 is a per-epoch curve; the selected checkpoint's value is its own metric.
            mlflow.log_metric("selected_val_sv_f1", float(best.best_model_score))
        metrics = _log_evaluation(val, predict_beats(network, val), "val")
        metrics |= _log_served_evaluation(network, val_detected, "val")
        with tempfile.TemporaryDirectory() as weights_dir:
            weights_path = Path(weights_dir) / Path(WEIGHTS_ARTIFACT).name
            torch.save(network.state_dict(), weights_path)
            mlflow.log_artifact(str(weights_path), str(Path(WEIGHTS_ARTIFACT).parent))
        return EcgTrainingResult(run_id=run.info.run_id, metrics=metrics)


def load_ecg_run(run_id: str) -> tuple[mlflow.entities.Run, EcgRecipe, EcgNetwork]:
    """An ECG training run, its recipe, and its network with the selected weights.

    Raises:
        RunError: if the run does not exist or is not an ECG run.
    """
    configure_tracking()
    run = get_run(run_id)
    tree = read_run_recipe(run_id)
    if tree.get("kind") != "ecg-monitoring":
        raise RunError(f"run {run_id} is not an ECG monitoring run")
    recipe = EcgRecipe.model_validate(tree)
    network = build_ecg_network(recipe.model)
    with tempfile.TemporaryDirectory() as download_dir:
        weights = mlflow.artifacts.download_artifacts(
            f"runs:/{run_id}/{WEIGHTS_ARTIFACT}", dst_path=download_dir
        )
        network.load_state_dict(torch.load(weights, weights_only=True))
    network.eval()
    return run, recipe, network


def _refuse_copies_of_seen_records(run_id: str, records_dir: Path, records: list[str]) -> str:
    """Refuse a record whose files are those of a record the run trained or selected on.

    Returns:
        What was checked, for the evaluation run's overlap tag.

    Raises:
        DatasetError: naming the record and the one it copies.
    """
    lineage = read_run_json(run_id, LINEAGE_ARTIFACT)
    # Signal and annotations, not the header: renaming a record means editing its header.
    seen = {
        digest: record
        for record, files in lineage.get("record_files_sha256", {}).items()
        for name, digest in files.items()
        if not name.endswith(".hea")
    }
    if not seen:
        # Runs of 2026-11-30 kept one digest over each record's three files.
        seen = {digest: record for record, digest in lineage.get("record_sha256", {}).items()}
        published = published_checksums(records_dir)
        copies = [
            (record, seen[digest])
            for record in records
            if (digest := record_digest(records_dir, record, published)) in seen
        ]
        if copies:
            record, original = copies[0]
            raise DatasetError(
                f"{records_dir / record}: the same files as record {original}, which run "
                f"{run_id} trained or selected on; evaluate on records it has never seen"
            )
        if seen:
            return "passed, whole records only: the run predates per-file digests"
        return "names only: the run predates per-record digests"
    for files in record_file_digests(records_dir, records).values():
        for name, digest in files.items():
            if digest in seen and not name.endswith(".hea"):
                raise DatasetError(
                    f"{records_dir / name}: the same file as in record {seen[digest]}, which "
                    f"run {run_id} trained or selected on; evaluate on records it has never seen"
                )
    return "passed: no record has a signal or annotation file of one the run trained or selected on"


def evaluate_ecg_records(run_id: str, records_dir: Path, records: list[str]) -> EcgTrainingResult:
    """Evaluate an ECG run's model on any records (DS2 elsewhere), as a linked MLflow run.

    Raises:
        RunError: if the run does not exist or is not an ECG run.
        DatasetError: naming a record that is missing or corrupt.
    """
    records = checked_records(records)
    run, recipe, network = load_ecg_run(run_id)
    seen = set(recipe.data.train_records) | set(recipe.data.val_records)
    if seen & set(records):
        raise DatasetError(
            f"records {sorted(seen & set(records))} were used to train or select "
            f"run {run_id}; evaluate on records it has never seen"
        )
    overlap_check = _refuse_copies_of_seen_records(run_id, records_dir, records)
    same_subject = "none of the records is from a subject of a record the run saw"
    if pairs := same_subject_pairs(records, sorted(seen)):
        # Not refused: the standard inter-patient split itself holds such a pair (201, 202).
        same_subject = "; ".join(
            f"record {record} is from the subject of record {other}, which the run trained or "
            "selected on"
            for record, other in pairs
        )
        logger.warning("evaluation of run %s: %s", run_id, same_subject)
    beats = load_beats(records_dir, records, recipe.data.lead)
    detected = load_detected_beats(records_dir, records, recipe.data.lead)
    with mlflow.start_run(
        experiment_id=run.info.experiment_id,
        run_name=f"evaluate {recipe.name} on {len(records)} records",
        tags={
            "mlflow.parentRunId": run_id,
            "medscreen.evaluates_run_id": run_id,
            "medscreen.data.eval.fingerprint": beats.fingerprint,
            PUBLISHED_CHECKSUMS_TAG: published_checksum_summary(records_dir, records),
            OVERLAP_CHECK_TAG: overlap_check,
            SAME_SUBJECT_TAG: same_subject,
            **provenance(),
        },
    ) as evaluation:
        mlflow.log_params({"records": ",".join(records), "lead": recipe.data.lead})
        metrics = _log_evaluation(beats, predict_beats(network, beats), "eval")
        metrics |= _log_served_evaluation(network, detected, "eval")
    return EcgTrainingResult(run_id=evaluation.info.run_id, metrics=metrics)
