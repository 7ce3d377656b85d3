"""A server worker ends with the process that supervises it.

``medscreen serve`` becomes BentoML's supervisor, and the workers are its children. Killed with
SIGKILL, the supervisor cannot stop them: they used to go on answering hospitals, writing the
prediction log and holding the port, out of reach of the next ``medscreen serve``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
SUPERVISOR_PID_ENV = "MEDSCREEN_SUPERVISOR_PID"


def end_with_supervisor(ending_signal: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send this process ``ending_signal`` when its parent dies.

    SIGTERM shuts a worker down the usual way: requests in flight are answered and the
    prediction log is closed.

    Args:
        ending_signal: The signal to receive.

    Returns:
        True if the kernel will send it (Linux); False where there is no such facility.
    """
    if not sys.platform.startswith("linux"):
        return False
    # The supervisor's PID from `medscreen serve` (it becomes the supervisor by exec): the
    # parent at this moment may already be init, if the supervisor died while we imported.
    parent = int(os.environ.get(SUPERVISOR_PID_ENV) or os.getppid())
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(ending_signal), 0, 0, 0) != 0:
        logger.warning("cannot tie this worker to its supervisor: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the supervisor died before the request was made
        logger.warning("the supervising process %d is gone; this worker stops", parent)
        os.kill(os.getpid(), ending_signal)
    return True
