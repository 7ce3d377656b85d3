"""The catalogue, checked downloads against a real local HTTP server, and fingerprints."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from datasets import DatasetError, download_file, fetch_dataset, get_dataset_spec, load_split
from tests.conftest import medscreen_error_line

PAYLOAD = b"medscreen test payload " * 4096
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/good.bin":
            body = PAYLOAD
        elif self.path == "/corrupt.bin":
            body = PAYLOAD[:-1] + b"X"
        elif self.path == "/bad-length.bin":
            # A Content-Length that is no number: the body is read to the end all the same.
            self.send_response(200)
            self.send_header("Content-Length", "abc")
            self.end_headers()
            self.wfile.write(PAYLOAD)
            self.close_connection = True
            return
        elif self.path == "/slow.bin":
            self.send_response(200)  # no Content-Length: read until the connection closes
            self.end_headers()
            for start in range(0, len(PAYLOAD), 1024):  # about 50 s in all
                self.wfile.write(PAYLOAD[start : start + 1024])
                self.wfile.flush()
                time.sleep(0.5)
            return
        elif self.path == "/interrupted.bin":
            # Promise the whole file, send half, and hang up.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def test_catalogue_entry_names_source_licence_and_positive_finding():
    spec = get_dataset_spec("pneumoniamnist")
    assert spec.url.startswith("https://zenodo.org/records/10519652/files/pneumoniamnist.npz")
    assert spec.md5 == "28209eda62fecd6e6a2d98b1501bb15f"
    assert spec.licence == "CC BY 4.0"
    assert "MedMNIST v2" in spec.citation
    assert spec.classes == ("normal", "pneumonia")
    assert spec.positive_finding == "pneumonia"
    assert spec.positive_classes == (1,)


@pytest.mark.parametrize(
    ("name", "positive_classes", "shape", "rows"),
    [
        ("breastmnist", (0,), (1, 28, 28), 78),  # malignant is class 0
        ("retinamnist", (2, 3, 4), (3, 28, 28), 120),  # referable: grade 2 or more
        ("vesselmnist3d", (1,), (1, 28, 28, 28), 191),
    ],
)
def test_every_task_loads_channels_first_with_its_positive_classes(
    medmnist_dir: Path, name: str, positive_classes: tuple, shape: tuple, rows: int
):
    spec = get_dataset_spec(name)
    assert spec.positive_classes == positive_classes
    val = load_split(spec, "val", data_dir=medmnist_dir)
    assert val.images.shape == (rows, *shape) and val.images.dtype == np.uint8
    assert set(np.unique(val.labels)) <= set(range(len(spec.classes)))


def test_unknown_dataset_is_named():
    with pytest.raises(DatasetError, match="unknown dataset 'nosuch'"):
        get_dataset_spec("nosuch")


def test_good_download_is_verified_and_renamed_into_place(http_server: str, tmp_path: Path):
    destination = tmp_path / "cache" / "good.bin"
    download_file(f"{http_server}/good.bin", destination, md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256)
    assert destination.read_bytes() == PAYLOAD
    assert _leftovers(destination.parent) == ["good.bin"]


def test_corrupt_download_leaves_nothing_and_says_why(http_server: str, tmp_path: Path):
    destination = tmp_path / "cache" / "corrupt.bin"
    with pytest.raises(DatasetError, match=r"MD5 .* expected .* discarded"):
        download_file(
            f"{http_server}/corrupt.bin", destination, md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256
        )
    assert _leftovers(destination.parent) == []


def test_a_download_must_match_both_checksums(http_server: str, tmp_path: Path):
    """MD5 is what the authors publish, SHA-256 what the catalogue pins: each is checked."""
    destination = tmp_path / "cache" / "good.bin"
    with pytest.raises(DatasetError, match=r"SHA-256 .* expected .* discarded"):
        download_file(f"{http_server}/good.bin", destination, md5=PAYLOAD_MD5, sha256="0" * 64)
    with pytest.raises(DatasetError, match=r"MD5 .* expected .* discarded"):
        download_file(f"{http_server}/good.bin", destination, md5="0" * 32, sha256=PAYLOAD_SHA256)
    assert _leftovers(destination.parent) == []


def test_a_content_length_that_is_no_number_is_not_a_traceback(http_server: str, tmp_path: Path):
    destination = tmp_path / "cache" / "bad-length.bin"
    download_file(f"{http_server}/bad-length.bin", destination, sha256=PAYLOAD_SHA256)
    assert destination.read_bytes() == PAYLOAD


def test_an_answer_larger_than_the_official_file_is_cut_off(http_server: str, tmp_path: Path):
    destination = tmp_path / "cache" / "file.bin"
    size = len(PAYLOAD) - 1
    for path, said in (("good.bin", "announces"), ("bad-length.bin", "sent more than")):
        with pytest.raises(DatasetError, match=f"{path} {said} .*{size}"):
            download_file(
                f"{http_server}/{path}", destination, sha256=PAYLOAD_SHA256, size_bytes=size
            )
    assert _leftovers(tmp_path / "cache") == []


def test_an_unreadable_local_file_is_named(tmp_path: Path):
    from datasets.download import readable_sha256

    (tmp_path / "pneumoniamnist.npz").mkdir()  # unreadable as a file, even by root
    with pytest.raises(DatasetError, match=r"pneumoniamnist.npz: cannot read it \(Is a direc"):
        readable_sha256(tmp_path / "pneumoniamnist.npz")


@pytest.mark.parametrize(
    ("signal_name", "exit_code", "last_line"),
    [("SIGINT", 130, "aborted"), ("SIGTERM", 143, "terminated")],
)
def test_a_signal_during_a_download_says_so_and_keeps_nothing(
    http_server: str, tmp_path: Path, signal_name: str, exit_code: int, last_line: str
):
    """Ctrl-C, and SIGTERM (a scheduler's or a service manager's stop), both unwind the command."""
    import signal
    import subprocess

    from tests.conftest import medscreen_command

    arguments = ["--cache-dir", str(tmp_path), "--url", f"{http_server}/slow.bin"]
    # A suite run as a background job ignores SIGINT, and so would the command it starts: a
    # handler (reset to the default by exec) is what the command gets instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [*medscreen_command(), "datasets", "fetch", "pneumoniamnist", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".*.part")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code
    assert stderr.strip().splitlines()[-1] == last_line  # typer's own exit 130 said nothing
    assert _leftovers(tmp_path) == []


def test_interrupted_download_leaves_nothing_and_says_why(http_server: str, tmp_path: Path):
    destination = tmp_path / "cache" / "interrupted.bin"
    with pytest.raises(DatasetError, match="failed"):
        download_file(
            f"{http_server}/interrupted.bin", destination, md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256
        )
    assert _leftovers(destination.parent) == []


def test_missing_file_on_server_is_an_error(http_server: str, tmp_path: Path):
    with pytest.raises(DatasetError, match="404"):
        download_file(
            f"{http_server}/nope.bin", tmp_path / "x", md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256
        )
    assert _leftovers(tmp_path) == []


def test_fetch_cli_reports_a_corrupt_mirror_in_one_line(http_server: str, tmp_path: Path):
    fetch = ["datasets", "fetch", "pneumoniamnist", "--cache-dir", str(tmp_path), "--url"]
    # No size announced: read, then checked.
    line = medscreen_error_line(*fetch, f"{http_server}/bad-length.bin")
    assert line.startswith("error: MD5")
    line = medscreen_error_line(*fetch, f"{http_server}/good.bin")
    assert line.endswith(
        "but the official file has 4170669: not the official file; nothing was kept"
    )
    assert _leftovers(tmp_path) == []


def test_local_directory_is_verified(medmnist_dir: Path, tmp_path: Path):
    spec = get_dataset_spec("pneumoniamnist")
    assert fetch_dataset(spec, data_dir=medmnist_dir) == medmnist_dir / spec.filename
    (tmp_path / spec.filename).write_bytes(b"not the official file")
    with pytest.raises(DatasetError, match=r"SHA-256 is .* expected"):
        fetch_dataset(spec, data_dir=tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        fetch_dataset(spec, data_dir=tmp_path / "empty")


def test_fingerprint_tracks_file_split_and_rows(medmnist_dir: Path):
    spec = get_dataset_spec("pneumoniamnist")
    val = load_split(spec, "val", data_dir=medmnist_dir)
    assert val.images.shape == (524, 1, 28, 28) and val.images.dtype == np.uint8
    assert np.bincount(val.labels).tolist() == [135, 389]
    again = load_split(spec, "val", data_dir=medmnist_dir)
    test = load_split(spec, "test", data_dir=medmnist_dir)
    subset = load_split(spec, "val", data_dir=medmnist_dir, max_samples=100, seed=0)
    assert val.fingerprint == again.fingerprint
    assert len({val.fingerprint, test.fingerprint, subset.fingerprint}) == 3
    assert len(subset) == 100 and set(subset.labels.tolist()) == {0, 1}


def test_fetch_cli_names_a_cache_directory_that_is_a_file(http_server: str, tmp_path: Path):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    line = medscreen_error_line(
        "datasets", "fetch", "pneumoniamnist", "--cache-dir", str(cache), "--url",
        f"{http_server}/good.bin",
    )  # fmt: skip
    assert line.startswith(f"error: {cache}") and "cannot create it" in line


def test_a_directory_in_the_files_place_is_named_and_leaves_nothing(
    http_server: str, tmp_path: Path
):
    destination = tmp_path / "good.bin"
    destination.mkdir()  # os.replace cannot put the file there
    with pytest.raises(DatasetError, match=rf"{destination}: cannot write it \(Is a directory"):
        download_file(
            f"{http_server}/good.bin", destination, md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256
        )
    assert _leftovers(tmp_path) == ["good.bin"]


def test_partial_downloads_of_killed_processes_are_removed(http_server: str, tmp_path: Path):
    destination = tmp_path / "good.bin"
    killed = tmp_path / ".good.bin.99999999.part"  # a SIGKILL gives `finally` no chance
    live = tmp_path / ".good.bin.99999998.part"  # another process, still downloading
    killed.write_bytes(b"half")
    live.write_bytes(b"half")
    an_hour_and_more_ago = time.time() - 3700
    os.utime(killed, (an_hour_and_more_ago, an_hour_and_more_ago))
    download_file(f"{http_server}/good.bin", destination, md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256)
    assert _leftovers(tmp_path) == [live.name, "good.bin"]


def test_a_corrupt_cached_file_says_how_to_recover(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MEDSCREEN_DATA_DIR", str(tmp_path / "elsewhere"))  # a cache dir wins
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"not the official file")
    with pytest.raises(DatasetError, match=r"SHA-256 is .*; delete it to download it again"):
        fetch_dataset(get_dataset_spec("pneumoniamnist"), cache_dir=tmp_path)
