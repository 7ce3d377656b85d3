"""Checked downloads and local-directory lookup for raw dataset files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sqlite3
import time
import urllib.parse
from http import HTTPStatus
from pathlib import Path

import requests
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from datasets.catalogue import DatasetSpec
from datasets.errors import DatasetError

DATA_DIR_ENV = "MEDSCREEN_DATA_DIR"
CACHE_DIR_ENV = "MEDSCREEN_CACHE_DIR"
_CHUNK_BYTES = 1 << 20
# A live download writes at least once a minute (its read timeout); a partial file left alone
# this long was left by a process that was killed, and is removed.
_STALE_PARTIAL_S = 3600
_GATEWAY_FAILURES = frozenset({502, 503, 504})
_SOCKET_ERROR = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
# What OpenSSL says when the other end answers a TLS handshake in plain text (3.0; 3.2 and later).
_PLAIN_TEXT_ANSWER = ("WRONG_VERSION_NUMBER", "record layer failure")
_PROGRESS_CONSOLE = Console(stderr=True)
# The password runs to the authority's last "@": clients take "user:p@ss@host" as "p@ss".
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:'\"]*):[^/?#\s'\"]*@")
# User information without a password: often a token alone ("https://TOKEN@host").
_URL_USER_ONLY = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s:'\"]+@")


def hide_passwords(text: str) -> str:
    """Return ``text`` with the secret of every URL in it replaced by ``***``.

    For messages that name a configured URL: an error line or a log must not carry the secret.
    In ``http://user:password@host`` the user name stays, to say which account was used; user
    information without a password (``https://TOKEN@host``) may be a token, so it is hidden
    whole, as pip hides it.
    """
    return _URL_USER_ONLY.sub(r"\1***@", _URL_PASSWORD.sub(r"\1:***@", text))


def default_cache_dir() -> Path:
    """Return the download cache: ``$MEDSCREEN_CACHE_DIR`` or ``~/.cache/medscreen/datasets``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "medscreen" / "datasets"


def _content_length(response: requests.Response) -> int | None:
    """The announced size, for the progress bar; None if absent or not a number."""
    announced = response.headers.get("Content-Length", "")
    return int(announced) if announced.isdigit() and int(announced) > 0 else None


def readable_sha256(path: Path) -> str:
    """:func:`file_sha256`, with an unreadable file a :class:`DatasetError` naming it."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise DatasetError(f"{path}: cannot read it ({error.strerror or error})") from error


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    destination: Path,
    *,
    sha256: str,
    md5: str | None = None,
    size_bytes: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Download ``url`` to ``destination`` with its checksums checked.

    The bytes go to a temporary file beside the destination, which is renamed into place only
    after the transfer is complete and every checksum given matches, so a failed, interrupted
    or corrupt download leaves nothing behind.

    Args:
        url: Where to download from (http or https).
        destination: The final path of the file.
        sha256: Expected SHA-256 hex digest.
        md5: Expected MD5 hex digest, where the dataset's authors publish one.
        size_bytes: The file's size, where known: a server that announces or sends more is
            cut off, rather than read to the end (a full disk, for an endless answer).
        show_progress: Show a progress bar on the terminal.

    Returns:
        The destination path.

    Raises:
        DatasetError: if the transfer fails or a checksum does not match.
    """
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # for example a cache directory that is a file
        raise DatasetError(f"{destination.parent}: cannot create it ({error})") from error
    _remove_stale_partials(destination)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.part")
    md5_digest, sha256_digest = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    try:
        try:
            with requests.get(url, stream=True, timeout=(10, 60)) as response:
                response.raise_for_status()
                total = _content_length(response)
                # An encoded (gzip) answer announces its encoded size.
                plain = "Content-Encoding" not in response.headers
                if size_bytes is not None and plain and total is not None and total != size_bytes:
                    raise DatasetError(
                        f"{url} announces {total} bytes, but the official file has "
                        f"{size_bytes}: not the official file; nothing was kept"
                    )
                received = 0
                with (
                    partial.open("wb") as stream,
                    Progress(
                        "[progress.description]{task.description}",
                        BarColumn(),
                        DownloadColumn(),
                        TransferSpeedColumn(),
                        disable=not show_progress,
                        transient=True,
                        console=_PROGRESS_CONSOLE,  # stdout holds only what a command prints
                    ) as progress,
                ):
                    task = progress.add_task(f"downloading {destination.name}", total=total)
                    for chunk in response.iter_content(_CHUNK_BYTES):
                        received += len(chunk)
                        if size_bytes is not None and received > size_bytes:
                            raise DatasetError(
                                f"{url} sent more than the official file's {size_bytes} "
                                "bytes: not the official file; nothing was kept"
                            )
                        stream.write(chunk)
                        md5_digest.update(chunk)
                        sha256_digest.update(chunk)
                        progress.advance(task, len(chunk))
                    stream.flush()
                    os.fsync(stream.fileno())
        except requests.RequestException as error:
            raise DatasetError(
                f"download of {url} failed ({type(error).__name__}: {error}); nothing was kept"
            ) from error
        for name, expected, actual in (
            ("MD5", md5, md5_digest.hexdigest()),
            ("SHA-256", sha256, sha256_digest.hexdigest()),
        ):
            if expected is not None and actual != expected:
                raise DatasetError(
                    f"{name} of the file downloaded from {url} is {actual}, expected {expected}: "
                    "the file is corrupt or not the official one, and was discarded"
                )
        os.replace(partial, destination)
    except OSError as error:  # a read-only or full disk, a directory in the file's place
        raise DatasetError(
            f"{destination}: cannot write it ({error.strerror or error}); nothing was kept"
        ) from error
    finally:
        partial.unlink(missing_ok=True)
    return destination


def unreachable_reason(url: str, *, timeout_s: float = 10.0) -> str | None:
    """Say why nothing answers HTTP at ``url``, or return None when a server answers.

    One attempt, no retries: for a check at start-up, where a wrong address should be one line
    at once, not minutes of a client's retries. An HTTP answer counts, an error status too
    (the question is whether a server is there), except a gateway's 502, 503 or 504; so does a
    failed TLS handshake, unless the port answered in plain text (an ``https`` address for a
    plain-HTTP server, which clients would otherwise retry for minutes).

    Args:
        url: An http or https URL.
        timeout_s: How long to wait to connect, and then for the answer's first byte.

    Returns:
        For example ``"Connection refused"``, ``"no answer within 10 s"`` or ``"HTTP 502 Bad
        Gateway"``; None if a server answered. URL passwords never appear in it.
    """
    try:
        with requests.get(url, timeout=timeout_s, stream=True, allow_redirects=False) as answer:
            status = answer.status_code
    except requests.exceptions.SSLError as error:
        if any(sign in str(error) for sign in _PLAIN_TEXT_ANSWER):
            return "the port speaks plain HTTP, not HTTPS: use an http:// address"
        # Something speaks TLS on that port; whether its certificate is trusted is for the
        # client's own TLS settings (a hospital's private CA, client certificates).
        return None
    except requests.Timeout:
        return f"no answer within {timeout_s:g} s"
    except requests.RequestException as error:
        # urllib3 nests the socket error in a long message; its errno text is what tells.
        reason = _SOCKET_ERROR.search(str(error))
        return reason.group(1) if reason else type(error).__name__
    if status in _GATEWAY_FAILURES:
        # What a proxy or load balancer answers when the server behind it does not.
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    return None


# Databases MLflow can track in directly, with the port each listens on by default.
_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
_DATABASE_URI = re.compile(rf"({'|'.join(_DATABASE_PORTS)})(\+[a-z0-9]+)?://")
_REMEDY = "start it or correct the address"
# A cheap call every MLflow tracking server answers (GET and POST since MLflow 2).
_MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search"
# All that MLflow's answer to the probe may hold; another server's JSON holds something else.
_PROBE_FIELDS = frozenset({"experiments", "next_page_token"})
# A login in the way: whether MLflow is behind it is for the client and its credentials.
_LOGIN_STATUSES = frozenset({401, 403, 407})
_PROBE_MAX_BYTES = 1 << 20


class TrackingServerError(RuntimeError):
    """The configured tracking store cannot be used: no answer, a bad address or directory.

    Defined here, beside the checks, so that the command line catches it without loading
    MLflow (a second of every start, `--help` included).
    """


def tracking_address_problem(uri: str, *, timeout_s: float = 10.0) -> str | None:
    """Say why a tracking address (not ``sqlite:``) cannot be used, or return None.

    One check, at start: MLflow retries a server or database that does not answer for
    minutes, silently, and takes a mistyped address for a store it cannot open. A server that
    answers HTTP is also asked one MLflow question: another web server's 404 reached users as
    a traceback, or as "no registered model", blaming the model rather than the address.

    Args:
        uri: ``http(s)://`` (a tracking server) or a database URI (``postgresql://`` ...).
        timeout_s: How long to wait for an answer.

    Returns:
        The problem in words, without the address; None if it answers (a server: as MLflow
        does, or behind a login).
    """
    if uri.startswith(("http://", "https://")):
        problem = unreachable_reason(uri, timeout_s=timeout_s)
        if problem:
            return f"the tracking server does not answer ({problem}); {_REMEDY}"
        return _not_mlflow_reason(uri, timeout_s=timeout_s)
    if not _DATABASE_URI.match(uri):
        return (
            "not a tracking store medscreen uses: give http(s)://HOST:PORT (a tracking "
            "server), sqlite:///PATH or a database (postgresql://, mysql://)"
        )
    parsed = urllib.parse.urlsplit(uri)
    if not parsed.hostname:
        return None  # a local socket: left to the driver
    try:
        port = parsed.port or _DATABASE_PORTS[parsed.scheme.split("+")[0]]
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"the database does not answer (no answer within {timeout_s:g} s); {_REMEDY}"
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or error
        return f"the database does not answer ({reason}); {_REMEDY}"


def _not_mlflow_reason(uri: str, *, timeout_s: float) -> str | None:
    """Say why the HTTP server at ``uri`` is not an MLflow tracking server, or return None.

    None also when it cannot tell (a login, a certificate the check does not trust, a failure
    of this second request): the MLflow client, with its own settings, reports those.
    """
    try:
        with requests.get(
            f"{uri.rstrip('/')}{_MLFLOW_PROBE}",
            params={"max_results": 1},
            timeout=timeout_s,
            stream=True,
        ) as answer:
            status = answer.status_code
            # A bound: a wrong address may serve anything.
            content = answer.raw.read(_PROBE_MAX_BYTES, decode_content=True)
    except requests.RequestException:
        return None
    if status in _LOGIN_STATUSES:
        return None
    try:
        body = json.loads(content)
    except ValueError:  # HTML, or nothing
        body = None
    if isinstance(body, dict) and (
        "error_code" in body or (status == 200 and body.keys() <= _PROBE_FIELDS)
    ):
        return None  # MLflow's answer, or MLflow's own error (which the client reports)
    try:
        answered = f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        answered = f"HTTP {status}"
    if status == 200:
        answered += ", not MLflow's JSON"
    return (
        f"answers HTTP but is not an MLflow tracking server (GET {_MLFLOW_PROBE} answered "
        f"{answered}); correct the address (where `mlflow server` listens)"
    )


def sqlite_store_problem(database: Path, *, create: bool) -> str | None:
    """Say why ``database`` cannot be MLflow's sqlite store, or return None.

    Checked with sqlite itself, before MLflow opens it: MLflow answers a file that is not a
    database with a traceback, and one it cannot open (a read-only directory, a directory
    given as the file) with minutes of silent retries.

    Args:
        database: The sqlite file.
        create: Whether a missing file may be created (``False``: opened read-only).

    Returns:
        The problem in words, naming the file and what to do; None if it looks usable (or
        is busy: a lock is MLflow's to wait for).
    """
    if database.is_dir():
        return f"{database} is a directory, not an sqlite file; give the path of a file"
    address = f"file:{urllib.parse.quote(os.fspath(database))}?mode={'rwc' if create else 'ro'}"
    try:
        connection = sqlite3.connect(address, uri=True, timeout=30)
        try:
            tables = {
                name
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
        finally:
            connection.close()
    except sqlite3.OperationalError as error:
        if "unable to open" not in str(error):
            return None  # busy or locked: MLflow waits for it
        return (
            f"cannot open the tracking store {database} ({error}); check the permissions "
            "of the file and its directory, or point the setting at another store"
        )
    except sqlite3.DatabaseError as error:  # "file is not a database"
        return (
            f"{database} is not an MLflow sqlite store ({error}); point the setting at "
            "another store"
        )
    if tables and not tables & {"experiments", "alembic_version"}:
        # MLflow would add its own tables to another application's database.
        others = ", ".join(sorted(tables)[:3])
        return (
            f"{database} is not an MLflow sqlite store (it holds another application's "
            f"tables: {others}); point the setting at another store"
        )
    return None


def _remove_stale_partials(destination: Path) -> None:
    """Remove partial downloads of ``destination`` that killed processes left behind."""
    for partial in destination.parent.glob(f".{destination.name}.*.part"):
        try:
            if time.time() - partial.stat().st_mtime > _STALE_PARTIAL_S:
                partial.unlink()
        except OSError:
            pass  # gone already, or not ours to remove: it is never read either way


def verify_local_file(path: Path, spec: DatasetSpec, *, remedy: str = "") -> str:
    """Check a local copy of a dataset file against the catalogue and return its SHA-256.

    Args:
        path: The local copy.
        spec: The catalogue entry it should match.
        remedy: What to do about a wrong file, appended to the error.

    Raises:
        DatasetError: if the file is missing or its SHA-256 is not the catalogue's.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (dataset {spec.name!r} expects {spec.filename})")
    actual = readable_sha256(path)
    if actual != spec.sha256:
        raise DatasetError(
            f"{path}: SHA-256 is {actual}, expected {spec.sha256} for dataset {spec.name!r}"
            + (f"; {remedy}" if remedy else "")
        )
    return actual


def fetch_dataset(
    spec: DatasetSpec,
    *,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    url: str | None = None,
    show_progress: bool = False,
) -> Path:
    """Return a verified local path to a dataset's raw file, downloading it if needed.

    A local directory (``data_dir``) wins over the cache and is never written to. Otherwise
    the file is looked up in the cache and downloaded from ``url`` (default: the catalogue's
    official URL) when missing. ``$MEDSCREEN_DATA_DIR`` stands in for ``data_dir`` only when
    neither a cache directory nor a URL is given.

    Raises:
        DatasetError: if the file is missing, corrupt, or cannot be downloaded.
    """
    if data_dir is None and cache_dir is None and url is None and os.environ.get(DATA_DIR_ENV):
        data_dir = Path(os.environ[DATA_DIR_ENV])
    if data_dir is not None:
        path = data_dir / spec.filename
        verify_local_file(path, spec)
        return path
    path = (cache_dir or default_cache_dir()) / spec.filename
    if path.is_file():
        verify_local_file(path, spec, remedy="delete it to download it again")
        return path
    return download_file(
        url or spec.url,
        path,
        md5=spec.md5,
        sha256=spec.sha256,
        size_bytes=spec.size_bytes,
        show_progress=show_progress,
    )
