"""Experiment: do weight averaging, flip averaging or a training change help an image recipe?

One training run per seed yields every variant: the recipe's own weights (checkpoint chosen by
validation AUC, exactly as ``medscreen train`` chooses it) and, beside them, exponential moving
averages (EMA) of the weights over a horizon of 1 and 3 epochs, each with its own checkpoint
chosen by the same rule. An EMA only reads the weights, so the recipe's own trajectory is the
plain recipe's, to the last digit. For a recipe that trains with horizontal flips, the recipe's
weights are also scored on each image and its mirror image, logits averaged ("flip-averaged").
For a deep ensemble (``--set model.ensemble_members=2``), each member is also scored alone, at
the ensemble's checkpoint. A training change such as mixup (``--set
optimisation.mixup_alpha=0.2 --no-moving-averages``) is compared with the recipe's own figures
for the same seeds, measured by a run without the ``--set``.

Only validation data is used. The rule, fixed before the runs: a variant replaces the recipe's
weights if its validation log loss after temperature scaling (what the service returns) is lower
for every seed, and its validation AUC is no lower on average. The test split is reported once,
by ``benchmarks/image_tasks.py``, for the recipe that this chooses.

Usage:
    python benchmarks/recipe_variants.py --recipe training/recipes/pneumonia-full.yaml \
        --seeds 0,1 --data-dir ../shared/datasets/medmnist
    python benchmarks/recipe_variants.py --recipe training/recipes/breast-full.yaml \
        --seeds 0,1 --set optimisation.mixup_alpha=0.2 --no-moving-averages
    python benchmarks/recipe_variants.py --recipe training/recipes/pneumonia-full.yaml \
        --seeds 0,1 --set model.ensemble_members=2 --set optimisation.max_epochs=12 \
        --no-moving-averages
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import pytorch_lightning as pl
import torch
import typer
from pytorch_lightning.callbacks import ModelCheckpoint
from rich.console import Console
from rich.table import Table
from scipy.special import log_softmax
from sklearn.metrics import roc_auc_score
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from training import load_recipe
from training.data import ScreeningDataModule
from training.evaluation import (
    calibrated_probabilities,
    fit_temperature,
    is_positive,
    positive_scores,
)
from training.lit_models import ScreeningClassifier
from training.models import LogitAverage, ScreeningNetwork, predict_logits
from training.train import build_trainer, seeded_classifier

HORIZONS_EPOCHS = (1, 3)


def _auc(logits: np.ndarray, truth: np.ndarray, positive: tuple[int, ...]) -> float:
    """AUC of the positive finding's probability, as ``medscreen train`` scores validation."""
    scores = positive_scores(calibrated_probabilities(logits, 1.0), positive)
    return float(roc_auc_score(truth, scores))


class Variants(pl.Callback):
    """Keeps each variant's best-by-validation-AUC weights; EMAs update after every step."""

    def __init__(
        self, datamodule: ScreeningDataModule, steps_per_epoch: int, *, moving_averages: bool
    ) -> None:
        super().__init__()
        self.moving_averages = moving_averages
        self.val = datamodule.splits["val"]
        self.positive = datamodule.spec.positive_classes
        self.truth = is_positive(self.val.labels, self.positive)
        self.steps_per_epoch = steps_per_epoch
        self.averages: dict[str, AveragedModel] = {}
        self.best: dict[str, tuple[float, int, dict]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: ScreeningClassifier) -> None:
        for horizon in HORIZONS_EPOCHS if self.moving_averages else ():
            decay = 1.0 - 1.0 / (horizon * self.steps_per_epoch)
            self.averages[f"ema {horizon} epoch"] = AveragedModel(
                pl_module.network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: ScreeningClassifier, *_: object
    ) -> None:
        for average in self.averages.values():
            average.update_parameters(pl_module.network)

    def _keep(self, name: str, auc: float, epoch: int, network: torch.nn.Module) -> None:
        # Strictly better only, as ModelCheckpoint(mode="max") keeps the first best epoch.
        if name not in self.best or auc > self.best[name][0]:
            self.best[name] = (auc, epoch, copy.deepcopy(network.state_dict()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: ScreeningClassifier) -> None:
        epoch = trainer.current_epoch
        self._keep("recipe", float(trainer.callback_metrics["val_auc"]), epoch, pl_module.network)
        for name, average in self.averages.items():
            logits = predict_logits(average.module, self.val.images)
            auc = _auc(logits, self.truth, self.positive)
            self._keep(name, auc, epoch, average.module)


def _validation_figures(
    network: ScreeningNetwork, datamodule: ScreeningDataModule, *, flip_average: bool = False
) -> dict:
    val = datamodule.splits["val"]
    positive = datamodule.spec.positive_classes
    logits = predict_logits(network, val.images)
    if flip_average:  # the last axis is the width, as the recipe's RandFlip flips it
        logits = (logits + predict_logits(network, np.flip(val.images, axis=-1).copy())) / 2
    temperature = fit_temperature(logits, val.labels)
    rows = np.arange(len(val.labels))

    def log_loss(scale: float) -> float:
        return float(-np.mean(log_softmax(logits / scale, axis=1)[rows, val.labels]))

    return {
        "val_auc": _auc(logits, is_positive(val.labels, positive), positive),
        "val_accuracy": float(np.mean(logits.argmax(axis=1) == val.labels)),
        "val_log_loss": log_loss(1.0),
        "val_log_loss_calibrated": log_loss(temperature),
        "temperature": temperature,
    }


def run_seed(
    recipe_path: Path, seed: int, overrides: list[str], *, moving_averages: bool
) -> dict[str, dict]:
    """Train the recipe once with this seed; return each variant's validation figures."""
    recipe = load_recipe(recipe_path, [*overrides, f"seed={seed}"])
    datamodule, module = seeded_classifier(recipe)
    network = module.network
    variants = Variants(
        datamodule, len(datamodule.train_dataloader()), moving_averages=moving_averages
    )
    with tempfile.TemporaryDirectory() as unused:
        # Variants keeps the weights; this only stops Lightning's default checkpoint files.
        no_files = ModelCheckpoint(dirpath=unused, save_top_k=0)
        trainer = build_trainer(recipe.optimisation, [variants, no_files], show_progress=False)
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        minutes = (time.perf_counter() - started) / 60
    results = {}
    for name, (auc, epoch, state) in variants.best.items():
        network.load_state_dict(state)
        about = {"best_epoch": epoch, "best_val_auc_during_training": auc, "minutes": minutes}
        results[name] = _validation_figures(network, datamodule) | about
        if name == "recipe" and recipe.augmentation.horizontal_flip_probability:
            results["recipe, flip-averaged"] = (
                _validation_figures(network, datamodule, flip_average=True) | about
            )
        if name == "recipe" and isinstance(network.backbone, LogitAverage):
            # Each member alone, at the ensemble's checkpoint: what averaging adds.
            for index, member in enumerate(network.backbone.members):
                alone = ScreeningNetwork(
                    member,
                    network.spatial_dims,
                    network.network_input_size,
                    float(network.intensity_mean),
                    float(network.intensity_std),
                    per_image_scaling=network.per_image_scaling,
                )
                results[f"member {index} alone"] = _validation_figures(alone, datamodule) | about
    return results


def main(
    recipe: Annotated[Path, typer.Option(help="Image recipe to try.")],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1",
    data_dir: Annotated[Path | None, typer.Option(help="Local MedMNIST directory.")] = None,
    output: Annotated[Path | None, typer.Option(help="Where to write the JSON results.")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field: dotted.key=value (repeatable)."),
    ] = None,
    moving_averages: Annotated[
        bool, typer.Option(help="Also keep exponential moving averages of the weights.")
    ] = True,
) -> None:
    """Train the recipe once per seed and print each variant's validation figures."""
    overrides = [*(overrides or []), *([f"data.data_dir={data_dir}"] if data_dir else [])]
    results: dict[int, dict[str, dict]] = {}
    for seed in (int(seed) for seed in seeds.split(",") if seed):
        results[seed] = run_seed(recipe, seed, overrides, moving_averages=moving_averages)
        if output:  # after each seed, so a long run that is stopped keeps what it measured
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=2))
    table = Table(title=f"{recipe.name}: validation only")
    for column in ("seed", "variant", "AUC", "ACC", "log loss", "calibrated", "epoch", "min"):
        table.add_column(column)
    for seed, variants in results.items():
        for name, figures in variants.items():
            table.add_row(
                str(seed),
                name,
                f"{figures['val_auc']:.4f}",
                f"{figures['val_accuracy']:.3f}",
                f"{figures['val_log_loss']:.3f}",
                f"{figures['val_log_loss_calibrated']:.3f}",
                str(figures["best_epoch"]),
                f"{figures['minutes']:.1f}",
            )
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
