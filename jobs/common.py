"""What the training jobs share: argument parsing, the one-line error contract, Ray start-up,
the TorchTrainer around `tl_core.loop.fit`, and result.json."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from cluster import cache, storage
from cluster.storage import Location
from tl_core.checkpoint import META_FILE, RESULT_FILE
from tl_core.config import RunConfig, ScalingConfig, load_config, with_overrides
from tl_core.data import index_image_folder, index_unlabelled
from tl_core.errors import CheckpointError, ConfigError, DataError, UserError
from tl_core.models import build_model
from tl_core.simclr import build_simclr_model

log = logging.getLogger("jobs")
CHECKPOINT_PREFIX = "checkpoint_epoch_"


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.01 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the experiment from its latest checkpoint")
    return parser.parse_args(argv)


class RunFailed(Exception):
    """Training started but failed (after Ray's retries); the message is the workers' first error."""


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn a user mistake into one line on stderr and exit status 2, a failed run into one line and
    exit status 1; bugs still raise."""

    def wrapper(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except RunFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    wrapper.__doc__ = main.__doc__
    return wrapper


def setup_logging(in_worker: bool = False) -> None:
    """Our own progress lines at INFO on stderr.

    In a Ray worker the root logger already prints at INFO (Ray sets it up), so our loggers stop there
    instead of printing twice, and Ray Train's line-per-report echo of every metric is turned down.
    """
    for name in ("tl_core", "jobs"):
        log = logging.getLogger(name)
        if not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        log.propagate = not in_worker
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ..." per client
    if in_worker:
        from ray.train.v2._internal.execution import context  # its logger is named after its file

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def root_location(cfg: RunConfig) -> Location:
    return storage.parse(cfg.storage.root, cfg.storage.endpoint_url)


def experiment_location(cfg: RunConfig) -> Location:
    """ROOT/EXPERIMENT, where Ray Train lays out the run and we add result.json and config.yaml."""
    return root_location(cfg).child(cfg.experiment)


def load_and_check(args: argparse.Namespace) -> RunConfig:
    """The config, with everything a user can get wrong checked before Ray or storage is touched."""
    return check_run(load_config(args.config, args.overrides), resume=args.resume)


def check_run(cfg: RunConfig, resume: bool) -> RunConfig:
    """`cfg` with local paths made absolute (workers do not share the driver's working directory), after
    checking storage access, the experiment name, data and source weights, before anything is written."""
    cfg = with_absolute_paths(cfg)
    root = root_location(cfg)
    storage.check_access(root)
    present = storage.exists(root.child(cfg.experiment))
    if resume and not present:
        raise ConfigError(f"--resume: there is no experiment {cfg.experiment} under {root.uri}")
    if not resume and present:
        raise ConfigError(f"experiment: {root.child(cfg.experiment).uri} already exists; pass --resume to continue it "
                          "or choose another experiment name")
    local = localize(cfg)
    simclr = cfg.pretrain.method == "simclr"
    try:
        index = (index_unlabelled if simclr else index_image_folder)(local.data, seed=cfg.train.seed)
    except DataError as exc:  # name the user's s3:// prefix, not this node's cache
        raise DataError(str(exc).replace(local.data.root, cfg.data.root)) from None
    if simclr:
        build_simclr_model(local.model, cfg.pretrain, cfg.data.image_size)
    else:
        build_model(local.model, index.classes, cfg.data.image_size)  # unknown or mismatched weights fail here
    return cfg


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute, and the S3 endpoint pinned from AWS_ENDPOINT_URL so workers get it too."""
    absolute = lambda path: path if storage.is_uri(path) else str(Path(path).expanduser().resolve())  # noqa: E731
    overrides = [f"data.root={absolute(cfg.data.root)}", f"storage.root={absolute(cfg.storage.root)}"]
    weights = cfg.model.weights
    if weights and not storage.is_uri(weights) and Path(weights).expanduser().exists():
        overrides.append(f"model.weights={absolute(weights)}")
    uses_s3 = any(str(v).startswith("s3://") for v in (cfg.data.root, cfg.storage.root, weights))
    if uses_s3 and not cfg.storage.endpoint_url and os.environ.get("AWS_ENDPOINT_URL"):
        overrides.append(f"storage.endpoint_url={os.environ['AWS_ENDPOINT_URL']}")
    return with_overrides(cfg, overrides)


def localize(cfg: RunConfig) -> RunConfig:
    """`cfg` as this node reads it: s3:// data and weights replaced by their node-local cached copies.
    (The config kept in storage holds the URIs.)"""
    overrides = []
    if cfg.data.root.startswith("s3://"):
        data = storage.parse(cfg.data.root, cfg.storage.endpoint_url, field="data.root")
        overrides.append(f"data.root={cache.sync_prefix(data, 'data.root')}")
    if cfg.model.weights and cfg.model.weights.startswith("s3://"):
        overrides.append(f"model.weights={fetch_weights(cfg.model.weights, cfg.storage.endpoint_url)}")
    return with_overrides(cfg, overrides) if overrides else cfg


def fetch_weights(uri: str, endpoint_url: str | None) -> Path:
    """The local copy of source weights on S3: a state-dict object, a checkpoint prefix, or a finished run
    (whose result.json names its best checkpoint)."""
    location = storage.parse(uri, endpoint_url, field="model.weights")
    if location.key and storage.is_object(location, "model.weights"):
        return cache.fetch_object(location, "model.weights")
    result = location.child(RESULT_FILE)
    if storage.is_object(result, "model.weights"):
        best = json.loads(storage.read_text(result, "model.weights")).get("best_checkpoint") or ""
        if not best.startswith("s3://"):
            raise ConfigError(f"model.weights: run {uri} names no s3:// best_checkpoint in {RESULT_FILE}")
        location = storage.parse(best, endpoint_url, field="model.weights")
    return cache.sync_prefix(location, "model.weights")


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as `ray job submit` sets it), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(address="local", logging_level=logging.WARNING, dashboard_host="127.0.0.1")


def worker_resources(scaling: ScalingConfig) -> dict[str, float]:
    """What one training worker holds: `resources_per_worker`, a GPU with `use_gpu` unless it says how many,
    and a sliver of Ray's `accelerator_type:X` resource, which only nodes with that accelerator have."""
    resources = _cpu_gpu_per_worker(scaling)
    if scaling.accelerator_type:
        resources[f"accelerator_type:{scaling.accelerator_type}"] = 0.001
    return resources


def _cpu_gpu_per_worker(scaling: ScalingConfig) -> dict[str, float]:
    return {**scaling.resources_per_worker, **({"GPU": scaling.resources_per_worker.get("GPU", 1.0)} if scaling.use_gpu else {})}


def check_capacity(cfg: RunConfig) -> None:
    """Fail with a message, not a hang, when the cluster can never place the workers a run needs (all of
    them, or `min` of an elastic range). An autoscaling cluster is judged by what it can grow to."""
    import ray
    from ray._private.state import state

    capacity = state.get_max_resources_from_cluster_config()  # autoscaler v2 publishes its node types' limits
    if capacity is None:
        if _autoscaler_v1_can_add_nodes():
            # It does not publish its limits: the run waits for the nodes it launches.
            log.info("the cluster autoscales; waiting for %d worker(s) to be placed", cfg.scaling.min_workers)
            return
        capacity = ray.cluster_resources()
    workers = cfg.scaling.min_workers
    for name, amount in worker_resources(cfg.scaling).items():
        needed = amount * workers
        if needed > capacity.get(name, 0.0) + 1e-9:
            what = "accelerator_type" if name.startswith("accelerator_type:") else "num_workers"
            raise ConfigError(
                f"scaling.{what}: {workers} workers x {amount:g} {name} need {needed:g} {name}, "
                f"but the Ray cluster has {capacity.get(name, 0.0):g}")


def _autoscaler_v1_can_add_nodes() -> bool:
    """Whether the cluster's (v1) autoscaler has node types to launch. Every Ray cluster runs one; without an
    autoscaling config (`ray start` alone, `ray.init()`) it has a read-only provider whose only "node types"
    are the running nodes themselves, named `node_<id>`."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    node_types = {*(report.get("active_nodes") or {}), *(report.get("node_type_mapping") or {}).values()}
    return any(not name.startswith("node_") for name in node_types)


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: `fit` with a reporter that hands each epoch to Ray Train."""
    import ray.train
    import ray.train.torch

    from tl_core.config import from_dict
    from tl_core.loop import fit
    from tl_core.simclr import fit_simclr

    setup_logging(in_worker=True)
    cfg = from_dict(loop_config["config"])
    extras = loop_config.get("extra_metrics", {})
    local_cfg = localize(cfg)
    upload = checkpoint_uploader(experiment_location(cfg)) if root_location(cfg).is_s3 else None

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, **extras, "timestamp": time.time()}, checkpoint=checkpoint,
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):04d}", checkpoint_upload_fn=upload)

    train = fit_simclr if cfg.pretrain.method == "simclr" else fit
    train(local_cfg, report, resume_from=latest_valid_checkpoint(), device=ray.train.torch.get_device())


def latest_valid_checkpoint():
    """The newest checkpoint of this run that verifies, or None for a fresh start.

    Candidates are every checkpoint directory in the run's storage, not only those Ray Train registered: a
    worker killed right after its upload finished leaves a complete checkpoint that Ray never heard of.
    A missing or corrupt one is skipped with a warning.
    """
    import pyarrow.fs
    import ray.train

    from tl_core.checkpoint import load_checkpoint

    run = ray.train.get_context().get_storage()
    fs = run.storage_filesystem
    listed = fs.get_file_info(pyarrow.fs.FileSelector(run.experiment_fs_path, allow_not_found=True))
    paths = {info.path for info in listed
             if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX)}
    if (registered := ray.train.get_checkpoint()) is not None:
        paths.add(registered.path)
    for path in sorted(paths, key=lambda p: Path(p).name, reverse=True):
        try:
            with ray.train.Checkpoint(path, filesystem=fs).as_directory() as directory:
                checkpoint = load_checkpoint(directory)
        except (CheckpointError, FileNotFoundError) as exc:  # damaged, or an empty directory left by a delete
            log.warning("skipping checkpoint %s: %s", Path(path).name, exc)
            continue
        log.info("resuming from %s (epoch %d)", Path(path).name, checkpoint.meta["epoch"])
        return checkpoint
    if paths:
        log.warning("no checkpoint of this run verifies; starting from the beginning")
    return None


def checkpoint_uploader(experiment: Location) -> Callable:
    """Ray Train's `checkpoint_upload_fn` for S3: our upload, retried with backoff, meta.json last (so a
    checkpoint cut short by a failure has no meta.json and never verifies)."""

    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        destination = experiment.child(checkpoint_dir_name)
        storage.upload_dir(checkpoint.path, destination, last=META_FILE)
        return ray.train.Checkpoint(destination.path, filesystem=storage.filesystem(destination))

    return upload


def run_trainer(cfg: RunConfig, callbacks: list | None = None, extra_metrics: dict | None = None):
    """Fit `cfg` on the Ray cluster; a second call with the same experiment continues from its latest checkpoint.
    `extra_metrics` are added to every report (a sweep's batch sizes); `callbacks` go to Ray Train's RunConfig."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = with_absolute_paths(cfg)  # workers do not share the driver's working directory
    connect_ray()
    check_capacity(cfg)
    root = root_location(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "extra_metrics": extra_metrics or {}},
        scaling_config=train_scaling(cfg.scaling),
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
        cause = _first_error(exc)
        if root.is_s3 and "cannot reach" not in cause and any(token in cause for token in _UNREACHABLE):
            cause = f"storage.endpoint_url: cannot reach {root.endpoint_url or 'AWS S3'} for {root.uri} ({cause})"
        raise RunFailed(f"experiment {cfg.experiment} failed: {cause}; "
                        f"continue it with --resume once the cause is fixed") from exc


def train_scaling(scaling: ScalingConfig):
    """Ray Train's ScalingConfig: every worker holds `worker_resources`; an elastic range becomes Ray Train's
    (min, max), which starts once `min` workers fit and restarts from the latest checkpoint with more workers
    as the cluster grows."""
    import ray.train

    resources = _cpu_gpu_per_worker(scaling)  # Ray Train adds the accelerator_type resource itself
    num_workers = (scaling.min_workers, scaling.max_workers) if scaling.elastic else scaling.num_workers
    return ray.train.ScalingConfig(num_workers=num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                                   accelerator_type=scaling.accelerator_type,
                                   elastic_resize_monitor_interval_s=scaling.resize_interval_s)


# How pyarrow's S3 client (which Ray Train itself writes through) says the endpoint is down.
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Connection refused")


def _first_error(exc: Exception) -> str:
    failures = getattr(exc, "worker_failures", None) or {}
    cause = next(iter(failures.values()), getattr(exc, "controller_failure", None) or exc)
    cause = getattr(cause, "cause", None) or cause  # a RayTaskError wraps the worker's own exception
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def write_result(cfg: RunConfig, result) -> dict:
    """ROOT/EXPERIMENT/result.json (where the best checkpoint is and what the run reached) and config.yaml."""
    best = result.get_best_checkpoint(cfg.checkpoint.metric, cfg.checkpoint.mode) or result.checkpoint
    if best is None:
        raise CheckpointError(f"experiment {cfg.experiment}: the run finished without a checkpoint")
    best_meta = read_meta(best)
    final = dict(result.metrics) if result.metrics else read_meta(result.checkpoint)["metrics"]
    root = root_location(cfg)
    summary = {
        "best_checkpoint": f"s3://{best.path}" if root.is_s3 else best.path,
        "best_metric": {cfg.checkpoint.metric: best_meta["metrics"][cfg.checkpoint.metric], "epoch": best_meta["epoch"]},
        "final_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        "epochs_completed": int(final["epoch"]),
        "classes": best_meta["classes"],
        "config": cfg.to_dict(),
    }
    experiment = experiment_location(cfg)
    storage.write_text(experiment.child(RESULT_FILE), json.dumps(summary, indent=2))
    storage.write_text(experiment.child("config.yaml"), cfg.to_yaml())
    return summary


def read_meta(checkpoint) -> dict:
    """meta.json of a Ray checkpoint, read where it lies (local or S3) without downloading the weights."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{META_FILE}") as f:
        return json.loads(f.read())
