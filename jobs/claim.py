"""One job at a time per experiment: a run claims ROOT/EXPERIMENT/.lock atomically (local or S3) before it
writes anything, and gives it back when it ends, however it ends.

A second job on the same experiment gets one line naming the holder. A lock left by a driver that was killed
(same host, its process gone) is taken over, so `--resume` after a crash needs nothing by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from cluster import storage
from jobs.staging import experiment_location
from tl_core.config import RunConfig
from tl_core.errors import ConfigError, StorageError
from tl_core.processes import alive, start_stamp

LOCK_FILE = ".lock"
log = logging.getLogger("jobs")
_held: set[str] = set()  # the locks this process holds now


@contextlib.contextmanager
def claimed(cfg: RunConfig) -> Iterator[None]:
    """Hold the experiment's lock for the block."""
    experiment = experiment_location(cfg)
    lock = experiment.child(LOCK_FILE)
    # Local directories the claim itself creates are removed again if the run leaves nothing in them.
    created = [] if lock.is_s3 else [p for p in (Path(experiment.path), Path(experiment.path).parent) if not p.exists()]
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "stamp": start_stamp(os.getpid())}
    if not storage.create_exclusive(lock, json.dumps(me)):
        holder = _holder(lock)
        if not _is_stale(holder, lock):
            raise ConfigError(f"experiment: {cfg.experiment} is being run by another job (pid {holder.get('pid')} on "
                              f"{holder.get('host')} since {holder.get('started')}); if that job is gone, delete {lock.uri}")
        log.warning("experiment %s: taking over the lock of a job that is gone (pid %s)", cfg.experiment, holder.get("pid"))
        storage.remove_file(lock)
        if not storage.create_exclusive(lock, json.dumps(me)):
            raise ConfigError(f"experiment: {cfg.experiment} was just claimed by another job; delete {lock.uri} if it is gone")
    _held.add(lock.uri)
    try:
        yield
    finally:
        _held.discard(lock.uri)
        try:
            storage.remove_file(lock)
        except StorageError as exc:  # storage is down (the run's own error says so): a later run takes the lock over
            log.warning("experiment %s: could not give back %s (%s)", cfg.experiment, lock.uri, exc)
        for directory in created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something there
                directory.rmdir()


def _holder(lock: storage.Location) -> dict:
    try:
        holder = json.loads(storage.read_text(lock))
    except (ValueError, FileNotFoundError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict, lock: storage.Location) -> bool:
    """A lock whose job is certainly gone: taken on this host by a process that no longer runs (its number may have
    gone to another since: the start stamp tells them apart), or by this very process in a claim it no longer holds
    (one it could not give back while storage was down)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return lock.uri not in _held
    stamp = holder.get("stamp")
    return not alive(holder["pid"], stamp if isinstance(stamp, str) else None)
