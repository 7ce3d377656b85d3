"""The LightningModule that trains a screening network."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.nn import functional
from torchmetrics.classification import BinaryAUROC

from training.models import ScreeningNetwork
from training.recipe import OptimisationSection


class ScreeningClassifier(pl.LightningModule):
    """Cross-entropy training of a ScreeningNetwork, with validation AUC of the positive finding.

    Args:
        network: The network (preprocessing included) to train.
        positive_classes: Class indices whose summed probability is the positive finding.
        optimisation: The recipe's optimisation section.
        class_weights: Per-class loss weights, or None for an unweighted loss.
    """

    def __init__(
        self,
        network: ScreeningNetwork,
        positive_classes: tuple[int, ...],
        optimisation: OptimisationSection,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.positive_classes = list(positive_classes)
        self.optimisation = optimisation
        self.register_buffer("class_weights", class_weights)
        self.val_auc = BinaryAUROC()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits for uint8 images."""
        return self.network(images)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(
            logits,
            labels,
            weight=self.class_weights,
            label_smoothing=self.optimisation.label_smoothing,
        )

    def positive_score(self, logits: torch.Tensor) -> torch.Tensor:
        """Probability of the positive finding."""
        # Clipped: a float32 sum can exceed 1, and torchmetrics would then take all for logits.
        return torch.softmax(logits, dim=1)[:, self.positive_classes].sum(dim=1).clamp(0.0, 1.0)

    def on_fit_start(self) -> None:
        """Lay the weights out channels-last when the recipe asks (faster CPU convolutions)."""
        if self.optimisation.channels_last:
            volumes = self.network.spatial_dims == 3
            self.network.to(
                memory_format=torch.channels_last_3d if volumes else torch.channels_last
            )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        """One optimisation step; an ensemble's loss is the mean of its members' own losses."""
        images, labels = batch
        member_logits = self.network.member_logits(images)
        loss = sum(self._loss(logits, labels) for logits in member_logits) / len(member_logits)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        """Accumulate validation loss and AUC."""
        images, labels = batch
        logits = self(images)
        self.log("val_loss", self._loss(logits, labels), on_epoch=True, prog_bar=True)
        truth = torch.isin(labels, torch.tensor(self.positive_classes, device=labels.device))
        self.val_auc.update(self.positive_score(logits), truth.long())
        self.log("val_auc", self.val_auc, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> dict:
        """AdamW with cosine annealing over the recipe's epochs."""
        optimiser = torch.optim.AdamW(
            self.parameters(),
            lr=self.optimisation.learning_rate,
            weight_decay=self.optimisation.weight_decay,
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=self.optimisation.max_epochs
        )
        return {"optimizer": optimiser, "lr_scheduler": schedule}
