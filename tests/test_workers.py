"""Worker processes end with the process that started them, even when it is killed outright."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import multiprocessing, os, signal, sys, time
from pathlib import Path
from llgbm_ext.workers import worker_pool

if __name__ == "__main__":
    pool = worker_pool(2)
    futures = [pool.submit(time.sleep, 120) for _ in range(2)]
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.1)
    time.sleep(3)  # the workers have run their initializer and are sleeping
    Path(sys.argv[1]).write_text(" ".join(str(p.pid) for p in multiprocessing.active_children()))
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    pid_file, log = tmp_path / "pids", tmp_path / "stderr"
    with log.open("w") as stderr:  # files, not pipes: workers that outlive the parent would hold a pipe open
        code = subprocess.run([sys.executable, str(script), str(pid_file)], stdout=subprocess.DEVNULL, stderr=stderr,
                              timeout=120).returncode
    assert code == -signal.SIGKILL, log.read_text()[-2000:]
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = [p for p in pids if _alive(p)]
    for p in leftover:  # do not leave them behind if the test fails
        os.kill(p, signal.SIGKILL)
    assert not leftover, f"workers {leftover} outlived their parent"
