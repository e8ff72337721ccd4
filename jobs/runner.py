"""The one way the core runs on Ray.

`run_recipe` runs a recipe on a Ray worker: the node-local config, the newest checkpoint that verifies (a
damaged one is skipped), the device, and a reporter that hands every epoch to Ray. Both places the core
runs call it: every worker of a `TorchTrainer` (`train_worker`, started by `run_trainer`) and a one-worker
Ray Tune trial (jobs.sweep), so they resume, report and upload alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cluster import storage
from cluster.storage import Location
from jobs import ray_private, streaming, tracking
from jobs.cli import Interrupted, RunFailed, setup_logging
from jobs.preflight import check_capacity, cpu_gpu_per_worker
from jobs.staging import checkpoint_dirs, experiment_location, localize, newest_meta, root_location, stage_hub_weights, with_absolute_paths
from tl_core.checkpoint import META_FILE, Checkpoint, Mirror, load_checkpoint
from tl_core.config import RunConfig, ScalingConfig, from_dict
from tl_core.distributed import get_world_size
from tl_core.errors import CheckpointError
from tl_core.state import CheckpointMirror

log = logging.getLogger("jobs")
EPOCH_CHECKPOINT = "checkpoint_epoch_{:04d}"
DAMAGED_DIR = "damaged"  # EXPERIMENT/damaged/: checkpoints that failed verification, kept, never deleted
# Every worker process of the job binds torch.distributed's rendezvous store to MASTER_ADDR, not to every interface.
WORKER_RUNTIME_ENV = {"worker_process_setup_hook": "jobs.ray_private.bind_process_group_store_to_master_addr"}

# How pyarrow's S3 client (which Ray Train itself writes through) says the endpoint is down.
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Connection refused")


@dataclass
class WorkerSession:
    """What differs between a Train worker and a Tune trial: how an epoch is handed to Ray, where this run's
    checkpoints lie, and the device."""

    report: Callable[[dict, Optional[str]], None]  # (metrics, checkpoint directory or None)
    filesystem: object  # pyarrow filesystem of the run's storage
    checkpoints_dir: str  # where this run's checkpoint directories are, on `filesystem`
    registered: object  # the checkpoint Ray handed back (ray.train/tune.get_checkpoint()), or None
    device: object
    dataset_shard: Optional[Callable[[str], object]] = None  # a packed dataset's split for this worker (Ray Train's)
    mlflow_run: Optional[tuple[str, str]] = None  # (tracking URI, run id) that rank 0 logs each epoch to
    mirror: Optional[CheckpointMirror] = None  # where each checkpoint streams while it is saved (S3 runs)


def run_recipe(cfg: RunConfig, recipe: str, session: WorkerSession) -> None:
    """Run recipe `recipe` (a key of tl_core.recipes.RECIPES) on this Ray worker, resuming where the run stopped."""
    from tl_core.recipes import RECIPES

    ray_private.hold_torch_to_assigned_cpus()
    path, resume = latest_valid_checkpoint(session.filesystem, session.checkpoints_dir, cfg.experiment,
                                           session.registered) or (None, None)
    if resume is not None and (session.registered is None or Path(path).name > Path(session.registered.path).name):
        # Newer than any checkpoint Ray registered (they are numbered in order): its epoch was stored, but the run
        # stopped before Ray took the report (a driver killed in between). Report that epoch now, so the results hold
        # every epoch, Tune's scheduler judges a rung by the rung's own epoch (it judged a resumed trial by the epoch
        # after), and a run that had finished ends on its last epoch. One before a damaged registered one was heard.
        session.report(resume.meta["metrics"], None)
    report = tracking.tracked(session.report, session.filesystem, session.checkpoints_dir, session.mlflow_run)
    local = localize(cfg, weights=resume is None)  # a resumed run takes every weight from its checkpoint
    RECIPES[recipe].fit(local, report, data=packed_data(local, session), resume_from=resume, device=session.device,
                        mirror=session.mirror)


def packed_data(cfg: RunConfig, session: WorkerSession):
    """The stream of a packed `data.root` for this worker (None for a folder or a table): the split Ray Train handed
    it, or, in a one-worker trial, the whole stream."""
    if not streaming.is_packed(cfg):
        return None
    manifest = streaming.read_manifest(cfg)
    if session.dataset_shard is not None:
        return streaming.streamed_data(cfg, manifest, session.dataset_shard, get_world_size())
    whole = {name: ds.iterator() for name, ds in streaming.datasets(cfg, manifest).items()}
    return streaming.streamed_data(cfg, manifest, whole.__getitem__, 1)


def load_own_checkpoint(filesystem, path: str, experiment: str) -> Checkpoint:
    """The checkpoint at `path`, verified, and written by this experiment; CheckpointError otherwise."""
    import ray.train

    try:
        with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as local:
            checkpoint = load_checkpoint(local)
    except FileNotFoundError as exc:  # an empty directory left by a delete
        raise CheckpointError(f"checkpoint {Path(path).name} is incomplete ({exc})") from None
    config = checkpoint.meta.get("config")
    owner = config.get("experiment") if isinstance(config, dict) else None
    if owner != experiment:  # e.g. a link to another run's checkpoint
        raise CheckpointError(f"checkpoint {Path(path).name} belongs to experiment {owner!r}, not {experiment!r}")
    return checkpoint


def latest_valid_checkpoint(filesystem, directory: str, experiment: str, registered=None) -> tuple[str, Checkpoint] | None:
    """(path, checkpoint) of the newest checkpoint of this run that verifies, or None for a fresh start.

    Candidates are every checkpoint directory in the run's storage, not only the one Ray registered: a worker
    killed right after its upload finished leaves a complete checkpoint that Ray never heard of. A damaged or
    foreign one is skipped with a warning.
    """
    paths = checkpoint_dirs(filesystem, directory)
    if registered is not None and not registered.path.startswith(directory.rstrip("/") + "/"):
        paths = [registered.path, *paths]  # handed over from another trial (population-based training's exploit): it wins
    elif registered is not None and registered.path not in paths:
        paths = sorted([*paths, registered.path], key=lambda p: Path(p).name, reverse=True)
    for path in paths:
        try:
            checkpoint = load_own_checkpoint(filesystem, path, experiment)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", Path(path).name, exc)
            continue
        log.info("resuming from %s (epoch %d)", Path(path).name, checkpoint.meta["epoch"])
        return path, checkpoint
    if paths:
        log.warning("no checkpoint of this run verifies; starting from the beginning")
    return None


def set_aside_damaged_checkpoints(cfg: RunConfig) -> None:
    """Before a run starts again: newest first, every checkpoint that does not verify (or is not this run's) is
    moved to EXPERIMENT/damaged/, kept for inspection and out of the way of the epochs that will be written
    again, until one verifies."""
    experiment = experiment_location(cfg)
    filesystem = storage.filesystem(experiment)
    moved = False
    for path in checkpoint_dirs(filesystem, experiment.path):
        name = Path(path).name
        try:
            load_own_checkpoint(filesystem, path, cfg.experiment)
            break
        except CheckpointError as exc:
            log.warning("checkpoint %s is damaged (%s); moved to %s", name, exc, set_aside(experiment, name).uri)
            moved = True
    snapshot = ray_private.checkpoint_manager_snapshot_name()
    if moved and storage.exists(experiment.child(snapshot)):  # Ray Train forgets its registered checkpoints; the valid
        set_aside(experiment, snapshot)                          # ones stay in storage, found by latest_valid_checkpoint


def set_aside(experiment: Location, name: str) -> Location:
    """Move EXPERIMENT/NAME to EXPERIMENT/damaged/NAME-TIMESTAMP (kept, never deleted); returns where it went."""
    aside = experiment.child(DAMAGED_DIR, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    storage.move(experiment.child(name), aside)
    return aside


# ---------------------------------------------------------------- Ray Train

def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    setup_logging(in_worker=True)
    cfg = from_dict(loop_config["config"])
    extras = loop_config["extra_metrics"]
    experiment = experiment_location(cfg)
    checkpoints = S3Checkpoints(experiment) if experiment.is_s3 else None
    upload = checkpoints.upload if checkpoints else local_publisher(experiment)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, **extras, "timestamp": time.time()}, checkpoint=checkpoint,
                         checkpoint_dir_name=EPOCH_CHECKPOINT.format(int(metrics["epoch"])), checkpoint_upload_fn=upload)

    run = ray.train.get_context().get_storage()
    run_recipe(cfg, loop_config["recipe"], WorkerSession(report, run.storage_filesystem, run.experiment_fs_path,
                                                         ray.train.get_checkpoint(), ray.train.torch.get_device(),
                                                         ray.train.get_dataset_shard if loop_config["packed"] else None,
                                                         loop_config["mlflow_run"], checkpoints and checkpoints.mirror))


class S3Checkpoints:
    """A run's checkpoints on S3. `mirror(epoch)` streams each weights file to its place while torch.save writes it
    (the upload overlaps the save); `upload` is Ray Train's `checkpoint_upload_fn`: what was not streamed whole,
    retried with backoff, then meta.json last (so a checkpoint cut short by a failure has no meta.json and never
    verifies)."""

    def __init__(self, experiment: Location):
        self.experiment = experiment
        self.streamed: dict[str, dict[str, int]] = {}  # checkpoint directory name -> {file: bytes streamed whole}

    def mirror(self, epoch: int) -> Mirror:
        name = EPOCH_CHECKPOINT.format(epoch)
        streamed = self.streamed[name] = {}

        @contextlib.contextmanager
        def stream(file: str):
            copy = storage.UploadStream(self.experiment.child(name, file))
            try:
                yield copy
            finally:
                if copy.finish():
                    streamed[file] = copy.size
                else:
                    log.warning("checkpoint %s/%s: streaming it to %s failed (%s); it is uploaded after the save instead",
                                name, file, self.experiment.uri, copy.error)
        return stream

    def upload(self, checkpoint, checkpoint_dir_name: str):
        import ray.train

        local, destination = Path(checkpoint.path), self.experiment.child(checkpoint_dir_name)
        streamed = self.streamed.pop(checkpoint_dir_name, {})
        whole = frozenset(f for f, size in streamed.items() if (local / f).is_file() and (local / f).stat().st_size == size)
        storage.upload_dir(local, destination, last=META_FILE, skip=whole)
        return ray.train.Checkpoint(destination.path, filesystem=storage.filesystem(destination))


def local_publisher(experiment: Location) -> Callable:
    """Ray Train's `checkpoint_upload_fn` for local storage: the finished checkpoint directory is moved into the run
    (a rename when the temporary directory is on the run's filesystem) instead of being copied file by file."""

    def publish(checkpoint, checkpoint_dir_name: str):
        import ray.train

        destination = Path(experiment.path) / checkpoint_dir_name
        destination.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{checkpoint_dir_name}.tmp-", dir=destination.parent))
        shutil.move(checkpoint.path, staged / "checkpoint")  # whole before it takes the checkpoint's name
        if destination.exists():  # an incomplete leftover of an interrupted epoch: set aside, never deleted
            set_aside(experiment, checkpoint_dir_name)
        os.replace(staged / "checkpoint", destination)
        staged.rmdir()
        return ray.train.Checkpoint(str(destination))

    return publish


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as `ray job submit` sets it), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # worker lines in a log file without terminal colour codes
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, runtime_env=WORKER_RUNTIME_ENV)  # merged with a submitted job's own
    else:
        start_local_ray()
    ray_private.drop_benign_ray_lines()
    ray_private.note_when_worker_lines_come()
    ray_private.worker_lines_as_they_come()
    ray_private.plain_repeat_notes_off_terminals()


def start_local_ray(**init_kwargs) -> None:
    """A Ray cluster of this machine alone, every process of it (GCS, raylet, dashboard, agents, workers) listening
    on 127.0.0.1 only, as `python -m cluster.local up` starts it."""
    import ray

    ray_private.use_single_host_mode()
    ray_private.quiet_token_auth_notice()
    ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", logging_level=logging.WARNING,
             runtime_env=WORKER_RUNTIME_ENV, **init_kwargs)


def run_trainer(cfg: RunConfig, recipe: str, callbacks: list | None = None, extra_metrics: dict | None = None,
                mlflow_parent: str | None = None):
    """Fit `cfg` with `recipe` on the Ray cluster; a second call with the same experiment continues from its latest
    checkpoint. `extra_metrics` are added to every report (a sweep's batch sizes); `callbacks` go to Ray Train; the
    MLflow run (when tracked) is a child of `mlflow_parent` (a sweep's)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = with_absolute_paths(cfg)  # workers do not share the driver's working directory
    connect_ray()
    check_capacity(cfg)
    set_aside_damaged_checkpoints(cfg)
    cfg = stage_hub_weights(cfg, weights=newest_meta(experiment_location(cfg)) is None)  # a resumed run needs none
    root = root_location(cfg)
    packed = streaming.is_packed(cfg)
    mlflow = tracking.mlflow_run(cfg, experiment_location(cfg).uri, name=cfg.experiment, parent=mlflow_parent)
    ray_private.take_reports_promptly()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "recipe": recipe, "extra_metrics": extra_metrics or {}, "packed": packed,
                           "mlflow_run": mlflow},
        scaling_config=train_scaling(cfg.scaling),
        datasets=streaming.datasets(cfg, streaming.read_manifest(cfg)) if packed else None,
        dataset_config=streaming.data_config() if packed else None,
        run_config=ray.train.RunConfig(
            name=cfg.experiment,
            storage_path=root.path,
            storage_filesystem=storage.filesystem(root) if root.is_s3 else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep,
                                                         checkpoint_score_attribute=cfg.checkpoint.metric,
                                                         checkpoint_score_order=cfg.checkpoint.mode),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        tracking.finish_mlflow_run(mlflow, status="FAILED")
        cause = first_error(exc)
        if root.is_s3 and "cannot reach" not in cause and any(token in cause for token in _UNREACHABLE):
            cause = f"storage.endpoint_url: cannot reach {root.endpoint_url or 'AWS S3'} for {root.uri} ({cause})"
        raise RunFailed(f"experiment {cfg.experiment} failed: {cause}; "
                        f"continue it with --resume once the cause is fixed") from exc
    except SystemExit as exc:  # how the driver's wait ends after Ray Train's own Ctrl-C handler has aborted the run
        tracking.finish_mlflow_run(mlflow, status="KILLED")
        raise Interrupted(f"experiment {cfg.experiment} stopped; its checkpoints are kept: continue it with --resume") from exc
    finally:
        ray_private.worker_lines_settled()  # the workers' last lines before anything this driver says next


def train_scaling(scaling: ScalingConfig):
    """Ray Train's ScalingConfig: every worker holds `worker_resources`; an elastic range becomes Ray Train's
    (min, max), which starts once `min` workers fit and restarts from the latest checkpoint with more workers
    as the cluster grows."""
    import ray.train

    resources = cpu_gpu_per_worker(scaling)  # Ray Train adds the accelerator_type resource itself
    num_workers = (scaling.min_workers, scaling.max_workers) if scaling.elastic else scaling.num_workers
    return ray.train.ScalingConfig(num_workers=num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                                   accelerator_type=scaling.accelerator_type,
                                   elastic_resize_monitor_interval_s=scaling.resize_interval_s)


def first_error(exc: Exception) -> str:
    """The workers' first error as `Type: last line`, from Ray Train's TrainingFailedError."""
    failures = getattr(exc, "worker_failures", None) or {}
    return one_line(next(iter(failures.values()), getattr(exc, "controller_failure", None) or exc))


#: what Ray's memory monitor says when it kills workers of a node that runs low on memory
_MEMORY_KILL = re.compile(r"running low on memory\..*? was ([\d.]+GB) used / ([\d.]+GB) limit", re.DOTALL)


def one_line(error: BaseException) -> str:
    """An error as one line: its type and its message's first line (with the next where the first introduces it, as
    torch's "Error(s) in loading state_dict for ResNet:"), or the last line of a traceback, which ends with the error.
    Workers killed by Ray's memory monitor (whose message ends in Ray's own tuning advice) say what to change here."""
    error = getattr(error, "cause", None) or error  # a RayTaskError wraps the task's own exception
    text = str(error)
    if "running low on memory" in text:
        used = _MEMORY_KILL.search(text)
        return (f"OutOfMemoryError: the node ran low on memory{f' ({used[1]} used of {used[2]})' if used else ''} and Ray "
                "killed the training workers; lower train.batch_size or data.image_size, or use nodes with more memory")
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    if any(line.startswith(("Traceback", 'File "')) for line in lines):  # a traceback (Tune's error.txt, RayTaskError's)
        told = lines[-1]
    else:
        told = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return f"{type(error).__name__}: {_QUOTED_LIST.sub(_first_of_list, told)}"


#: a list of quoted names, as torch's "Missing key(s) in state_dict: "conv1.weight", "bn1.weight", ..." gives every one
_QUOTED_LIST = re.compile(r'"[^"]*"(?:, "[^"]*")+')


def _first_of_list(match: re.Match, keep: int = 3) -> str:
    names = re.findall(r'"[^"]*"', match[0])
    return match[0] if len(names) <= keep else f"{', '.join(names[:keep])} and {len(names) - keep} more"
