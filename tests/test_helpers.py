"""The test session's own process hygiene (tests/helpers.py)."""

import signal
import subprocess
import sys

import psutil
from helpers import end_stragglers


def test_processes_that_do_not_exit_are_killed_and_named_and_exited_ones_left_alone():
    hung = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert hung.stdout.readline() == "ready\n"
    try:
        assert end_stragglers([psutil.Process(hung.pid)], timeout=1) == [hung.pid]
        assert hung.wait(timeout=10) == -signal.SIGKILL
    finally:
        hung.kill()
    exited = psutil.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    assert end_stragglers([exited], timeout=1) == []
