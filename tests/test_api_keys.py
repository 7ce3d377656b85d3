"""Per-hospital API keys: issuing, checking, revoking, and the `medscreen keys` commands."""

from __future__ import annotations

import multiprocessing
import os
import re
import stat
from http import HTTPStatus
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medscreen_cli import app
from serving.api_keys import (
    MAX_STORE_BYTES,
    AuthError,
    KeyStore,
    KeyStoreError,
    UnknownKeyError,
    WrongSecretError,
)
from tests.conftest import medscreen_error_line

MODEL = "pneumonia-screening"


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "serving" / "api_keys.json")


def _refused(store: KeyStore, presented: str | None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        store.authenticate(presented)
    return caught.value


def test_a_created_key_authenticates_bare_or_as_a_bearer_header(store: KeyStore) -> None:
    key, plaintext = store.create("St Mary", "eu-west", [MODEL])
    assert re.fullmatch(r"msk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", plaintext)
    assert plaintext.startswith(f"msk_{key.key_id}_")
    assert store.authenticate(plaintext) == key
    assert store.authenticate(f"Bearer {plaintext}").hospital == "St Mary"
    assert store.authenticate(f"bearer  {plaintext}").region == "eu-west"
    store.authorise(key, MODEL)
    assert [entry.key_id for entry in store.list()] == [key.key_id]


@pytest.mark.parametrize("presented", [None, "", "   ", "Bearer ", "Bearer"])
def test_a_missing_key_is_401_and_says_what_to_send(store: KeyStore, presented) -> None:
    store.create("St Mary", "eu-west", [MODEL])
    error = _refused(store, presented)
    assert error.status == HTTPStatus.UNAUTHORIZED
    assert "Authorization: Bearer <key>" in error.message
    assert "medscreen keys create" in error.message


def test_garbage_unknown_wrong_secret_and_revoked_keys_are_401(store: KeyStore) -> None:
    key, plaintext = store.create("St Mary", "eu-west", [MODEL])
    garbage = _refused(store, "Bearer hunter2")
    assert garbage.status == HTTPStatus.UNAUTHORIZED
    assert "malformed" in garbage.message and "hunter2" not in garbage.message

    unknown = _refused(store, "msk_0123456789ab_" + "A" * 43)
    assert unknown.status == HTTPStatus.UNAUTHORIZED
    assert "0123456789ab" in unknown.message and "not recognised" in unknown.message

    wrong_secret = _refused(store, f"msk_{key.key_id}_" + "B" * 43)
    assert wrong_secret.status == HTTPStatus.UNAUTHORIZED

    store.revoke(key.key_id)
    revoked = _refused(store, plaintext)
    assert revoked.status == HTTPStatus.UNAUTHORIZED
    assert "revoked" in revoked.message and "St Mary" in revoked.message


def test_a_model_the_key_does_not_grant_is_403_naming_what_is_granted(store: KeyStore) -> None:
    key, plaintext = store.create("St Mary", "eu-west", [MODEL, "ecg-arrhythmia"])
    with pytest.raises(AuthError) as caught:
        store.authorise(store.authenticate(plaintext), "brain-mri")
    error = caught.value
    assert error.status == HTTPStatus.FORBIDDEN
    for expected in ("St Mary", "eu-west", "brain-mri", MODEL, "ecg-arrhythmia", key.key_id):
        assert expected in error.message
    assert not key.grants("brain-mri") and key.grants("ecg-arrhythmia")
    # Names are granted whole: a prefix or an extension of a granted name is another model.
    for other in (f"{MODEL}-v2", MODEL[:-1], "ecg"):
        with pytest.raises(AuthError) as caught:
            store.authorise(store.authenticate(plaintext), other)
        assert caught.value.status == HTTPStatus.FORBIDDEN
    # A client's name is cut, as everywhere else: echoed twice, 10 MB made a 20 MB answer.
    with pytest.raises(AuthError) as caught:
        store.authorise(store.authenticate(plaintext), "A" * 10_000_000)
    assert caught.value.message.count(f"'{'A' * 64}...'") == 2
    assert len(caught.value.message) < 400


def test_star_grants_every_model(store: KeyStore) -> None:
    key, plaintext = store.create("Charite", "eu-central", ["*", MODEL])
    assert key.models == ["*"]
    for model in (MODEL, "ecg-arrhythmia", "anything.else"):
        store.authorise(store.authenticate(plaintext), model)


def test_the_store_holds_only_hashes_and_is_private(store: KeyStore) -> None:
    plaintexts = [store.create("St Mary", "eu-west", [MODEL])[1] for _ in range(3)]
    content = store.path.read_text()
    for plaintext in plaintexts:
        assert plaintext not in content
        assert plaintext.split("_", 2)[2] not in content
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert content.count('"key_sha256"') == 3


def test_a_missing_store_refuses_every_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "nowhere" / "api_keys.json")
    assert store.list() == []
    assert _refused(store, "msk_0123456789ab_" + "A" * 43).status == HTTPStatus.UNAUTHORIZED


def test_an_open_store_sees_revocations_and_new_keys_without_restart(store: KeyStore) -> None:
    key, plaintext = store.create("St Mary", "eu-west", [MODEL])
    serving_view = KeyStore(store.path)  # what the running service holds
    assert serving_view.authenticate(plaintext).key_id == key.key_id

    KeyStore(store.path).revoke(key.key_id)
    assert _refused(serving_view, plaintext).status == HTTPStatus.UNAUTHORIZED

    new_key, new_plaintext = KeyStore(store.path).create("St Mary", "eu-west", [MODEL])
    assert serving_view.authenticate(new_plaintext).key_id == new_key.key_id


def test_revoking_is_idempotent_and_unknown_ids_are_named(store: KeyStore) -> None:
    key, _ = store.create("St Mary", "eu-west", [MODEL])
    first = store.revoke(key.key_id)
    assert first.revoked_at is not None
    assert store.revoke(key.key_id).revoked_at == first.revoked_at
    with pytest.raises(UnknownKeyError, match="feedfacecafe") as caught:
        store.revoke("feedfacecafe")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("hospital", "region", "models", "field"),
    [
        ("", "eu-west", [MODEL], "hospital"),
        ("St Mary/../x", "eu-west", [MODEL], "hospital"),
        ("St Mary", "eu west\n", [MODEL], "region"),
        ("St Mary", "eu-west", [], "models"),
        ("St Mary", "eu-west", ["bad model!"], "models"),
    ],
)
def test_invalid_names_are_refused_naming_the_field(
    store: KeyStore, hospital: str, region: str, models: list[str], field: str
) -> None:
    with pytest.raises(KeyStoreError, match=f"^{field}: "):
        store.create(hospital, region, models)
    assert not store.path.exists()


def test_a_corrupt_store_is_an_error_naming_the_file(store: KeyStore) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_text('{"keys": [{"key_id": "nope"}]}')
    with pytest.raises(KeyStoreError, match=re.escape(str(store.path))):
        store.authenticate("msk_0123456789ab_" + "A" * 43)


def _create_keys(path: str, hospital: str, count: int) -> None:
    store = KeyStore(Path(path))
    for _ in range(count):
        store.create(hospital, "eu-west", [MODEL])


def test_concurrent_creates_from_two_processes_lose_nothing(store: KeyStore) -> None:
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_create_keys, args=(str(store.path), hospital, 15))
        for hospital in ("Hospital A", "Hospital B")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    keys = store.list()
    assert len(keys) == 30
    assert len({key.key_id for key in keys}) == 30
    assert sorted({key.hospital for key in keys}) == ["Hospital A", "Hospital B"]


def _create_and_die_before_the_rename(path: str) -> None:
    import signal

    os.fsync = lambda descriptor: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write
    KeyStore(Path(path)).create("Hospital A", "eu-west", [MODEL])


def test_a_writer_killed_mid_write_leaves_no_temporary_after_the_next_write(
    store: KeyStore,
) -> None:
    store.create("Hospital B", "eu-west", [MODEL])
    killed = multiprocessing.get_context("fork").Process(
        target=_create_and_die_before_the_rename, args=(str(store.path),)
    )
    killed.start()
    killed.join(timeout=60)
    assert killed.exitcode == -9
    (leftover,) = store.path.parent.glob(f".{store.path.name}.*.tmp")
    assert '"key_sha256"' in leftover.read_text()  # hashes, left lying about
    store.create("Hospital C", "eu-west", [MODEL])
    assert not leftover.exists()
    assert sorted(key.hospital for key in store.list()) == ["Hospital B", "Hospital C"]


def test_keys_commands_create_list_and_revoke(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    runner = CliRunner()
    created = runner.invoke(
        app,
        [
            "keys",
            "create",
            "--hospital",
            "St Mary",
            "--region",
            "eu-west",
            "--model",
            MODEL,
            "--model",
            "ecg-arrhythmia",
            "--store",
            str(path),
        ],
    )
    assert created.exit_code == 0, created.output
    plaintext = re.search(r"api key: (msk_\S+)", created.stdout)[1]
    key_id = re.search(r"key id: ([0-9a-f]{12})", created.stdout)[1]
    assert "cannot be shown again" in created.stderr
    # A name the registry does not hold is issued (models may come later), with a warning.
    assert "warning: --model 'ecg-arrhythmia' is not a registered model" in created.stderr
    assert KeyStore(path).authenticate(plaintext).models == [MODEL, "ecg-arrhythmia"]

    listed = runner.invoke(app, ["keys", "list", "--store", str(path)])
    assert listed.exit_code == 0, listed.output
    for expected in (key_id, "St Mary", "eu-west", MODEL):
        assert expected in listed.stdout
    assert plaintext not in listed.stdout
    assert KeyStore(path).list()[0].key_sha256 not in listed.stdout

    revoked = runner.invoke(app, ["keys", "revoke", key_id, "--store", str(path)])
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked key {key_id}" in revoked.stdout
    assert _refused(KeyStore(path), plaintext).status == HTTPStatus.UNAUTHORIZED

    unknown = runner.invoke(app, ["keys", "revoke", "feedfacecafe", "--store", str(path)])
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == (f"error: KEY_ID: no API key with id 'feedfacecafe' in {path}")


def test_a_pasted_key_is_revoked_by_its_id_and_never_echoed(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, plaintext = KeyStore(path).create("St Mary", "eu-west", [MODEL])
    runner = CliRunner()
    revoked = runner.invoke(app, ["keys", "revoke", plaintext, "--store", str(path)])
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked key {key.key_id}" in revoked.stdout
    secret = plaintext.rsplit("_", 1)[1]
    mangled = runner.invoke(app, ["keys", "revoke", f"mks_{secret}", "--store", str(path)])
    assert mangled.exit_code == 2 and secret not in mangled.output
    assert mangled.stderr.startswith("error: KEY_ID: not a key id")


def test_keys_create_shows_the_key_when_the_registry_cannot_be_read(
    monkeypatch, tmp_path: Path
) -> None:
    """The key is live once stored: a registry check that fails must not lose it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknownscheme://nowhere")
    path = tmp_path / "keys.json"
    created = CliRunner().invoke(
        app,
        [
            "keys",
            "create",
            "--hospital",
            "A",
            "--region",
            "B",
            "--model",
            MODEL,
            "--store",
            str(path),
        ],
    )
    assert created.exit_code == 0, created.output
    assert "warning: cannot read the model registry unknownscheme://nowhere" in created.stderr
    plaintext = re.search(r"api key: (msk_\S+)", created.stdout)[1]
    assert KeyStore(path).authenticate(plaintext).hospital == "A"


def test_keys_create_uses_the_state_directory_by_default(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MEDSCREEN_KEY_STORE", raising=False)
    result = CliRunner().invoke(
        app, ["keys", "create", "--hospital", "A", "--region", "B", "--model", "*"]
    )
    assert result.exit_code == 0, result.output
    assert len(KeyStore(tmp_path / "serving" / "api_keys.json").list()) == 1


def test_a_bad_hospital_name_is_one_line_naming_the_option(tmp_path: Path) -> None:
    store = str(tmp_path / "keys.json")
    line = medscreen_error_line(
        "keys", "create", "--hospital", "St Mary; DROP", "--region", "eu", "--model", MODEL,
        "--store", store,
    )  # fmt: skip
    assert line.startswith("error: --hospital: 'St Mary; DROP' is not a valid name")
    # A name pasted by mistake (a whole document) is cut, not echoed whole.
    line = medscreen_error_line(
        "keys", "create", "--hospital", "A" * 5000, "--region", "eu", "--model", MODEL,
        "--store", store,
    )  # fmt: skip
    assert line.startswith(f"error: --hospital: '{'A' * 64}...' is not a valid name"), line
    assert len(line) < 300
    line = medscreen_error_line(
        "keys", "create", "--hospital", "A", "--region", "eu", "--store", store
    )
    assert line.startswith("error: --model: ")
    assert not Path(store).exists()


def test_a_store_under_a_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a folder")
    store = str(tmp_path / "notes.txt" / "keys.json")
    line = medscreen_error_line(
        "keys", "create", "--hospital", "A", "--region", "eu", "--model", "*", "--store", store
    )
    assert line == f"error: --store: {store}: {tmp_path / 'notes.txt'} is not a folder"
    line = medscreen_error_line("keys", "list", "--store", store)
    assert line == f"error: --store: {store}: no such key store"
    # The library says why too, for the default path (which the CLI does not check).
    with pytest.raises(KeyStoreError, match="cannot write the key store"):
        KeyStore(Path(store)).create("A", "eu", ["*"])
    with pytest.raises(KeyStoreError, match="cannot read the key store"):
        KeyStore(Path(store)).list()


def test_a_mistyped_store_is_refused_and_nothing_is_left_behind(
    monkeypatch, tmp_path: Path
) -> None:
    """A typo in --store must not start a store the service never reads, nor pass as empty."""
    typo = tmp_path / "medscren" / "keys.json"
    line = medscreen_error_line(
        "keys", "create", "--hospital", "A", "--region", "eu", "--model", "*", "--store", str(typo)
    )
    assert line == f"error: --store: {typo}: {typo.parent} does not exist"
    assert not typo.parent.exists()
    missing = tmp_path / "keys-typo.json"
    assert medscreen_error_line("keys", "list", "--store", str(missing)) == (
        f"error: --store: {missing}: no such key store"
    )
    line = medscreen_error_line("keys", "revoke", "feedfacecafe", "--store", str(missing))
    assert line == f"error: --store: {missing}: no such key store"
    # The default store not created yet: listing says so, revoking finds no key and no lock
    # file is left where no store is.
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MEDSCREEN_KEY_STORE", raising=False)
    default = tmp_path / "state" / "serving" / "api_keys.json"
    listed = CliRunner().invoke(app, ["keys", "list"])
    assert listed.exit_code == 0 and listed.stdout.strip() == f"no API keys in {default}"
    revoked = CliRunner().invoke(app, ["keys", "revoke", "feedfacecafe"])
    assert revoked.exit_code == 2
    assert revoked.stderr.strip() == (
        f"error: KEY_ID: no API key with id 'feedfacecafe': {default} does not exist"
    )
    assert not (tmp_path / "state").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can write another user's file")
def test_a_store_written_by_root_keeps_its_owner(tmp_path: Path) -> None:
    """`sudo medscreen keys create` must not take the store away from the service's user."""
    store = KeyStore(tmp_path / "keys.json")
    store.create("St Mary", "eu-west", [MODEL])
    os.chown(store.path, 65534, 65534)  # the service's user
    store.create("St John", "eu-west", [MODEL])
    owner = store.path.stat()
    assert (owner.st_uid, owner.st_gid) == (65534, 65534)
    assert stat.S_IMODE(owner.st_mode) == 0o600


def test_revoking_a_revoked_key_says_it_was_revoked_already(tmp_path: Path) -> None:
    """A second revocation must not read like a fresh one, at a time long past."""
    path = tmp_path / "keys.json"
    key, plaintext = KeyStore(path).create("St Mary", "eu-west", [MODEL])
    runner = CliRunner()
    first = runner.invoke(app, ["keys", "revoke", key.key_id, "--store", str(path)])
    assert first.exit_code == 0, first.output
    revoked_at = KeyStore(path).list()[0].revoked_at
    assert first.stdout.strip() == f"revoked key {key.key_id} of St Mary (eu-west) at {revoked_at}"
    for given in (key.key_id, plaintext):
        again = runner.invoke(app, ["keys", "revoke", given, "--store", str(path)])
        assert again.exit_code == 0, again.output  # the key is revoked, as asked
        assert again.stdout.strip() == (
            f"key {key.key_id} of St Mary (eu-west) was already revoked at {revoked_at}"
        )
    assert KeyStore(path).revoke_key(key.key_id).already_revoked
    assert KeyStore(path).list()[0].revoked_at == revoked_at


def test_a_whole_key_with_another_secret_revokes_nothing(tmp_path: Path) -> None:
    """Another store's key, or a mangled copy, must not revoke the key that shares its id."""
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    key, plaintext = store.create("St Mary", "eu-west", [MODEL])
    wrong = f"msk_{key.key_id}_{'A' * 43}"
    line = medscreen_error_line("keys", "revoke", wrong, "--store", str(path))
    assert line == (
        f"error: KEY_ID: the secret does not match key {key.key_id} in {path}; revoke by the "
        f"key id (`medscreen keys revoke {key.key_id}`) if that is the key meant"
    )
    assert "A" * 43 not in line
    assert store.authenticate(plaintext).key_id == key.key_id  # still valid
    with pytest.raises(WrongSecretError):
        store.revoke_key(key.key_id, whole_key=wrong)
    assert not store.list()[0].revoked
    # By its id alone, or as the whole key, it is revoked.
    revoked = CliRunner().invoke(app, ["keys", "revoke", key.key_id, "--store", str(path)])
    assert revoked.exit_code == 0, revoked.output
    assert _refused(store, plaintext).status == HTTPStatus.UNAUTHORIZED


def test_a_store_that_is_a_device_or_pipe_is_one_line_not_a_hang(tmp_path: Path) -> None:
    """/dev/zero was read for ever (MemoryError), and a named pipe blocked `keys list`."""
    pipe = tmp_path / "keys.json"
    os.mkfifo(pipe)
    for store, kind in (("/dev/zero", "a character device"), (str(pipe), "a named pipe")):
        assert medscreen_error_line("keys", "list", "--store", store) == (
            f"error: --store: {store} is {kind}, not a key store file"
        )
    # The service reads $MEDSCREEN_KEY_STORE the same way: an error it can answer 5xx with.
    with pytest.raises(KeyStoreError, match="is a named pipe, not a regular file"):
        KeyStore(pipe).authenticate("msk_0123456789ab_" + "A" * 43)


def test_a_store_too_large_to_be_one_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    with path.open("wb") as stream:
        stream.truncate(MAX_STORE_BYTES + 1)
    with pytest.raises(KeyStoreError, match=f"longer than {MAX_STORE_BYTES} bytes"):
        KeyStore(path).list()
