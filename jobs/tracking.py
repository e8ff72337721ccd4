"""Where a run reports besides Ray: TensorBoard event files beside its results, and MLflow when configured.

Every run and every sweep trial writes, from rank 0 only, one scalar per metric and epoch (train/loss, every val
metric, lr, epoch time) to RESULTS/tensorboard/, where RESULTS is the run's directory (ROOT/EXPERIMENT) or the
trial's, local or S3: `tensorboard --logdir ROOT/EXPERIMENT` shows a run, or every trial of a sweep side by side.
On S3 the events are written to a local file and copied up after each epoch (TensorBoard reads s3:// logdirs).

MLflow (`tracking.mlflow: {uri, experiment}`): the driver finds or creates the run's MLflow run (tagged with the
run's storage location, so --resume continues the same one) and logs the resolved config as params; rank 0 logs
every epoch's metrics; the driver closes it with the best checkpoint's metrics (best/...) and result.json and
config.yaml as artifacts. A sweep is a parent run with one child run per trial; trials ASHA stopped are closed as
KILLED when the sweep ends. A tracking server that cannot be reached costs a warning, never the run.

Both hook into the reporter the recipes call (jobs.runner.run_recipe), not into Ray's logger callbacks: Ray 2.60's
Train V2 refuses Tune's logger callbacks (ray-project/ray#49454, #64253).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from tl_core.config import MlflowConfig, RunConfig
from tl_core.distributed import get_rank
from tl_core.errors import ConfigError
from tl_core.files import user_path
from tl_core.secrets import redact

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


def tracked(report: Report, filesystem, directory: str, mlflow: tuple[str, str] | None = None) -> Report:
    """`report`, also writing each epoch's metrics to TensorBoard (and to the MLflow run `mlflow` = (uri, run id)) on
    rank 0. A failure to write them is a warning: tracking never stops a training run."""
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
            if mlflow is not None:
                _guarded(mlflow[0], "log this epoch", lambda client: client.log_batch(mlflow[1], metrics=_metrics(metrics)))
        report(metrics, checkpoint_dir)

    return report_and_track


# ---------------------------------------------------------------- MLflow

RUN_TAG = "tl.run"  # the run's storage location (ROOT/EXPERIMENT, or a trial's directory): one MLflow run per place


def _client(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a server that is down: a warning in seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _guarded(uri: str, what: str, call: Callable):
    """`call(client)`, or None with one warning when MLflow cannot be reached or refuses."""
    try:
        return call(_client(uri))
    except Exception as exc:  # noqa: BLE001 - tracking never stops a training run
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning("tracking.mlflow: cannot %s at %s (%s: %s); the run goes on", what, uri, type(exc).__name__, redact(first))
        return None


def _metrics(metrics: dict, prefix: str = "") -> list:
    from mlflow.entities import Metric

    now, step = int(time.time() * 1000), int(metrics.get("epoch", 0))
    return [Metric(prefix + name, float(value), now, step) for name, value in metrics.items()
            if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value)]


def _flat(data: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = redact(str(value))[:6000]
    return out


def check_mlflow_uri(cfg: RunConfig) -> None:
    """On the driver, before anything runs: a SQLite database must go in a folder that exists and takes a new file
    (MLflow retried opening one in /proc for minutes, in backoff); MLflow 3 refuses a file: store unless
    MLFLOW_ALLOW_FILE_STORE is set, which every epoch would then only warn about (MLflow's own reading of the variable;
    older versions lack it)."""
    settings = cfg.tracking.mlflow
    if settings is None:
        return
    uri = absolute_uri(settings.uri)
    database, _ = _sqlite_path(uri) or ("", "")
    if database.startswith("/"):
        from cluster import storage

        if not Path(database).parent.is_dir():
            raise ConfigError(f"tracking.mlflow.uri: {Path(database).parent}, the folder of the SQLite database, does not exist "
                              "(SQLite creates the database file, not its folder)")
        storage.check_creatable(storage.parse(database, field="tracking.mlflow.uri"), "tracking.mlflow.uri")
    if not uri.startswith("file:"):
        return
    from mlflow import environment_variables

    allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    if allowed is not None and not allowed.get():
        raise ConfigError("tracking.mlflow.uri: MLflow refuses a file: store unless MLFLOW_ALLOW_FILE_STORE=true is set "
                          "(where the workers run too); use sqlite:///PATH/mlflow.db or a tracking server")


def absolute_uri(uri: str) -> str:
    """A file: or sqlite: tracking URI with its path made absolute. Ray runs each worker in a directory of its own,
    so with a relative one (`sqlite:///mlflow.db`, as MLflow's docs write it) the workers opened a database of their
    own, which lacked the driver's run: every epoch's metrics were lost, one warning each."""
    scheme, _, rest = uri.partition(":")
    if sqlite := _sqlite_path(uri):
        path, query = sqlite
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{user_path(path).resolve()}{query}"
    elif scheme == "file" and not rest.startswith("//") and not rest.startswith("/"):  # file:./mlruns
        return user_path(rest).resolve().as_uri()
    return uri


def _sqlite_path(uri: str) -> tuple[str, str] | None:
    """(database path, "?query" or "") of a sqlite:/// URI (sqlite:///relative.db, sqlite:////absolute.db), or None."""
    if not uri.startswith("sqlite:///"):
        return None
    path, sep, query = uri.removeprefix("sqlite:///").partition("?")
    return path, sep + query


def mlflow_run(cfg: RunConfig, place: str, *, name: str, parent: str | None = None, params: dict | None = None) -> tuple[str, str] | None:
    """(uri, run id) of the MLflow run for the run stored at `place`: the one an earlier attempt made (--resume), else a
    new one (a child of `parent`) with the resolved config (and `params`) logged; None when tracking is off or down."""
    settings: MlflowConfig | None = cfg.tracking.mlflow
    if settings is None:
        return None

    def find_or_create(client) -> str:
        from mlflow.entities import Param

        experiment = client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
        earlier = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{place}'", max_results=1)
        if earlier:
            client.update_run(earlier[0].info.run_id, status="RUNNING")
            return earlier[0].info.run_id
        tags = {RUN_TAG: place, **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        logged = {**_flat(cfg.to_dict()), **{k: redact(str(v))[:6000] for k, v in (params or {}).items()}}
        client.log_batch(run_id, params=[Param(k, v) for k, v in logged.items()])
        return run_id

    run_id = _guarded(settings.uri, f"start the MLflow run for {place}", find_or_create)
    return (settings.uri, run_id) if run_id else None


def finish_mlflow_run(run: tuple[str, str] | None, status: str = "FINISHED", best: dict | None = None,
                      artifacts: dict[str, str] | None = None) -> None:
    """Close an MLflow run: the best checkpoint's metrics as best/..., `artifacts` (file name -> text) attached."""
    if run is None:
        return
    uri, run_id = run

    def close(client) -> None:
        if best:
            client.log_batch(run_id, metrics=_metrics(best, prefix="best/"))
        with tempfile.TemporaryDirectory(prefix="tl-mlflow-") as tmp:
            for file_name, text in (artifacts or {}).items():
                (Path(tmp) / file_name).write_text(text)
                client.log_artifact(run_id, str(Path(tmp) / file_name))
        client.set_terminated(run_id, status=status)

    _guarded(uri, "close the MLflow run", close)


def close_stopped_children(parent: tuple[str, str] | None) -> None:
    """At the end of a sweep: child runs still RUNNING (trials the scheduler stopped) are closed as KILLED."""
    if parent is None:
        return
    uri, run_id = parent

    def close(client) -> None:
        experiment_id = client.get_run(run_id).info.experiment_id
        for child in client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"):
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, "tl.stopped_by", "scheduler")
                client.set_terminated(child.info.run_id, status="KILLED")

    _guarded(uri, "close the sweep's trials", close)
