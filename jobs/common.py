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

from tl_core.checkpoint import RESULT_FILE, verify_checkpoint
from tl_core.config import RunConfig, load_config, with_overrides
from tl_core.data import index_image_folder
from tl_core.errors import CheckpointError, ConfigError, UserError
from tl_core.models import build_model


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
    if in_worker:
        from ray.train.v2._internal.execution import context  # its logger is named after its file

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def experiment_dir(cfg: RunConfig) -> Path:
    return Path(cfg.storage.root).expanduser().resolve() / cfg.experiment


def load_and_check(args: argparse.Namespace) -> RunConfig:
    """The config, with everything a user can get wrong checked before Ray or storage is touched."""
    return check_run(load_config(args.config, args.overrides), resume=args.resume)


def check_run(cfg: RunConfig, resume: bool) -> RunConfig:
    """`cfg` with local paths made absolute (workers do not share the driver's working directory), after
    checking the experiment name, data and source weights, before anything is written."""
    cfg = with_absolute_paths(cfg)
    exp = experiment_dir(cfg)
    if resume and not exp.is_dir():
        raise ConfigError(f"--resume: there is no experiment {cfg.experiment} under {cfg.storage.root}")
    if not resume and exp.exists():
        raise ConfigError(f"experiment: {exp} already exists; pass --resume to continue it or choose another experiment name")
    index = index_image_folder(cfg.data, seed=cfg.train.seed)
    build_model(cfg.model, index.classes, cfg.data.image_size)  # unknown or mismatched weights fail here
    return cfg


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    absolute = lambda path: str(Path(path).expanduser().resolve())  # noqa: E731
    overrides = [f"data.root={absolute(cfg.data.root)}", f"storage.root={absolute(cfg.storage.root)}"]
    if cfg.model.weights and Path(cfg.model.weights).expanduser().exists():
        overrides.append(f"model.weights={absolute(cfg.model.weights)}")
    return with_overrides(cfg, overrides)


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as `ray job submit` sets it), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(logging_level=logging.WARNING, dashboard_host="127.0.0.1")


def check_capacity(cfg: RunConfig) -> None:
    """Fail with a message, not a hang, when the cluster can never place all workers."""
    import ray

    per_worker = dict(cfg.scaling.resources_per_worker)
    if cfg.scaling.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    available = ray.cluster_resources()
    for name, amount in per_worker.items():
        needed = amount * cfg.scaling.num_workers
        if needed > available.get(name, 0.0) + 1e-9:
            raise ConfigError(
                f"scaling.num_workers: {cfg.scaling.num_workers} workers x {amount:g} {name} need {needed:g} {name}, "
                f"but the Ray cluster has {available.get(name, 0.0):g}")


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: `fit` with a reporter that hands each epoch to Ray Train."""
    import ray.train
    import ray.train.torch

    from tl_core.checkpoint import load_checkpoint
    from tl_core.config import from_dict
    from tl_core.loop import fit

    setup_logging(in_worker=True)
    cfg = from_dict(loop_config["config"])
    resume = None
    if (latest := ray.train.get_checkpoint()) is not None:
        with latest.as_directory() as directory:
            resume = load_checkpoint(directory)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, "timestamp": time.time()}, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{int(metrics['epoch']):04d}")

    fit(cfg, report, resume_from=resume, device=ray.train.torch.get_device())


def run_trainer(cfg: RunConfig):
    """Fit `cfg` on the Ray cluster; a second call with the same experiment continues from its latest checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = with_absolute_paths(cfg)  # workers do not share the driver's working directory
    connect_ray()
    check_capacity(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=dict(cfg.scaling.resources_per_worker)),
        run_config=ray.train.RunConfig(
            name=cfg.experiment,
            storage_path=str(experiment_dir(cfg).parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep,
                                                         checkpoint_score_attribute=cfg.checkpoint.metric,
                                                         checkpoint_score_order=cfg.checkpoint.mode),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RunFailed(f"experiment {cfg.experiment} failed: {_first_error(exc)}; "
                        f"continue it with --resume once the cause is fixed") from exc


def _first_error(exc: Exception) -> str:
    failures = getattr(exc, "worker_failures", None) or {}
    cause = next(iter(failures.values()), exc)
    cause = getattr(cause, "cause", None) or cause  # a RayTaskError wraps the worker's own exception
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def write_result(cfg: RunConfig, result) -> dict:
    """ROOT/EXPERIMENT/result.json: where the best checkpoint is and what the run reached."""
    best = result.get_best_checkpoint(cfg.checkpoint.metric, cfg.checkpoint.mode) or result.checkpoint
    if best is None:
        raise CheckpointError(f"experiment {cfg.experiment}: the run finished without a checkpoint")
    best_meta = verify_checkpoint(best.path)
    final = dict(result.metrics) if result.metrics else verify_checkpoint(result.checkpoint.path)["metrics"]
    summary = {
        "best_checkpoint": best.path,
        "best_metric": {cfg.checkpoint.metric: best_meta["metrics"][cfg.checkpoint.metric], "epoch": best_meta["epoch"]},
        "final_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        "epochs_completed": int(final["epoch"]),
        "classes": best_meta["classes"],
        "config": cfg.to_dict(),
    }
    path = experiment_dir(cfg) / RESULT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    (experiment_dir(cfg) / "config.yaml").write_text(cfg.to_yaml())
    return summary
