"""The LightningModule that trains a screening network."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from monai.transforms import MixUp
from torch.nn import functional
from torchmetrics.classification import BinaryAUROC

from training.models import ScreeningNetwork, logits_per_member
from training.recipe import OptimisationSection


class ScreeningClassifier(pl.LightningModule):
    """Cross-entropy training of a ScreeningNetwork, with validation AUC of the positive finding.

    Args:
        network: The network (preprocessing included) to train.
        positive_classes: Class indices whose summed probability is the positive finding.
        optimisation: The recipe's optimisation section.
        class_weights: Per-class loss weights, or None for an unweighted loss.
        seed: Seeds the mixup draws when the recipe asks for mixup.
    """

    def __init__(
        self,
        network: ScreeningNetwork,
        positive_classes: tuple[int, ...],
        optimisation: OptimisationSection,
        class_weights: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.network = network
        self.positive_classes = list(positive_classes)
        self.optimisation = optimisation
        self.register_buffer("class_weights", class_weights)
        self.val_auc = BinaryAUROC()
        self.mixup: MixUp | None = None
        if optimisation.mixup_alpha > 0:
            # A generator of its own: the run repeats, and the other draws are not shifted.
            self.mixup = MixUp(batch_size=1, alpha=optimisation.mixup_alpha)
            self.mixup.set_random_state(seed=seed)

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

    def _mixed_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """One-hot labels mixed with the pairs and weights of the last mixed images."""
        one_hot = functional.one_hot(labels, num_classes).to(torch.float32)
        # MixUp mixes image-shaped tensors: the labels travel as (N, classes, 1, 1).
        return self.mixup(one_hot[:, :, None, None], randomize=False)[:, :, 0, 0]

    def _mixed_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on mixed labels, weighted as the plain loss weights hard labels."""
        per_image = functional.cross_entropy(
            logits,
            targets,
            weight=self.class_weights,
            label_smoothing=self.optimisation.label_smoothing,
            reduction="none",
        )
        if self.class_weights is None:
            return per_image.mean()
        # As cross_entropy's weighted mean: divided by the total weight of the labels.
        return per_image.sum() / (targets @ self.class_weights).sum()

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
        if self.mixup is None:
            member_logits = self.network.member_logits(images)
            losses = [self._loss(logits, labels) for logits in member_logits]
        else:
            self.mixup.batch_size = len(images)  # the last batch of an epoch may be smaller
            # Mixed after preprocessing, so each image is scaled by its own range first.
            inputs = self.mixup(self.network.preprocess(images))
            member_logits = logits_per_member(self.network.backbone, inputs)
            targets = self._mixed_labels(labels, member_logits.shape[-1])
            losses = [self._mixed_loss(logits, targets) for logits in member_logits]
        loss = sum(losses) / len(losses)
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
