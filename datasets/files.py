"""Files written so that a reader sees the old or the new content, never a mix."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    The data goes to a temporary file in the same directory (mode 0600), is fsynced, then
    renamed over ``path``. The file keeps its owner: run as root (``sudo medscreen keys
    create``), a rename would otherwise hand the service's key store to root, and the service
    could read it no more.

    Args:
        path: The file to replace.
        data: Its new content.
        sync_directory: Also fsync the directory, so that the rename itself survives a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            with contextlib.suppress(FileNotFoundError):
                owner = path.stat()
                if owner.st_uid != os.geteuid():
                    os.fchown(stream.fileno(), owner.st_uid, owner.st_gid)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if sync_directory:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is, e.g. ``"a character device"``; None if regular.

    Args:
        mode: ``st_mode`` from ``os.stat``.

    Returns:
        None for a regular file, else a phrase naming its kind.
    """
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "an unknown kind of file")


class NotRegularFileError(OSError):
    """A path to read that is a device, a pipe, a directory or a socket, not a regular file."""


def open_regular_file(path: Path) -> BinaryIO:
    """Open a file for reading in binary, refusing anything that is not a regular file.

    ``/dev/zero`` never ends and a named pipe blocks its reader: neither is a key store, a
    prediction log or its head file. Opened non-blocking, so a pipe cannot hang the open.

    Args:
        path: The file to open (a symbolic link is followed).

    Returns:
        The open file.

    Raises:
        NotRegularFileError: if it is not a regular file; its ``strerror`` reads e.g.
            ``"is a character device, not a regular file"``.
        OSError: if it cannot be opened.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = file_kind(os.fstat(descriptor).st_mode)
        if kind is not None:
            raise NotRegularFileError(errno.EINVAL, f"is {kind}, not a regular file", str(path))
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
