"""Resident and peak memory of a Linux process, read from ``/proc``, for the memory benchmarks."""

from __future__ import annotations

from pathlib import Path


def status_mib(field: str, pid: int | str = "self") -> float:
    """A memory field of the process's status (``VmHWM``: peak resident; ``VmRSS``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def resident_mib_with_peak_reset(pid: int | str = "self") -> float:
    """The resident memory now, with the peak (``VmHWM``) reset to it: earlier peaks not counted."""
    resident = status_mib("VmRSS", pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return resident
