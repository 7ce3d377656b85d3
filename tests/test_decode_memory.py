"""The memory budget of large decodes: small files declaring huge pictures cannot, six at once,
take the worker's memory (at 6000 x 6000 pixels a 100 kB PNG took 137-412 MiB to decode, a
1.7 MB RLE DICOM 910 MiB)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import grayscale_dicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

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
