"""The loggers that write a sweep's per-trial results (progress.csv, result.json), which jobs.analyze reads.

They are Tune's CSV and JSON loggers with one change. When a trial starts from a checkpoint, Tune's loggers copy the
trial's file from storage over the driver's own copy (`LoggerCallback._restore_from_remote`, a private method: when
upgrading Ray, check it here). That is right for a resumed sweep, whose driver stages its files in a new folder. It is
wrong for a trial restarted in the same run (population-based training's exploit, a retry after a failure): the driver
syncs its copy to storage only every so often, so the copy in storage can be older, and the rows the trial logged since
the last sync were lost (a CI run's exploited trial kept only its last epoch). Here the driver's copy, when it has one,
is kept: it holds every row the storage copy does, and any logged since.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

NO_DEFAULT_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


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


@contextlib.contextmanager
def tune_loggers(tuner) -> Iterator[None]:
    """Tune's loggers: its CSV and JSON results, which jobs.analyze reads, and not its TensorBoard events, which would
    repeat each trial's own tensorboard/ under other names (and print a line pointing at the driver's staging folder).
    A sweep names the first two as callbacks and turns Tune's default loggers off while it runs; one begun before it
    named them is resumed with Tune's defaults, all three."""
    from jobs import ray_private

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
