"""Worker processes for the runs that train in parallel (teacher groups, generator runs).

Workers are spawned (a clean interpreter: no inherited threads or locks) and, on Linux, die with the
process that started them: a run stopped with ``kill PID`` (not only Ctrl-C, which reaches the whole
process group) leaves no workers training on in the background. The kernel ties the signal to the
thread that started the worker, so a pool is used from a thread that outlives it (the main thread here).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to send this worker SIGTERM when its parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request: nobody is left to send it
        os._exit(1)


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that end when this process ends."""
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_die_with_parent, initargs=(os.getpid(),))
