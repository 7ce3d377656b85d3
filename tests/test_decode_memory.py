"""The memory budget of large decodes: small files declaring huge pictures cannot, six at once,
take the worker's memory (at 6000 x 6000 pixels a 100 kB PNG took 137-412 MiB to decode, a
1.7 MB RLE DICOM 910 MiB)."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import subprocess
import sys
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import wfdb
from conftest import grayscale_dicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian
from scipy.signal import resample_poly

from datasets.images import ImageDecodeError, decode_image, decode_memory_estimate
from serving import service
from serving.decode_memory import DecodeMemory


class _Decodes:
    """Decodes that record how many bytes of the budget were held while each ran."""

    def __init__(self, memory: DecodeMemory) -> None:
        self.memory = memory
        self.lock = threading.Lock()
        self.running: list[str] = []
        self.started: list[str] = []
        self.alone: dict[str, bool] = {}
        self.peak_in_use = 0

    def decode(self, name: str, seconds: float = 0.1):
        def run() -> str:
            with self.lock:
                self.alone[name] = not self.running
                self.running.append(name)
                self.started.append(name)
                self.peak_in_use = max(self.peak_in_use, self.memory.in_use)
            time.sleep(seconds)
            with self.lock:
                self.running.remove(name)
            return name

        return run


def test_large_decodes_share_the_budget_and_one_over_it_runs_alone():
    async def scenario() -> tuple[list[str], _Decodes, DecodeMemory]:
        memory = DecodeMemory(100)
        decodes = _Decodes(memory)
        costs = {"a": 60, "b": 60, "c": 30, "huge": 500, "d": 10}
        async with asyncio.timeout(10):  # a decode over the budget must not wait forever
            answers = await asyncio.gather(
                *(memory.run(cost, decodes.decode(name)) for name, cost in costs.items())
            )
        return answers, decodes, memory

    answers, decodes, memory = asyncio.run(scenario())
    assert answers == ["a", "b", "c", "huge", "d"]  # every decode ran, none was lost
    assert decodes.peak_in_use <= 100
    assert decodes.alone["huge"]  # over the whole budget: nothing beside it
    assert memory.in_use == 0


def test_a_waiting_large_decode_is_not_overtaken_by_smaller_ones():
    async def scenario() -> _Decodes:
        memory = DecodeMemory(100)
        decodes = _Decodes(memory)
        first = asyncio.ensure_future(memory.run(80, decodes.decode("first", 0.2)))
        await asyncio.sleep(0.05)
        large = asyncio.ensure_future(memory.run(100, decodes.decode("large")))
        await asyncio.sleep(0.05)
        # 10 bytes would fit beside "first", but "large" has waited longer.
        small = asyncio.ensure_future(memory.run(10, decodes.decode("small")))
        await asyncio.gather(first, large, small)
        return decodes

    assert asyncio.run(scenario()).started == ["first", "large", "small"]


def test_a_request_that_gives_up_waiting_leaves_the_budget_whole():
    async def scenario() -> tuple[_Decodes, DecodeMemory]:
        memory = DecodeMemory(100)
        decodes = _Decodes(memory)
        holder = asyncio.ensure_future(memory.run(100, decodes.decode("holder", 0.3)))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await memory.run(100, decodes.decode("gave up"))
        assert await memory.run(100, decodes.decode("after")) == "after"
        await holder
        return decodes, memory

    decodes, memory = asyncio.run(scenario())
    assert decodes.started == ["holder", "after"]  # the one that gave up never ran
    assert decodes.alone["after"] and memory.in_use == 0


def test_a_share_granted_as_its_request_gives_up_is_given_back():
    async def scenario() -> DecodeMemory:
        memory = DecodeMemory(100)
        await memory._acquire(100)
        waiting = asyncio.ensure_future(memory._acquire(100))
        await asyncio.sleep(0)
        memory._release(100)  # grants the waiting share ...
        waiting.cancel()  # ... whose request gives up before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return memory

    assert asyncio.run(scenario()).in_use == 0


def test_a_held_share_lasts_across_steps_and_until_its_threads_end():
    """A JSON body's share covers its parse and decode, and outlives a request that gives up."""

    async def scenario() -> tuple[list[int], _Decodes, DecodeMemory]:
        memory = DecodeMemory(100)
        decodes = _Decodes(memory)
        held: list[int] = []

        async def request() -> None:
            async with memory.hold(70) as reservation:
                await reservation.run(decodes.decode("parse", 0))
                await asyncio.sleep(0.05)  # checks on the loop, between the threads
                held.append(memory.in_use)
                await reservation.run(decodes.decode("decode", 0.4))

        giving_up = asyncio.ensure_future(request())
        await asyncio.sleep(0.02)
        other = asyncio.ensure_future(memory.run(70, decodes.decode("other", 0)))
        while "decode" not in decodes.started:
            await asyncio.sleep(0.01)
        giving_up.cancel()  # the request's deadline passes while its decode still runs
        with pytest.raises(asyncio.CancelledError):
            await giving_up
        await other
        return held, decodes, memory

    held, decodes, memory = asyncio.run(scenario())
    assert held == [70]  # between the parse and the decode
    assert decodes.started == ["parse", "decode", "other"]
    assert decodes.alone["other"]  # it waited for the abandoned decode's thread to end
    assert decodes.peak_in_use == 70 and memory.in_use == 0


class _Parsed(list):
    """Stands for a parsed body: a list that a weak reference can follow."""


def test_a_failed_step_frees_its_values_without_the_cycle_collector():
    """A refused body's parsed values go with the refusal, before the next body is parsed.

    The failure's traceback holds the frames that ran the step; a reference from one of them
    back to the failure would keep every parsed value alive until a full collection.
    """

    async def scenario() -> tuple[bool, bool]:
        memory = DecodeMemory(100)
        parsed: list[weakref.ref] = []

        def decode(values: _Parsed) -> None:
            raise ValueError(f"{len(values)} values do not fit the model")

        async def request() -> None:
            values = _Parsed([[0]] * 1000)
            parsed.append(weakref.ref(values))
            async with memory.hold(60) as reservation:
                await reservation.run(lambda: decode(values))

        with pytest.raises(ValueError):
            await request()
        await asyncio.sleep(0)  # the thread's completion callbacks run
        await asyncio.sleep(0)
        return parsed[0]() is None, memory.in_use == 0

    gc.disable()
    try:
        freed, given_back = asyncio.run(scenario())
    finally:
        gc.enable()
    assert given_back
    assert freed


def test_a_share_of_nothing_does_not_queue_behind_large_decodes():
    async def scenario() -> list[str]:
        memory = DecodeMemory(100)
        order: list[str] = []
        holder = asyncio.ensure_future(memory.run(100, lambda: time.sleep(0.3)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(memory.run(100, lambda: order.append("large")))
        await asyncio.sleep(0.05)
        async with memory.hold(0) as reservation:  # a small body: estimated under the bar
            await reservation.run(lambda: order.append("small"))
        await asyncio.gather(holder, waiting)
        return order

    assert asyncio.run(scenario()) == ["small", "large"]


# Runs in a fresh process, so that the peak is this step's alone (VmHWM: ru_maxrss would
# carry over the parent's peak through exec).
_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from datasets.arrays import decode_array
from datasets.images import ImageDecodeError
from datasets.waveforms import (
    EcgSignal, beats_for_model, beats_memory_estimate, dicom_ecg_memory_estimate, ecg_from_dicom,
)
from serving.service import _json_memory_estimate, _json_pairs

kind, path = sys.argv[1], Path(sys.argv[2])
data = path.read_bytes()
samples = np.load(path) if kind == "beats" else None


def status(field: str) -> int:
    line = next(line for line in open("/proc/self/status") if line.startswith(field))
    return int(line.split()[1]) * 1024


before = status("VmRSS:")
if kind == "json":
    estimate = _json_memory_estimate(data)
    try:
        decode_array(json.loads(data, object_pairs_hook=_json_pairs)["array"], shape=(1, 28, 28))
    except ImageDecodeError:
        pass
elif kind == "dicom":
    estimate = dicom_ecg_memory_estimate(data)
    ecg_from_dicom(data, lead="II")
else:
    signal = EcgSignal(samples, 2000.0, "MLII", "json")
    estimate = beats_memory_estimate(signal)
    beats_for_model(signal)
print(status("VmHWM:") - before, estimate)
"""


def _one_lead_dicom_ecg(shared_datasets: Path, rate: float, seconds: float) -> bytes:
    """The sample 12-lead DICOM ECG cut to lead II, repeated to ``seconds`` at ``rate`` Hz."""
    dataset = pydicom.dcmread(shared_datasets / "dicom" / "pydicom_waveform_ecg.dcm")
    group = dataset.WaveformSequence[0]
    channels = int(group.NumberOfWaveformChannels)
    definitions = group.ChannelDefinitionSequence
    lead = [str(ch.ChannelSourceSequence[0].CodeMeaning) for ch in definitions].index("Lead II")
    values = np.frombuffer(group.WaveformData, dtype="<i2").reshape(-1, channels)[:, lead]
    count = int(rate * seconds)
    group.ChannelDefinitionSequence = [group.ChannelDefinitionSequence[lead]]
    group.NumberOfWaveformChannels, group.SamplingFrequency = 1, rate
    group.NumberOfWaveformSamples = count
    group.WaveformData = np.resize(values, count).astype("<i2").tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["json", "dicom", "beats"])
def test_the_estimates_cover_the_measured_peaks(kind: str, shared_datasets: Path, tmp_path: Path):
    """Each estimate is at least the peak it stands for, on the costliest input of its kind."""
    path = tmp_path / kind
    if kind == "json":  # single-element lists nested 63 deep: the most objects per byte
        unit = "[" * 63 + "0" + "]" * 63
        path.write_text('{"array": [' + ",".join([unit] * 15_000) + "]}")
    elif kind == "dicom":  # one lead at the highest rate: the most samples per file byte
        path.write_bytes(_one_lead_dicom_ecg(shared_datasets, 2000.0, 600.0))
    else:  # ten minutes of a real ECG at the highest rate
        record = wfdb.rdrecord(str(shared_datasets / "mitdb" / "101"), channel_names=["MLII"])
        samples = resample_poly(record.p_signal[: 600 * 360, 0], 50, 9)  # 360 to 2000 Hz
        np.save(path, samples, allow_pickle=False)
        path = path.with_suffix(".npy")
    completed = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, kind, str(path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr
    peak, estimate = map(int, completed.stdout.split())
    # Not far above either: a share much larger than the peak would stall other requests.
    assert 0.25 * estimate < peak <= estimate


def _gradient_png(height: int, width: int, step: int = 16) -> bytes:
    rows = np.arange(height, dtype=np.uint32)[:, None] // step
    columns = np.arange(width, dtype=np.uint32)[None, :] // step
    buffer = io.BytesIO()
    Image.fromarray(((rows + columns) % 200).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_estimate_follows_the_declared_size_not_the_file_size(shared_datasets: Path):
    radiograph = (shared_datasets / "dicom" / "nih_chestxray14_dx_1024.dcm").read_bytes()
    assert decode_memory_estimate(radiograph) == 1024 * 1024 * 30  # 16-bit grey: 30 B a pixel
    large_png = _gradient_png(6000, 6000)
    assert len(large_png) < 200_000
    assert decode_memory_estimate(large_png) == 6000 * 6000 * 5
    large_dicom = grayscale_dicom(6000, 6000, 8, b"", ExplicitVRLittleEndian)
    assert decode_memory_estimate(large_dicom) == 6000 * 6000 * 30
    # Over the pixel limit the decoder refuses the file (413) before decoding a pixel.
    huge_dicom = grayscale_dicom(6001, 6000, 8, b"", ExplicitVRLittleEndian)
    assert decode_memory_estimate(huge_dicom) == 0
    with pytest.raises(ImageDecodeError) as refused:
        decode_image(huge_dicom, channels=1, height=32, width=32)
    assert refused.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert decode_memory_estimate(b"not an image") == 0


def test_pillows_bomb_warning_is_not_printed_for_a_picture_refused_anyway(tmp_path: Path):
    """Over 89 M pixels Pillow warns on stderr; such a picture is a 413 before that matters."""
    declared = tmp_path / "declares-100M-pixels.png"
    header = bytearray(_gradient_png(1, 10000))
    header[20:24] = (10000).to_bytes(4, "big")  # IHDR height: 10000 x 10000
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    declared.write_bytes(bytes(header))
    script = (
        "import sys; from pathlib import Path; "
        "from datasets.images import ImageDecodeError, decode_image, decode_memory_estimate\n"
        "data = Path(sys.argv[1]).read_bytes(); print(decode_memory_estimate(data))\n"
        "try: decode_image(data, channels=1, height=32, width=32)\n"
        "except ImageDecodeError as error: print(int(error.status))"
    )
    completed = subprocess.run(
        [sys.executable, "-W", "default", "-c", script, str(declared)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["0", "413"]
    assert completed.stderr == ""


def test_the_service_decodes_a_large_picture_within_the_budget(shared_datasets: Path):
    """The service's picture path: a large picture holds its estimate, a radiograph nothing."""
    memory = DecodeMemory(2**30)
    held: list[int] = []

    def decoding(data: bytes):
        def decode():
            held.append(memory.in_use)
            return decode_image(data, channels=1, height=32, width=32, refuse_blank=True)

        return decode

    large_png = _gradient_png(6000, 4000)
    radiograph = (shared_datasets / "dicom" / "nih_chestxray14_dx_1024.dcm").read_bytes()

    async def scenario() -> list:
        return [
            await service._decode_picture(memory, decoding(data), data)
            for data in (large_png, radiograph)
        ]

    decoded = asyncio.run(scenario())
    assert [image.source_shape for image in decoded] == [(6000, 4000), (1024, 1024)]
    assert held == [decode_memory_estimate(large_png), 0]
    assert memory.in_use == 0


@pytest.mark.slow
def test_large_uploads_at_once_are_all_answered(served_model, service_keys, registered_model):
    large_png = _gradient_png(6000, 6000)
    small_png = _gradient_png(28, 28, step=1)

    def screen(content: bytes) -> requests.Response:
        return requests.post(
            f"{served_model.url}/v1/screen",
            files={"file": ("upload.png", content)},
            data={"model": registered_model.model_name},
            headers={"Authorization": f"Bearer {service_keys.all_models}"},
            timeout=60,
        )

    with ThreadPoolExecutor(max_workers=7) as pool:
        answers = list(pool.map(screen, [large_png] * 6 + [small_png]))
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["decision"] in ("positive", "negative")


@pytest.mark.slow
def test_large_json_bodies_and_long_ecgs_at_once_are_all_answered(
    served_model, service_keys, registered_model, ecg_model, shared_datasets: Path
):
    """Each of these holds a share of the budget: JSON parses, a DICOM lead read, beat cuts."""
    headers = {"Authorization": f"Bearer {service_keys.all_models}"}
    rows = np.arange(600, dtype=np.uint16)[:, None] // 8
    columns = np.arange(600, dtype=np.uint16)[None, :] // 8
    array = {"array": ((rows + columns) % 200 + 20).tolist(), "model": registered_model.model_name}
    assert len(json.dumps(array)) > 1_000_000  # over the bar: parsed under a share
    record = wfdb.rdrecord(str(shared_datasets / "mitdb" / "101"), channel_names=["MLII"])
    ecg = {"samples": record.p_signal[:, 0].round(3).tolist(), "sampling_rate_hz": 360}
    ecg |= {"lead": "MLII", "model": ecg_model.model_name}  # the whole 30 min record
    dicom_ecg = _one_lead_dicom_ecg(shared_datasets, 2000.0, 1800.0)

    def post(kind: str) -> requests.Response:
        url = f"{served_model.url}/v1"
        if kind == "array":
            return requests.post(f"{url}/screen/array", json=array, headers=headers, timeout=120)
        if kind == "ecg":
            return requests.post(f"{url}/monitor", json=ecg, headers=headers, timeout=120)
        return requests.post(
            f"{url}/monitor/dicom",
            files={"file": ("ecg.dcm", dicom_ecg)},
            data={"model": ecg_model.model_name, "lead": "II"},
            headers=headers,
            timeout=120,
        )

    kinds = ["array", "ecg", "dicom"] * 2
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
        answers = dict(enumerate(pool.map(post, kinds)))
    for index, answer in answers.items():
        assert answer.status_code == 200, (kinds[index], answer.text)
        body = answer.json()
        if kinds[index] == "array":
            assert body["input"] == {"format": "array", "height": 600, "width": 600}
        elif kinds[index] == "ecg":
            assert 1800 < body["summary"]["beats"] < 1900  # record 101 has 1,865 beats
        else:
            assert body["summary"]["beats"] > 1000
