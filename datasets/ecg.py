"""ECG beats from WFDB records (MIT-BIH Arrhythmia Database) for arrhythmia monitoring.

Beats are windowed around the annotated R peaks of one lead, with the RR intervals a beat's
timing is judged by, and mapped to the AAMI EC57 classes. The inter-patient split of de Chazal
et al. (2004) is named here: DS1 for training (validation held out by record), DS2 for testing;
a record never crosses splits. Signal conditioning (a 0.5 Hz high-pass) lives here, outside
torch, so that the monitoring service can reuse it and see the beats training saw.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import butter, sosfiltfilt

from datasets.checksums import published_checksums
from datasets.errors import DatasetError

AAMI_CLASSES = ("N", "S", "V", "F", "Q")
# MIT-BIH beat symbols to AAMI classes; other annotations (rhythm, noise, '!' flutter waves,
# 'x' non-conducted P waves) are not beats and are skipped.
AAMI_BY_SYMBOL = {
    **dict.fromkeys(("N", "L", "R", "e", "j"), "N"),
    **dict.fromkeys(("A", "a", "J", "S"), "S"),
    **dict.fromkeys(("V", "E"), "V"),
    "F": "F",
    **dict.fromkeys(("/", "f", "Q"), "Q"),
}
# de Chazal et al., IEEE TBME 51(7), 2004; the paced records 102, 104, 107, 217 are in neither.
DS1_RECORDS = (
    "101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124",
    "201", "203", "205", "207", "208", "209", "215", "220", "223", "230",
)  # fmt: skip
DS2_RECORDS = (
    "100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210", "212",
    "213", "214", "219", "221", "222", "228", "231", "232", "233", "234",
)  # fmt: skip
# Records of one subject (PhysioNet's MIT-BIH directory: "Records 201 and 202 came from the
# same male subject"). The inter-patient split keeps them apart by record only: 201 is in DS1,
# 202 in DS2.
SAME_SUBJECT_RECORDS = (frozenset({"201", "202"}),)
SAMPLING_RATE_HZ = 360
# A record is named as in its directory (118), never by a path: "./118" would otherwise pass
# as a record that no recipe lists.
RECORD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # a file name the OS takes
WINDOW_BEFORE, WINDOW_AFTER = 90, 166  # samples around the R peak: 0.25 s before, 0.46 s after
LOCAL_RR_BEATS = 10
# The beat model's inputs, by name: beat windows, the median-beat templates, RR seconds.
ECG_INPUTS = ("beats", "templates", "rr_seconds")
# gqrs marks beats this many samples (at 360 Hz) before MIT-BIH's annotated R peak (median over
# the first 5 minutes of the DS1 records; see datasets.waveforms).
GQRS_TO_R_PEAK_SAMPLES = 12
# A detected beat is the annotated beat within 150 ms of it (the match window of AAMI EC57).
MATCH_WINDOW_SAMPLES = 54
# The label of a detected beat that matches no annotated beat (noise taken for a QRS).
NO_ANNOTATED_BEAT = -1
# MIT-format annotation codes (the top 6 bits of a 16-bit word) that are not annotations.
_ANN_SKIP, _ANN_AUX = 59, 63


@dataclass(frozen=True)
class BeatSet:
    """Beats of some records.

    Attributes:
        windows: float32 (N, 1, WINDOW_BEFORE + WINDOW_AFTER), high-passed signal in mV.
        templates: float32, same shape: the median beat of each beat's record, the patient's
            own typical beat that a beat's shape is compared with.
        rr_seconds: float32 (N, 4): previous RR, next RR, mean of the previous
            ``LOCAL_RR_BEATS`` RRs, and the record's mean RR.
        labels: int64 AAMI class index (N,).
        records: Record name of each beat (N,).
        fingerprint: SHA-256 over each record's files and the record list.
    """

    windows: np.ndarray
    templates: np.ndarray
    rr_seconds: np.ndarray
    labels: np.ndarray
    records: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> BeatSet:
        """The beats at ``rows`` (the fingerprint stays that of the source records)."""
        return BeatSet(
            windows=self.windows[rows],
            templates=self.templates[rows],
            rr_seconds=self.rr_seconds[rows],
            labels=self.labels[rows],
            records=self.records[rows],
            fingerprint=self.fingerprint,
        )

    def extended(self, more: BeatSet) -> BeatSet:
        """These beats followed by ``more`` (the fingerprint stays that of the source records)."""
        return BeatSet(
            windows=np.concatenate([self.windows, more.windows]),
            templates=np.concatenate([self.templates, more.templates]),
            rr_seconds=np.concatenate([self.rr_seconds, more.rr_seconds]),
            labels=np.concatenate([self.labels, more.labels]),
            records=np.concatenate([self.records, more.records]),
            fingerprint=self.fingerprint,
        )


def high_pass(signal: np.ndarray, sampling_rate: float) -> np.ndarray:
    """Remove baseline wander: zero-phase 0.5 Hz Butterworth high-pass."""
    sections = butter(2, 0.5, btype="highpass", fs=sampling_rate, output="sos")
    return sosfiltfilt(sections, signal).astype(np.float32)


def rr_intervals(peaks: np.ndarray, sampling_rate: float) -> np.ndarray:
    """The four RR features (seconds) of each beat from its R-peak sample positions."""
    intervals = np.diff(peaks) / sampling_rate
    previous = np.concatenate([[intervals[0]], intervals])
    following = np.concatenate([intervals, [intervals[-1]]])
    cumulative = np.concatenate([[0.0], np.cumsum(previous)])
    counts = np.minimum(np.arange(1, len(previous) + 1), LOCAL_RR_BEATS)
    ends = np.arange(1, len(previous) + 1)
    local = (cumulative[ends] - cumulative[ends - counts]) / counts
    record_mean = np.full(len(previous), intervals.mean())
    return np.stack([previous, following, local, record_mean], axis=1).astype(np.float32)


def beat_windows(signal: np.ndarray, peaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut a window around each peak; return the windows and which peaks had a full window."""
    inside = (peaks - WINDOW_BEFORE >= 0) & (peaks + WINDOW_AFTER <= len(signal))
    offsets = np.arange(-WINDOW_BEFORE, WINDOW_AFTER)
    windows = signal[peaks[inside, None] + offsets][:, None, :]
    return windows.astype(np.float32), inside


def checked_records(records: Sequence[str]) -> list[str]:
    """:func:`check_record_names`, its error a :class:`DatasetError` naming ``records``."""
    try:
        return check_record_names(records)
    except ValueError as error:
        raise DatasetError(f"records: {error}") from None


def check_record_names(records: Sequence[str]) -> list[str]:
    """Return the record names without surrounding spaces, each checked and listed once.

    Raises:
        ValueError: naming an empty, path-like or repeated record name.
    """
    names = [record.strip() for record in records]
    listed: set[str] = set()
    for name in names:
        if not name:
            raise ValueError("an empty record name (a stray comma?)")
        if not RECORD_NAME.fullmatch(name):
            shown = name if len(name) <= 64 else f"{name[:64]}..."
            raise ValueError(
                f"{shown!r} is not a record name: give the name of the record in its directory "
                "(for example 118), without a path or a suffix"
            )
        if name in listed:
            raise ValueError(f"record {name} is listed twice; list each record once")
        listed.add(name)
    return names


RECORD_FILE_SUFFIXES = (".hea", ".dat", ".atr")


def same_subject_pairs(evaluated: Sequence[str], seen: Sequence[str]) -> list[tuple[str, str]]:
    """``(evaluated, seen)`` pairs of different MIT-BIH records from one subject."""
    return [
        (record, other)
        for record in evaluated
        for group in SAME_SUBJECT_RECORDS
        if record in group
        for other in sorted(group & set(seen) - {record})
    ]


def record_file_digests(records_dir: Path, records: Sequence[str]) -> dict[str, dict[str, str]]:
    """SHA-256 of each file of each record (header, signal, annotations), by record name.

    File by file, as PhysioNet's ``SHA256SUMS`` lists them, so an auditor can compare the two;
    and a renamed copy of a record keeps its signal's and annotations' digests even though
    its header, which names the record, must change.

    Raises:
        DatasetError: naming a record file that cannot be read.
    """
    return {
        record: {
            f"{record}{suffix}": hashlib.sha256(
                _read_record_file(records_dir / f"{record}{suffix}")
            ).hexdigest()
            for suffix in RECORD_FILE_SUFFIXES
        }
        for record in records
    }


def _read_record_file(path: Path) -> bytes:
    """The file's bytes; an unreadable file is a DatasetError naming it."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: {error.strerror or 'cannot read'}") from error


def record_digest(
    records_dir: Path, record: str, published: tuple[Path, dict[str, str]] | None
) -> str:
    """SHA-256 over a record's header, signal and annotation files, read in that order.

    Args:
        records_dir: The records directory.
        record: The record's name.
        published: The directory's checksum list (:func:`published_checksums`): each file it
            names must match it.

    Raises:
        DatasetError: naming a file that cannot be read or differs from the list.
    """
    digest = hashlib.sha256()
    for suffix in RECORD_FILE_SUFFIXES:
        path = records_dir / f"{record}{suffix}"
        data = _read_record_file(path)
        if published is not None and (expected := published[1].get(path.name)) is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise DatasetError(
                    f"{path}: SHA-256 is {actual}, but {published[0].name} lists {expected}: "
                    "the file is corrupt or was changed"
                )
        digest.update(data)
    return digest.hexdigest()


def records_fingerprint(records_dir: Path, records: Sequence[str]) -> str:
    """SHA-256 over the records' names and digests: the fingerprint of beats read from them.

    Raises:
        DatasetError: as :func:`record_digest`.
    """
    published = published_checksums(records_dir)
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record}:{record_digest(records_dir, record, published)}\n".encode())
    return digest.hexdigest()


def published_checksum_summary(records_dir: Path, records: Sequence[str]) -> str:
    """How many of the records' files the directory's checksum list names (all matched).

    Only meaningful after the records were loaded, which checks each listed file.
    """
    published = published_checksums(records_dir)
    if published is None:
        return "no published checksum list in the records directory"
    files = [f"{record}{suffix}" for record in records for suffix in RECORD_FILE_SUFFIXES]
    listed = sum(name in published[1] for name in files)
    return f"{listed} of {len(files)} files checked against {published[0].name}"


def check_annotation_file(path: Path) -> None:
    """Raise unless ``path`` is a whole MIT-format annotation file.

    The file is a run of little-endian 16-bit words (6-bit code, 10-bit value); a SKIP word is
    followed by a 32-bit interval, an AUX word by its value in bytes, padded to an even count.
    It ends with the end-of-file marker, a zero word; a truncated file lacks it, and wfdb reads
    the annotations before the cut without complaint.

    Raises:
        DatasetError: naming the file, if it is truncated or unreadable.
    """
    data = _read_record_file(path)
    position = 0
    while position + 2 <= len(data):
        word = int.from_bytes(data[position : position + 2], "little")
        if word == 0:
            if any(data[position + 2 :]):
                raise DatasetError(f"{path}: data after the annotation end-of-file marker")
            return
        code, value = word >> 10, word & 0x3FF
        position += 2
        if code == _ANN_SKIP:
            position += 4
        elif code == _ANN_AUX:
            position += value + value % 2
    raise DatasetError(f"{path}: truncated annotation file (no end-of-file marker)")


def _read_record(
    records_dir: Path, record: str, lead: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One record's high-passed lead, its annotated beat positions and their AAMI labels.

    Raises:
        DatasetError: naming the record file that is wrong (see :func:`load_beats`).
    """
    import wfdb  # imported here: the catalogue and image paths do not need it

    path = records_dir / record
    try:
        header = wfdb.rdheader(str(path))
        if lead not in header.sig_name:
            raise DatasetError(f"{path}.hea: no lead {lead!r} (has {header.sig_name})")
        # The windows are a fixed number of samples (0.25 s before, 0.46 s after at 360 Hz),
        # and the model is exported as a 360 Hz one; a record at another rate would give
        # beats of another length in time. MIT-BIH is recorded at 360 Hz.
        if header.fs != SAMPLING_RATE_HZ:
            raise DatasetError(
                f"{path}.hea: sampled at {header.fs:g} Hz; the beat windows and the model "
                f"expect {SAMPLING_RATE_HZ} Hz (MIT-BIH)"
            )
        check_annotation_file(Path(f"{path}.atr"))
        signal_record = wfdb.rdrecord(str(path), channel_names=[lead])
        annotation = wfdb.rdann(str(path), "atr")
    except DatasetError:
        raise
    except Exception as error:  # wfdb raises many kinds on a corrupt record
        raise DatasetError(
            f"{path}: unreadable WFDB record ({type(error).__name__}: {error})"
        ) from error
    signal = signal_record.p_signal[:, 0]
    if not np.isfinite(signal).all():
        raise DatasetError(f"{path}.dat: the {lead} signal has missing samples")
    symbols = np.asarray(annotation.symbol, dtype=object)
    keep = np.array([symbol in AAMI_BY_SYMBOL for symbol in symbols], dtype=bool)
    peaks = np.asarray(annotation.sample, dtype=np.int64)[keep]
    if len(peaks) == 0:
        raise DatasetError(f"{path}.atr: no beat annotations (of {len(keep)} annotations)")
    if len(peaks) < 2:
        raise DatasetError(f"{path}.atr: fewer than two annotated beats")
    labels = np.array([AAMI_CLASSES.index(AAMI_BY_SYMBOL[s]) for s in symbols[keep]])
    return high_pass(signal, float(signal_record.fs)), peaks, labels


def cut_beats(
    filtered: np.ndarray, peaks: np.ndarray, rate: float = SAMPLING_RATE_HZ
) -> tuple[np.ndarray, ...]:
    """Windows, templates and RR features of the beats at ``peaks`` that have a full window.

    Training, evaluation and the monitoring service all cut beats here.

    Args:
        filtered: High-passed signal at 360 Hz.
        peaks: Sorted R-peak sample positions.
        rate: The signal's exact sampling rate, for the RR intervals.

    Returns:
        ``windows``, ``templates`` (the median beat, repeated), ``rr_seconds`` and the mask of
        ``peaks`` that had a full window; no beat at all with fewer than two peaks (no RR).
    """
    windows, inside = beat_windows(filtered, peaks)
    if len(peaks) < 2 or not inside.any():
        none = windows[:0]
        return none, none, np.zeros((0, 4), dtype=np.float32), np.zeros(len(peaks), dtype=bool)
    template = np.median(windows, axis=0, keepdims=True)
    rr = rr_intervals(peaks, rate)[inside]
    return windows, np.repeat(template, len(windows), axis=0), rr, inside


def _beat_set(parts: list[tuple[np.ndarray, ...]], fingerprint: str) -> BeatSet:
    if not parts:
        raise DatasetError("no records given")
    windows, templates, rr_seconds, labels, record_names = (
        np.concatenate([part[index] for part in parts]) for index in range(5)
    )
    return BeatSet(
        windows=windows,
        templates=templates.astype(np.float32),
        rr_seconds=rr_seconds,
        labels=labels.astype(np.int64),
        records=record_names,
        fingerprint=fingerprint,
    )


@dataclass(frozen=True)
class MissedBeats:
    """Annotated beats that no detected beat matched: the detector lost them.

    Attributes:
        labels: AAMI class index of each (N,).
        records: Record name of each (N,).
    """

    labels: np.ndarray
    records: np.ndarray

    def per_class(self) -> np.ndarray:
        """How many of each AAMI class were missed."""
        return np.bincount(self.labels, minlength=len(AAMI_CLASSES))


def detect_r_peaks(filtered: np.ndarray) -> np.ndarray:
    """R-peak sample positions in a high-passed 360 Hz signal (mV), aligned as MIT-BIH's.

    The monitoring service finds beats with this function; :func:`load_detected_beats` lets
    evaluation find them the same way.

    Args:
        filtered: Output of :func:`high_pass` at 360 Hz.

    Returns:
        Sorted, distinct int64 sample indices inside the signal.
    """
    from wfdb import processing  # imported here: training on annotated beats does not need it

    marks = processing.gqrs_detect(sig=filtered.astype(np.float64), fs=SAMPLING_RATE_HZ)
    peaks = np.asarray(marks, dtype=np.int64) + GQRS_TO_R_PEAK_SAMPLES
    return np.unique(peaks[peaks < len(filtered)])


def load_beats(
    records_dir: Path, records: tuple[str, ...] | list[str], lead: str = "MLII"
) -> BeatSet:
    """Read the annotated beats of the given records from a directory of WFDB files.

    Args:
        records_dir: Directory with ``<record>.hea``, ``.dat`` and ``.atr`` files.
        records: Record names, for example :data:`DS1_RECORDS`.
        lead: Signal name to use (MIT-BIH: ``MLII`` in all but a few records' first channel).

    Returns:
        All beats of an AAMI class, in record order.

    Raises:
        DatasetError: naming the record file that is missing, corrupt, truncated, sampled at
            another rate than :data:`SAMPLING_RATE_HZ`, without beat annotations or without
            the lead.
    """
    records = checked_records(records)
    fingerprint = records_fingerprint(records_dir, records)
    parts = []
    for record in records:
        filtered, peaks, labels = _read_record(records_dir, record, lead)
        windows, templates, rr, inside = cut_beats(filtered, peaks)
        if not inside.any():
            raise DatasetError(
                f"{records_dir / record}.atr: no annotated beat has a full window in the signal"
            )
        parts.append((windows, templates, rr, labels[inside], np.full(inside.sum(), record)))
    return _beat_set(parts, fingerprint)


def load_detected_beats(
    records_dir: Path, records: tuple[str, ...] | list[str], lead: str = "MLII"
) -> tuple[BeatSet, MissedBeats]:
    """The beats of the given records as the monitoring service finds them, labelled.

    Beats are cut at :func:`detect_r_peaks`, not at the annotations, with RR intervals and
    templates from the detected beats, so that a model is evaluated on what it is served.
    Each detected beat takes the label of the annotated beat within
    :data:`MATCH_WINDOW_SAMPLES` (nearest first, each annotation used once), else
    :data:`NO_ANNOTATED_BEAT`.

    Returns:
        The detected beats, and the annotated beats (with a full window) that no detected
        beat matched: missed beats, which count against sensitivity.

    Raises:
        DatasetError: as :func:`load_beats`.
    """
    records = checked_records(records)
    fingerprint = records_fingerprint(records_dir, records)
    parts = []
    missed_labels: list[int] = []
    missed_records: list[str] = []
    for record in records:
        filtered, annotated, annotated_labels = _read_record(records_dir, record, lead)
        peaks = detect_r_peaks(filtered)
        if len(peaks) < 2:
            raise DatasetError(f"{records_dir / record}.dat: fewer than two beats detected")
        windows, templates, rr, inside = cut_beats(filtered, peaks)
        detected = peaks[inside]
        labels = np.full(len(detected), NO_ANNOTATED_BEAT, dtype=np.int64)
        _, has_window = beat_windows(filtered, annotated)
        for position, label in zip(
            annotated[has_window], annotated_labels[has_window], strict=True
        ):
            nearest = np.searchsorted(detected, position)
            candidates = [
                index
                for index in (nearest - 1, nearest)
                if 0 <= index < len(detected)
                and labels[index] == NO_ANNOTATED_BEAT
                and abs(detected[index] - position) <= MATCH_WINDOW_SAMPLES
            ]
            if candidates:
                labels[min(candidates, key=lambda index: abs(detected[index] - position))] = label
            else:
                missed_labels.append(int(label))
                missed_records.append(record)
        parts.append((windows, templates, rr, labels, np.full(len(labels), record)))
    missed = MissedBeats(
        labels=np.array(missed_labels, dtype=np.int64), records=np.array(missed_records, dtype=str)
    )
    return _beat_set(parts, fingerprint), missed
