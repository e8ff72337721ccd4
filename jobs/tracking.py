"""Where a run reports besides Ray: TensorBoard event files beside its results.

Every run and every sweep trial writes, from rank 0 only, one scalar per metric and epoch (train/loss, every val
metric, lr, epoch time) to RESULTS/tensorboard/, where RESULTS is the run's directory (ROOT/EXPERIMENT) or the
trial's, local or S3: `tensorboard --logdir ROOT/EXPERIMENT` shows a run, or every trial of a sweep side by side.
On S3 the events are written to a local file and copied up after each epoch (TensorBoard reads s3:// logdirs).

This hooks into the reporter the recipes call (jobs.runner.run_recipe), not into Ray's logger callbacks: Ray 2.60's
Train V2 refuses Tune's logger callbacks (ray-project/ray#49454).
"""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from tl_core.distributed import get_rank

log = logging.getLogger("jobs")

TENSORBOARD_DIR = "tensorboard"
Report = Callable[[dict, Optional[str]], None]


class TensorBoardLog:
    """Scalars per epoch as TensorBoard events under `directory` of `filesystem` (a pyarrow filesystem)."""

    def __init__(self, filesystem, directory: str):
        from torch.utils.tensorboard import SummaryWriter  # flush() waits for the events (tensorboardX's does not)

        self.filesystem, self.directory = filesystem, f"{directory.rstrip('/')}/{TENSORBOARD_DIR}"
        self.local = Path(tempfile.mkdtemp(prefix="tl-tensorboard-"))
        self.writer = SummaryWriter(log_dir=str(self.local), flush_secs=10**6)

    def log(self, metrics: dict) -> None:
        step = int(metrics["epoch"])
        for name, value in metrics.items():
            if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.filesystem.create_dir(self.directory, recursive=True)
        for path in self.local.iterdir():  # an event file only grows: the whole file again is the simple, safe copy
            with open(path, "rb") as src, self.filesystem.open_output_stream(f"{self.directory}/{path.name}") as dst:
                shutil.copyfileobj(src, dst)

    def close(self) -> None:
        self.writer.close()
        shutil.rmtree(self.local, ignore_errors=True)


def tracked(report: Report, filesystem, directory: str) -> Report:
    """`report`, also writing each epoch's metrics to TensorBoard on rank 0. A failure to write them is a warning:
    tracking never stops a training run."""
    board: list[TensorBoardLog] = []

    def report_and_track(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        if get_rank() == 0:
            try:
                if not board:
                    board.append(TensorBoardLog(filesystem, directory))
                    atexit.register(board[0].close)
                board[0].log(metrics)
            except Exception as exc:  # noqa: BLE001 - a full disk or an S3 hiccup costs the plot, not the run
                log.warning("tracking: cannot write TensorBoard events to %s (%s: %s)", directory, type(exc).__name__, exc)
        report(metrics, checkpoint_dir)

    return report_and_track
