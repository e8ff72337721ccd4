"""Processes on this machine by PID: whether one exists, and what tells it from a later one given its number."""

from __future__ import annotations

import os
from pathlib import Path


def process_exists(pid: int) -> bool:
    """Whether a process with this PID runs (another user's included)."""
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def start_stamp(pid: int) -> str | None:
    """What tells process `pid` from a later one with its number: the boot and its start time in clock ticks since
    boot (Linux /proc), or None where they cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return f"{boot}:{fields[19]}"  # field 22 of stat, starttime; the fields after the name start at field 3
    except (OSError, IndexError):
        return None


def alive(pid: int | None, started: str | None = None) -> bool:
    """Whether process `pid` runs and, when `started` (its `start_stamp` when it was started) is known, is that
    process still: after a reboot, or once it has ended, its number may belong to another."""
    return bool(pid) and process_exists(pid) and (started is None or start_stamp(pid) in (None, started))
