"""Training on a hospital's own manifest: patient-disjoint splits, per-site metrics, export."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from datasets import DatasetError, get_dataset_spec, load_manifest, load_split
from datasets.manifest import ManifestSpec, split_manifest
from tests.conftest import PROJECT_ROOT, SHARED_DATASETS, medscreen_error_line

EXAMPLE_RECIPE = PROJECT_ROOT / "training" / "recipes" / "hospital-manifest-example.yaml"
NIFTI_VOLUME = SHARED_DATASETS / "nifti" / "someones_anatomy.nii.gz"
SECRET = "PATIENT-SECRET-"
PATIENTS, IMAGES_PER_PATIENT, ROWS_WITHOUT_PATIENT = 22, 3, 6
# A tiny network and 28 px input: seconds of CPU training on a few dozen images.
TINY_MANIFEST_TRAINING = [
    "data.manifest_task.image_shape=[1, 28, 28]",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "data.batch_size=16",
    "model.network=DenseNet",
    "model.network_params={init_features: 8, growth_rate: 8, block_config: [2, 2]}",
    "model.network_input_size=32",
    "optimisation.max_epochs=2",
    "registration.minimum_metrics={test_auc: 0.0}",
    # A few dozen images split four ways hold 6-13 cases of a class per split.
    "registration.minimum_cases_per_class=5",
]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_rows(folder: Path, rows: list[dict[str, str]]) -> Path:
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["path", "label", "patient_id", "site"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_hospital_manifest(folder: Path, medmnist_dir: Path, skip: int = 0) -> Path:
    """PNGs of real PneumoniaMNIST images: 22 patients of 3 images, 6 rows without a patient.

    ``skip`` images of each class are passed over first, so that manifests can be disjoint.
    """
    test = load_split(get_dataset_spec("pneumoniamnist"), "test", data_dir=medmnist_dir)
    pools = {label: iter(np.flatnonzero(test.labels == label)[skip:]) for label in (0, 1)}
    (folder / "images").mkdir(parents=True)
    rows = []
    owners = [patient for patient in range(PATIENTS) for _ in range(IMAGES_PER_PATIENT)]
    owners += [None] * ROWS_WITHOUT_PATIENT
    for number, patient in enumerate(owners):
        key = number if patient is None else patient
        label = key % 2  # a patient's images share one label
        name = f"images/image{number:03d}.png"
        (folder / name).write_bytes(_png(test.images[next(pools[label]), 0]))
        rows.append(
            {
                "path": name,
                "label": ["normal", "pneumonia"][label],
                "patient_id": "" if patient is None else f"{SECRET}{patient:03d}",
                "site": "north" if key % 4 < 2 else "south",
            }
        )
    return _write_rows(folder, rows)


def _recipe(manifest: Path, experiment: str, *extra: str):
    from training import load_recipe

    return load_recipe(
        EXAMPLE_RECIPE,
        [f"data.manifest={manifest}", f"experiment={experiment}", *TINY_MANIFEST_TRAINING, *extra],
    )


def recipe_spec(recipe, manifest_sha256: str) -> ManifestSpec:
    from training.data import manifest_spec

    return manifest_spec(recipe.data, manifest_sha256)


def _client() -> MlflowClient:
    from training.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


@pytest.fixture(scope="module")
def hospital_manifest(tmp_path_factory: pytest.TempPathFactory, medmnist_dir: Path) -> Path:
    return write_hospital_manifest(tmp_path_factory.mktemp("hospital"), medmnist_dir)


@pytest.fixture(scope="module")
def manifest_run(hospital_manifest: Path):
    from training import train_recipe

    recipe = _recipe(hospital_manifest, "hospital-manifest-tests")
    return recipe, train_recipe(recipe, show_progress=False)


@pytest.mark.slow
def test_manifest_run_is_patient_disjoint_with_per_site_metrics(
    manifest_run, hospital_manifest: Path
):
    recipe, result = manifest_run
    client = _client()
    run = client.get_run(result.run_id)
    lineage = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/data/lineage.json"))
    splits = lineage["splits"]
    assert lineage["source"] == "manifest"
    assert lineage["manifest_sha256"] == run.data.tags["medscreen.manifest.sha256"]
    # Disjoint by the counts: the splits' patients add up to the manifest's patients.
    assert lineage["patients"] == PATIENTS + ROWS_WITHOUT_PATIENT
    assert sum(split["patients"] for split in splits.values()) == lineage["patients"]
    assert sum(split["rows"] for split in splits.values()) == 72
    # And by recomputation: the same fingerprints, and no patient ID in two splits.
    data = load_manifest(hospital_manifest, recipe_spec(recipe, lineage["manifest_sha256"]))
    rebuilt = split_manifest(data, val_fraction=0.25, test_fraction=0.25, seed=recipe.seed)
    seen = {}
    for name, split in rebuilt.items():
        assert split.fingerprint == splits[name]["fingerprint_sha256"]
        assert run.data.tags[f"medscreen.data.{name}.fingerprint"] == split.fingerprint
        seen[name] = {pid for pid in data.patient_ids[split.indices] if pid}
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"])
    assert not seen["val"] & seen["test"]
    # Per-site test metrics, and patient-level intervals.
    metrics = run.data.metrics
    site_rows = splits["test"]["sites"]
    assert set(site_rows) == {"north", "south"}
    for site, rows in site_rows.items():
        assert metrics[f"test_site_{site}_cases"] == rows
    assert metrics["test_auc_ci_low"] <= metrics["test_auc_ci_high"]
    # Only a bootstrap over patients logs its resample count (images: Wilson intervals).
    assert 900 <= metrics["test_ci_resamples"] <= 1000
    # Patient IDs are never recorded.
    recorded = json.dumps(lineage) + " ".join(
        [*run.data.params.values(), *run.data.tags.values(), *metrics]
    )
    assert SECRET not in recorded


@pytest.mark.slow
def test_manifest_run_has_a_run_card(manifest_run):
    _, result = manifest_run
    card = mlflow.artifacts.load_text(f"runs:/{result.run_id}/card/run_card.md")
    assert card.startswith("# Run card: hospital-cxr-example")
    assert result.run_id in card
    assert f"{result.threshold:.6f}" in card
    assert f"{result.metrics['test_auc']:.4f}" in card
    assert "### Test, per site" in card and "| north |" in card
    assert SECRET not in card


@pytest.mark.slow
def test_manifest_run_exports_and_checks_the_manifest(
    manifest_run, hospital_manifest: Path, tmp_path: Path
):
    from training import export_and_register
    from training.runs import RunError, load_run_context

    recipe, result = manifest_run
    exported = export_and_register(result.run_id)
    card = exported.card
    assert card.training_data.dataset == recipe.data.manifest_task.name
    assert card.input.shape == ["batch", 1, 28, 28]
    assert card.positive_finding == "pneumonia" and card.positive_classes == [1]
    tags = _client().get_run(result.run_id).data.tags
    assert card.training_data.split_fingerprints["val"] == tags["medscreen.data.val.fingerprint"]
    # The registry's card names the manifest for auditors; the card served to regions does not
    # (a training site's folder names can carry an MRN), though it keeps the file's SHA-256.
    assert card.training_data.url == hospital_manifest.resolve().as_uri()
    from serving.model import LOCAL_PATH_SHOWN_AS, load_served_model
    from training.registry import promote

    promote(exported.model_name, exported.version, alias="champion", approver="ci", reason="t")
    served = load_served_model(f"{exported.model_name}@champion").describe()
    assert served["card"]["training_data"]["url"] == LOCAL_PATH_SHOWN_AS
    assert served["card"]["training_data"]["file_sha256"] == card.training_data.file_sha256
    assert str(hospital_manifest.parent) not in json.dumps(served)
    # A moved copy, byte for byte, rebuilds the same splits from the data directory ...
    moved = tmp_path / "moved"
    shutil.copytree(hospital_manifest.parent, moved)
    context = load_run_context(result.run_id, data_dir=moved)
    assert context.split("test").fingerprint == tags["medscreen.data.test.fingerprint"]
    # ... but an edited manifest is refused.
    edited = moved / "manifest.csv"
    edited.write_text(edited.read_text().replace("north", "east", 1))
    with pytest.raises(RunError, match=r"SHA-256 .* but the run recorded"):
        load_run_context(result.run_id, data_dir=moved).split("val")


@pytest.mark.slow
def test_manifest_run_evaluates_on_another_manifest(
    manifest_run, hospital_manifest: Path, tmp_path: Path, medmnist_dir: Path
):
    from training.evaluate import evaluate_manifest

    _, result = manifest_run
    with pytest.raises(DatasetError, match="in the training or validation data"):
        evaluate_manifest(result.run_id, hospital_manifest)  # its own training data
    other = write_hospital_manifest(tmp_path, medmnist_dir, skip=72)
    evaluation = evaluate_manifest(result.run_id, other)
    metrics = evaluation.metrics
    assert metrics["eval_cases"] == 72
    assert metrics["eval_site_north_cases"] + metrics["eval_site_south_cases"] == 72
    # Patient IDs are present, so intervals come from resampling patients.
    assert metrics["eval_auc_ci_low"] <= metrics["eval_auc_ci_high"]
    assert 900 <= metrics["eval_ci_resamples"] <= 1000


def _valid_rows(folder: Path, count: int = 12) -> list[dict[str, str]]:
    (folder / "images").mkdir()
    rows = []
    for number in range(count):
        name = f"images/ok{number}.png"
        (folder / name).write_bytes(_png(np.full((28, 28), number * 9, dtype=np.uint8)))
        label = ["normal", "pneumonia"][number % 2]
        rows.append({"path": name, "label": label, "patient_id": f"p{number}", "site": "a"})
    return rows


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": "images/nowhere.png"}, r"manifest.csv:5: the image file: No such file"),
        ({"label": "bronchitis"}, r"manifest.csv:5: the label is not one of"),
        ({"path": "images/ok0.png"}, r"manifest.csv:5: the image file is the same as line"),
        ({"path": "scan.nii.gz"}, r"manifest.csv:5: the image file: a NIfTI volume cannot be"),
    ],
)
def test_bad_manifest_row_stops_training_before_any_run(
    tmp_path: Path, change: dict[str, str], message: str
):
    from training import train_recipe

    rows = _valid_rows(tmp_path)
    shutil.copy(NIFTI_VOLUME, tmp_path / "scan.nii.gz")
    rows[3] |= change
    experiment = f"bad-manifest-{tmp_path.name}"
    with pytest.raises(DatasetError, match=message):
        train_recipe(_recipe(_write_rows(tmp_path, rows), experiment), show_progress=False)
    _client()
    assert mlflow.get_experiment_by_name(experiment) is None, "no run may exist"


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        # Three patients: no fractions leave each split a patient of both classes.
        (3, [], r"manifest.csv: the (train|val|test) split would (be empty|have no)"),
        (12, ["data.manifest_task.classes=[normal, pneumonia, other]"], None),
    ],
)
def test_unsplittable_manifest_is_named(tmp_path: Path, rows: int, extra: list, message):
    from training.data import ScreeningDataModule

    manifest = _write_rows(tmp_path, _valid_rows(tmp_path, rows))
    module = ScreeningDataModule(_recipe(manifest, "unused", *extra))
    if message is None:  # a valid manifest of a three-class task splits fine
        module.setup()
        assert sum(len(split) for split in module.splits.values()) == rows
        return
    with pytest.raises(DatasetError, match=message):
        module.setup()


def test_train_cli_names_the_bad_manifest_line(tmp_path: Path):
    rows = _valid_rows(tmp_path)
    rows[5]["label"] = "1"
    manifest = _write_rows(tmp_path, rows)
    line = medscreen_error_line("train", str(EXAMPLE_RECIPE), "--set", f"data.manifest={manifest}")
    assert "manifest.csv:7: the label is not one of ['normal', 'pneumonia']" in line
    assert "'1'" not in line  # values are not quoted: file names and labels can name a patient


def test_nifti_rows_feed_a_3d_task(tmp_path: Path):
    volume = NIFTI_VOLUME
    original = nib.load(volume)
    flipped = tmp_path / "flipped.nii.gz"  # a second, different volume
    nib.save(nib.Nifti1Image(np.asarray(original.dataobj)[::-1], original.affine), flipped)
    (tmp_path / "manifest.csv").write_text(f"path,label\n{volume},vessel\n{flipped},aneurysm\n")
    spec = get_dataset_spec("vesselmnist3d")
    data = load_manifest(tmp_path / "manifest.csv", spec)
    assert data.images.shape == (2, 1, 28, 28, 28) and data.images.dtype == np.uint8
    # A 3D task takes volumes only.
    (tmp_path / "flat.png").write_bytes(_png(np.zeros((28, 28), dtype=np.uint8)))
    (tmp_path / "manifest.csv").write_text("path,label\nflat.png,vessel\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:2: the image file: .* takes 3D volumes"):
        load_manifest(tmp_path / "manifest.csv", spec)
