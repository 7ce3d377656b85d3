"""Checksum lists in the form ``sha256sum`` writes them, as PhysioNet publishes one per database."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from datasets.errors import DatasetError

# sha256sum's output: digest, space, space or '*' (binary mode), name; a line whose name holds
# a backslash or a line break starts with a backslash and escapes them.
_CHECKSUM_LINE = re.compile(r"(\\?)([0-9a-fA-F]{64})[ \t][ *\t]?(.+)")


def _checksum_list_entries(text: str, source: str) -> list[tuple[int, str, str]]:
    """The lines of a checksum list: (line number, name as listed, lower-case SHA-256).

    Args:
        text: The list's text (a leading BOM and CRLF line ends are accepted).
        source: The list's path or URL, for errors.

    Raises:
        DatasetError: naming the first line that is not a ``SHA256 NAME`` line.
    """
    entries = []
    for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        match = _CHECKSUM_LINE.fullmatch(line.strip())
        if match is None:
            raise DatasetError(f"{source}:{number}: not a 'SHA256 FILE' line")
        escaped, digest, name = match.groups()
        if escaped:
            name = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], name)
        entries.append((number, name.replace("\\", "/"), digest.lower()))
    return entries


def digests_by_file_name(
    text: str, source: str, *, top_folder_only: bool = False
) -> dict[str, str]:
    """A checksum list's digests by file name, whatever folder the list names each file in.

    Lists made with ``sha256sum ./*`` or from a parent folder name files by path.

    Args:
        text: The list's text.
        source: The list's path or URL, for errors.
        top_folder_only: Keep only the files of the list's own folder (a database's list also
            names its documentation and other folders).

    Raises:
        DatasetError: naming a bad line, or a name listed twice with different digests.
    """
    listed: dict[str, str] = {}
    for number, listed_path, digest in _checksum_list_entries(text, source):
        path = PurePosixPath(listed_path)
        if top_folder_only and len(path.parts) != 1:
            continue
        name = path.name
        if listed.setdefault(name, digest) != digest:
            raise DatasetError(
                f"{source}:{number}: lists {name} again with another SHA-256; "
                "which copy is meant cannot be told"
            )
    return listed


# PhysioNet publishes one per database; a download of the directory brings it along.
PUBLISHED_CHECKSUM_FILES = ("SHA256SUMS.txt", "SHA256SUMS")


def published_checksums(records_dir: Path) -> tuple[Path, dict[str, str]] | None:
    """The checksum list in a records directory, by file name; None if it holds none.

    Raises:
        DatasetError: naming the line of a list that is not ``SHA256 NAME`` lines.
    """
    for name in PUBLISHED_CHECKSUM_FILES:
        path = records_dir / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: not a checksum list (not UTF-8 text)") from None
        except OSError as error:
            raise DatasetError(f"{path}: cannot read the checksum list: {error}") from error
        return path, digests_by_file_name(text, str(path))
    return None
