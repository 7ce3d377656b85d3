"""ECG monitoring inputs: real MIT-BIH signals and a DICOM 12-lead ECG to the beat model's input."""

from __future__ import annotations

import io
import time
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
import pytest
import wfdb
from scipy.signal import resample_poly

from datasets.ecg import AAMI_BY_SYMBOL, SAMPLING_RATE_HZ, WINDOW_AFTER, WINDOW_BEFORE, high_pass
from datasets.images import ImageDecodeError
from datasets.waveforms import (
    EcgBeats,
    EcgSignal,
    beats_for_model,
    canonical_lead,
    ecg_from_dicom,
    ecg_from_json,
)

SECONDS = 60
WINDOW = WINDOW_BEFORE + WINDOW_AFTER


def mitdb_minute(mitdb: Path, record: str) -> tuple[np.ndarray, np.ndarray]:
    """The first minute of MLII (mV, 360 Hz) and the annotated beats in it (seconds)."""
    end = SECONDS * SAMPLING_RATE_HZ
    signal = wfdb.rdrecord(str(mitdb / record), channel_names=["MLII"], sampto=end)
    annotation = wfdb.rdann(str(mitdb / record), "atr", sampto=end)
    beats = [
        s
        for s, sym in zip(annotation.sample, annotation.symbol, strict=True)
        if sym in AAMI_BY_SYMBOL
    ]
    return signal.p_signal[:, 0], np.asarray(beats) / SAMPLING_RATE_HZ


@pytest.fixture(scope="module")
def mitdb(shared_datasets: Path) -> Path:
    return shared_datasets / "mitdb"


@pytest.fixture(scope="module")
def ecg_dicom(shared_datasets: Path) -> bytes:
    return (shared_datasets / "dicom" / "pydicom_waveform_ecg.dcm").read_bytes()


def json_payload(samples: np.ndarray, rate: float, lead: str = "MLII") -> dict:
    return {"samples": samples.tolist(), "sampling_rate_hz": rate, "lead": lead}


def at_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    return samples if rate == SAMPLING_RATE_HZ else resample_poly(samples, rate, SAMPLING_RATE_HZ)


# 106 has frequent ventricular ectopic beats, which a detector must not lose.
@pytest.mark.parametrize("record", ["101", "106"])
@pytest.mark.parametrize("rate", [360, 250])
def test_detected_beats_match_the_annotations(mitdb: Path, record: str, rate: int):
    samples, annotated = mitdb_minute(mitdb, record)
    signal = ecg_from_json(json_payload(at_rate(samples, rate), rate))
    assert signal.sampling_rate_hz == rate and signal.source_format == "json"
    beats = beats_for_model(signal)
    assert abs(len(beats) - len(annotated)) <= 0.05 * len(annotated)
    distance = np.abs(beats.peak_times_s[:, None] - annotated[None, :]).min(axis=1)
    assert np.mean(distance <= 0.05) >= 0.95
    # Peaks index the signal as sent, whatever its rate.
    np.testing.assert_allclose(beats.peak_samples / rate, beats.peak_times_s)


def test_ventricular_beats_are_not_lost(mitdb: Path):
    # Record 208's first minute has 29 ventricular beats among 106; XQRS finds only 77 beats.
    samples, annotated = mitdb_minute(mitdb, "208")
    beats = beats_for_model(ecg_from_json(json_payload(samples, 360)))
    assert abs(len(beats) - len(annotated)) <= 0.05 * len(annotated)


def test_beats_are_cut_as_in_training(mitdb: Path):
    samples, _ = mitdb_minute(mitdb, "101")
    beats = beats_for_model(ecg_from_json(json_payload(samples, 360)))
    count = len(beats)
    assert beats.windows.shape == (count, 1, WINDOW) and beats.windows.dtype == np.float32
    assert beats.templates.shape == (count, 1, WINDOW) and beats.templates.dtype == np.float32
    assert beats.rr_seconds.shape == (count, 4) and beats.rr_seconds.dtype == np.float32
    assert beats.peak_samples.dtype == np.int64
    # At 360 Hz the windows are training's high-passed signal around each peak. The service
    # takes the median off first (for the filter's precision), so values may differ in the last
    # float32 digit; which ones depends on the CPU's vector instructions.
    filtered = high_pass(samples, SAMPLING_RATE_HZ)
    for window, peak in zip(beats.windows, beats.peak_samples, strict=True):
        np.testing.assert_allclose(
            window[0], filtered[peak - WINDOW_BEFORE : peak + WINDOW_AFTER], rtol=0, atol=1e-6
        )
    np.testing.assert_array_equal(beats.templates, np.repeat(beats.templates[:1], count, axis=0))
    np.testing.assert_allclose(
        beats.templates[0], np.median(beats.windows, axis=0), rtol=1e-6, atol=1e-7
    )
    # Previous and next RR of neighbouring beats are the same interval; 101 runs at 70-80 bpm.
    np.testing.assert_allclose(beats.rr_seconds[1:, 0], beats.rr_seconds[:-1, 1])
    assert 0.7 < float(beats.rr_seconds[0, 3]) < 0.9


def test_dicom_ecg_lead_ii_in_millivolts(ecg_dicom: bytes):
    signal = ecg_from_dicom(ecg_dicom)
    assert signal.lead == "Lead II" and signal.source_format == "dicom"
    assert signal.sampling_rate_hz == 1000.0 and len(signal.samples) == 10_000
    # Stored in microvolts (1.25 uV per unit): a QRS peaks near 1 mV, not near 1000.
    assert 0.5 < float(np.ptp(signal.samples)) < 5
    beats = beats_for_model(signal)
    assert 8 <= len(beats) <= 11
    assert 0.9 < float(np.median(beats.rr_seconds[:, 0])) < 1.1  # about 60 bpm


def test_mlii_names_lead_ii_in_a_dicom_ecg(ecg_dicom: bytes):
    np.testing.assert_array_equal(
        ecg_from_dicom(ecg_dicom, "MLII").samples, ecg_from_dicom(ecg_dicom, "II").samples
    )
    assert canonical_lead("Lead I (Einthoven)") == "I" and canonical_lead("Lead aVR") == "AVR"
    assert canonical_lead("ML II") == canonical_lead("Lead II") == "II"


def test_missing_lead_lists_the_leads_and_no_patient_tag(ecg_dicom: bytes):
    with pytest.raises(ImageDecodeError) as failure:
        ecg_from_dicom(ecg_dicom, "V7")
    message = str(failure.value)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "no lead 'V7'" in message and "Lead II" in message and "Lead V6" in message
    patient = pydicom.dcmread(io.BytesIO(ecg_dicom))
    for identifier in (str(patient.PatientName), str(patient.PatientID)):
        assert identifier not in message


def edited_dicom(data: bytes, edit) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(data))
    edit(dataset)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _unknown_units(dataset: pydicom.Dataset) -> None:
    for channel in dataset.WaveformSequence[0].ChannelDefinitionSequence:
        channel.ChannelSensitivityUnitsSequence[0].CodeValue = "mm"


def _truncated_samples(dataset: pydicom.Dataset) -> None:
    group = dataset.WaveformSequence[0]
    group.WaveformData = group.WaveformData[:1000]


def _no_sampling_frequency(dataset: pydicom.Dataset) -> None:
    del dataset.WaveformSequence[0].SamplingFrequency


def _no_waveform(dataset: pydicom.Dataset) -> None:
    del dataset.WaveformSequence


def _empty_samples(dataset: pydicom.Dataset) -> None:
    dataset.WaveformSequence[0].WaveformData = b""  # read back as None: pydicom's TypeError


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_unknown_units, "unit 'mm' is not a voltage"),
        (_truncated_samples, "waveform data cannot be decoded"),
        (_no_sampling_frequency, "Sampling Frequency"),
        (_no_waveform, "no waveform"),
        (_empty_samples, "Waveform Data is empty"),
    ],
)
def test_unusable_dicom_ecg_is_a_422(ecg_dicom: bytes, edit, message: str):
    with pytest.raises(ImageDecodeError, match=message) as failure:
        ecg_from_dicom(edited_dicom(ecg_dicom, edit))
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY


@pytest.mark.parametrize(
    ("name", "message"),
    [("pydicom_CT_small.dcm", "POST /v1/screen"), (None, "not a DICOM file")],
)
def test_not_an_ecg_file_is_a_415(shared_datasets: Path, name: str | None, message: str):
    data = (shared_datasets / "dicom" / name).read_bytes() if name else b"0,1,2,3\n" * 100
    with pytest.raises(ImageDecodeError, match=message) as failure:
        ecg_from_dicom(data)
    assert failure.value.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE


TEN_SECONDS = np.sin(np.linspace(0, 60, 3600)).round(3).tolist()
_MISSING = object()


def body(samples: object = TEN_SECONDS, rate: object = 360, lead: object = "II") -> dict:
    """A monitoring request; a field given as ``_MISSING`` is left out."""
    fields = {"samples": samples, "sampling_rate_hz": rate, "lead": lead}
    return {key: value for key, value in fields.items() if value is not _MISSING}


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ([1, 2], 422, "must be a JSON object"),
        (body(rate=_MISSING), 422, "missing field.*sampling_rate_hz"),
        (body(samples=_MISSING, lead=_MISSING), 422, "missing field.*samples, lead"),
        (body(rate="360"), 422, "'sampling_rate_hz' must be a number"),
        (body(rate=True), 422, "'sampling_rate_hz' must be a number"),
        # Valid JSON; too large for a float (math.isfinite's OverflowError was the message).
        (body(rate=10**400), 422, "'sampling_rate_hz' must be a number"),
        (body(rate=50), 422, "between 100 and 2000"),
        (body(lead=""), 422, "'lead'"),
        (body(lead=2), 422, "'lead'"),
        (body(samples="0,1,2"), 422, "'samples' must be a list"),
        # Not "0.00 s of signal (1 samples)": the samples are there, one list too deep.
        (body(samples=[TEN_SECONDS]), 422, "'samples' is a list of lists; send one lead's"),
        (body(samples=[*TEN_SECONDS[:5], "0.1", *TEN_SECONDS[6:]]), 422, r"\[5\] is not a number"),
        (
            body(samples=[*TEN_SECONDS[:7], float("nan"), *TEN_SECONDS[8:]]),
            422,
            r"\[7\] is not a fin",
        ),
        (body(samples=TEN_SECONDS[:3240]), 422, "9.00 s .* at least 10 s"),
        # Rounded away from the limit: 3,599 samples are not "10.0 s".
        (body(samples=TEN_SECONDS[:3599]), 422, r"9\.99 s .* at least 10 s"),
        (body(samples=[0.0] * 1_296_001), 413, r"3600\.01 s of signal; the limit is 3600 s"),
        # Refused before the lead's regexes see it: "(" * 30000 took 5.6 s on the event loop.
        (body(lead="(" * 30_000), 422, "'lead' is 30000 characters long"),
        (body(samples=[0.0] * 1008, rate=100.9), 422, "at least 10 s"),
        (body(samples=[0.0] * 360_001, rate=100), 413, "limit is 3600 s"),
        (body(samples=[v * 1000 for v in TEN_SECONDS]), 422, "send millivolts"),
    ],
)
def test_bad_json_payloads(payload: object, status: int, message: str):
    with pytest.raises(ImageDecodeError, match=message) as failure:
        ecg_from_json(payload)
    assert failure.value.status == status


def _beats_of(samples: np.ndarray) -> EcgBeats:
    return beats_for_model(EcgSignal(samples, 360.0, "II", "json"))


def test_signal_quality_tells_an_ecg_from_noise_and_test_signals(mitdb: Path):
    import wfdb

    def record(name: str, start_s: int) -> np.ndarray:
        signal = wfdb.rdrecord(
            str(mitdb / name),
            channel_names=["MLII"],
            sampfrom=360 * start_s,
            sampto=360 * (start_s + 30),
        )
        return signal.p_signal[:, 0]

    assert _beats_of(record("101", 0)).quality_acceptable
    assert _beats_of(record("106", 600)).quality_acceptable  # frequent ventricular ectopy
    seconds = np.arange(360 * 30) / 360
    for samples in (
        np.random.default_rng(0).normal(0.0, 0.3, len(seconds)),  # noise, e.g. a loose lead
        np.sign(np.sin(2 * np.pi * seconds)),  # a 1 mV square wave, as a calibration pulse
        record("207", 1560),  # ventricular flutter: no distinct QRS complexes either
    ):
        beats = _beats_of(samples)
        assert len(beats) >= 3 and not beats.quality_acceptable, beats.signal_kurtosis
    # Two minutes of noise inside ten clean minutes: flagged, not averaged away, and placed.
    clean = np.concatenate([record("101", start) for start in range(0, 600, 30)])
    noise = np.random.default_rng(1).normal(0.0, 0.3, 360 * 120)
    beats = _beats_of(np.concatenate([clean[: 360 * 300], noise, clean[360 * 300 :]]))
    assert not beats.quality_acceptable
    assert beats.low_quality_spans_s
    assert all(start >= 295 and end <= 425 for start, end in beats.low_quality_spans_s)
    assert _beats_of(clean).low_quality_spans_s == ()


def test_signal_without_qrs_complexes_is_a_422():
    flat = EcgSignal(np.zeros(3600), 360.0, "II", "json")
    with pytest.raises(ImageDecodeError, match="no QRS complexes detected") as failure:
        beats_for_model(flat)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY


def test_lead_names_no_lead_has_are_refused_at_once(ecg_dicom: bytes):
    started = time.perf_counter()
    assert canonical_lead("(" * 50_000) == "(" * 50_000  # names no lead
    with pytest.raises(ImageDecodeError, match="'lead' is 20000 characters") as failure:
        ecg_from_dicom(ecg_dicom, lead="(" * 20_000)
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    # Quadratic regexes took seconds here; a linear pass takes milliseconds.
    assert time.perf_counter() - started < 1.0


def test_long_channel_labels_are_shortened_in_messages(ecg_dicom: bytes):
    def long_labels(dataset: pydicom.Dataset) -> None:
        for channel in dataset.WaveformSequence[0].ChannelDefinitionSequence:
            channel.ChannelSourceSequence[0].CodeMeaning = "(" * 100_000

    with pytest.raises(ImageDecodeError, match="no lead 'V7'") as failure:
        ecg_from_dicom(edited_dicom(ecg_dicom, long_labels), "V7")
    assert len(str(failure.value)) < 2_000


def test_lead_only_in_a_derived_waveform_is_named(ecg_dicom: bytes):
    def derived_only(dataset: pydicom.Dataset) -> None:
        dataset.WaveformSequence[0].WaveformOriginality = "DERIVED"

    with pytest.raises(ImageDecodeError, match="only in a derived waveform") as failure:
        ecg_from_dicom(edited_dicom(ecg_dicom, derived_only), "II")
    assert failure.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
