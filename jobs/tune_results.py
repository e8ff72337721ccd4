"""What Ray Tune writes of a sweep, written and read so that a restart or a killed driver loses none of it.

- The per-trial results (progress.csv, result.json), which jobs.analyze reads: Tune's CSV and JSON loggers with one
  change. When a trial starts from a checkpoint, Tune's loggers copy the trial's file from storage over the driver's
  own copy (`LoggerCallback._restore_from_remote`, a private method: when upgrading Ray, check it here). That is
  right for a resumed sweep, whose driver stages its files in a new folder. It is wrong for a trial restarted in the
  same run (population-based training's exploit, a retry after a failure): the driver syncs its copy to storage only
  every so often, so the copy in storage can be older, and the rows the trial logged since the last sync were lost
  (a CI run's exploited trial kept only its last epoch). Here the driver's copy, when it has one, is kept: it holds
  every row the storage copy does, and any logged since.
- The saves of Tune's state (experiment_state-STAMP.json and its searcher's files of the same STAMP), which a resume
  and jobs.analyze read. Tune copies them from the driver's staging folder into storage in place, and rewrites the
  staged copy while an earlier copy may still be reading it: a driver killed then leaves a file cut short (on a
  local or shared disk; an S3 object is whole or absent). Tune's restore then logged a traceback and went on as a
  new sweep (seen in a test: a sweep of 6 trials, resumed so, ran 1 more trial and ended with status 0).
- ASHA's rungs: the score each trial reached at each rung. Tune saves no scheduler with the experiment (ray-project/
  ray#30838): a resume rebuilds ASHA from tuner.pkl, written as the sweep began, with no rung recorded, and judged a
  resumed trial again at a rung it had passed, against whichever trials reported first after the resume (a scratch
  trial passed rung 4 in the sweep and was stopped there once resumed). ResumableASHA reads them back from each
  trial's result.json.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pickle
import pickletools
import re
from pathlib import Path
from typing import Iterator

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from cluster import storage
from cluster.storage import Location
from jobs import ray_private
from jobs.runner import set_aside

NO_DEFAULT_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
log = logging.getLogger("jobs")


class _KeepsTheDriversCopy:
    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class CSVResults(_KeepsTheDriversCopy, CSVLoggerCallback):
    """Tune's progress.csv logger, keeping the driver's copy on a restart in the same run."""


class JsonResults(_KeepsTheDriversCopy, JsonLoggerCallback):
    """Tune's result.json logger, keeping the driver's copy on a restart in the same run."""


def result_loggers() -> list:
    return [CSVResults(), JsonResults()]


class ResumableASHA(ASHAScheduler):
    """Ray Tune's ASHA, with the rungs of a resumed sweep's trials read back from their results: a trial added with
    results (every trial of a restored sweep, finished ones too) has each of its reported scores replayed into its
    bracket in order, recording what ASHA recorded as they came; the decisions are not taken again. It reads ASHA's
    private `_trial_info`, `_time_attr`, `_metric` and `_metric_op` (Ray 2.60): when upgrading Ray, check them here."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.has_reported_at_least_once:
            return  # a new trial (its storage has no folder yet)
        bracket = self._trial_info[trial.trial_id]
        for row in reported_rows(trial.storage.storage_filesystem, f"{trial.storage.trial_fs_path}/result.json"):
            if self._time_attr in row and isinstance(row.get(self._metric), (int, float)):
                bracket.on_result(trial, row[self._time_attr], self._metric_op * row[self._metric])


def reported_rows(fs, path: str) -> list[dict]:
    """The rows of a trial's result.json (one JSON object a line), none where it is missing; a line cut short by a
    driver killed while writing it is left out."""
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return []
    with fs.open_input_stream(path) as f:
        lines = f.readall().decode("utf-8", errors="replace").splitlines()
    rows = []
    for line in lines:
        with contextlib.suppress(ValueError):
            if isinstance(row := json.loads(line), dict):
                rows.append(row)
    return rows


@contextlib.contextmanager
def tune_loggers(tuner) -> Iterator[None]:
    """Tune's loggers: its CSV and JSON results, which jobs.analyze reads, and not its TensorBoard events, which would
    repeat each trial's own tensorboard/ under other names (and print a line pointing at the driver's staging folder).
    A sweep names the first two as callbacks and turns Tune's default loggers off while it runs; one begun before it
    named them is resumed with Tune's defaults, all three."""
    if not any(isinstance(callback, JsonLoggerCallback) for callback in ray_private.tuner_run_config(tuner).callbacks or ()):
        yield
        return
    before = os.environ.get(NO_DEFAULT_LOGGERS)
    os.environ[NO_DEFAULT_LOGGERS] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NO_DEFAULT_LOGGERS, None)
        else:
            os.environ[NO_DEFAULT_LOGGERS] = before


def state_saves(experiment: Location) -> list[tuple[str, list[str]]]:
    """Tune's saves of the sweep's state in storage, newest first: (STAMP, the names of its files).

    Not Tune's temporary files (`.UUID-tmp-basic-variant-state-STAMP.json`, `tmp-...`): Tune writes a searcher's state
    there and renames it, and the driver's upload of its staged files to storage, in a thread of its own, can copy one
    in between, empty; that copy is never removed (a CI run's finished sweep then read as cut short), and Tune never
    reads one."""
    import pyarrow.fs

    fs = storage.filesystem(experiment)
    names = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(experiment.path, allow_not_found=True))
             if info.type == pyarrow.fs.FileType.File and not info.base_name.startswith((".", "tmp-"))]
    stamps = sorted((match[1] for name in names if (match := re.fullmatch(r"experiment_state-(.+)\.json", name))), reverse=True)
    return [(stamp, [name for name in names if re.fullmatch(rf".+-{re.escape(stamp)}\.(json|pkl)", name)]) for stamp in stamps]


def newest_whole_save(experiment: Location, saves: list[tuple[str, list[str]]]) -> str | None:
    """The STAMP of the newest of `saves` (state_saves' list) whose every file reads whole, or None."""
    fs = storage.filesystem(experiment)
    return next((stamp for stamp, files in saves if all(reads_whole(fs, f"{experiment.path}/{name}") for name in files)), None)


def set_aside_cut_short_state(experiment: Location) -> bool:
    """Before a resume: whether a whole save of the sweep's state remains once every newer save with a file cut short
    is moved to EXPERIMENT/damaged/ (kept). Tune restores the newest save left; with none, the sweep starts again."""
    saves = state_saves(experiment)
    whole = newest_whole_save(experiment, saves)
    newer = [(stamp, files) for stamp, files in saves if whole is None or stamp > whole]
    for stamp, files in newer:
        log.warning("Tune's save of the sweep's state at %s has a file cut short (its driver was stopped while saving "
                    "it): moved to %s", stamp, ", ".join(set_aside(experiment, name).uri for name in files))
    if newer and whole is None:
        log.warning("no whole save of the sweep's state is left: it starts again (the trials' folders are kept)")
    return whole is not None


def reads_whole(fs, path: str) -> bool:
    """Whether Tune's state file at `path` is whole: a pickle (by its protocol mark, whatever its name: Tune's
    basic-variant-state-*.json is one) whose opcodes run to its STOP, read with pickletools, which runs none of them;
    otherwise JSON that parses."""
    with fs.open_input_stream(path) as f:
        data = f.readall()
    try:
        if data[:1] == pickle.PROTO:
            collections.deque(pickletools.genops(data), maxlen=0)
        else:
            json.loads(data)
    except ValueError:  # json.JSONDecodeError is one; pickletools raises it for a pickle cut short
        return False
    return True
