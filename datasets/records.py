"""PhysioNet databases of WFDB records (MIT-BIH Arrhythmia): metadata and checked downloads.

A database is fetched record by record. Every file is checked against a SHA-256 before it is
kept: the one pinned in the database's metadata file where there is one (the DS1 records),
else the one in the checksum list PhysioNet publishes beside the files, which must itself
agree with every pin. The directory that results holds the files and their checksum list, so
the ECG loaders check each file again on every load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import requests
import urllib3
from pydantic import Field, field_validator

from datasets.catalogue import MetadataSpec, load_metadata_files
from datasets.checksums import digests_by_file_name, published_checksums
from datasets.download import default_cache_dir, download_file, readable_sha256
from datasets.errors import DatasetError
from datasets.files import write_atomically

# Where a download keeps the checksums of what it fetched, for the loaders to check on load.
LOCAL_CHECKSUM_LIST = "SHA256SUMS.txt"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# PhysioNet's list for MIT-BIH is about 20 kB; anything far larger is not a checksum list.
_MAX_CHECKSUM_LIST_BYTES = 10 << 20


class RecordDatabaseSpec(MetadataSpec):
    """What medscreen knows about a database of WFDB records: source, checksums, licence."""

    title: str
    task: str
    modality: str
    format: Literal["wfdb-records"]
    url: str = Field(pattern=r"^https?://\S+/$", description="The folder of the record files.")
    checksum_list: str = Field(description="The name of the published list in that folder.")
    record_file_suffixes: tuple[str, ...] = Field(min_length=1)
    licence: str
    citation: str
    classes: tuple[str, ...]
    positive_finding: str
    sha256: dict[str, str] = Field(description="Pinned SHA-256 of record files, by file name.")

    @field_validator("sha256")
    @classmethod
    def _digests_are_sha256(cls, pins: dict[str, str]) -> dict[str, str]:
        for name, digest in pins.items():
            if not _SHA256.fullmatch(digest):
                raise ValueError(f"{name}: {digest!r} is not a lower-case SHA-256")
        return pins

    def record_files(self, record: str) -> list[str]:
        """The names of a record's files: header, signal, annotations."""
        return [f"{record}{suffix}" for suffix in self.record_file_suffixes]


@dataclass(frozen=True)
class FetchedRecords:
    """Where the records are, and what a fetch did."""

    directory: Path
    records: list[str]
    files_checked: int
    files_downloaded: int


@cache
def _load_record_databases() -> dict[str, RecordDatabaseSpec]:
    return load_metadata_files("records", RecordDatabaseSpec)


def list_record_databases() -> list[RecordDatabaseSpec]:
    """Return every database of records, sorted by name."""
    return sorted(_load_record_databases().values(), key=lambda spec: spec.name)


def get_record_database(name: str) -> RecordDatabaseSpec | None:
    """Return the database of records called ``name``, or None if there is none."""
    return _load_record_databases().get(name)


def record_list(spec: RecordDatabaseSpec, records: str | None) -> list[str]:
    """The records a comma-separated list names; ``DS1`` and ``DS2`` stand for MIT-BIH's sets.

    Args:
        spec: The database.
        records: For example ``DS2``, ``DS1,DS2`` or ``100,103``; None means DS1 and DS2.

    Raises:
        DatasetError: naming an empty, path-like or repeated record name.
    """
    from datasets.ecg import DS1_RECORDS, DS2_RECORDS, checked_records

    record_sets = {"DS1": DS1_RECORDS, "DS2": DS2_RECORDS} if spec.name == "mitdb" else {}
    names: list[str] = []
    for item in (records if records is not None else "DS1,DS2").split(","):
        names.extend(record_sets.get(item.strip(), [item]))
    return checked_records(names)


def fetch_records(
    spec: RecordDatabaseSpec,
    records: Sequence[str],
    *,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    url: str | None = None,
    show_progress: bool = False,
) -> FetchedRecords:
    """Return a directory that holds the records' files, each checked, downloading what is missing.

    A local directory (``data_dir``) is checked and never written to: each file against its
    pinned SHA-256, else against the directory's own checksum list. Otherwise the files go to
    ``CACHE/NAME/`` (``CACHE`` is ``cache_dir`` or the download cache), from ``url`` (default:
    the database's official folder). Nothing is downloaded until every file has a known
    SHA-256 and every file already there matches it; each download is kept only if it matches.

    Raises:
        DatasetError: naming the record, file or list at fault.
    """
    from datasets.ecg import checked_records

    records = checked_records(records)  # names, never paths: they become file names here
    if data_dir is not None:
        return _check_local_records(spec, records, data_dir)
    directory = (cache_dir or default_cache_dir()) / spec.name
    base_url = (url or spec.url).rstrip("/") + "/"
    expected = _expected_digests(spec, records, base_url)
    kept = published_checksums(directory) if directory.is_dir() else None
    for name, digest in expected.items():
        if kept is not None and kept[1].get(name, digest) != digest:
            raise DatasetError(
                f"{kept[0]} lists {name} with SHA-256 {kept[1][name]}, but "
                f"{base_url}{spec.checksum_list} lists {digest}; nothing was downloaded"
            )
        path = directory / name
        if path.exists() and (actual := readable_sha256(path)) != digest:
            raise DatasetError(
                f"{path}: SHA-256 is {actual}, expected {digest}; delete it to download it again"
            )
    missing = [name for name in expected if not (directory / name).exists()]
    for name in missing:
        download_file(
            base_url + name, directory / name, sha256=expected[name], show_progress=show_progress
        )
    listed = {**(kept[1] if kept else {}), **expected}
    if kept is None or listed != kept[1]:
        lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(listed.items()))
        kept_list = kept[0] if kept else directory / LOCAL_CHECKSUM_LIST
        try:
            write_atomically(kept_list, lines.encode())
        except OSError as error:
            raise DatasetError(
                f"{kept_list}: cannot write it ({error.strerror or error}); the records were "
                "checked, but a later load could not check them again"
            ) from error
    return FetchedRecords(directory, list(records), len(expected), len(missing))


def _expected_digests(
    spec: RecordDatabaseSpec, records: Sequence[str], base_url: str
) -> dict[str, str]:
    """Each record file's SHA-256: pinned, else from the published list, which must agree."""
    list_url = base_url + spec.checksum_list
    published = digests_by_file_name(_fetch_text(list_url), list_url, top_folder_only=True)
    for name, digest in published.items():
        pinned = spec.sha256.get(name)
        if pinned is not None and pinned != digest:
            raise DatasetError(
                f"{list_url} gives {name} the SHA-256 {digest}, but medscreen's metadata for "
                f"{spec.name} pins {pinned}: it is not the list of {spec.title}; "
                "nothing was downloaded"
            )
    expected = {}
    for record in records:
        for name in spec.record_files(record):
            digest = spec.sha256.get(name) or published.get(name)
            if digest is None:
                raise DatasetError(
                    f"record {record}: {list_url} does not list {name}; is {record} a record "
                    f"of {spec.title}? Nothing was downloaded"
                )
            expected[name] = digest
    return expected


def _fetch_text(url: str) -> str:
    """The text at ``url`` (a checksum list), read whole."""
    try:
        with requests.get(url, stream=True, timeout=(10, 60)) as response:
            response.raise_for_status()
            body = response.raw.read(_MAX_CHECKSUM_LIST_BYTES + 1, decode_content=True)
    # urllib3's own errors come through response.raw: a cut, a stall, a broken gzip.
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        raise DatasetError(
            f"cannot fetch the checksum list {url} ({type(error).__name__}: {error}); "
            "nothing was downloaded"
        ) from error
    if len(body) > _MAX_CHECKSUM_LIST_BYTES:
        raise DatasetError(f"{url}: over {_MAX_CHECKSUM_LIST_BYTES} bytes, not a checksum list")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{url}: not a checksum list (not UTF-8 text)") from None


def _check_local_records(
    spec: RecordDatabaseSpec, records: Sequence[str], directory: Path
) -> FetchedRecords:
    """Check a local directory's record files against the pins and the directory's own list."""
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory of {spec.title} records")
    own = published_checksums(directory)
    own_list = own[1] if own else {}
    checked = 0
    for record in records:
        for name in spec.record_files(record):
            path = directory / name
            if not path.is_file():
                raise DatasetError(f"{path}: no such file (record {record} of {spec.title})")
            digest = spec.sha256.get(name) or own_list.get(name)
            if digest is None:
                raise DatasetError(
                    f"{path}: no SHA-256 to check it against; medscreen pins only the DS1 "
                    f"files; put {spec.title}'s {spec.checksum_list} in {directory}"
                )
            if (actual := readable_sha256(path)) != digest:
                raise DatasetError(
                    f"{path}: SHA-256 is {actual}, expected {digest}: the file is corrupt or "
                    f"not {spec.title}'s"
                )
            checked += 1
    return FetchedRecords(directory, list(records), checked, 0)
