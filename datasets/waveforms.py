"""ECG signals from monitoring requests (JSON samples or a DICOM ECG) into the beat model's input.

The arrhythmia model was trained on beats of MIT-BIH lead MLII at 360 Hz, cut around annotated
R peaks by :mod:`datasets.ecg`. A served signal goes through the same functions (resampled to
360 Hz, :func:`datasets.ecg.high_pass`, then :func:`datasets.ecg.cut_beats`: windows, RR
intervals, the median beat as template); only the R peaks differ: they are detected instead of
annotated.

The detector is ``wfdb.processing.gqrs_detect`` (the port of PhysioNet's gqrs), not ``XQRS``:
on the first 5 minutes of the 22 DS1 records, XQRS found 75 % of the annotated ventricular beats
(7 % in record 208, 15 % in 119), gqrs 92 %, with 98.9 % sensitivity and 98.1 % positive
predictivity over all beats (XQRS: 95.5 %, 95.3 %). A monitor must not lose the beats it exists
to flag. gqrs marks a beat 12 samples (33 ms at 360 Hz) before the annotated R peak (median over
those records; 96.6 % then within 3 samples of it), so its marks are moved by that much to cut the
windows where training cut them; ``correct_peaks`` aligned them less well (86 %). Ventricular
beats are the exception: only 64 % of them are then within 3 samples, many 25-35 samples late.
The card therefore also reports the model on beats found this way
(:func:`datasets.ecg.load_detected_beats`, the ``val_served_*`` metrics).

MLII (the modified lead II of Holter recordings, MIT-BIH's main lead) and lead II of a resting
ECG see the heart along nearly the same axis, so a request for one accepts the other. No
patient tag is read from a DICOM file: it is parsed with only the waveform's tags kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from http import HTTPStatus

import numpy as np
from pydicom import Dataset
from scipy.signal import resample_poly
from scipy.stats import kurtosis

from datasets.ecg import SAMPLING_RATE_HZ, cut_beats, detect_r_peaks, high_pass
from datasets.images import (
    ImageDecodeError,
    check_upload_size,
    is_dicom,
    quiet_dicom_parsing,
    read_dicom_dataset,
    untrusted_input,
)

MIN_SAMPLING_RATE_HZ, MAX_SAMPLING_RATE_HZ = 100.0, 2000.0
MIN_DURATION_S, MAX_DURATION_S = 10.0, 3600.0
# An ECG spans a few millivolts; far more means microvolts or ADC counts were sent.
MAX_PEAK_TO_PEAK_MV = 50.0
MIN_BEATS = 3
# Kurtosis of the high-passed signal: sharp QRS complexes make an ECG's high. Of the 3,960 10 s
# windows of the 22 MIT-BIH DS1 records, 17 are under 4: 15 in record 207 (wide bundle-branch
# beats, ventricular flutter), one at a run of ventricular tachycardia, one in noise. Gaussian
# noise gives 3.0-3.3, a square or sine wave under 2 (kSQI; Li, Clifford, Tarassenko 2008).
MIN_SIGNAL_KURTOSIS = 4.0
QUALITY_WINDOW_S = 10
_MILLIVOLTS_PER_UNIT = {"uV": 1e-3, "mV": 1.0, "V": 1e3}
# Multiplex groups that are not the recorded signal (a derived median beat is one beat long).
_DERIVED = "DERIVED"
_KEPT_DICOM_TAGS = ["SOPClassUID", "WaveformSequence", "PixelData"]
_LEAD_SYNONYMS = {"MLII": "II", "MII": "II"}
# Longer than any lead's name ("Lead V6R (unipolar, right)"); also bounds the name's regexes.
MAX_LEAD_NAME_CHARS = 64


@dataclass(frozen=True)
class EcgSignal:
    """One ECG lead, as received.

    Attributes:
        samples: float64 (N,) in millivolts.
        sampling_rate_hz: Samples per second.
        lead: The lead's name as the sender gave it (JSON) or the file labels it (DICOM).
        source_format: ``json`` or ``dicom``.
    """

    samples: np.ndarray
    sampling_rate_hz: float
    lead: str
    source_format: str

    @property
    def duration_s(self) -> float:
        """Length of the signal in seconds."""
        return len(self.samples) / self.sampling_rate_hz


@dataclass(frozen=True)
class EcgBeats:
    """The detected beats of a signal, as the beat model takes them.

    Attributes:
        windows: float32 (N, 1, WINDOW_BEFORE + WINDOW_AFTER): high-passed beats at 360 Hz, mV.
        templates: float32, same shape: the signal's median beat, repeated (as in training).
        rr_seconds: float32 (N, 4): previous RR, next RR, local mean RR, whole-signal mean RR.
        peak_samples: int64 (N,): each beat's R peak as a sample index of the signal as sent.
        peak_times_s: float64 (N,): each R peak's time from the start of the signal.
        signal_kurtosis: The lowest kurtosis of the high-passed signal over stretches of 10 to
            20 s (without the first and last second, the filter's edges); below
            :data:`MIN_SIGNAL_KURTOSIS` a stretch shows no distinct QRS complexes and the beat
            classes cannot be trusted.
        low_quality_spans_s: (start, end) seconds of each stretch below the limit.
    """

    windows: np.ndarray
    templates: np.ndarray
    rr_seconds: np.ndarray
    peak_samples: np.ndarray
    peak_times_s: np.ndarray
    signal_kurtosis: float
    low_quality_spans_s: tuple[tuple[float, float], ...] = ()

    @property
    def quality_acceptable(self) -> bool:
        """Whether the signal looks like an ECG with distinct QRS complexes."""
        return self.signal_kurtosis >= MIN_SIGNAL_KURTOSIS

    def __len__(self) -> int:
        return len(self.peak_samples)


def _unprocessable(message: str) -> ImageDecodeError:
    return ImageDecodeError(message, HTTPStatus.UNPROCESSABLE_ENTITY)


def canonical_lead(name: str) -> str:
    """A lead name reduced for comparison: ``Lead II``, ``II``, ``MLII`` all give ``II``.

    ``Lead I (Einthoven)`` gives ``I``, ``Lead aVR`` gives ``AVR``, ``V1`` stays ``V1``. A name
    over :data:`MAX_LEAD_NAME_CHARS` characters names no lead and is returned as it is (the
    regexes below take time quadratic in the length of a crafted name).
    """
    if len(name) > MAX_LEAD_NAME_CHARS:
        return name
    key = re.sub(r"\(.*?\)", "", name).upper()
    key = re.sub(r"^\s*LEAD\b", "", key)
    key = re.sub(r"[\s_\-]", "", key)
    return _LEAD_SYNONYMS.get(key, key)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer too large for a float
        return False


def check_lead_name(lead: str, field: str) -> str:
    """Refuse a lead name no lead has (422), before any regex sees it; return it stripped."""
    if len(lead) > MAX_LEAD_NAME_CHARS:
        raise _unprocessable(
            f"{field} is {len(lead)} characters long; a lead's name has at most "
            f'{MAX_LEAD_NAME_CHARS} (for example "MLII" or "II")'
        )
    return lead.strip()


def _check_duration(count: int, rate: float, field: str) -> None:
    duration = count / rate
    # Rounded away from the limit: 9.99 s must not read as "10.0 s", nor 3600.01 s as "3600 s".
    if duration > MAX_DURATION_S:
        raise ImageDecodeError(
            f"{field} holds {math.ceil(duration * 100) / 100:.2f} s of signal; the limit is "
            f"{MAX_DURATION_S:.0f} s (1 hour): split the recording",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    if duration < MIN_DURATION_S:
        raise _unprocessable(
            f"{field} holds {math.floor(duration * 100) / 100:.2f} s of signal ({count} samples "
            f"at {rate:g} Hz); at least {MIN_DURATION_S:.0f} s are needed to find the patient's "
            "typical beat"
        )


def _checked_signal(
    samples: np.ndarray, rate: float, lead: str, source_format: str, field: str
) -> EcgSignal:
    """Check duration, finiteness and scale; ``field`` names the samples in messages."""
    _check_duration(len(samples), rate, field)
    bad = np.flatnonzero(~np.isfinite(samples))
    if len(bad):
        raise _unprocessable(f"{field}[{bad[0]}] is not a finite number (NaN or infinity)")
    span = float(samples.max() - samples.min())
    if span > MAX_PEAK_TO_PEAK_MV:
        raise _unprocessable(
            f"{field} spans {span:.4g} from lowest to highest, but an ECG spans a few "
            "millivolts: send millivolts (not microvolts or ADC counts)"
        )
    return EcgSignal(
        samples=samples.astype(np.float64),
        sampling_rate_hz=float(rate),
        lead=lead,
        source_format=source_format,
    )


@untrusted_input("the ECG")
def ecg_from_json(payload: dict) -> EcgSignal:
    """Read the JSON body of ``POST /v1/monitor``.

    Args:
        payload: ``{"samples": [mV, ...], "sampling_rate_hz": number, "lead": "MLII"}``.

    Returns:
        The signal; ``lead`` is kept as sent (the service compares it with the model's lead,
        for example with :func:`canonical_lead`).

    Raises:
        ImageDecodeError: 413 if longer than an hour; 422 naming the field that is missing or
            wrong (not numbers, NaN, rate outside 100-2000 Hz, shorter than 10 s, not in mV).
    """
    if not isinstance(payload, dict):
        raise _unprocessable(
            "the request body must be a JSON object with samples, sampling_rate_hz and lead"
        )
    missing = [key for key in ("samples", "sampling_rate_hz", "lead") if key not in payload]
    if missing:
        raise _unprocessable(f"missing field(s): {', '.join(missing)}")
    rate, lead, samples = payload["sampling_rate_hz"], payload["lead"], payload["samples"]
    if not _is_finite_number(rate):
        raise _unprocessable("field 'sampling_rate_hz' must be a number (samples per second)")
    if not MIN_SAMPLING_RATE_HZ <= rate <= MAX_SAMPLING_RATE_HZ:
        raise _unprocessable(
            f"field 'sampling_rate_hz' is {rate:g}; it must be between "
            f"{MIN_SAMPLING_RATE_HZ:g} and {MAX_SAMPLING_RATE_HZ:g} Hz"
        )
    if not isinstance(lead, str) or not lead.strip():
        raise _unprocessable('field \'lead\' must name the ECG lead, for example "MLII" or "II"')
    lead = check_lead_name(lead, "field 'lead'")
    if not isinstance(samples, list):
        raise _unprocessable("field 'samples' must be a list of numbers (millivolts)")
    if samples and isinstance(samples[0], list):
        # Before the length, which counts the inner lists: "0.00 s of signal" misled.
        raise _unprocessable(
            "field 'samples' is a list of lists; send one lead's samples as a flat list of "
            "numbers (millivolts), not nested in another list"
        )
    # Length first: a too-long list is refused before looking at every value.
    _check_duration(len(samples), rate, "field 'samples'")
    not_number = next((i for i, v in enumerate(samples) if not _is_number(v)), None)
    if not_number is not None:
        raise _unprocessable(f"field 'samples'[{not_number}] is not a number")
    try:
        values = np.asarray(samples, dtype=np.float64)
    except OverflowError as error:
        raise _unprocessable("field 'samples' holds a number too large for a voltage") from error
    return _checked_signal(values, rate, lead, "json", "field 'samples'")


def _channel_label(channel: Dataset) -> str:
    sources = channel.get("ChannelSourceSequence") or []
    if sources and sources[0].get("CodeMeaning"):
        label = str(sources[0].CodeMeaning)
    else:
        label = str(channel.get("ChannelLabel", "") or "unlabelled")
    # A label no lead has is shortened, so that messages listing the leads stay short.
    return label if len(label) <= MAX_LEAD_NAME_CHARS else label[:MAX_LEAD_NAME_CHARS] + "..."


def _millivolts_per_unit(channel: Dataset) -> float:
    """The factor from pydicom's values (sensitivity units) to millivolts."""
    if "ChannelSensitivity" not in channel:
        raise _unprocessable(
            "the DICOM ECG channel has no Channel Sensitivity, so its voltage is unknown"
        )
    units = channel.get("ChannelSensitivityUnitsSequence") or []
    code = str(units[0].get("CodeValue", "")) if units else ""
    if code not in _MILLIVOLTS_PER_UNIT:
        raise _unprocessable(
            f"the DICOM ECG channel's sensitivity unit {code or '(none)'!r} is not a voltage "
            f"unit this service knows ({', '.join(_MILLIVOLTS_PER_UNIT)})"
        )
    return _MILLIVOLTS_PER_UNIT[code]


@untrusted_input("the DICOM ECG waveform")
@quiet_dicom_parsing()  # DICOM values are converted lazily: the whole reader runs inside it
def ecg_from_dicom(data: bytes, lead: str = "II") -> EcgSignal:
    """Read one lead of a DICOM ECG waveform (``POST /v1/monitor/dicom``).

    The longest original (not derived, such as a median beat) multiplex group holding the lead
    is used. ``MLII`` and ``II`` name the same lead.

    Args:
        data: A DICOM file with a Waveform Sequence (for example 12-lead ECG Waveform Storage).
        lead: The lead to read, for example ``II`` (matched against each channel's source, such
            as ``Lead II``).

    Returns:
        The lead in millivolts at the group's sampling frequency; ``lead`` is the file's label.

    Raises:
        ImageDecodeError: 400 empty or unreadable; 413 too large or over an hour; 415 not DICOM
            or a DICOM image; 422 no waveform, lead missing (the message lists the leads found),
            unknown units, or a signal unusable as :func:`ecg_from_json` describes.
    """
    check_upload_size(data)
    if not is_dicom(data):
        raise ImageDecodeError(
            "the upload is not a DICOM file; send a DICOM ECG waveform (such as 12-lead ECG "
            "Waveform Storage), or the samples as JSON to POST /v1/monitor",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    dataset = read_dicom_dataset(data, tags=_KEPT_DICOM_TAGS)
    if "WaveformSequence" not in dataset:
        if "PixelData" in dataset:
            raise ImageDecodeError(
                "the DICOM file is an image, not a waveform; send images to POST /v1/screen",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        raise _unprocessable("the DICOM file has no waveform (no Waveform Sequence)")
    wanted = canonical_lead(check_lead_name(lead, "field 'lead'"))
    found: list[str] = []
    candidates: list[tuple[bool, int, int, int]] = []
    for group_index, group in enumerate(dataset.WaveformSequence):
        labels = [_channel_label(ch) for ch in group.get("ChannelDefinitionSequence") or []]
        found += [label for label in labels if label not in found]
        for channel_index, label in enumerate(labels):
            if canonical_lead(label) == wanted:
                original = group.get("WaveformOriginality", "") != _DERIVED
                samples = int(group.get("NumberOfWaveformSamples", 0) or 0)
                candidates.append((original, samples, group_index, channel_index))
    if not candidates:
        raise _unprocessable(
            f"the DICOM ECG has no lead {lead!r}; it has: "
            f"{', '.join(map(repr, found)) or 'no labelled leads'}"
        )
    original, _, group_index, channel_index = max(candidates)
    if not original:
        raise _unprocessable(
            f"the DICOM ECG holds lead {lead!r} only in a derived waveform (such as a median "
            "beat), not as recorded; send the recorded rhythm"
        )
    group = dataset.WaveformSequence[group_index]
    channel = group.ChannelDefinitionSequence[channel_index]
    try:
        rate = float(group.SamplingFrequency)
    except (AttributeError, TypeError, ValueError):
        rate = math.nan  # missing or not a number: refused below
    if not MIN_SAMPLING_RATE_HZ <= rate <= MAX_SAMPLING_RATE_HZ:
        raise _unprocessable(
            f"the DICOM ECG's Sampling Frequency ({rate:g} Hz) must be between "
            f"{MIN_SAMPLING_RATE_HZ:g} and {MAX_SAMPLING_RATE_HZ:g} Hz"
        )
    to_millivolts = _millivolts_per_unit(channel)
    if not group.get("WaveformData"):  # pydicom reads an empty element as None
        raise _unprocessable("the DICOM ECG's Waveform Data is empty; send the recorded samples")
    try:
        # pydicom applies sensitivity, correction factor and baseline: values are in the
        # channel's sensitivity unit (microvolts in most ECGs), not millivolts.
        values = dataset.waveform_array(group_index)[:, channel_index] * to_millivolts
    except (AttributeError, KeyError, ValueError, IndexError) as error:
        raise _unprocessable(
            f"the DICOM waveform data cannot be decoded ({type(error).__name__}: {error})"
        ) from error
    return _checked_signal(values, rate, _channel_label(channel), "dicom", "the DICOM ECG lead")


# Peak memory, measured on 2026-12-01, with a margin: reading one lead took up to 11 bytes per
# file byte (a single lead at 2000 Hz; 5 for 12 leads), cutting an hour of beats 153-389 MiB
# (250-2000 Hz), most of it per 360 Hz sample, the rest per sample received.
_DICOM_ECG_READ_BYTES_PER_FILE_BYTE = 16
_BEATS_BYTES_PER_MODEL_SAMPLE = 128
_BEATS_BYTES_PER_RECEIVED_SAMPLE = 48


def dicom_ecg_memory_estimate(data: bytes) -> int:
    """Return about how many bytes :func:`ecg_from_dicom` will hold at its peak for ``data``."""
    return _DICOM_ECG_READ_BYTES_PER_FILE_BYTE * len(data)


def beats_memory_estimate(signal: EcgSignal) -> int:
    """Return about how many bytes :func:`beats_for_model` will hold at its peak for ``signal``."""
    model_samples = signal.duration_s * SAMPLING_RATE_HZ
    return int(
        _BEATS_BYTES_PER_MODEL_SAMPLE * model_samples
        + _BEATS_BYTES_PER_RECEIVED_SAMPLE * len(signal.samples)
    )


def _resampling_ratio(rate: float) -> tuple[int, int]:
    """``(up, down)`` with rate * up / down close to 360 Hz (exact for whole-number rates)."""
    ratio = Fraction(SAMPLING_RATE_HZ) / Fraction(rate).limit_denominator(1000)
    ratio = ratio.limit_denominator(1000)
    return ratio.numerator, ratio.denominator


@untrusted_input("the ECG")
def beats_for_model(signal: EcgSignal) -> EcgBeats:
    """Find the beats of a signal and prepare them as in training.

    Resampled to 360 Hz (polyphase, ``scipy.signal.resample_poly``), high-passed, R peaks
    detected (:func:`detect_r_peaks`), then windows, RR features and the median-beat template by
    :func:`datasets.ecg.cut_beats`. Beats too near either end for a full window are left out.

    Args:
        signal: A checked signal from :func:`ecg_from_json` or :func:`ecg_from_dicom`.

    Returns:
        The beats, in time order.

    Raises:
        ImageDecodeError: 422 if fewer than three complete beats are found.
    """
    up, down = _resampling_ratio(signal.sampling_rate_hz)
    # A constant offset carries no information and would cost the filter its precision.
    samples = signal.samples - np.median(signal.samples)
    if (up, down) != (1, 1):
        # Extending the ends as lines keeps the filter from ringing at the edges.
        samples = resample_poly(samples, up, down, padtype="line")
    filtered = high_pass(samples, SAMPLING_RATE_HZ)
    peaks = detect_r_peaks(filtered)
    # Exactly 360 Hz for whole-number rates; within 0.1 % otherwise.
    effective_rate = signal.sampling_rate_hz * up / down
    windows, templates, rr, inside = cut_beats(filtered, peaks, effective_rate)
    if len(windows) < MIN_BEATS:
        raise _unprocessable(
            f"no QRS complexes detected in enough of the signal ({len(windows)} complete beats "
            f"found, {MIN_BEATS} needed); check that it is an ECG lead in millivolts, sent with "
            "its true sampling rate"
        )
    # Sample positions at 360 Hz back to the signal as sent.
    original = np.rint(peaks[inside] * (signal.sampling_rate_hz / effective_rate))
    peak_samples = np.clip(original, 0, len(signal.samples) - 1).astype(np.int64)
    return EcgBeats(
        windows=windows.astype(np.float32),
        templates=templates.astype(np.float32),
        rr_seconds=rr.astype(np.float32),
        peak_samples=peak_samples,
        peak_times_s=peak_samples / signal.sampling_rate_hz,
        **_signal_quality(filtered, effective_rate),
    )


def _signal_quality(filtered: np.ndarray, rate: float) -> dict:
    """The lowest kurtosis over 10-20 s stretches, and the stretches under the limit.

    The limit was measured on 10 s windows, and a stretch of noise in a long recording must not
    be averaged away by the clean rest of it.

    Args:
        filtered: The high-passed signal at (about) 360 Hz.
        rate: Its exact sampling rate, for the stretches' times in the signal as sent.

    Returns:
        ``signal_kurtosis`` and ``low_quality_spans_s`` for :class:`EcgBeats`.
    """
    edge = SAMPLING_RATE_HZ  # the filter's first and last second
    inner = filtered[edge:-edge]
    window = QUALITY_WINDOW_S * SAMPLING_RATE_HZ
    stretches = np.array_split(np.arange(len(inner)), max(1, len(inner) // window))
    lowest, spans = math.inf, []
    for samples in stretches:
        value = float(kurtosis(inner[samples], fisher=False))
        value = value if math.isfinite(value) else 0.0  # no variation at all: no QRS either
        lowest = min(lowest, value)
        if value < MIN_SIGNAL_KURTOSIS:
            first, last = edge + samples[0], edge + samples[-1] + 1
            spans.append((round(first / rate, 1), round(last / rate, 1)))
    return {"signal_kurtosis": lowest, "low_quality_spans_s": tuple(spans)}
