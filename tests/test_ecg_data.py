"""WFDB beats of the MIT-BIH Arrhythmia Database: AAMI classes, RR features, bad records."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from datasets import DatasetError
from datasets.ecg import (
    AAMI_CLASSES,
    DS1_RECORDS,
    DS2_RECORDS,
    NO_ANNOTATED_BEAT,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    load_beats,
    load_detected_beats,
    published_checksum_summary,
    rr_intervals,
)


@pytest.fixture(scope="module")
def mitdb(shared_datasets: Path) -> Path:
    return shared_datasets / "mitdb"


def test_ds1_beats_match_the_published_aami_counts(mitdb: Path):
    beats = load_beats(mitdb, DS1_RECORDS)
    counts = dict(zip(AAMI_CLASSES, np.bincount(beats.labels, minlength=5).tolist(), strict=True))
    # de Chazal et al. 2004, Table I (DS1): N 45866, S 944, V 3788, F 415, Q 8; a few beats
    # closer to a record's edge than the window are dropped here.
    assert counts["S"] == 944 and counts["V"] == 3788 and counts["Q"] == 8
    assert 45800 <= counts["N"] <= 45866 and 410 <= counts["F"] <= 415
    assert beats.windows.shape == (len(beats), 1, WINDOW_BEFORE + WINDOW_AFTER)
    assert beats.windows.dtype == np.float32 and np.isfinite(beats.windows).all()
    assert set(beats.records.tolist()) == set(DS1_RECORDS)
    assert not set(DS1_RECORDS) & set(DS2_RECORDS)


def test_record_114_uses_its_second_channel_for_mlii(mitdb: Path):
    beats = load_beats(mitdb, ["114"])
    assert len(beats) > 1800
    # The R peak sits at the window's centre point: the MLII lead is upright there.
    assert np.median(beats.windows[beats.labels == 0, 0, WINDOW_BEFORE]) > 0


def test_detected_beats_take_the_labels_of_the_annotated_beats_they_match(mitdb: Path):
    """Record 119: the ventricular beats the detector marks late are matched all the same."""
    annotated = load_beats(mitdb, ["119"])
    detected, missed = load_detected_beats(mitdb, ["119"])
    annotated_counts = np.bincount(annotated.labels, minlength=5)
    matched_counts = np.bincount(detected.labels[detected.labels >= 0], minlength=5)
    # Every annotated beat is matched once or counted as missed.
    np.testing.assert_array_equal(matched_counts + missed.per_class(), annotated_counts)
    assert set(missed.records.tolist()) <= {"119"}
    assert annotated_counts[AAMI_CLASSES.index("V")] == 444
    assert missed.per_class()[AAMI_CLASSES.index("V")] <= 5
    assert (detected.labels == NO_ANNOTATED_BEAT).sum() < 0.01 * len(detected)
    # Cut where the service cuts: the service's own function gives the same beats.
    from datasets.waveforms import EcgSignal, beats_for_model

    record = wfdb.rdrecord(str(mitdb / "119"), channel_names=["MLII"])
    served = beats_for_model(EcgSignal(record.p_signal[:, 0], 360.0, "MLII", "json"))
    np.testing.assert_allclose(served.windows, detected.windows, atol=1e-5)
    np.testing.assert_allclose(served.rr_seconds, detected.rr_seconds, atol=1e-6)


def test_rr_features_on_known_peaks():
    peaks = np.array([0, 360, 720, 900, 1440])  # 1 s, 1 s, 0.5 s (premature), 1.5 s
    rr = rr_intervals(peaks, 360.0)
    np.testing.assert_allclose(rr[3], [0.5, 1.5, (1 + 1 + 1 + 0.5) / 4, 1.0])
    np.testing.assert_allclose(rr[0, :2], [1.0, 1.0])


def test_fingerprint_changes_with_the_records(mitdb: Path):
    first, again = load_beats(mitdb, ["101"]), load_beats(mitdb, ["101"])
    assert first.fingerprint == again.fingerprint
    assert load_beats(mitdb, ["106"]).fingerprint != first.fingerprint


def test_bad_records_are_named(mitdb: Path, tmp_path: Path):
    for suffix in (".hea", ".dat", ".atr"):
        shutil.copy(mitdb / f"101{suffix}", tmp_path / f"101{suffix}")
    (tmp_path / "101.dat").write_bytes((mitdb / "101.dat").read_bytes()[:1000])
    with pytest.raises(DatasetError, match=r"101: unreadable WFDB record"):
        load_beats(tmp_path, ["101"])
    with pytest.raises(DatasetError, match=r"999\.hea: No such file"):
        load_beats(tmp_path, ["999"])
    with pytest.raises(DatasetError, match=r"101\.hea: no lead 'V9'"):
        load_beats(mitdb, ["101"], lead="V9")
    for records, message in (
        (["101", "101"], "records: record 101 is listed twice"),
        ([f"{mitdb}/101"], "is not a record name"),
        (["101", " "], "records: an empty record name"),
    ):
        with pytest.raises(DatasetError, match=message):
            load_beats(mitdb, records)
        with pytest.raises(DatasetError, match=message):
            load_detected_beats(mitdb, records)


def _copy_record(mitdb: Path, directory: Path, record: str) -> None:
    for suffix in (".hea", ".dat", ".atr"):
        shutil.copy(mitdb / f"{record}{suffix}", directory / f"{record}{suffix}")


def test_a_record_without_beat_annotations_is_refused(mitdb: Path, tmp_path: Path):
    _copy_record(mitdb, tmp_path, "124")
    (tmp_path / "124.atr").write_bytes(bytes(4))  # an end-of-file marker and nothing else
    with pytest.raises(DatasetError, match=r"124\.atr: no beat annotations"):
        load_beats(tmp_path, ["124"])


def test_a_record_at_another_sampling_rate_is_refused(mitdb: Path, tmp_path: Path):
    _copy_record(mitdb, tmp_path, "124")
    header = (tmp_path / "124.hea").read_text()
    (tmp_path / "124.hea").write_text(header.replace("124 2 360 650000", "124 2 250 650000", 1))
    with pytest.raises(DatasetError, match=r"124\.hea: sampled at 250 Hz.*360 Hz"):
        load_beats(tmp_path, ["124"])


def test_a_truncated_annotation_file_is_refused(mitdb: Path, tmp_path: Path):
    _copy_record(mitdb, tmp_path, "115")
    (tmp_path / "115.atr").write_bytes((mitdb / "115.atr").read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"115\.atr: truncated"):
        load_beats(tmp_path, ["115"])
    (tmp_path / "115.atr").write_bytes((mitdb / "115.atr").read_bytes()[:201])  # odd length
    with pytest.raises(DatasetError, match=r"115\.atr: truncated"):
        load_beats(tmp_path, ["115"])


def test_records_are_checked_against_the_published_checksum_list(mitdb: Path, tmp_path: Path):
    """PhysioNet's SHA256SUMS beside the records: a changed file is refused, naming it."""
    assert published_checksum_summary(mitdb, ["101", "118"]) == (
        "6 of 6 files checked against SHA256SUMS"
    )
    _copy_record(mitdb, tmp_path, "101")
    assert published_checksum_summary(tmp_path, ["101"]) == (
        "no published checksum list in the records directory"
    )
    listed = [line for line in (mitdb / "SHA256SUMS").read_text().splitlines() if "101." in line]
    (tmp_path / "SHA256SUMS.txt").write_text("\n".join(listed) + "\n")
    assert len(load_beats(tmp_path, ["101"])) > 1000
    signal = bytearray((mitdb / "101.dat").read_bytes())
    signal[5000] ^= 0x01  # one bit of one sample: wfdb would read it without complaint
    (tmp_path / "101.dat").write_bytes(bytes(signal))
    expected = next(line.split()[0] for line in listed if line.endswith("101.dat"))
    for load in (load_beats, load_detected_beats):
        with pytest.raises(DatasetError) as failure:
            load(tmp_path, ["101"])
        assert str(failure.value).startswith(f"{tmp_path / '101.dat'}: SHA-256 is ")
        assert str(failure.value).endswith(
            f", but SHA256SUMS.txt lists {expected}: the file is corrupt or was changed"
        )
    (tmp_path / "SHA256SUMS.txt").write_text(listed[0] + "\nnot a checksum line\n")
    with pytest.raises(DatasetError, match=r"SHA256SUMS\.txt:2: not a 'SHA256 FILE' line"):
        load_beats(tmp_path, ["101"])


def test_checksum_lists_in_every_form_sha256sum_writes_are_read(mitdb: Path, tmp_path: Path):
    """Paths, binary markers, tabs, a BOM, CRLF and names with spaces are all read as lists."""
    _copy_record(mitdb, tmp_path, "101")
    signal = bytearray((mitdb / "101.dat").read_bytes())
    signal[5000] ^= 0x01
    (tmp_path / "101.dat").write_bytes(bytes(signal))
    published = {
        line.split()[1]: line.split()[0]
        for line in (mitdb / "SHA256SUMS").read_text().splitlines()
        if "101." in line
    }
    for prefix, separator in (("./", "  "), ("mitdb/", " *"), ("", "\t")):
        lines = [f"{digest}{separator}{prefix}{name}" for name, digest in published.items()]
        lines.append(f"{'0' * 64}  {prefix}notes on the records.pdf")
        text = "\ufeff" + "\r\n".join(lines) + "\r\n"
        (tmp_path / "SHA256SUMS").write_text(text, encoding="utf-8")
        assert published_checksum_summary(tmp_path, ["101"]) == (
            "3 of 3 files checked against SHA256SUMS"
        )
        with pytest.raises(DatasetError, match=r"101\.dat: SHA-256 is .* but SHA256SUMS lists"):
            load_beats(tmp_path, ["101"])
    twice = f"{published['101.dat']}  a/101.dat\n{'0' * 64}  b/101.dat\n"
    (tmp_path / "SHA256SUMS").write_text(twice)
    with pytest.raises(DatasetError, match=r"SHA256SUMS:2: lists 101\.dat again with another"):
        load_beats(tmp_path, ["101"])
