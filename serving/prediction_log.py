"""The prediction log: one hash-chained JSON line per request (EU AI Act art. 12 record-keeping).

Every stored line is a :class:`PredictionRecord` plus ``seq`` (1, 2, ...), ``prev_hash`` (the
previous line's ``hash``; 64 zeros for the first) and ``hash``, the SHA-256 of ``prev_hash``
followed by the canonical JSON of the line without ``hash``. Editing, inserting, deleting or
reordering a line breaks the chain; a head file ``<log>.head.json`` holding the last ``seq`` and
``hash`` reveals lines removed from the end. :func:`verify_log` (``medscreen audit verify``) checks
all of it.

Nothing that identifies a patient belongs here: the record schema is closed (unknown fields are
rejected) and its text fields are constrained to identifiers, not free text.

Several processes may append to one log: each commit holds an ``flock`` on ``<log>.lock`` and
continues the chain from the file's last line when another process wrote since.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from datasets.files import NotRegularFileError, open_regular_file, write_atomically
from serving.api_keys import NAME_PATTERN, check_model_name, check_name

logger = logging.getLogger("medscreen.serving")
GENESIS_HASH = "0" * 64
_HEX64 = r"^[0-9a-f]{64}$"
# Longer than any line the writer builds: the closed schema bounds every field, so the largest
# record it admits (64 summary entries of 4300-digit integers, a 1000-character error of
# astral characters) is under 300 KB as ASCII JSON; records in service are a few hundred bytes.
# A longer line is not a record: verify reports it without holding it whole in memory.
MAX_LINE_BYTES = 1 << 20
# Longest line the writer looks back over to find where the chain ends.
_MAX_TAIL_BYTES = MAX_LINE_BYTES
# A head file is one short JSON object; anything longer is not one, and is not read whole.
_MAX_HEAD_BYTES = 4096


# The field by which the first record after a crash commits to the lines the crash left.
INTERRUPTED_WRITE_FIELD = "after_interrupted_write"
# What a writer killed mid-write leaves: the start of a record line (canonical ASCII JSON).
_TORN_LINE = re.compile(rb'\{"[\x20-\x7e]*')


def interrupted_write_commitment(left: bytes) -> dict[str, int | str]:
    """What a record says of the lines a crash left before it: their count and SHA-256."""
    return _commitment(left.count(b"\n") + 1, hashlib.sha256(left).hexdigest())


def _commitment(lines: int, sha256: str) -> dict[str, int | str]:
    """The commitment's one form, for the writer and for ``verify`` (which hashes as it reads)."""
    return {"lines": lines, "sha256": sha256}


def _last_record(descriptor: int, size: int) -> tuple[tuple[int, str, str] | None, bytes]:
    """The last chained record of the file's tail, and the bytes after its line.

    ``(None, b"")`` if no record is within :data:`_MAX_TAIL_BYTES` of the end.
    """
    buffer, start = b"", size
    while True:
        end = len(buffer)
        while True:
            newline = buffer.rfind(b"\n", 0, end)
            if newline < 0 and start > 0:
                break  # the piece may go on before the buffer: read further back
            piece = buffer[newline + 1 : end]
            if piece:
                with contextlib.suppress(ValueError):
                    position = _chain_position(_parse_json(piece))
                    if position is not None:
                        # A record cut just before its newline is whole: nothing after it.
                        return position, buffer[end + 1 :]
            if newline < 0:
                return None, b""
            end = newline
        if start == 0 or size - start >= _MAX_TAIL_BYTES:
            return None, b""
        step = min(65536, start)
        start -= step
        buffer = os.pread(descriptor, step, start) + buffer


def _require_record(record: object) -> None:
    """Only the closed schema is ever written: a plain dict could carry anything."""
    if not isinstance(record, PredictionRecord):
        raise TypeError(f"expected a PredictionRecord, got {type(record).__name__}")


class PredictionLogError(RuntimeError):
    """The prediction log could not be written; the message names the file."""


def utc_now() -> str:
    """Return the current UTC time as ISO-8601 with milliseconds, e.g. ``...T09:30:00.123Z``."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def head_path_for(log: Path) -> Path:
    """Return the head file of a log: ``<log>.head.json``.

    Args:
        log: The prediction log.

    Returns:
        The path of its head file.
    """
    return log.with_name(log.name + ".head.json")


def canonical_json(value: Any) -> str:
    """Return the canonical JSON the chain hashes: sorted keys, no spaces, ASCII only.

    Args:
        value: A JSON-serialisable value (no NaN or infinity).

    Returns:
        The canonical text.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def chain_hash(prev_hash: str, line_without_hash: dict[str, Any]) -> str:
    """Return the ``hash`` of a stored line.

    Args:
        prev_hash: The previous line's hash (64 zeros for the first line).
        line_without_hash: The stored line without its ``hash`` field.

    Returns:
        SHA-256 hex of ``prev_hash`` followed by the line's canonical JSON.
    """
    payload = prev_hash + canonical_json(line_without_hash)
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


class PredictionRecord(BaseModel):
    """What is kept about one request. Closed schema: the guard against logging patient data.

    ``outcome="prediction"`` needs ``score``, ``threshold``, ``decision``, ``model_name`` and
    ``model_version`` and a 2xx ``status``; ``outcome="failed"`` needs ``error`` and a 4xx/5xx
    ``status`` and may not carry a ``score`` or ``decision``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    time: str = Field(
        default_factory=utc_now,
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}(Z|\+00:00)$",
    )
    request_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    outcome: Literal["prediction", "failed"]
    status: int = Field(ge=100, le=599)
    route: str = Field(pattern=r"^/[A-Za-z0-9/_.-]{0,127}$")
    hospital: str | None = None
    region: str | None = None
    key_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{12}$")
    model_name: str | None = None
    model_version: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    model_alias: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # The graph that answered, as registered: ties the record to one exact file.
    model_sha256: str | None = Field(default=None, pattern=_HEX64)
    input_sha256: str | None = Field(default=None, pattern=_HEX64)
    input_format: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.+/-]{1,64}$")
    score: float | None = None
    threshold: float | None = None
    decision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9 _.-]{1,64}$")
    summary: dict[str, int | float | str] | None = Field(default=None, max_length=64)
    latency_ms: float = Field(ge=0)
    error: str | None = Field(default=None, min_length=1, max_length=1000)

    @field_validator("hospital", "region")
    @classmethod
    def _valid_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_name(info.field_name or "name", value)

    @field_validator("model_name")
    @classmethod
    def _valid_model(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name("model_name", value)

    @field_validator("summary")
    @classmethod
    def _valid_summary(
        cls, value: dict[str, int | float | str] | None
    ) -> dict[str, int | float | str] | None:
        for key, item in (value or {}).items():
            check_name("summary key", key)
            # Counts and labels only: free text could carry anything, a patient's name included.
            if isinstance(item, str) and not NAME_PATTERN.fullmatch(item):
                raise ValueError(
                    f"summary[{key!r}] must be a number or a short label (1-64 letters, digits, "
                    "spaces, '_', '.' or '-')"
                )
        return value

    @model_validator(mode="after")
    def _outcome_fields(self) -> Self:
        if self.outcome == "prediction":
            required = ("score", "threshold", "decision", "model_name", "model_version")
            missing = [name for name in required if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a 'prediction' record needs {', '.join(missing)}")
            if self.error is not None:
                raise ValueError("a 'prediction' record has no error; log outcome 'failed'")
            if not 200 <= self.status < 300:
                raise ValueError(f"a 'prediction' record has a 2xx status, not {self.status}")
        else:
            if self.error is None:
                raise ValueError("a 'failed' record needs error")
            present = [name for name in ("score", "decision") if getattr(self, name) is not None]
            if present:
                raise ValueError(f"a 'failed' record may not carry {', '.join(present)}")
            if self.status < 400:
                raise ValueError(f"a 'failed' record has a 4xx or 5xx status, not {self.status}")
        return self


def _parse_json(raw: bytes) -> Any:
    """``json.loads``, with nesting too deep for the parser raised as the ValueError it is."""
    try:
        return json.loads(raw)
    except RecursionError as error:
        raise ValueError("JSON nested too deeply") from error


def _chain_position(line: Any) -> tuple[int, str, str] | None:
    """``(seq, prev_hash, hash)`` of a parsed line, or None if it is not a chained record."""
    if not isinstance(line, dict):
        return None
    seq, prev_hash, digest = line.get("seq"), line.get("prev_hash"), line.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None
    for value in (prev_hash, digest):
        if not isinstance(value, str) or len(value) != 64:
            return None
        if any(character not in "0123456789abcdef" for character in value):
            return None
    return seq, prev_hash, digest


def _read_head(head_file: Path) -> tuple[tuple[int, str] | None, str | None]:
    """``((seq, hash), None)`` from a head file, ``(None, None)`` if absent, else a problem."""
    try:
        with open_regular_file(head_file) as stream:
            raw = stream.read(_MAX_HEAD_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except NotRegularFileError as error:
        return None, f"{head_file.name}: the head file {error.strerror}"
    except OSError as error:
        return None, f"{head_file.name}: cannot read the head file: {error}"
    if len(raw) > _MAX_HEAD_BYTES:
        return None, f"{head_file.name}: the head file is longer than {_MAX_HEAD_BYTES} bytes"
    try:
        head = _parse_json(raw)
    except ValueError:
        return None, f"{head_file.name}: the head file is not JSON"
    seq = head.get("seq") if isinstance(head, dict) else None
    digest = head.get("hash") if isinstance(head, dict) else None
    position = _chain_position({"seq": seq, "prev_hash": GENESIS_HASH, "hash": digest})
    if position is None:
        return None, f"{head_file.name}: the head file has no valid seq and hash"
    return (position[0], position[2]), None


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_Waiter = tuple[PredictionRecord, asyncio.AbstractEventLoop, "asyncio.Future[dict[str, Any]]"]


class PredictionLog:
    """Appends records to one hash-chained JSON Lines file.

    :meth:`append` writes one record and fsyncs before returning. :meth:`append_async` hands the
    record to a writer thread that commits everything pending at once, with one fsync per batch
    (group commit), and resolves every waiting caller. ``commits`` counts fsynced batches and
    ``records_written`` the records in them.

    Create one per process (after any fork), and :meth:`close` it at shutdown.

    Args:
        path: The log file; it and its directory are created on the first append.
    """

    def __init__(self, path: Path, *, head_interval_seconds: float = 0.0) -> None:
        self.path = Path(path)
        self.head_path = head_path_for(self.path)
        # How often the head file is rewritten (it may lag; verify accepts a head behind the
        # log); 0 rewrites it with every commit. close() always brings it up to date.
        self.head_interval_seconds = head_interval_seconds
        self._head_written_at = float("-inf")
        self._head_due = False
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.commits = 0
        self.records_written = 0
        self._closed = False
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """State that belongs to one process; a forked child starts over with fresh copies."""
        self._pid = os.getpid()
        # Serialises commits within this process; the flock serialises processes.
        self._mutex = threading.Lock()
        self._condition = threading.Condition()
        self._pending: list[_Waiter] = []
        self._stopping = False
        self._writer: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        # Size of the log after this process's last commit; None: re-read the tail first.
        self._known_size: int | None = None
        self._seq = 0
        self._hash = GENESIS_HASH
        self._needs_newline = False
        # What a killed writer left after the last record: the next record commits to it.
        self._interrupted: dict[str, int | str] | None = None

    def check_writable(self) -> None:
        """Check, before a service starts, that records can be appended here.

        Opens what the first commit opens (the folder, the lock file, an existing log) without
        writing a record or creating the log: a log that does not exist yet stays absent, so
        ``audit verify`` keeps telling a new deployment (no log) from an emptied log.

        Raises:
            OSError: what the first commit would have met.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        if self.path.exists() or self.path.is_symlink():
            os.close(os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC))
        elif not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "the folder cannot be written", str(self.path))

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            # Descriptors inherited over fork share their flock with the parent: drop them.
            for descriptor in (self._lock_fd, self._log_fd):
                if descriptor is not None:
                    with contextlib.suppress(OSError):
                        os.close(descriptor)
            self._reset_process_state()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Committing ----------------------------------------------------------------------------

    def _open_log(self) -> int:
        """The log's descriptor, reopened if the file was removed or replaced since."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        if self._log_fd is not None:
            held = os.fstat(self._log_fd)
            if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (held.st_dev, held.st_ino):
                os.close(self._log_fd)
                self._log_fd = None
        if self._log_fd is None:
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._log_fd = os.open(self.path, flags, 0o600)
            self._known_size = None
            if on_disk is None:
                # Make the new directory entry itself durable, not only the data.
                _fsync_directory(self.path.parent)
        return self._log_fd

    def _resume(self, descriptor: int, size: int) -> None:
        """Continue the chain after whatever is in the file (another process may have written).

        Takes the latest of the last record in the file, the head file and this process's own
        last commit, so that a log truncated, emptied or deleted behind the writer's back shows
        up as a seq gap instead of being silently re-chained. Lines after the last record are
        what a writer killed mid-write left (one per crash): the next record commits to them.
        """
        # Listed first, this process's own commit wins a tie: another worker that never saw the
        # records cut behind its back may have written the same seq since.
        candidates: list[tuple[int, str]] = [(self._seq, self._hash)] if self._seq else []
        self._needs_newline = size > 0 and os.pread(descriptor, 1, size - 1) != b"\n"
        self._interrupted = None
        position, after = _last_record(descriptor, size)
        if position is not None:
            candidates.append((position[0], position[2]))
            if after:
                self._interrupted = interrupted_write_commitment(after.removesuffix(b"\n"))
        head, _ = _read_head(self.head_path)
        if head is not None:
            candidates.append(head)
        self._seq, self._hash = max(
            candidates, key=lambda position: position[0], default=(0, GENESIS_HASH)
        )

    def _commit(self, records: list[PredictionRecord]) -> list[dict[str, Any]]:
        """Write, fsync and chain a batch; update the head file. Caller holds ``_mutex``."""
        self._check_process()
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._lock_fd = os.open(self.lock_path, flags, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            descriptor = self._open_log()
            size = os.fstat(descriptor).st_size
            if size != self._known_size:
                self._resume(descriptor, size)
            seq, previous = self._seq, self._hash
            chunks = [b"\n"] if self._needs_newline else []
            stored = []
            for record in records:
                seq += 1
                line = record.model_dump(mode="json")
                if self._interrupted is not None and not stored:
                    line[INTERRUPTED_WRITE_FIELD] = self._interrupted
                line["seq"] = seq
                line["prev_hash"] = previous
                previous = line["hash"] = chain_hash(previous, line)
                chunks.append(canonical_json(line).encode("ascii") + b"\n")
                stored.append(line)
            data = b"".join(chunks)
            # Until the write is known durable, the next commit must re-read the tail.
            self._known_size = None
            try:
                _write_all(descriptor, data)
                os.fsync(descriptor)
            except OSError:
                # The callers are refused: their records must not stay behind as predictions.
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, size)
                raise
            self._known_size = size + len(data)
            self._seq, self._hash, self._needs_newline = seq, previous, False
            self._interrupted = None
            # No directory fsync: a head lost in a crash is merely behind, which verify accepts;
            # the file fsync still guarantees a head that survives is complete.
            self._head_due = True
            if time.monotonic() - self._head_written_at >= self.head_interval_seconds:
                self._write_head()
            self.commits += 1
            self.records_written += len(records)
            return stored
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write_head(self) -> None:
        """Record the chain's end in the head file. Caller holds the flock."""
        head = canonical_json({"seq": self._seq, "hash": self._hash}).encode("ascii")
        try:
            write_atomically(self.head_path, head, sync_directory=False)
        except OSError as error:
            # The records are durable; a head left behind is one verify accepts, so the
            # callers' predictions stand (failing them now would contradict the log).
            logger.warning("%s: head not updated: %s", self.head_path, error)
            return
        self._head_written_at, self._head_due = time.monotonic(), False

    def _flush_head(self) -> None:
        """Bring a lagging head up to date, unless another process has written since."""
        if not self._head_due or self._lock_fd is None or self._log_fd is None:
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._log_fd).st_size == self._known_size:
                self._write_head()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def append(self, record: PredictionRecord) -> dict[str, Any]:
        """Append one record; it is on disk (fsynced) when this returns.

        Args:
            record: The record to keep.

        Returns:
            The stored line as a dict, including ``seq``, ``prev_hash`` and ``hash``.

        Raises:
            PredictionLogError: if the log is closed or cannot be written.
        """
        _require_record(record)
        if self._closed:
            raise PredictionLogError(f"{self.path}: the prediction log is closed")
        self._check_process()
        with self._mutex:
            try:
                return self._commit([record])[0]
            except OSError as error:
                raise PredictionLogError(f"{self.path}: cannot append: {error}") from error

    # Group commit --------------------------------------------------------------------------

    async def append_async(self, record: PredictionRecord) -> dict[str, Any]:
        """Append one record from async code; returns once it is fsynced.

        Records from concurrent callers are committed together by one writer thread with a
        single fsync, so the event loop never blocks on the disk. A record is written even if
        the awaiting task is cancelled.

        Args:
            record: The record to keep.

        Returns:
            The stored line as a dict, including ``seq``, ``prev_hash`` and ``hash``.

        Raises:
            PredictionLogError: if the log is closed or cannot be written.
        """
        _require_record(record)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._check_process()
        with self._condition:
            if self._closed:
                raise PredictionLogError(f"{self.path}: the prediction log is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_pending, name="prediction-log-writer", daemon=True
                )
                self._writer.start()
            self._pending.append((record, loop, future))
            self._condition.notify()
        return await future

    def _head_wait_seconds(self) -> float | None:
        """How long the writer may sleep before a lagging head is due; None: nothing due."""
        if not self._head_due:
            return None
        return self.head_interval_seconds - (time.monotonic() - self._head_written_at)

    def _write_pending(self) -> None:
        """Writer thread: take everything pending, commit it with one fsync, wake the callers.

        When records stop arriving, it brings the head up to date once the interval has
        passed: a head left behind would let the last records be cut off unnoticed.
        """
        while True:
            head_due = False
            with self._condition:
                while not self._pending and not self._stopping:
                    wait_seconds = self._head_wait_seconds()
                    if wait_seconds is not None and wait_seconds <= 0:
                        head_due = True
                        break
                    self._condition.wait(wait_seconds)
                batch, self._pending = self._pending, []
            if head_due:
                with self._mutex:
                    with contextlib.suppress(OSError):
                        self._flush_head()
                    self._head_due = False  # one try per pause; the next commit tries again
                continue
            if not batch:
                return
            results: list[tuple[dict[str, Any] | None, BaseException | None]]
            try:
                with self._mutex:
                    lines = self._commit([record for record, _, _ in batch])
                results = [(line, None) for line in lines]
            except Exception as error:
                message = f"{self.path}: cannot append: {error}"
                results = [(None, PredictionLogError(message)) for _ in batch]
            by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
            for (_, loop, future), (line, failure) in zip(batch, results, strict=True):
                by_loop.setdefault(loop, []).append((future, line, failure))
            for loop, settled in by_loop.items():
                # One wake-up per event loop per batch rather than one per record.
                with contextlib.suppress(RuntimeError):  # that loop is already closed
                    loop.call_soon_threadsafe(_settle, settled)

    def close(self) -> None:
        """Write what is pending, stop the writer thread and close the files. Idempotent."""
        with self._condition:
            self._closed = True
            self._stopping = True
            self._condition.notify_all()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        with self._mutex:
            if self._pid == os.getpid():
                self._flush_head()
            for descriptor in (self._log_fd, self._lock_fd):
                if descriptor is not None and self._pid == os.getpid():
                    os.close(descriptor)
            self._log_fd = self._lock_fd = None


def _settle(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """Runs on the callers' event loop: resolve each still-waiting future."""
    for future, line, failure in settled:
        if future.done():  # the caller was cancelled; its record is written all the same
            continue
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(line)


@dataclass
class VerificationResult:
    """The outcome of :func:`verify_log`: ``problems`` name line numbers (1-based)."""

    ok: bool
    records: int
    problems: list[str] = field(default_factory=list)
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Overlong:
    """A line longer than :data:`MAX_LINE_BYTES`: only its length is kept, never its text."""

    length: int


def _bounded_lines(stream: BinaryIO) -> Iterator[bytes | _Overlong]:
    """Each line of the stream without its newline, or :class:`_Overlong` for one too long.

    A line over :data:`MAX_LINE_BYTES` is skipped in pieces, so memory stays bounded however
    long it is (a 300 MB file without a newline took 780 MB when read whole).
    """
    while True:
        piece = stream.readline(MAX_LINE_BYTES + 1)
        if not piece:
            return
        if piece.endswith(b"\n"):
            yield piece[:-1]
        elif len(piece) <= MAX_LINE_BYTES:
            yield piece  # the last line, without its newline
        else:
            length = len(piece)
            while piece and not piece.endswith(b"\n"):
                piece = stream.readline(1 << 16)
                length += len(piece)
            yield _Overlong(length - (1 if piece.endswith(b"\n") else 0))


def parse_head(text: str) -> tuple[int, str]:
    """Parse a kept head, ``SEQ:HASH`` (as ``audit verify`` prints it).

    Raises:
        ValueError: if the text is not a positive seq and a 64-digit hex hash.
    """
    seq, _, digest = text.strip().partition(":")
    if not (seq.isdigit() and int(seq) > 0 and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"{text!r} is not SEQ:HASH (a record number and its 64-digit hash)")
    return int(seq), digest


def verify_log(path: Path, *, kept_head: tuple[int, str] | None = None) -> VerificationResult:
    """Check a prediction log's hash chain and its head file.

    Reports edited records (hash mismatch), inserted, deleted or reordered records (seq gap or
    ``prev_hash`` mismatch), records removed from the end (head file beyond the last record),
    lines that are not JSON or longer than any record (:data:`MAX_LINE_BYTES`), and a missing
    log or head file where the other exists. A log that holds no records and has no head file
    is a problem too: a log emptied, its head file deleted, cannot be told from a new one.

    A writer that dies mid-write (a crash, ``kill -9``) leaves the start of a record line; the
    next writer continues the chain from the last whole record, and its first record commits
    to the lines left (:data:`INTERRUPTED_WRITE_FIELD`). Those lines are a note, not a problem,
    when the record commits to exactly them and continues the chain (or when they end the log
    and look like the start of a record): no record was lost, and their callers were never
    answered, since an answer waits for the write's fsync.

    Args:
        path: The prediction log.
        kept_head: ``(seq, hash)`` an auditor kept from an earlier verification: the log must
            still hold that record, unchanged. Unlike the head file, it is out of reach of
            whoever can write to the log's directory.

    Returns:
        ``ok`` with the number of records, and one message per problem. A missing log with no
        head file is 0 records and ok (the writer creates the log with its first record;
        ``audit verify`` refuses such a path before it gets here).

    Raises:
        NotRegularFileError: if the log is not a regular file (``/dev/zero``, a pipe).
        OSError: if the log exists but cannot be read.
    """
    path = Path(path)
    head_file = head_path_for(path)
    problems: list[str] = []
    head, head_problem = _read_head(head_file)
    if head_problem:
        problems.append(head_problem)
    if not path.exists():
        if head is not None or head_problem:
            problems.append(
                f"{path.name} is missing but {head_file.name} exists"
                + (f" and records seq {head[0]}" if head else "")
                + ": the log was deleted"
            )
        if kept_head is not None:
            problems.append(f"{path.name} is missing but the kept head is seq {kept_head[0]}")
        return VerificationResult(ok=not problems, records=0, problems=problems)

    heads = {
        (name, what): position
        for name, what, position in (
            (head_file.name, "the head file", head),
            ("the kept head", "the kept head", kept_head),
        )
        if position is not None
    }
    hashes_at: dict[int, str] = {}
    notes: list[str] = []
    line_problems = _LineProblems()
    # Lines after the last record: a crash's, if the next record commits to them.
    unchained = _Unchained()
    records, last_seq, last_hash = 0, 0, GENESIS_HASH
    with open_regular_file(path) as stream:
        for number, text in enumerate(_bounded_lines(stream), start=1):
            if isinstance(text, _Overlong):
                unchained.add(number, text, None)
                continue
            line = _parse_json_or_none(text)
            position = _chain_position(line)
            if position is None:
                unchained.add(number, text, line)
                continue
            claimed = line.get(INTERRUPTED_WRITE_FIELD)
            if unchained or claimed is not None:
                torn = (
                    claimed is not None
                    and claimed == unchained.commitment()
                    and position[:2] == (last_seq + 1, last_hash)
                )
                if torn:
                    notes.append(unchained.note(f"seq {position[0]} records them"))
                else:
                    line_problems.merge(unchained.problems)
                    if claimed is not None:
                        line_problems.add(
                            number,
                            f"line {number} (seq {position[0]}): it records lines left by an "
                            "interrupted write that the lines before it are not: lines were "
                            "inserted, removed or changed",
                        )
                unchained = _Unchained()
            records += 1
            seq, prev_hash, digest = position
            body = {key: value for key, value in line.items() if key != "hash"}
            try:
                recomputed = chain_hash(prev_hash, body)
            except ValueError:  # NaN or infinity: the writer never produces them
                recomputed = None
            if recomputed != digest:
                line_problems.add(
                    number,
                    f"line {number} (seq {seq}): the record was altered after it was written "
                    "(hash mismatch)",
                )
            elif canonical_json(line).encode("ascii") != text:
                # The values hash right but the text differs (a shadowing duplicate key, say):
                # whoever reads the text could be shown what the chain never recorded.
                line_problems.add(
                    number,
                    f"line {number} (seq {seq}): not the text the writer wrote "
                    "(not canonical JSON)",
                )
            if seq != last_seq + 1:
                line_problems.add(
                    number,
                    f"line {number}: seq {seq} where {last_seq + 1} was expected: records were "
                    "deleted, inserted or reordered",
                )
            elif prev_hash != last_hash:
                line_problems.add(
                    number,
                    f"line {number} (seq {seq}): prev_hash is not the previous record's hash: "
                    "a record was replaced, inserted or reordered",
                )
            if any(seq == position[0] for position in heads.values()):
                hashes_at.setdefault(seq, digest)
            last_seq, last_hash = seq, digest
    # At the end, a crash's lines are not committed to yet; records cut are caught by the heads.
    if unchained.commitment() is not None:
        notes.append(unchained.note("no record follows them yet"))
    else:
        line_problems.merge(unchained.problems)
    problems.extend(line_problems.listed())

    for (name, what), (head_seq, head_hash) in heads.items():
        if head_seq > last_seq:
            problems.append(
                f"{name} records seq {head_seq} but the last record is seq {last_seq}: "
                "records were removed from the end of the log"
            )
        elif head_seq in hashes_at and hashes_at[head_seq] != head_hash:
            problems.append(
                f"{name}: the record with seq {head_seq} does not have the hash {what} "
                "records: the log was rewritten"
            )
    if head is None and not head_problem:
        if records:
            problems.append(
                f"{head_file.name} is missing: records removed from the end cannot be ruled out"
            )
        else:
            # The writer creates the log only to write a record, and the head right after it.
            problems.append(
                f"{path.name} holds no records and {head_file.name} is missing: a log emptied "
                "and its head file deleted cannot be told from a new one"
            )
    return VerificationResult(
        ok=not problems,
        records=records,
        problems=problems,
        last_seq=last_seq,
        last_hash=last_hash,
        notes=notes,
    )


def _parse_json_or_none(text: bytes) -> Any:
    try:
        return _parse_json(text)
    except ValueError:
        return None


# Problems of single lines listed at most; a log of millions of bad lines is counted past it.
_MAX_LINE_PROBLEMS = 10_000


class _LineProblems:
    """Problems of single lines, in order: the first :data:`_MAX_LINE_PROBLEMS`, then a count."""

    def __init__(self) -> None:
        self._listed: list[tuple[int, str]] = []
        self._unlisted = 0
        self._last_unlisted = 0

    def add(self, number: int, problem: str) -> None:
        """Keep the problem of line ``number``, or only count it once enough are kept."""
        if len(self._listed) < _MAX_LINE_PROBLEMS:
            self._listed.append((number, problem))
        else:
            self._unlisted += 1
            self._last_unlisted = number

    def merge(self, other: _LineProblems) -> None:
        """Add another's problems after these (they are of later lines)."""
        for number, problem in other._listed:
            self.add(number, problem)
        if other._unlisted:
            self._unlisted += other._unlisted
            self._last_unlisted = other._last_unlisted

    def listed(self) -> list[str]:
        """The problems kept, and a last line saying how many more there were."""
        problems = [problem for _, problem in self._listed]
        if self._unlisted:
            problems.append(
                f"{self._unlisted} more problems of lines up to line {self._last_unlisted}, "
                f"not listed (the first {_MAX_LINE_PROBLEMS} are)"
            )
        return problems


class _Unchained:
    """The lines since the last record that are not records.

    A crash's, if each is the start of a record and the next record commits to them; else
    each is a problem. Only their numbers, SHA-256 and problems are kept, not the lines, so
    memory does not follow how many there are.
    """

    def __init__(self) -> None:
        self.first = self.last = 0
        self.problems = _LineProblems()
        self._torn = True  # each line so far is the start of a record line, as a crash leaves
        self._digest = hashlib.sha256()

    def __bool__(self) -> bool:
        return self.last > 0

    def add(self, number: int, text: bytes | _Overlong, parsed: Any) -> None:
        """Take the next line: its number, text (or length) and its JSON (None if not JSON)."""
        if not self:
            self.first = number
        self.last = number
        if isinstance(text, _Overlong):
            self._torn = False
            self.problems.add(
                number,
                f"line {number}: {text.length} bytes long, longer than any record "
                f"(at most {MAX_LINE_BYTES}): not a prediction log record",
            )
            return
        if self._torn and _TORN_LINE.fullmatch(text):
            # The writer commits to the lines joined by newlines: hash them the same way.
            self._digest.update(text if number == self.first else b"\n" + text)
        else:
            self._torn = False
        if not text.strip():
            self.problems.add(number, f"line {number}: empty line")
        elif parsed is None:
            self.problems.add(number, f"line {number}: not JSON")
        else:
            self.problems.add(
                number,
                f"line {number}: not a prediction log record (no valid seq, prev_hash, hash)",
            )

    def commitment(self) -> dict[str, int | str] | None:
        """What a writer records of these lines; None if none, or if a crash cannot leave them."""
        if not self or not self._torn:
            return None
        return _commitment(self.last - self.first + 1, self._digest.hexdigest())

    def note(self, what_follows: str) -> str:
        """The note for lines a crash left, naming them."""
        lines = (
            f"line {self.first}" if self.first == self.last else f"lines {self.first}-{self.last}"
        )
        return (
            f"{lines}: the start of a record whose write was interrupted (a writer stopped "
            f"mid-write); {what_follows}, and the chain continues intact around them"
        )
