"""Per-hospital API keys: issued with ``medscreen keys``, checked by the service on every request.

A key looks like ``msk_<key_id>_<secret>``. The store keeps only the SHA-256 of the whole key,
so a leaked store file grants nothing. The store is one JSON document, rewritten atomically under
a lock file so that two ``medscreen keys`` processes never lose each other's update, and the
service re-reads it whenever it changes, so a revocation takes effect without a restart.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from datasets.files import NotRegularFileError, open_regular_file, write_atomically
from serving.errors import shown

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
# The name part of a serving reference (``serving.model``), so every servable model can be granted.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ALL_MODELS = "*"
KEY_PREFIX = "msk_"
_PRESENTED_KEY = re.compile(r"msk_(?P<key_id>[0-9a-f]{12})_[A-Za-z0-9_-]{32,128}")
_BEARER = re.compile(r"^bearer(\s+|$)", re.IGNORECASE)
_ISSUE_HINT = "keys are issued with `medscreen keys create`"

# Far beyond any store in use (a key takes about 300 bytes): a larger file is not read whole.
MAX_STORE_BYTES = 64 << 20


def is_medscreen_authorization(authorization: str | None) -> bool:
    """Whether an ``Authorization`` value is meant for medscreen: Bearer, or a bare key.

    Another scheme (a proxy's ``Basic``) is not, and must not hide an ``X-API-Key``.
    """
    value = (authorization or "").strip()
    return bool(_BEARER.match(value) or value.startswith(KEY_PREFIX))


class AuthError(Exception):
    """A request the service must refuse: ``status`` is 401 (who are you?) or 403 (not for you).

    Args:
        status: The HTTP status to answer with.
        message: What the caller should do about it.
    """

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class KeyStoreError(ValueError):
    """A key store that cannot be read or written, or a bad value for one of its fields."""


class UnknownKeyError(KeyStoreError):
    """No key with the given key id exists in the store."""


class WrongSecretError(KeyStoreError):
    """A whole key was given whose secret is not that of the stored key with its id."""


class Revocation(NamedTuple):
    """What :meth:`KeyStore.revoke_key` did: the key, and whether it was revoked before."""

    key: ApiKey
    already_revoked: bool


def check_name(field: str, value: str) -> str:
    """Return ``value`` if it is a valid hospital or region name.

    Args:
        field: The field name, used in the error message.
        value: The name to check.

    Returns:
        The unchanged name.

    Raises:
        KeyStoreError: if the name is empty, too long or has characters other than letters,
            digits, spaces, ``_``, ``.`` and ``-``.
    """
    if not NAME_PATTERN.fullmatch(value):
        raise KeyStoreError(
            f"{field}: {shown(value)} is not a valid name (1-64 ASCII letters, digits, spaces, "
            "'_', '.' or '-', starting with a letter or digit)"
        )
    return value


def check_model_name(field: str, value: str, *, allow_all: bool = False) -> str:
    """Return ``value`` if it is a valid registered-model name (or ``*`` when ``allow_all``).

    Args:
        field: The field name, used in the error message.
        value: The model name to check.
        allow_all: Whether ``*`` (every model) is accepted.

    Returns:
        The unchanged name.

    Raises:
        KeyStoreError: if the name is not a registered-model name.
    """
    if (allow_all and value == ALL_MODELS) or MODEL_NAME_PATTERN.fullmatch(value):
        return value
    also = " or '*' for every model" if allow_all else ""
    raise KeyStoreError(
        f"{field}: {value!r} is not a registered-model name (1-128 letters, digits, '_', '.' "
        f"or '-', starting with a letter or digit){also}"
    )


def utc_timestamp() -> str:
    """Return the current UTC time as ISO-8601 with seconds, e.g. ``2025-01-31T09:30:00Z``."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="seconds").replace("+00:00", "Z")


class ApiKey(BaseModel):
    """One issued key as stored: who holds it, what it grants, and the hash of the key itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str = Field(pattern=r"^[0-9a-f]{12}$")
    hospital: str
    region: str
    models: list[str] = Field(min_length=1)
    created_at: str
    revoked_at: str | None = None
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("hospital", "region")
    @classmethod
    def _valid_name(cls, value: str, info: ValidationInfo) -> str:
        return check_name(info.field_name or "name", value)

    @field_validator("models")
    @classmethod
    def _valid_models(cls, value: list[str]) -> list[str]:
        return [check_model_name("models", name, allow_all=True) for name in value]

    @property
    def revoked(self) -> bool:
        """Whether the key has been revoked."""
        return self.revoked_at is not None

    def grants(self, model_name: str) -> bool:
        """Return whether this key may call ``model_name`` (``*`` grants every model).

        Args:
            model_name: The registered-model name a request would use.

        Returns:
            True if the model is granted.
        """
        return ALL_MODELS in self.models or model_name in self.models


class _StoreDocument(BaseModel):
    """The whole store file."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["medscreen-api-keys/1"] = "medscreen-api-keys/1"
    keys: list[ApiKey] = Field(default_factory=list)

    @field_validator("keys")
    @classmethod
    def _unique_ids(cls, value: list[ApiKey]) -> list[ApiKey]:
        seen: set[str] = set()
        for key in value:
            if key.key_id in seen:
                raise ValueError(f"key id {key.key_id} appears twice")
            seen.add(key.key_id)
        return value


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created with mode 0600) for the block.

    Args:
        lock_path: The lock file; it is never removed, so every process locks the same inode.

    Yields:
        Nothing; the lock is released when the block ends.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(descriptor)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "document"
    return f"{where}: {first['msg']}"


class KeyStore:
    """The API keys in one JSON file.

    Reads are cached and refreshed whenever the file's inode, mtime or size changes, so a
    long-running service sees keys created or revoked by ``medscreen keys`` on its next request.

    Args:
        path: The store file; it need not exist yet (then there are no keys).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._cache_lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    # Reading -------------------------------------------------------------------------------

    def _read(self) -> tuple[tuple[int, int, int] | None, dict[str, ApiKey]]:
        """Read the file as it is now, with the stamp of exactly the bytes read."""
        try:
            stream = open_regular_file(self.path)
        except FileNotFoundError:
            return None, {}
        except NotRegularFileError as error:
            message = f"{self.path}: cannot read the key store: it {error.strerror}"
            raise KeyStoreError(message) from None
        except OSError as error:
            raise KeyStoreError(f"{self.path}: cannot read the key store: {error}") from None
        with stream:
            # fstat of the open file, so the stamp belongs to the content we parse even if a
            # writer replaces the file in between.
            info = os.fstat(stream.fileno())
            raw = stream.read(MAX_STORE_BYTES + 1)
        if len(raw) > MAX_STORE_BYTES:
            raise KeyStoreError(
                f"{self.path}: not a valid key store: longer than {MAX_STORE_BYTES} bytes"
            )
        try:
            document = _StoreDocument.model_validate_json(raw)
        except ValidationError as error:
            raise KeyStoreError(f"{self.path}: not a valid key store: {_one_line(error)}") from None
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        return stamp, {key.key_id: key for key in document.keys}

    def _current(self) -> dict[str, ApiKey]:
        """The keys, re-read only if the file changed since the last read."""
        try:
            info = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError as error:  # for example a parent that is a file
            raise KeyStoreError(f"{self.path}: cannot read the key store: {error}") from None
        with self._cache_lock:
            if stamp is None:
                self._stamp, self._keys = None, {}
            elif stamp != self._stamp:
                self._stamp, self._keys = self._read()
            return self._keys

    def list(self) -> list[ApiKey]:
        """Return every key, revoked ones included, oldest first.

        Raises:
            KeyStoreError: if the store file exists but is not a valid key store.
        """
        return sorted(self._current().values(), key=lambda key: (key.created_at, key.key_id))

    # Writing -------------------------------------------------------------------------------

    def _update(self, change: Callable[[dict[str, ApiKey]], ApiKey]) -> ApiKey:
        """Apply ``change`` to a fresh read of the store under the lock and write it back."""
        try:
            with file_lock(self.lock_path):
                self._remove_leftover_temporaries()
                # Re-read under the lock: the cache may predate another process's update.
                _, keys = self._read()
                changed = change(keys)
                document = _StoreDocument(
                    keys=sorted(keys.values(), key=lambda key: key.created_at)
                )
                data = json.dumps(document.model_dump(mode="json"), indent=2) + "\n"
                write_atomically(self.path, data.encode("utf-8"))
        except OSError as error:  # the lock or the write: a parent that is a file, a full disk
            raise KeyStoreError(f"{self.path}: cannot write the key store: {error}") from None
        self._current()
        return changed

    def _remove_leftover_temporaries(self) -> None:
        """Delete what a writer killed mid-write left; only call it holding the lock.

        Every write happens under the lock, so a temporary file seen by the lock's holder
        belongs to a writer that died: it holds key hashes and would otherwise stay for good.
        """
        prefix, suffix = f".{self.path.name}.", ".tmp"
        for entry in self.path.parent.iterdir():
            if entry.name.startswith(prefix) and entry.name.endswith(suffix):
                entry.unlink(missing_ok=True)

    def create(self, hospital: str, region: str, models: list[str]) -> tuple[ApiKey, str]:
        """Issue a new key for one hospital.

        Args:
            hospital: Who holds the key, e.g. ``St Mary``.
            region: Where, e.g. ``eu-west``; shown in logs and refusals.
            models: Registered-model names the key may call; ``["*"]`` grants every model.

        Returns:
            The stored key record and the plaintext key. The plaintext is not stored anywhere:
            hand it over now, it cannot be shown again.

        Raises:
            KeyStoreError: if a name is invalid or the store cannot be read or written.
        """
        check_name("hospital", hospital)
        check_name("region", region)
        if isinstance(models, str):
            raise TypeError("models must be a list of model names, not one string")
        if not models:
            raise KeyStoreError("models: grant at least one model name, or '*' for every model")
        granted = list(dict.fromkeys(check_model_name("models", m, allow_all=True) for m in models))
        if ALL_MODELS in granted:
            granted = [ALL_MODELS]
        secret = secrets.token_urlsafe(32)

        def add(keys: dict[str, ApiKey]) -> ApiKey:
            key_id = secrets.token_hex(6)
            while key_id in keys:
                key_id = secrets.token_hex(6)
            plaintext = f"{KEY_PREFIX}{key_id}_{secret}"
            key = ApiKey(
                key_id=key_id,
                hospital=hospital,
                region=region,
                models=granted,
                created_at=utc_timestamp(),
                key_sha256=_sha256(plaintext),
            )
            keys[key_id] = key
            return key

        key = self._update(add)
        return key, f"{KEY_PREFIX}{key.key_id}_{secret}"

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key; revoking a revoked key changes nothing.

        Args:
            key_id: The 12-character key id shown by ``medscreen keys list``.

        Returns:
            The key record with ``revoked_at`` set.

        Raises:
            UnknownKeyError: if no key has that id.
            KeyStoreError: if the store cannot be read or written.
        """
        return self.revoke_key(key_id).key

    def revoke_key(self, key_id: str, *, whole_key: str | None = None) -> Revocation:
        """Revoke a key, saying whether it was revoked already (then nothing changes).

        Args:
            key_id: The 12-character key id shown by ``medscreen keys list``.
            whole_key: The whole key (``msk_<key_id>_<secret>``), when that is what was given:
                it must be the stored key itself, or nothing is revoked.

        Returns:
            The key record with ``revoked_at`` set, and whether it was set before.

        Raises:
            UnknownKeyError: if no key has that id.
            WrongSecretError: if ``whole_key`` is not the key stored under that id.
            KeyStoreError: if the store cannot be read or written.
        """
        if not self.path.exists():
            # Checked before locking: revoking must not leave a lock file where no store is.
            raise UnknownKeyError(f"no API key with id {key_id!r}: {self.path} does not exist")
        already = False

        def mark(keys: dict[str, ApiKey]) -> ApiKey:
            nonlocal already
            key = keys.get(key_id)
            if key is None:
                raise UnknownKeyError(f"no API key with id {key_id!r} in {self.path}")
            # A key with another secret is another store's, or a mangled copy: revoking the key
            # that happens to share its id would cut off a hospital nobody meant to.
            if whole_key is not None and not hmac.compare_digest(
                _sha256(whole_key), key.key_sha256
            ):
                raise WrongSecretError(
                    f"the secret does not match key {key_id} in {self.path}; revoke by the key "
                    f"id (`medscreen keys revoke {key_id}`) if that is the key meant"
                )
            already = key.revoked
            if not already:
                key = key.model_copy(update={"revoked_at": utc_timestamp()})
                keys[key_id] = key
            return key

        key = self._update(mark)
        return Revocation(key, already)

    # Checking requests ---------------------------------------------------------------------

    def authenticate(self, presented: str | None) -> ApiKey:
        """Return the key record for the key a request presented.

        Args:
            presented: The ``Authorization`` header value (``Bearer <key>``) or the bare key;
                None if the request sent none.

        Returns:
            The matching, unrevoked key.

        Raises:
            AuthError: 401 if the key is missing, malformed, unknown or revoked.
            KeyStoreError: if the store file exists but cannot be read (the service should
                answer 5xx: it cannot tell a valid key from a revoked one).
        """
        unauthorised = HTTPStatus.UNAUTHORIZED
        candidate = _BEARER.sub("", (presented or "").strip(), count=1).strip()
        if not candidate:
            raise AuthError(
                unauthorised,
                f"no API key: send 'Authorization: Bearer <key>' with every request; {_ISSUE_HINT}",
            )
        match = _PRESENTED_KEY.fullmatch(candidate)
        if not match:
            # Never echo what was sent: it may be some other secret pasted by mistake.
            raise AuthError(
                unauthorised,
                "malformed API key: expected 'Authorization: Bearer msk_<key id>_<secret>' "
                f"exactly as issued; {_ISSUE_HINT}",
            )
        key_id = match["key_id"]
        key = self._current().get(key_id)
        digest = _sha256(candidate)
        # Compare against a dummy for unknown ids too, so timing does not reveal which ids exist.
        expected = key.key_sha256 if key is not None else "0" * 64
        if not hmac.compare_digest(digest, expected) or key is None:
            raise AuthError(
                unauthorised,
                f"API key {key_id} is not recognised: check that the whole key was copied; "
                f"{_ISSUE_HINT}",
            )
        if key.revoked:
            raise AuthError(
                unauthorised,
                f"API key {key_id} of {key.hospital} ({key.region}) was revoked at "
                f"{key.revoked_at}; ask the service operator for a new key "
                "(`medscreen keys create`)",
            )
        return key

    def authorise(self, key: ApiKey, model_name: str) -> None:
        """Refuse a request for a model the key does not grant.

        Args:
            key: The key returned by :meth:`authenticate`.
            model_name: The registered-model name the request would use.

        Raises:
            AuthError: 403 naming the hospital, region, requested model and the granted models.
        """
        if key.grants(model_name):
            return
        requested = shown(model_name)  # the client's text: cut, and quoted for the log's mask
        raise AuthError(
            HTTPStatus.FORBIDDEN,
            f"API key {key.key_id} of {key.hospital} ({key.region}) is not granted model "
            f"{requested}; it is granted: {', '.join(key.models)}. Ask the service operator "
            f"for a key granted {requested}",
        )
