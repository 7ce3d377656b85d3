"""Deep ensembles: members trained side by side, averaged inside the exported graph."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pytest
import torch
from scipy.special import softmax

from tests.conftest import QUICK_RECIPE, RECIPES, TINY_DENSENET, TINY_ECG, TINY_TRAINING
from training.ecg import BeatClassifier, build_ecg_network
from training.lit_models import ScreeningClassifier
from training.models import LogitAverage, build_network
from training.recipe import EcgModelSection, ModelSection, OptimisationSection, RecipeError


def _first_convolution(member: torch.nn.Module) -> torch.Tensor:
    return next(p for p in member.parameters() if p.dim() >= 3)


def _beats(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random beat windows, templates and RR seconds of the beat network's input shapes."""
    generator = torch.Generator().manual_seed(1)
    windows = torch.randn(count, 1, 256, generator=generator)
    rr_seconds = 0.6 + 0.4 * torch.rand(count, 4, generator=generator)
    return windows, windows.median(dim=0, keepdim=True).values.expand_as(windows), rr_seconds


def test_members_start_apart_and_the_network_averages_their_logits():
    torch.manual_seed(0)
    section = ModelSection(network="DenseNet", network_params=TINY_DENSENET, ensemble_members=3)
    network = build_network(section, (1, 28, 28), 2).eval()
    assert isinstance(network.backbone, LogitAverage) and len(network.backbone.members) == 3
    first, second, _ = (_first_convolution(m) for m in network.backbone.members)
    assert not torch.equal(first, second)

    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        member_logits = network.member_logits(images)
        assert member_logits.shape == (3, 5, 2)
        assert not torch.allclose(member_logits[0], member_logits[1])
        torch.testing.assert_close(network(images), member_logits.mean(dim=0))


def test_a_single_network_is_not_wrapped():
    network = build_network(
        ModelSection(network="DenseNet", network_params=TINY_DENSENET), (1, 28, 28), 2
    )
    assert not isinstance(network.backbone, LogitAverage)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        network.eval()
        torch.testing.assert_close(network.member_logits(images)[0], network(images))


def test_each_member_learns_from_its_own_loss_only():
    torch.manual_seed(0)
    section = ModelSection(network="DenseNet", network_params=TINY_DENSENET, ensemble_members=2)
    module = ScreeningClassifier(
        build_network(section, (1, 28, 28), 2), (1,), OptimisationSection()
    )
    module.log = lambda *args, **kwargs: None  # no trainer here to log to
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 4)

    module.training_step((images, labels), 0).backward()
    ensemble_gradient = [
        _first_convolution(m).grad.clone() for m in module.network.backbone.members
    ]
    for index, member in enumerate(module.network.backbone.members):
        module.zero_grad()
        alone = module.network.member_logits(images)[index]
        (torch.nn.functional.cross_entropy(alone, labels) / 2).backward()
        torch.testing.assert_close(_first_convolution(member).grad, ensemble_gradient[index])


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (1, 28, 28, 28)])
def test_channels_last_lays_out_the_weights_for_2d_and_3d(image_shape: tuple[int, ...]):
    section = ModelSection(network="DenseNet", network_params=TINY_DENSENET)
    network = build_network(section, image_shape, 2)
    module = ScreeningClassifier(network, (1,), OptimisationSection(channels_last=True))
    module.on_fit_start()
    layout = torch.channels_last if len(image_shape) == 3 else torch.channels_last_3d
    assert _first_convolution(network).is_contiguous(memory_format=layout)
    images = torch.randint(0, 256, (2, *image_shape), dtype=torch.uint8)
    assert network(images).shape == (2, 2)


@pytest.mark.parametrize("members", [0, 9])
def test_member_count_out_of_range_is_named(members: int):
    from training import load_recipe

    with pytest.raises(RecipeError, match=r"model\.ensemble_members"):
        load_recipe(QUICK_RECIPE, [f"model.ensemble_members={members}"])


@pytest.mark.slow
def test_trained_ensemble_exports_one_graph_that_averages_its_members(medmnist_dir: Path):
    from training import export_and_register, load_recipe, train_recipe
    from training.runs import load_run_context

    recipe = load_recipe(
        QUICK_RECIPE,
        [
            f"data.data_dir={medmnist_dir}",
            *TINY_TRAINING,
            "model.network=DenseNet",
            "model.network_params={init_features: 8, growth_rate: 4, block_config: [2, 2]}",
            "model.ensemble_members=2",
            "optimisation.channels_last=true",
            "registration.model_name=pneumonia-ensemble-test",
        ],
    )
    result = train_recipe(recipe, show_progress=False)
    params = mlflow.get_run(result.run_id).data.params
    assert params["model.ensemble_members"] == "2"
    assert params["optimisation.channels_last"] == "True"

    registered = export_and_register(result.run_id)
    assert registered.card.onnx.parity_max_abs_difference <= 1e-4

    context = load_run_context(result.run_id)
    network = context.network().eval()
    first, second = network.backbone.members
    assert not torch.equal(_first_convolution(first), _first_convolution(second))
    val = context.split("val")
    with torch.no_grad():
        member_logits = network.member_logits(torch.from_numpy(val.images)).numpy()
    expected = softmax(member_logits.mean(axis=0) / context.temperature, axis=1)

    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{registered.model_name}/{registered.version}")
    )
    session = onnxruntime.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(None, {"image": val.images})
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    # Not one member's answer: the average differs from either member alone.
    for logits in member_logits:
        alone = softmax(logits / context.temperature, axis=1)
        assert np.abs(alone - probabilities).max() > 1e-3


def test_ecg_members_start_apart_and_the_network_averages_their_logits():
    torch.manual_seed(0)
    network = build_ecg_network(EcgModelSection(block_config=[2], ensemble_members=3)).eval()
    assert isinstance(network, LogitAverage) and len(network.members) == 3
    first, second, _ = (_first_convolution(m) for m in network.members)
    assert not torch.equal(first, second)
    beats = _beats(6)
    with torch.no_grad():
        member_logits = network.member_logits(*beats)
        assert member_logits.shape == (3, 6, 5)
        assert not torch.allclose(member_logits[0], member_logits[1])
        torch.testing.assert_close(network(*beats), member_logits.mean(dim=0))
    # One member is the plain network, as before the option existed.
    assert not isinstance(build_ecg_network(EcgModelSection(block_config=[2])), LogitAverage)


def test_each_ecg_member_learns_from_its_own_loss_only():
    torch.manual_seed(0)
    # No dropout, so the two forward passes below are the same computation.
    section = EcgModelSection(block_config=[2], ensemble_members=2, dropout=0.0)
    network = build_ecg_network(section)
    weights = torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0])
    module = BeatClassifier(network, 1e-3, 0.0, 1, weights, label_smoothing=0.1)
    module.log = lambda *args, **kwargs: None  # no trainer here to log to
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0])
    beats = _beats(len(labels))

    module.training_step((*beats, labels), 0).backward()
    ensemble_gradient = [_first_convolution(m).grad.clone() for m in network.members]
    for index, member in enumerate(network.members):
        module.zero_grad()
        alone = torch.nn.functional.cross_entropy(
            network.member_logits(*beats)[index], labels, weight=weights, label_smoothing=0.1
        )
        (alone / 2).backward()
        torch.testing.assert_close(_first_convolution(member).grad, ensemble_gradient[index])


@pytest.mark.slow
def test_trained_ecg_ensemble_exports_one_graph_that_averages_its_members(shared_datasets: Path):
    from datasets.ecg import ECG_INPUTS, load_beats
    from training import load_recipe
    from training.ecg import load_ecg_run, train_ecg
    from training.ecg_export import export_ecg_and_register

    records_dir = shared_datasets / "mitdb"
    recipe = load_recipe(
        RECIPES / "ecg-full.yaml",
        [
            f"data.records_dir={records_dir}",
            *TINY_ECG,
            "model.ensemble_members=2",
            "registration.model_name=ecg-ensemble-test",
        ],
    )
    result = train_ecg(recipe, show_progress=False)
    assert mlflow.get_run(result.run_id).data.params["model.ensemble_members"] == "2"
    registered = export_ecg_and_register(result.run_id, records_dir=records_dir)
    assert registered.card.onnx.parity_max_abs_difference <= 1e-4

    _, _, network = load_ecg_run(result.run_id)
    first, second = network.members
    assert not torch.equal(_first_convolution(first), _first_convolution(second))
    beats = load_beats(records_dir, ["220"])
    inputs = (beats.windows, beats.templates, beats.rr_seconds)
    with torch.no_grad():
        member_logits = network.member_logits(*map(torch.from_numpy, inputs)).numpy()
    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{registered.model_name}/{registered.version}")
    )
    session = onnxruntime.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(None, dict(zip(ECG_INPUTS, inputs, strict=True)))
    averaged = softmax(member_logits.mean(axis=0), axis=1)
    np.testing.assert_allclose(probabilities, averaged, atol=1e-4)
    for logits in member_logits:
        assert np.abs(softmax(logits, axis=1) - probabilities).max() > 1e-3
