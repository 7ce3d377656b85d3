"""Release gate, approvals and alias history against a real MLflow registry."""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    QUICK_RECIPE,
    TINY_TRAINING,
    free_port,
    medscreen_command,
    medscreen_error_line,
    registration_tags,
)

pytestmark = pytest.mark.slow


def _client() -> MlflowClient:
    from training.tracking import configure_tracking

    configure_tracking()
    return MlflowClient()


def _now() -> datetime.datetime:
    moment = datetime.datetime.now(datetime.UTC)
    time.sleep(0.01)
    return moment


@pytest.fixture(scope="module")
def int8_version(registered_model):
    from training.export import export_int8

    return export_int8(registered_model)


@pytest.fixture(scope="module")
def second_float_version(trained_run):
    from training import export_and_register

    return export_and_register(trained_run[1].run_id)


def test_int8_copy_is_its_own_gated_version(registered_model, int8_version, medmnist_dir: Path):
    card = int8_version.card
    assert int8_version.version != registered_model.version
    assert card.onnx.variant == "int8"
    assert card.onnx.parity_reference == f"float32 ONNX model (version {registered_model.version})"
    assert card.onnx.size_bytes < registered_model.card.onnx.size_bytes
    auc_check = next(check for check in card.release_gate if check.check == "int8 validation AUC")
    assert auc_check.passed
    tags = _client().get_model_version(card.model_name, int8_version.version).tags
    assert tags["medscreen.variant"] == "int8"
    assert tags["medscreen.float_version"] == registered_model.version
    assert tags["medscreen.release_gate"] == "passed"
    # The threshold is chosen again on validation for the same sensitivity target.
    assert card.metrics["selected_val_sensitivity"] >= card.operating_point.sensitivity_target
    # Reported as the training run reports them: a gate a recipe names exists for both.
    assert {"test_accuracy", "test_ece"} <= set(card.metrics)  # test_ece was missing
    # The registered INT8 graph runs and gives probabilities.
    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{card.model_name}/{int8_version.version}")
    )
    from training.export import onnx_probabilities

    probabilities = onnx_probabilities(
        model_dir / "model.onnx", np.zeros((3, 1, 28, 28), dtype=np.uint8)
    )
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # ... and its threshold is the INT8 graph's own on the validation split, not on test.
    from datasets import get_dataset_spec, load_split
    from training.evaluation import choose_threshold

    spec = get_dataset_spec("pneumoniamnist")

    def threshold_on(split_name: str) -> float:
        split = load_split(spec, split_name, data_dir=medmnist_dir, max_samples=160, seed=0)
        scores = onnx_probabilities(model_dir / "model.onnx", split.images)[:, 1]
        return choose_threshold(split.labels == 1, scores, card.operating_point.sensitivity_target)

    assert card.operating_point.threshold == pytest.approx(threshold_on("val"), abs=1e-4)
    assert card.operating_point.threshold != pytest.approx(threshold_on("test"), abs=1e-4)


def test_failed_gates_register_nothing_and_say_by_how_much(medmnist_dir: Path):
    from training import ExportError, export_and_register, load_recipe, train_recipe

    # A parity tolerance no float32 export can meet, and a metric minimum no model reaches.
    recipe = load_recipe(
        QUICK_RECIPE,
        [
            f"data.data_dir={medmnist_dir}",
            *TINY_TRAINING,
            "optimisation.max_epochs=1",
            "registration.model_name=gate-check",
            "registration.parity_tolerance=1e-15",
            "registration.minimum_metrics={test_auc: 0.9999}",
        ],
    )
    result = train_recipe(recipe, show_progress=False)
    with pytest.raises(ExportError) as failure:
        export_and_register(result.run_id)
    message = str(failure.value)
    assert message.startswith("release gate failed: ")
    assert "parity probabilities: max abs difference" in message
    assert "minimum test_auc: " in message and "< 0.9999 (short by " in message
    assert message.endswith("nothing was registered")
    assert "parity decisions" not in message  # that check passed
    assert _client().search_model_versions("name='gate-check'") == []


def test_promotion_needs_an_approver_a_reason_and_a_passed_gate(registered_model):
    from training.registry import GovernanceError, promote

    name, version = registered_model.model_name, registered_model.version
    with pytest.raises(GovernanceError, match="--approver"):
        promote(name, version, alias="champion", approver=None, reason="ok")
    with pytest.raises(GovernanceError, match="--reason"):
        promote(name, version, alias="champion", approver="alice", reason="  ")
    with pytest.raises(GovernanceError, match="--approver: an approver ID is 2-64 letters"):
        promote(name, version, alias="champion", approver="a", reason="ok")
    for reason in ("line1\nline2", "ok \x1b[31mRED", "tab\there", "ok\u2028no"):
        with pytest.raises(GovernanceError, match="--reason: give one line of text"):
            promote(name, version, alias="champion", approver="alice", reason=reason)
    with pytest.raises(GovernanceError, match="--approver: an approver ID is 2-64"):
        promote(name, version, alias="champion", approver="alice\n", reason="ok")
    client = _client()
    assert "champion" not in client.get_registered_model(name).aliases
    # A version registered around medscreen (no release gate) cannot be promoted.
    source = client.get_model_version(name, version).source
    ungated = client.create_model_version(name, source)
    with pytest.raises(GovernanceError, match="no passed release gate"):
        promote(name, ungated.version, alias="champion", approver="alice", reason="try")
    line = medscreen_error_line(
        "models", "promote", name, version, "--to", "champion", "--reason", "no approver given"
    )
    assert "--approver" in line


def test_rollback_refuses_a_version_without_a_passed_gate(registered_model):
    from training.registry import GovernanceError, promote, rollback

    name, version = registered_model.model_name, registered_model.version
    client = _client()
    # An alias set around medscreen on a version registered around it (no release gate) ...
    ungated = client.create_model_version(name, client.get_model_version(name, version).source)
    client.set_registered_model_alias(name, "regional", ungated.version)
    event = promote(name, version, alias="regional", approver="alice", reason="gated release")
    assert event.previous_version == str(ungated.version)
    # ... is not where a rollback may take it back to.
    with pytest.raises(GovernanceError, match=f"version {ungated.version} has no passed release"):
        rollback(name, alias="regional", approver="bob", reason="complaint")
    assert str(client.get_registered_model(name).aliases["regional"]) == version
    line = medscreen_error_line(
        "models", "rollback", name, "--alias", "regional", "--approver", "bob", "--reason", "x"
    )
    assert "has no passed release gate" in line and "promote a version" in line


def test_history_answers_which_version_held_an_alias_at_a_time(
    registered_model, second_float_version
):
    import subprocess

    from training.registry import GovernanceError, alias_history, promote, rollback, version_at

    name = registered_model.model_name
    first, second = registered_model.version, second_float_version.version
    before = _now()
    promote(name, first, alias="champion", approver="alice", reason="initial release")
    after_first = _now()
    promote(name, second, alias="champion", approver="bob", reason="retrained")
    after_second = _now()
    event = rollback(name, alias="champion", approver="carol", reason="regional complaint")
    after_rollback = _now()
    assert (event.version, event.previous_version, event.action) == (first, second, "rollback")

    assert version_at(name, "champion", before) is None
    assert version_at(name, "champion", after_first) == first
    assert version_at(name, "champion", after_second) == second
    assert version_at(name, "champion", after_rollback) == first
    assert str(_client().get_registered_model(name).aliases["champion"]) == first
    champion_events = [e for e in alias_history(name) if e.alias == "champion"]
    assert [(e.action, e.version, e.approver) for e in champion_events] == [
        ("promote", first, "alice"),
        ("promote", second, "bob"),
        ("rollback", first, "carol"),
    ]
    tags = _client().get_model_version(name, first).tags
    assert tags["medscreen.approval.champion.approved_by"] == "carol"
    # The approval left with the alias: the second version cannot be re-pointed unapproved.
    second_tags = _client().get_model_version(name, second).tags
    assert "medscreen.approval.champion.approved_by" not in second_tags
    assert tags["medscreen.approval.champion.approval_reason"] == "regional complaint"
    with pytest.raises(GovernanceError, match="give the time with its zone"):
        version_at(name, "champion", after_first.replace(tzinfo=None))
    # A mistyped alias is refused, not answered with "no version" as if nothing held it then.
    with pytest.raises(GovernanceError, match="'champoin' was never set"):
        version_at(name, "champoin", after_first)
    for extra in ((), ("--at", after_second.isoformat())):
        line = medscreen_error_line("models", "history", name, "--alias", "champoin", *extra)
        # Other tests of this session move other aliases of the same model.
        prefix = f"error: --alias: 'champoin' was never set on {name} (aliases in its history: "
        assert line.startswith(prefix) and "champion" in line[len(prefix) : -1].split(", "), line

    completed = subprocess.run(
        [
            *medscreen_command(),
            "models",
            "history",
            name,
            "--alias",
            "champion",
            "--at",
            after_second.isoformat(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert completed.stdout.strip().endswith(f"version {second}")
    shown = subprocess.run(
        [*medscreen_command(), "models", "show", f"{name}@champion"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "parity probabilities" in shown.stdout and "test_auc" in shown.stdout
    # The way back to the run, the code and the data, without leaving the command line.
    for label in ("run id", "code commit", "val fingerprint", "threshold chosen on"):
        assert label in shown.stdout, label
    listed = subprocess.run(
        [*medscreen_command(), "models", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert name in listed.stdout
    # Piped, as into an audit report: whole times and run ids, not 80 columns of ellipses.
    import os

    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    piped = {
        command: subprocess.run(
            [*medscreen_command(), "models", command, name],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env=environment,
        ).stdout
        for command in ("history", "show")
    }
    assert "…" not in piped["history"] and "…" not in piped["show"]
    assert _client().get_model_version(name, first).run_id in piped["show"]


def _shown_aliases(name: str) -> dict[str, str]:
    """Run `medscreen models show NAME`; return its table as version -> aliases cell."""
    import os
    import subprocess

    shown = subprocess.run(
        [*medscreen_command(), "models", "show", name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "COLUMNS": "300"},  # no wrapped or cut cells
    )
    rows = {}
    for line in shown.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0].isdigit():
            rows[cells[0]] = cells[1]
    return rows


def test_show_lists_every_version_with_its_aliases(registered_model, second_float_version):
    from training.registry import promote

    name = registered_model.model_name
    first, second = registered_model.version, second_float_version.version
    promote(name, first, alias="shown", approver="ci", reason="show test")
    promote(name, second, alias="shown-too", approver="ci", reason="show test")
    client = _client()
    expected: dict[str, list[str]] = {
        str(entry.version): [] for entry in client.search_model_versions(f"name='{name}'")
    }
    for alias, version in client.get_registered_model(name).aliases.items():
        expected[str(version)].append(alias)
    rows = _shown_aliases(name)
    assert set(rows) == set(expected)
    for version, aliases in expected.items():
        shown = [] if rows[version] == "-" else rows[version].split(", ")
        assert sorted(shown) == sorted(aliases), (version, rows[version])
    assert "shown" in rows[first].split(", ")
    assert "shown-too" in rows[second].split(", ")


def test_each_export_of_a_run_keeps_its_own_card_in_the_run(registered_model, second_float_version):
    import json

    client = _client()
    run_id = registered_model.card.provenance.run_id
    assert second_float_version.card.provenance.run_id == run_id  # the same run, exported twice
    for exported in (registered_model, second_float_version):
        source = client.get_model_version(exported.model_name, exported.version).source
        model_id = source.removeprefix("models:/")  # the logged model the version was made from
        folder = f"card/float32/{model_id}"
        files = {Path(artifact.path).name for artifact in client.list_artifacts(run_id, folder)}
        assert files == {"card.json", "card.md"}, folder
        card = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{folder}/card.json"))
        assert card == json.loads(exported.card.model_dump_json())


def test_a_graph_that_is_not_the_one_that_passed_the_gate_is_not_registered(
    registered_model, tmp_path: Path
):
    import onnx

    from training.export import ExportError, image_signature, register_version

    client = _client()
    name = registered_model.model_name
    versions_before = {v.version for v in client.search_model_versions(f"name='{name}'")}
    graph_dir = mlflow.artifacts.download_artifacts(
        f"models:/{name}/{registered_model.version}", dst_path=str(tmp_path)
    )
    graph = onnx.load(str(Path(graph_dir) / "model.onnx"))
    graph.doc_string = "changed after the gate"  # the card's SHA-256 is of the gated bytes
    with pytest.raises(ExportError, match="is not the graph that passed the gate"):
        register_version(
            graph,
            registered_model.card,
            image_signature((1, 28, 28), 2),
            description="a graph changed after its gate",
            extra_tags={},
        )
    versions_after = {v.version for v in client.search_model_versions(f"name='{name}'")}
    assert versions_after == versions_before


def test_show_prints_an_undefined_card_metric_as_n_a(registered_model, tmp_path: Path):
    """A metric with no value (PPV where nothing was called positive) is null in the card."""
    import json
    import subprocess

    name = registered_model.model_name
    source = _client().get_model_version(name, registered_model.version).source
    copy = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path)))
    card_path = copy / "extra_files" / "card.json"
    card = json.loads(card_path.read_text())
    card["metrics"]["test_ppv"] = None
    card["confidence_intervals"]["test_ppv"] = [None, None]
    card_path.write_text(json.dumps(card))
    version = _client().create_model_version(name, str(copy)).version
    shown = subprocess.run(
        [*medscreen_command(), "models", "show", f"{name}/{version}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert re.search(r"test_ppv\s+.\s+n/a\s+.\s+n/a to n/a", shown.stdout), shown.stdout


@pytest.mark.parametrize(
    ("card_bytes", "message"),
    [
        (b"\x89\x00binary", "its card.json is not JSON"),
        (b'{"metrics": {}}', "its card.json has no release gate or metrics"),
        (b'{"release_gate": [], "metrics": {}, "provenance": "x"}', "no release gate or metrics"),
        (None, "has no card.json"),
    ],
)
def test_show_names_a_version_whose_card_is_not_a_medscreen_card(
    registered_model, tmp_path: Path, card_bytes: bytes | None, message: str
):
    """A version registered outside `medscreen export`, or a card edited: a traceback before."""
    name = registered_model.model_name
    source = _client().get_model_version(name, registered_model.version).source
    copy = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path)))
    card_path = copy / "extra_files" / "card.json"
    if card_bytes is None:
        card_path.unlink()
    else:
        card_path.write_bytes(card_bytes)
    version = _client().create_model_version(name, str(copy)).version
    line = medscreen_error_line("models", "show", f"{name}/{version}")
    assert line.startswith(f"error: {name} version {version}") and message in line, line
    assert line.endswith("not registered by `medscreen export`, or its card was changed")


@pytest.mark.parametrize("alias", ["latest", "v2"])
def test_promoting_to_a_reserved_alias_is_refused_and_leaves_no_history(registered_model, alias):
    from training.registry import GovernanceError, alias_history, promote

    name, version = registered_model.model_name, registered_model.version
    with pytest.raises(GovernanceError, match=f"--to: '{alias}' is reserved"):
        promote(name, version, alias=alias, approver="dr.who", reason="test")
    line = medscreen_error_line(
        "models", "promote", name, version, "--to", alias, "--approver", "dr.who", "--reason", "t"
    )
    assert line.startswith("error: --to: ") and "reserved" in line
    assert [event for event in alias_history(name) if event.alias == alias] == []
    assert alias not in _client().get_registered_model(name).aliases


def test_an_alias_mlflow_refuses_leaves_no_history(registered_model, monkeypatch):
    from mlflow.exceptions import MlflowException

    from training.registry import GovernanceError, alias_history, promote

    def refuse(self, name, alias, version):
        raise MlflowException(f"refused\n{alias}")

    name, version = registered_model.model_name, registered_model.version
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(GovernanceError, match="--to: MLflow refused") as refusal:
        promote(name, version, alias="refused", approver="ci", reason="registry says no")
    assert "\n" not in str(refusal.value)
    assert [event for event in alias_history(name) if event.alias == "refused"] == []


def test_a_registry_error_just_before_the_alias_write_leaves_no_approval(
    registered_model, monkeypatch
):
    """It was taken for a missing model: the approval stayed, and no repair would remove it."""
    import sqlite3

    from training import registry

    name, version = registered_model.model_name, registered_model.version
    database = mlflow.get_tracking_uri().removeprefix("sqlite:///")
    still_pending = registry._still_pending

    def registry_locked(client, model_name, move):
        # A real registry failure, after the approval was written: the store's database is
        # locked by another connection while this one check reads it (MLflow gives up in 20 s).
        lock = sqlite3.connect(database, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            still_pending(client, model_name, move)
        finally:
            lock.execute("ROLLBACK")
            lock.close()

    monkeypatch.setattr(registry, "_still_pending", registry_locked)
    with pytest.raises(registry.GovernanceError) as failure:
        registry.promote(name, version, alias="hiccup", approver="ci", reason="registry error")
    message = str(failure.value)
    assert "failed to check that the move is still pending" in message, message
    assert "database is locked" in message and "no registered model" not in message
    monkeypatch.undo()
    assert "hiccup" not in _client().get_registered_model(name).aliases
    version_tags = _client().get_model_version(name, version).tags
    assert not [tag for tag in version_tags if tag.startswith("medscreen.approval.hiccup.")]
    assert registry._pending_moves(_client().get_registered_model(name)) == []


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        ("medscreen.alias_event.1.edited", "not json"),
        ("medscreen.alias_event.1.edited", '{"alias": "champion"}'),
        ("medscreen.alias_pending.1.edited", '["a", "list"]'),
    ],
    ids=["event-not-json", "event-missing-fields", "pending-not-an-object"],
)
def test_a_hand_edited_alias_tag_is_one_error_line_naming_it(tag: str, value: str):
    name = f"edited-tags-{next(_ALIAS_NUMBERS)}"
    _client().create_registered_model(name, tags={tag: value})
    for command in (["history", name], ["show", name], ["rollback", name, "--alias", "champion"]):
        extra = ["--approver", "ci", "--reason", "test"] if command[0] == "rollback" else []
        line = medscreen_error_line("models", *command, *extra)
        assert line.startswith("error: ") and f"registry tag {tag} " in line, (command, line)


def test_serving_refuses_unapproved_aliases_and_ungated_versions(
    registered_model, approved_reference
):
    from serving import ModelLoadError, load_served_model

    name = registered_model.model_name
    client = _client()
    client.set_registered_model_alias(name, "rogue", registered_model.version)
    with pytest.raises(ModelLoadError, match="without a recorded approval"):
        load_served_model(f"{name}@rogue")
    source = client.get_model_version(name, registered_model.version).source
    ungated = client.create_model_version(name, source)
    with pytest.raises(ModelLoadError, match="no passed release gate"):
        load_served_model(f"{name}@{ungated.version}")
    loaded = load_served_model(approved_reference)
    assert loaded.version == registered_model.version


def test_a_version_named_by_number_needs_an_approved_alias(registered_model):
    """Pinned, it is served without following an alias, but never without an approval."""
    from serving import ModelLoadError, load_served_model
    from training.registry import promote

    name = registered_model.model_name
    source = _client().get_model_version(name, registered_model.version).source
    gated = _client().create_model_version(
        name, source, tags=registration_tags(name, registered_model.version)
    )
    with pytest.raises(ModelLoadError, match=f"version {gated.version} holds no approved alias"):
        load_served_model(f"{name}@{gated.version}")
    promote(name, gated.version, alias="pinned", approver="ci", reason="pin test")
    assert load_served_model(f"{name}@{gated.version}").version == str(gated.version)
    # Deleting the alias withdraws the approval, though the version keeps the old tags.
    _client().delete_registered_model_alias(name, "pinned")
    with pytest.raises(ModelLoadError, match="holds no approved alias"):
        load_served_model(f"{name}@{gated.version}")


@pytest.fixture(scope="module")
def approved_reference(registered_model) -> str:
    """The float version by an alias of its own, approved: what the service may load."""
    from training.registry import promote

    name, version = registered_model.model_name, registered_model.version
    promote(name, version, alias="approved", approver="ci", reason="governance tests")
    return f"{name}@approved"


_ALIAS_NUMBERS = itertools.count()


def _pool_behind_a_moved_alias(first, second, alias: str):
    """A pool serving ``first`` by ``alias``, which then moves to ``second`` (not yet followed)."""
    from training.registry import promote

    promote(first.model_name, first.version, alias=alias, approver="ci", reason="pool test")
    pool = _watched_pool(f"{first.model_name}@{alias}")
    promote(first.model_name, second.version, alias=alias, approver="ci", reason="pool test")
    return pool


def _watched_pool(reference: str):
    from serving.batching import MicroBatcher
    from serving.pool import ModelPool

    return ModelPool(
        [reference],
        tracking=mlflow.get_tracking_uri(),
        make_batcher=lambda model: MicroBatcher(
            model.run, name=f"onnxruntime-{model.name}-{model.version}"
        ),
        reload_seconds=0,  # refreshed by hand
    )


def test_the_watcher_warns_once_while_an_alias_points_at_a_version_it_may_not_serve(
    registered_model, caplog
):
    from training.registry import promote

    name, version = registered_model.model_name, registered_model.version
    promote(name, version, alias="watched", approver="ci", reason="watcher test")
    pool = _watched_pool(f"{name}@watched")
    client = _client()
    ungated = client.create_model_version(name, client.get_model_version(name, version).source)
    client.set_registered_model_alias(name, "watched", ungated.version)  # no gate, no approval
    with caplog.at_level("WARNING", logger="medscreen.serving"):
        changes = [pool.refresh() for _ in range(3)]
    assert changes == [[], [], []]
    warnings = [
        record.getMessage() for record in caplog.records if "keeping" in record.getMessage()
    ]
    assert len(warnings) == 1 and "no passed release gate" in warnings[0]
    assert pool.all()[0].model.version == registered_model.version
    pool.stop()


def _close(pool) -> None:
    """Stop the pool and its runners, as the service does at shutdown."""
    pool.stop()
    for served in pool.all():
        served.batcher.close()


def _withdrawal_refusal(pool, name: str) -> str:
    from serving.errors import RequestError

    with pytest.raises(RequestError) as named:
        pool.select(name, monitoring=False)
    with pytest.raises(RequestError) as unnamed:  # the only image model: chosen for the key
        pool.select(None, monitoring=False)
    assert named.value.status == unnamed.value.status == 503
    assert str(named.value) == str(unnamed.value)
    return str(named.value)


def test_a_pinned_version_whose_approval_moved_on_is_withdrawn_and_comes_back(
    registered_model, second_float_version, caplog
):
    """Served by number, a version stops answering once its alias leaves it, not at restart."""
    from training.registry import promote

    name = registered_model.model_name
    # A version of its own: the approval of this test's alias is its only one.
    source = _client().get_model_version(name, registered_model.version).source
    version = str(
        _client()
        .create_model_version(name, source, tags=registration_tags(name, registered_model.version))
        .version
    )
    alias = f"pinned-{next(_ALIAS_NUMBERS)}"
    promote(name, version, alias=alias, approver="ci", reason="pinned withdrawal test")
    pool = _watched_pool(f"{name}@{version}")
    assert pool.refresh() == []  # approved: nothing changes
    promote(name, second_float_version.version, alias=alias, approver="ci", reason="moved on")
    with caplog.at_level("WARNING", logger="medscreen.serving"):
        (change,) = pool.refresh()
        assert pool.refresh() == [] and pool.refresh() == []
    assert change.startswith(f"{name} version {version} withdrawn: ")
    assert "holds no approved alias" in change
    assert pool.all() == [] and list(pool.withdrawn()) == [name]
    refusal = _withdrawal_refusal(pool, name)
    assert "withdrawn from this service" in refusal and "approve a version" in refusal
    assert "the version it served is no longer approved" in refusal
    assert "deleted" not in refusal
    said = [record.getMessage() for record in caplog.records if name in record.getMessage()]
    assert len(said) == 1, said  # once, not at every poll
    promote(name, version, alias=alias, approver="ci", reason="approved again")
    (change,) = pool.refresh()
    assert change.startswith(f"{name}@{version} is served again, by version {version}")
    assert [served.model.version for served in pool.all()] == [version]
    assert pool.withdrawn() == {} and pool.select(name, monitoring=False).model.version == version
    _close(pool)


def test_a_deleted_alias_withdraws_its_model_and_a_new_approval_brings_it_back(
    registered_model, second_float_version
):
    from training.registry import promote

    name, version = registered_model.model_name, registered_model.version
    alias = f"deleted-{next(_ALIAS_NUMBERS)}"
    promote(name, version, alias=alias, approver="ci", reason="alias withdrawal test")
    pool = _watched_pool(f"{name}@{alias}")
    _client().delete_registered_model_alias(name, alias)
    (change,) = pool.refresh()
    assert f"has no alias {alias!r}" in change and pool.all() == []
    refusal = _withdrawal_refusal(pool, name)
    assert "withdrawn" in refusal and "alias or registered model was deleted" in refusal
    assert "no longer approved" not in refusal and alias not in refusal  # no registry details
    # An alias recreated by hand, without an approval, does not bring it back, and the 503
    # now gives that cause, not the deletion.
    _client().set_registered_model_alias(name, alias, second_float_version.version)
    assert pool.refresh() == [] and pool.all() == []
    refusal = _withdrawal_refusal(pool, name)
    assert "its alias points at a version without an approval" in refusal
    assert "deleted" not in refusal and alias not in refusal
    assert "without a recorded approval" in pool.withdrawn()[name].reason  # the operator's view
    _client().delete_registered_model_alias(name, alias)  # and deleted again
    assert pool.refresh() == []
    assert "alias or registered model was deleted" in _withdrawal_refusal(pool, name)
    _client().set_registered_model_alias(name, alias, second_float_version.version)
    assert pool.refresh() == []
    promote(name, second_float_version.version, alias=alias, approver="ci", reason="back")
    (change,) = pool.refresh()
    assert change.startswith(f"{name}@{alias} is served again, by version ")
    assert pool.all()[0].model.version == second_float_version.version
    _close(pool)


def test_an_unreachable_registry_withdraws_nothing(registered_model, monkeypatch, caplog):
    from training.registry import promote

    name, version = registered_model.model_name, registered_model.version
    alias = f"unreachable-{next(_ALIAS_NUMBERS)}"
    promote(name, version, alias=alias, approver="ci", reason="registry hiccup test")
    pool = _watched_pool(f"{name}@{alias}")
    # A real registry address where nothing answers, asked once rather than with retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(pool, "_tracking", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level("WARNING", logger="medscreen.serving"):
        assert pool.refresh() == []
    assert [served.model.version for served in pool.all()] == [version]
    assert pool.withdrawn() == {} and "keeping" in caplog.text
    _close(pool)


def test_the_watchers_unforeseen_failure_is_logged_without_the_registrys_password(
    registered_model, caplog, monkeypatch: pytest.MonkeyPatch
):
    from training.registry import promote

    name, version = registered_model.model_name, registered_model.version
    promote(name, version, alias="failing", approver="ci", reason="watcher test")
    pool = _watched_pool(f"{name}@failing")

    def failing_refresh() -> list[str]:
        # What MLflow's client raises when the registry's address holds a password.
        raise RuntimeError("API request to http://alice:s3cret@127.0.0.1:1/api failed")

    monkeypatch.setattr(pool, "refresh", failing_refresh)
    monkeypatch.setattr(pool, "_reload_seconds", 0.01)
    with caplog.at_level(logging.ERROR, logger="medscreen.serving"):
        pool.start_watching()
        deadline = time.monotonic() + 10
        while "registry watch failed" not in caplog.text:
            assert time.monotonic() < deadline, "the watcher logged nothing"
            time.sleep(0.02)
        pool.stop()
    assert "Traceback" in caplog.text and "in failing_refresh" in caplog.text  # still useful
    assert "http://alice:***@127.0.0.1:1/api" in caplog.text
    assert "s3cret" not in caplog.text


def test_a_stopped_pool_swaps_in_nothing_and_leaves_no_runner(
    registered_model, second_float_version, monkeypatch
):
    """Shutdown begins while the watcher loads a moved alias's version: it is closed, not used."""
    import serving.pool
    from training.registry import promote

    name, version = registered_model.model_name, registered_model.version
    promote(name, version, alias="stopping", approver="ci", reason="shutdown test")
    pool = _watched_pool(f"{name}@stopping")
    promote(name, second_float_version.version, alias="stopping", approver="ci", reason="test")
    loaded = []

    def load_then_shut_down(*args, **kwargs):
        model = load_served_model(*args, **kwargs)  # the real load, to the end
        loaded.append(model.version)
        pool.stop()  # the service closes the batchers of pool.all() from here on
        return model

    load_served_model = serving.pool.load_served_model
    monkeypatch.setattr(serving.pool, "load_served_model", load_then_shut_down)
    assert pool.refresh() == []
    assert loaded == [second_float_version.version]  # the race was reached
    assert [served.model.version for served in pool.all()] == [version]
    runner = f"onnxruntime-{name}-{second_float_version.version}"
    deadline = time.monotonic() + 10
    while any(thread.name == runner for thread in threading.enumerate()):
        assert time.monotonic() < deadline, f"{runner} is still running"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "hiccup",
    [
        lambda: mlflow.exceptions.MlflowException("the artifact store answered 503"),
        lambda: ConnectionResetError(104, "Connection reset by peer"),
    ],
    ids=["registry", "network"],
)
def test_a_failed_download_is_retried_at_the_next_poll(
    registered_model, second_float_version, monkeypatch, hiccup
):
    """An artifact store hiccup must not reject an approved version until a restart."""
    pool = _pool_behind_a_moved_alias(
        registered_model, second_float_version, f"retried-{next(_ALIAS_NUMBERS)}"
    )
    download, calls = mlflow.artifacts.download_artifacts, itertools.count()

    def failing_once(*args, **kwargs):
        if next(calls) == 0:
            raise hiccup()
        return download(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", failing_once)
    assert pool.refresh() == []  # kept the old version at this poll
    assert len(pool.refresh()) == 1  # and switched at the next
    assert pool.all()[0].model.version == second_float_version.version
    pool.stop()


def test_a_graph_onnxruntime_cannot_load_is_a_model_load_error(approved_reference, tmp_path):
    from serving.errors import ModelLoadError
    from serving.model import ServedModel, load_served_model

    served = load_served_model(approved_reference)
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an onnx graph")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load the graph") as failure:
        ServedModel(served.card, corrupt, version="99", alias=None)
    assert not failure.value.transient  # the pool will not download it again


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positive_classes": [2]}, "positive classes .2. are not distinct indices of the 2"),
        ({"positive_classes": [1, 1]}, "positive classes .1, 1. are not distinct"),
        ({"input": {"shape": ["batch", "C", 28, 28]}}, "every axis after the first needs a size"),
        ({"input": {"height": 32}}, r"input shape .* disagrees with grayscale 32x28"),
    ],
)
def test_a_card_that_contradicts_itself_is_refused(approved_reference, change, message):
    """Such a card would load and then fail every request with a 500."""
    from pydantic import ValidationError

    from serving.card import ServedCard
    from serving.model import load_served_model

    served = load_served_model(approved_reference)
    fields = served.card.model_dump()
    for key, value in change.items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ValidationError, match=message):
        ServedCard.model_validate(fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output": {"name": "probs"}}, r"the card's output 'probs' is not among the graph's"),
        ({"classes": ["normal", "pneumonia", "other"]}, "gives 2 class probabilities, the card"),
        (
            {"input": {"shape": ["batch", 1, 32, 32], "height": 32, "width": 32}},
            r"the graph takes \[1, 28, 28\] per image, its card says \[1, 32, 32\]",
        ),
        ({"input": {"name": "pixels"}}, r"the graph's inputs \['image'\] differ from its card's"),
        (
            {"input": {"shape": ["batch", 1, 28, 28, 1]}},
            r"the graph takes \[1, 28, 28\] per image, its card says \[1, 28, 28, 1\]",
        ),
    ],
)
def test_a_card_that_contradicts_its_graph_is_refused(
    registered_model, approved_reference, change, message
):
    from serving.errors import ModelLoadError
    from serving.model import ServedModel, load_served_model

    served = load_served_model(approved_reference)
    card = served.card.model_copy(
        update={
            key: served.card.__dict__[key].model_copy(update=value)
            if isinstance(value, dict)
            else value
            for key, value in change.items()
        }
    )
    with tempfile.TemporaryDirectory() as download_dir:
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{registered_model.model_name}/{registered_model.version}",
                dst_path=download_dir,
            )
        )
        with pytest.raises(ModelLoadError, match=message):
            ServedModel(card, model_dir / card.onnx.filename, version="99", alias=None)


def test_a_graph_that_is_not_the_one_its_card_hashed_is_refused(
    registered_model, approved_reference
):
    """A model.onnx replaced in the artifact store must not answer hospitals."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from serving.errors import ModelLoadError
    from serving.model import load_served_model

    location = _client().get_model_version_download_uri(
        registered_model.model_name, registered_model.version
    )
    stored = Path(url2pathname(urlparse(location).path)) / "model.onnx"
    assert stored.is_file(), location
    original = stored.read_bytes()
    try:
        stored.write_bytes(original + b"\0")
        with pytest.raises(ModelLoadError, match="its SHA-256 differs from the card's"):
            load_served_model(approved_reference)
    finally:
        stored.write_bytes(original)
    assert load_served_model(approved_reference).version == registered_model.version


def test_a_graph_and_card_replaced_together_are_refused(
    registered_model, approved_reference, caplog
):
    """Files that still agree with each other must also be the ones the gate registered.

    A review replaced model.onnx, wrote its new SHA-256 into the card and raised the threshold
    to 0.9: the service answered with them under the approved version's name.
    """
    import json
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from datasets.download import file_sha256
    from serving.errors import ModelLoadError
    from serving.model import load_served_model

    location = _client().get_model_version_download_uri(
        registered_model.model_name, registered_model.version
    )
    folder = Path(url2pathname(urlparse(location).path))
    graph, card = folder / "model.onnx", folder / "extra_files" / "card.json"
    originals = {path: path.read_bytes() for path in (graph, card)}
    version = registered_model.version
    try:
        graph.write_bytes(originals[graph] + b"\0")
        document = json.loads(originals[card])
        document["onnx"]["sha256"] = file_sha256(graph)
        card.write_text(json.dumps(document))
        with pytest.raises(ModelLoadError, match=r"the graph's SHA-256 \w+ is not the registered"):
            load_served_model(approved_reference)
        # The graph as registered, with only the card's threshold changed.
        graph.write_bytes(originals[graph])
        document = json.loads(originals[card])
        document["operating_point"]["threshold"] = 0.9
        card.write_text(json.dumps(document))
        with pytest.raises(ModelLoadError) as failure:
            load_served_model(approved_reference)
        assert str(failure.value) == (
            f"{approved_reference!r} (version {version}): its card's SHA-256 is not the "
            f"registered {file_sha256_of(originals[card])}; the artifact was changed after the "
            "release gate, so it is not served"
        )
        # A version registered before cards were hashed is still held to its threshold tag.
        client = _client()
        client.delete_model_version_tag(registered_model.model_name, version, CARD_TAG)
        with pytest.raises(ModelLoadError, match=r"the card's threshold 0\.900000 is not the regi"):
            load_served_model(approved_reference)
        # The rest of such a card cannot be checked: it is served, and the log says so.
        card.write_bytes(originals[card])
        with caplog.at_level(logging.WARNING, logger="medscreen.serving"):
            assert load_served_model(approved_reference).version == version
        assert "registered before cards were hashed" in caplog.text
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
        _client().set_model_version_tag(
            registered_model.model_name, version, CARD_TAG, file_sha256_of(originals[card])
        )
    assert load_served_model(approved_reference).version == version


CARD_TAG = "medscreen.card_sha256"


def file_sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_an_unforeseen_load_fault_is_kept_out_and_not_retried(
    registered_model, second_float_version, monkeypatch
):
    """Any fault of one version must not escape refresh(), which would stop every alias move."""
    import serving.pool

    pool = _pool_behind_a_moved_alias(registered_model, second_float_version, "faulty")
    attempts = itertools.count()

    def faulty(*args, **kwargs):
        next(attempts)
        raise ValueError("invalid literal for int() with base 10: 'C'")

    monkeypatch.setattr(serving.pool, "load_served_model", faulty)
    assert pool.refresh() == [] and pool.refresh() == []
    assert next(attempts) == 1  # tried once, then rejected
    assert pool.all()[0].model.version == registered_model.version
    pool.stop()


def test_free_text_that_looks_like_markup_is_shown_as_written(registered_model):
    """An approval reason is free text: '[/x]' must neither crash nor style the audit view."""
    import subprocess

    from training.registry import promote

    name, version = registered_model.model_name, registered_model.version
    promote(name, version, alias="markup", approver="ci", reason="review [/x] [bold]run")
    for command in (["models", "history", name], ["models", "show", f"{name}@markup"]):
        shown = subprocess.run(
            [*medscreen_command(), *command], capture_output=True, text=True, timeout=120
        )
        assert shown.returncode == 0, shown.stderr
    history = subprocess.run(
        [*medscreen_command(), "models", "history", name, "--alias", "markup"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "[/x]" in history.stdout and "[bold]" in history.stdout  # as written, not styled
