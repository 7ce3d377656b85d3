"""Mixup: the recipe's images and labels are mixed with the same pairs and weights."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from tests.conftest import QUICK_RECIPE, TINY_DENSENET
from training.lit_models import ScreeningClassifier
from training.models import build_network
from training.recipe import ModelSection, OptimisationSection, RecipeError

# Fixed scaling maps grey level 0 to -1 and 255 to +1, so a mixed pixel tells its weights.
FIXED_SCALING = ModelSection(
    network="DenseNet", network_params=TINY_DENSENET, intensity_scaling="fixed"
)


def _classifier(
    alpha: float,
    *,
    seed: int = 0,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> ScreeningClassifier:
    torch.manual_seed(0)
    module = ScreeningClassifier(
        build_network(FIXED_SCALING, (1, 28, 28), 2),
        (1,),
        OptimisationSection(mixup_alpha=alpha, label_smoothing=label_smoothing),
        class_weights,
        seed=seed,
    )
    module.log = lambda *args, **kwargs: None  # no trainer here to log to
    return module


def _black_and_white(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-0 images all black and class-1 images all white."""
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1][:count])
    images = (labels * 255).to(torch.uint8)[:, None, None, None].expand(-1, 1, 28, 28)
    return images.contiguous(), labels


def _backbone_calls(module: ScreeningClassifier) -> list[tuple[torch.Tensor, torch.Tensor]]:
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.network.backbone.register_forward_hook(
        lambda _, inputs, logits: calls.append((inputs[0].detach(), logits))
    )
    return calls


def _white_share_targets(inputs: torch.Tensor) -> torch.Tensor:
    """Each black-and-white input's mixed label: the share of white it shows, as it must be."""
    white_share = (inputs.mean(dim=(1, 2, 3)) + 1) / 2
    assert not torch.isin(white_share, torch.tensor([0.0, 1.0])).all()  # some really mixed
    return torch.stack([1 - white_share, white_share], dim=1)


def test_the_loss_is_cross_entropy_on_labels_mixed_like_the_images():
    module = _classifier(0.4)
    images, labels = _black_and_white(8)
    calls = _backbone_calls(module)

    loss = module.training_step((images, labels), 0)

    ((inputs, logits),) = calls
    # Each input is w * image + (1 - w) * partner, and so is its label: the share of white.
    torch.testing.assert_close(loss, functional.cross_entropy(logits, _white_share_targets(inputs)))


def test_without_mixup_the_step_sees_the_images_unmixed():
    module = _classifier(0.0)
    assert module.mixup is None
    images, labels = _black_and_white(8)
    calls = _backbone_calls(module)
    loss = module.training_step((images, labels), 0)
    ((inputs, logits),) = calls
    torch.testing.assert_close(inputs.mean(dim=(1, 2, 3)), labels * 2.0 - 1)
    torch.testing.assert_close(loss, functional.cross_entropy(logits, labels))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_weights_are_applied_as_for_hard_labels(smoothing: float):
    # Unmixed one-hot targets must give exactly the plain weighted (and smoothed) loss.
    weights = torch.tensor([3.0, 0.5])
    module = _classifier(0.4, class_weights=weights, label_smoothing=smoothing)
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 1, 0, 1])
    one_hot = functional.one_hot(labels, 2).to(torch.float32)
    plain = module._loss(logits, labels)
    assert plain.item() != pytest.approx(functional.cross_entropy(logits, labels).item())
    torch.testing.assert_close(module._mixed_loss(logits, one_hot), plain)


def test_the_draws_follow_the_seed_and_a_short_last_batch_is_mixed():
    images, labels = _black_and_white(8)

    def mixed_inputs(seed: int) -> torch.Tensor:
        module = _classifier(0.4, seed=seed)
        calls = _backbone_calls(module)
        module.training_step((images, labels), 0)
        return calls[0][0]

    torch.testing.assert_close(mixed_inputs(0), mixed_inputs(0))
    assert not torch.equal(mixed_inputs(0), mixed_inputs(1))
    # As in training: the epoch's short last batch comes after a full one on the same module,
    # and its images and labels are mixed as the full batch's are.
    module = _classifier(0.4)
    calls = _backbone_calls(module)
    module.training_step((images, labels), 0)
    loss = module.training_step((images[:5], labels[:5]), 1)
    _, (inputs, logits) = calls
    assert inputs.shape == (5, 1, 32, 32)
    torch.testing.assert_close(loss, functional.cross_entropy(logits, _white_share_targets(inputs)))


@pytest.mark.parametrize("alpha", [-0.1, 11])
def test_an_alpha_out_of_range_is_named(alpha: float):
    from training import load_recipe

    with pytest.raises(RecipeError, match=r"optimisation\.mixup_alpha"):
        load_recipe(QUICK_RECIPE, [f"optimisation.mixup_alpha={alpha}"])


@pytest.mark.parametrize(
    "override", ["optimisation.mixup_alpha=0.2", "optimisation.channels_last=true"]
)
def test_an_ecg_recipe_refuses_image_only_options(override: str):
    from tests.conftest import RECIPES
    from training import load_recipe

    with pytest.raises(RecipeError, match=rf"'{override.split('=')[0]}': image recipes only"):
        load_recipe(RECIPES / "ecg-full.yaml", [override])
