"""Checked downloads of MIT-BIH records from a real local HTTP server laid out as PhysioNet's."""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datasets import DatasetError
from datasets.ecg import load_beats, records_fingerprint
from datasets.records import LOCAL_CHECKSUM_LIST, fetch_records, get_record_database, record_list
from tests.conftest import medscreen_command, medscreen_error_line

MITDB = get_record_database("mitdb")
PINNED_RECORD = "101"  # a DS1 record: its files' SHA-256 are in medscreen's metadata
UNPINNED_RECORD = "100"  # a DS2 name: only the served list vouches for its files


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_one_bit(path: Path, offset: int = 5000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _publish(folder: Path, mitdb: Path, *, corrupt: str | None = None, lie: str | None = None):
    """Lay out a PhysioNet-like folder: record files and the SHA256SUMS.txt beside them.

    Args:
        corrupt: A file served with one bit flipped; the list keeps its true SHA-256.
        lie: A file the list gives a wrong SHA-256.
    """
    folder.mkdir()
    suffixes = MITDB.record_file_suffixes
    sources = {f"{PINNED_RECORD}{suffix}": f"{PINNED_RECORD}{suffix}" for suffix in suffixes}
    # The unpinned record's files are 106's, renamed: what matters is that no pin names them.
    sources |= {f"{UNPINNED_RECORD}{suffix}": f"106{suffix}" for suffix in suffixes}
    lines = []
    for name, source in sources.items():
        shutil.copyfile(mitdb / source, folder / name)
        digest = _sha256(folder / name)
        if name == lie:
            digest = "0" * 64
        lines.append(f"{digest} *{name}\n")
        if name == corrupt:
            _flip_one_bit(folder / name)
    # PhysioNet's list also names the database's documentation, in other folders.
    lines.append(f"{'1' * 64}  mitdbdir/intro.htm\n{'2' * 64}  x_mitdb/{PINNED_RECORD}.dat\n")
    (folder / "SHA256SUMS.txt").write_text("".join(lines))


@pytest.fixture(scope="module")
def physionet(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("physionet")
    mitdb = shared_datasets / "mitdb"
    _publish(root / "good", mitdb)
    _publish(root / "corrupt", mitdb, corrupt=f"{UNPINNED_RECORD}.dat")
    _publish(root / "lying", mitdb, lie=f"{PINNED_RECORD}.dat")
    (root / "unlisted").mkdir()
    shutil.copyfile(mitdb / "101.hea", root / "unlisted" / "101.hea")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def test_records_are_downloaded_checked_and_listed_for_the_loaders(
    physionet: str, tmp_path: Path, shared_datasets: Path
):
    records = [PINNED_RECORD, UNPINNED_RECORD]
    fetched = fetch_records(MITDB, records, cache_dir=tmp_path, url=f"{physionet}/good/")

    assert fetched.directory == tmp_path / "mitdb"
    assert (fetched.files_checked, fetched.files_downloaded) == (6, 6)
    for suffix in (".hea", ".dat", ".atr"):
        assert (fetched.directory / f"101{suffix}").read_bytes() == (
            shared_datasets / "mitdb" / f"101{suffix}"
        ).read_bytes()
    # The list left beside the files names exactly what was fetched, with its real digests.
    listed = (fetched.directory / LOCAL_CHECKSUM_LIST).read_text().splitlines()
    assert sorted(listed) == sorted(
        f"{_sha256(path)}  {path.name}"
        for path in fetched.directory.iterdir()
        if path.name != LOCAL_CHECKSUM_LIST
    )
    assert len(listed) == 6
    # The downloaded record is the shared one, and loads.
    assert records_fingerprint(fetched.directory, ["101"]) == records_fingerprint(
        shared_datasets / "mitdb", ["101"]
    )
    assert len(load_beats(fetched.directory, ["101"])) > 1000

    again = fetch_records(MITDB, records, cache_dir=tmp_path, url=f"{physionet}/good/")
    assert (again.files_checked, again.files_downloaded) == (6, 0)

    # The loaders check every load against the list the download left.
    _flip_one_bit(fetched.directory / "101.dat")
    with pytest.raises(DatasetError, match=r"101\.dat: SHA-256 is .* SHA256SUMS\.txt lists"):
        load_beats(fetched.directory, ["101"])


def test_a_corrupt_download_is_discarded_and_named(physionet: str, tmp_path: Path):
    with pytest.raises(DatasetError, match=r"SHA-256 of the file downloaded from .*/100\.dat"):
        fetch_records(MITDB, [UNPINNED_RECORD], cache_dir=tmp_path, url=f"{physionet}/corrupt/")
    assert "100.dat" not in _files(tmp_path / "mitdb")
    assert not [name for name in _files(tmp_path / "mitdb") if name.endswith(".part")]
    assert LOCAL_CHECKSUM_LIST not in _files(tmp_path / "mitdb")


def test_a_list_that_contradicts_a_pinned_checksum_downloads_nothing(
    physionet: str, tmp_path: Path
):
    with pytest.raises(DatasetError, match=r"101\.dat the SHA-256 0{64}, but .* pins"):
        fetch_records(MITDB, [UNPINNED_RECORD], cache_dir=tmp_path, url=f"{physionet}/lying/")
    assert _files(tmp_path / "mitdb") == []


def test_records_without_a_known_checksum_are_refused_before_any_download(
    physionet: str, tmp_path: Path
):
    with pytest.raises(DatasetError, match=r"record 999: .* does not list 999\.hea"):
        fetch_records(MITDB, ["101", "999"], cache_dir=tmp_path, url=f"{physionet}/good/")
    assert _files(tmp_path / "mitdb") == []
    # A mirror without a checksum list: nothing can be vouched for.
    with pytest.raises(DatasetError, match=r"cannot fetch the checksum list .*SHA256SUMS\.txt"):
        fetch_records(MITDB, ["101"], cache_dir=tmp_path, url=f"{physionet}/unlisted/")
    assert _files(tmp_path / "mitdb") == []


def test_a_wrong_file_already_in_the_cache_is_named_and_kept(physionet: str, tmp_path: Path):
    directory = tmp_path / "mitdb"
    directory.mkdir()
    (directory / "101.atr").write_bytes(b"not an annotation file")
    with pytest.raises(DatasetError, match=r"101\.atr: SHA-256 is .*delete it to download it"):
        fetch_records(MITDB, ["101"], cache_dir=tmp_path, url=f"{physionet}/good/")
    assert _files(directory) == ["101.atr"]
    assert (directory / "101.atr").read_bytes() == b"not an annotation file"


def test_a_local_directory_is_checked_against_the_pins(shared_datasets: Path, tmp_path: Path):
    checked = fetch_records(MITDB, record_list(MITDB, "DS1"), data_dir=shared_datasets / "mitdb")
    assert (checked.files_checked, checked.files_downloaded) == (66, 0)

    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in (".hea", ".dat", ".atr"):
        shutil.copyfile(shared_datasets / "mitdb" / f"118{suffix}", copy / f"118{suffix}")
    _flip_one_bit(copy / "118.dat")
    with pytest.raises(DatasetError, match=r"copy/118\.dat: SHA-256 is .* expected"):
        fetch_records(MITDB, ["118"], data_dir=copy)
    # A DS2 record is pinned nowhere: without the directory's own list it cannot be checked.
    for suffix in (".hea", ".dat", ".atr"):
        shutil.copyfile(shared_datasets / "mitdb" / f"118{suffix}", copy / f"100{suffix}")
    with pytest.raises(DatasetError, match=r"100\.hea: no SHA-256 to check it against"):
        fetch_records(MITDB, ["100"], data_dir=copy)


def test_record_lists_name_mitbih_sets_and_refuse_bad_names():
    assert record_list(MITDB, "DS2")[:3] == ["100", "103", "105"]
    assert len(record_list(MITDB, None)) == 44  # DS1 and DS2; the paced records are in neither
    assert record_list(MITDB, "DS1, 100") == [*record_list(MITDB, "DS1"), "100"]
    with pytest.raises(DatasetError, match="listed twice"):
        record_list(MITDB, "DS1,101")
    with pytest.raises(DatasetError, match="not a record name"):
        record_list(MITDB, "../101")
    # Longer than a file name may be: refused as a name, cut in the message.
    with pytest.raises(DatasetError, match=f"'{'a' * 64}...' is not a record name"):
        record_list(MITDB, "a" * 300)
    with pytest.raises(DatasetError, match="not a record name"):
        fetch_records(MITDB, ["../101"], cache_dir=Path("/nonexistent"), url="http://127.0.0.1:9/")


class _CutListHandler(BaseHTTPRequestHandler):
    """Promises a checksum list and hangs up halfway: urllib3's own error, not requests'."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "9000")
        self.end_headers()
        self.wfile.write(b"0" * 64 + b"  100.hea\n")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *_: object) -> None:
        pass


def test_a_checksum_list_cut_mid_transfer_is_one_error(tmp_path: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CutListHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/mitdb/"
        with pytest.raises(DatasetError, match=r"cannot fetch the checksum list .*nothing was"):
            fetch_records(MITDB, [UNPINNED_RECORD], cache_dir=tmp_path, url=url)
    finally:
        server.shutdown()
    assert _files(tmp_path / "mitdb") == []


def test_fetch_command_downloads_records_and_errors_in_one_line(physionet: str, tmp_path: Path):
    arguments = ["datasets", "fetch", "mitdb", "--cache-dir", str(tmp_path)]
    completed = subprocess.run(
        [*medscreen_command(), *arguments, "--records", "101", "--url", f"{physionet}/good/"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # Only the result line, to pass on as --records-dir: the progress bar goes to stderr.
    assert completed.stdout == (
        f"mitdb: 1 records in {tmp_path / 'mitdb'} (3 files, SHA-256 verified; 3 downloaded)\n"
    )
    line = medscreen_error_line(*arguments, "--records", "999", "--url", f"{physionet}/good/")
    assert "does not list 999.hea" in line
    line = medscreen_error_line("datasets", "fetch", "pneumoniamnist", "--records", "101")
    assert line == "error: --records: pneumoniamnist is not a database of WFDB records"
    # Ignored, they would suggest a download that never happens.
    line = medscreen_error_line(*arguments, "--data-dir", str(tmp_path), "--records", "101")
    assert line == "error: --data-dir: give it alone; --cache-dir and --url are for downloads"
