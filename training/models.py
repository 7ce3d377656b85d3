"""MONAI networks wrapped so that all preprocessing lives inside the exported graph."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.networks import nets
from torch import nn
from torch.nn import functional

from training.recipe import ModelSection, RecipeError

_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class ScreeningNetwork(nn.Module):
    """Raw uint8 images in, class logits out.

    Scaling to [0, 1], intensity normalisation and resizing to the network's input size happen
    here, so the ONNX export carries them and serving cannot preprocess differently.

    Args:
        backbone: The MONAI network.
        spatial_dims: 2 or 3.
        network_input_size: Side the images are resized to.
        intensity_mean: Subtracted after scaling to [0, 1].
        intensity_std: Divides after the mean is subtracted.
        per_image_scaling: Scale by each image's own minimum and maximum (over all channels,
            as MONAI's ``ScaleIntensity``) rather than by 255. The service stretches 16-bit
            PNG and DICOM pixels to 0-255 but takes 8-bit ones as they are; with this, the
            same picture gets the same input whichever way it arrived.
    """

    def __init__(
        self,
        backbone: nn.Module,
        spatial_dims: int,
        network_input_size: int,
        intensity_mean: float,
        intensity_std: float,
        *,
        per_image_scaling: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.network_input_size = network_input_size
        self.per_image_scaling = per_image_scaling
        self.register_buffer("intensity_mean", torch.tensor(intensity_mean, dtype=torch.float32))
        self.register_buffer("intensity_std", torch.tensor(intensity_std, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, classes) for uint8 images of shape (N, C, *spatial)."""
        return self.backbone(self.preprocess(images))

    def member_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Return each ensemble member's logits, shape (members, N, classes).

        A single network is one member. Training takes each member's own loss; the graph
        averages them.
        """
        return logits_per_member(self.backbone, self.preprocess(images))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Scale, normalise and resize uint8 images to the network's float input."""
        values = images.to(torch.float32)
        if self.per_image_scaling:
            axes = tuple(range(1, values.dim()))
            low = torch.amin(values, dim=axes, keepdim=True)
            high = torch.amax(values, dim=axes, keepdim=True)
            # At least one grey level: a flat image (refused by the service) becomes zeros.
            scaled = (values - low) / torch.clamp(high - low, min=1.0)
        else:
            scaled = values / 255.0
        normalised = (scaled - self.intensity_mean) / self.intensity_std
        return functional.interpolate(
            normalised,
            size=(self.network_input_size,) * self.spatial_dims,
            mode=_INTERPOLATION[self.spatial_dims],
            align_corners=False,
        )


class LogitAverage(nn.Module):
    """A deep ensemble: the mean of its members' logits.

    Args:
        members: Networks of the same inputs and output shape, each with its own initial weights.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Return the members' logits, shape (members, N, classes)."""
        return torch.stack([member(*inputs) for member in self.members])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Return the mean of the members' logits, shape (N, classes)."""
        return self.member_logits(*inputs).mean(dim=0)


def logits_per_member(network: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Return each member's logits of ``network``, shape (members, N, classes).

    A network that is not a :class:`LogitAverage` is one member.
    """
    if isinstance(network, LogitAverage):
        return network.member_logits(*inputs)
    return network(*inputs).unsqueeze(0)


class ProbabilityModel(nn.Module):
    """The exported graph: uint8 images in, temperature-scaled class probabilities out."""

    def __init__(self, network: ScreeningNetwork, temperature: float = 1.0) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return softmax probabilities of shape (N, classes)."""
        return torch.softmax(self.network(images) / self.temperature, dim=1)


def build_network(
    section: ModelSection, image_shape: tuple[int, ...], num_classes: int
) -> ScreeningNetwork:
    """Build the MONAI backbone a recipe names, wrapped with its preprocessing.

    Args:
        section: The recipe's model section.
        image_shape: (C, *spatial) of the dataset; 2D or 3D.
        num_classes: Number of output classes.

    Returns:
        The network, ready to train.
    """
    in_channels, spatial_dims = image_shape[0], len(image_shape) - 1
    try:
        # Degenerate values also warn (zero-element weights); the error below says it all.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", UserWarning)
            # Members are built one after another, so each draws its own initial weights.
            members = [
                _backbone(section, in_channels, spatial_dims, num_classes)
                for _ in range(section.ensemble_members)
            ]
            backbone = members[0] if len(members) == 1 else LogitAverage(members)
            # Some values fail only at the first forward pass (zero features, a zero stride).
            backbone.eval()
            backbone(torch.zeros(2, in_channels, *[section.network_input_size] * spatial_dims))
            backbone.train()
    except (ValueError, TypeError, RuntimeError, KeyError, ZeroDivisionError) as error:
        # Values the recipe's types allow but MONAI refuses (a negative growth rate, an unknown
        # activation): named here, before any run starts.
        raise RecipeError(
            f"model.network_params: MONAI's {section.network} refused them: "
            + " ".join(str(error).split())
        ) from None
    return ScreeningNetwork(
        backbone,
        spatial_dims=spatial_dims,
        network_input_size=section.network_input_size,
        intensity_mean=section.intensity_mean,
        intensity_std=section.intensity_std,
        per_image_scaling=section.intensity_scaling == "per_image",
    )


def _backbone(
    section: ModelSection, in_channels: int, spatial_dims: int, num_classes: int
) -> nn.Module:
    params = dict(section.network_params)
    if section.network == "ResNet":
        params.setdefault("block", "basic")
        params.setdefault("layers", (2, 2, 2, 2))
        params.setdefault("block_inplanes", (64, 128, 256, 512))
        return nets.ResNet(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=num_classes,
            **params,
        )
    densenet = nets.DenseNet121 if section.network == "DenseNet121" else nets.DenseNet
    return densenet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        dropout_prob=section.dropout,
        **params,
    )


@torch.no_grad()
def predict_logits(
    network: ScreeningNetwork, images: np.ndarray | torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Return class logits for uint8 images, in batches, in evaluation mode."""
    network.eval()
    images = torch.as_tensor(images)
    return torch.cat([network(batch) for batch in images.split(batch_size)]).numpy()


@torch.no_grad()
def predict_probabilities(
    network: ScreeningNetwork,
    images: np.ndarray | torch.Tensor,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> np.ndarray:
    """Return the exported graph's probabilities for uint8 images, in evaluation mode."""
    model = ProbabilityModel(network, temperature).eval()
    images = torch.as_tensor(images)
    return torch.cat([model(batch) for batch in images.split(batch_size)]).numpy()
