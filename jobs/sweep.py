"""Sweep hyperparameters with Ray Tune, stopping the losers early with ASHA.

    python -m jobs.sweep --config configs/sweep-demo.yaml [--set search.num_samples=12 ...] [--resume]
    python -m jobs.analyze ROOT/EXPERIMENT      # then: the report, plots and best.yaml

A trial with `scaling.num_workers: 1` runs the core loop inside the Tune trial; with more it starts a
TorchTrainer (DDP) that reports to Tune through TuneReportCallback. The experiment lives under
`storage.root` in Ray Tune's own layout, so `--resume` (Tuner.restore) continues it without rerunning
finished trials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Collection
from typing import Any, Iterator

from cluster import storage
from cluster.storage import Location
from jobs import ray_private, streaming, tracking
from jobs.claim import claimed
from jobs.cli import Interrupted, RunFailed, guarded, parse_args, run_module
from jobs.preflight import TRIAL_MODEL_KEYS, check_capacity, check_decode_room, check_run, worker_resources
from jobs.runner import WorkerSession, connect_ray, one_line, run_recipe, run_trainer
from jobs.staging import checkpoint_dirs, experiment_location, root_location, stage_hub_weights, with_absolute_paths
from jobs.sweep_config import SearchConfig, Variant, kept_by_search, listed_values, load_sweep, settings, with_values
from tl_core.config import CheckpointConfig, RunConfig, as_yaml, from_dict, override, value_at, with_overrides
from tl_core.errors import ConfigError
from tl_core.run_dir import SWEEP_FILE
from tl_core.safe_yaml import dump_yaml, parse_yaml

log = logging.getLogger("jobs")


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __name__, __doc__)
    base, search = load_sweep(args.config, args.overrides)
    search = with_absolute_space(base, search)
    if args.resume:
        check_same_sweep(base, search)
    variants = search.variants(TRIAL_MODEL_KEYS)
    base = check_run(base, resume=args.resume, has_progress=sweep_has_progress, varied=search.varied_keys(), variants=variants)
    if base.checkpoint.metric not in (search.metric, CheckpointConfig().metric):
        log.warning("config: in a sweep, search.metric %s keeps the trials' checkpoints (and best.yaml's); nothing reads "
                    "checkpoint.metric: %s", search.metric, base.checkpoint.metric)
    with claimed(base):
        results = run_sweep(base, search, resume=args.resume, variants=variants)
    failed = f" ({len(results.errors)} failed; the first: {one_line(results.errors[0])})" if results.errors else ""
    ranked = [result for result in results if search.reported(result.metrics_dataframe)]
    if not ranked:
        print(f"{base.experiment}: {len(results)} trials{failed}, none reported {search.metric}")
        return 1
    best = max(ranked, key=lambda result: search.ranking(result.metrics_dataframe))  # as jobs.analyze picks it
    print(f"{base.experiment}: {len(results)} trials{failed}, best {search.metric} "
          f"{best.metrics_dataframe[search.metric].agg(search.mode):.4f} ({best.path.rsplit('/', 1)[-1]}: {listed_values(best.config)})")
    print(f"report: python -m jobs.analyze {experiment_location(base).uri}")
    return 0


def with_absolute_space(base: RunConfig, search: SearchConfig) -> SearchConfig:
    """`search` with the local paths among its choice and grid values (`model.weights`, an `hf:` folder, ...) made
    absolute as with_absolute_paths makes the base's: trials do not run in the driver's working directory."""
    def absolute(entry: str, value: Any) -> Any:
        drawn = with_absolute_paths(with_values(base, ((entry, value),)))
        keys = {key: value_at(drawn, key) for key, _ in settings(entry, value)}
        return keys if search.is_group(entry) else keys[entry]  # a group's keys, flat

    space = {key: {kind: [absolute(key, v) for v in values] if kind in ("choice", "grid") else values}
             for key, spec in search.space.items() for kind, values in spec.items()}
    return search.model_copy(update={"space": space})


def sweep_record(cfg: RunConfig, search: SearchConfig) -> dict:
    """What SWEEP_FILE holds: the base config (paths absolute) and the search section, as jobs.analyze reads them."""
    return {**with_absolute_paths(cfg).to_dict(), "search": search.model_dump()}


def check_same_sweep(cfg: RunConfig, search: SearchConfig) -> None:
    """--resume continues the sweep as it was started: Tune restores its own space, samples and searcher, and
    jobs.analyze reads SWEEP_FILE, so a config changed since would go unheard, or train the resumed trials with
    settings the report does not know. The first difference is one line."""
    location = experiment_location(cfg).child(SWEEP_FILE)
    if not storage.exists(location, "storage.root"):
        return
    started = parse_yaml(storage.read_text(location, "storage.root"), location.uri)
    now = parse_yaml(dump_yaml(sweep_record(cfg, search), sort_keys=False), "config")
    if isinstance(started, dict) and (difference := first_difference(started, now)) is not None:
        key, was, is_now = difference
        raise ConfigError(f"--resume: sweep {cfg.experiment} was started with {key}: {as_yaml(was)}, and the config now says "
                          f"{as_yaml(is_now)}; a resume continues the sweep as started, so restore it, or start a new sweep "
                          "(another experiment name)")


#: How long a trial's process, about to run the next trial, waits for the last one to end (its uploads, say).
THREAD_END_TIMEOUT_S = 60

#: What says where a sweep's services are, not what its trials train: a resume may find them elsewhere (a local S3
#: server or MLflow started again on other ports).
MAY_MOVE = ("storage.endpoint_url", "tracking")


def first_difference(started: dict, now: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted key, value in `started`, value in `now`) of the first key both hold with different values; keys one
    of them lacks (added to the schema since the sweep started) and MAY_MOVE do not count. A search space is compared
    whole: a key added to it is a difference."""
    for key, was in started.items():
        if key not in now or f"{prefix}{key}" in MAY_MOVE:
            continue
        if isinstance(was, dict) and isinstance(now[key], dict) and key != "space":
            if (difference := first_difference(was, now[key], f"{prefix}{key}.")) is not None:
                return difference
        elif was != now[key]:
            return f"{prefix}{key}", was, now[key]
    return None


def sweep_has_progress(experiment: Location) -> bool:
    """Whether Ray Tune has saved this experiment's state (what `--resume` restores)."""
    from ray import tune

    return tune.Tuner.can_restore(experiment.path, storage_filesystem=storage.filesystem(experiment) if experiment.is_s3 else None)


def param_space(search: SearchConfig) -> dict:
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "randint": lambda v: tune.randint(*v), "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](values) for key, spec in search.space.items() for kind, values in spec.items()}


def trial_config(base: dict, search: dict, params: dict) -> RunConfig:
    """The run config of one trial: the base with the sampled values, LR scaled with the global batch if asked, its
    checkpoints kept by the sweep's metric."""
    params = {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}  # BOHB samples numpy scalars
    cfg = with_values(from_dict(base), tuple(params.items()))
    if search["scale_lr"] == "linear":
        cfg = with_overrides(cfg, [override("optim.lr", cfg.optim.lr * global_batch_size(cfg) / search['base_batch_size'])])
    return kept_by_search(cfg, search["metric"], search["mode"])


def global_batch_size(cfg: RunConfig) -> int:
    return cfg.train.batch_size * cfg.scaling.max_workers * cfg.train.grad_accum


def trial(params: dict, base: dict, search: dict, mlflow_parent: str | None = None) -> None:
    """One Tune trial: every epoch's metrics (and checkpoint) go to Tune, so ASHA can stop it at a rung; with MLflow,
    to a child run of the sweep's too."""
    import ray.tune

    from jobs.cli import setup_logging
    from tl_core.state import default_device

    cfg = trial_config(base, search, params)
    sizes = {"batch_size_per_worker": cfg.train.batch_size, "global_batch_size": global_batch_size(cfg), "trial_lr": cfg.optim.lr}
    if cfg.scaling.max_workers > 1:
        return _ddp_trial(cfg, sizes, search["metric"], mlflow_parent)

    setup_logging(in_worker=True)
    # When this process runs the next trial, Tune waits this long for this one's thread to end, read in this process
    # as it resets (2 s by default; then the failure `reuses_processes` describes).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(THREAD_END_TIMEOUT_S))

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if not reaches_tune(metrics, search["metric"]):
            return
        saved = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report({**metrics, **sizes, "timestamp": time.time()}, checkpoint=saved)

    context = ray.tune.get_context()
    trial_storage = context.get_storage()
    # A resumed trial writes no epoch over a checkpoint stored after Tune last saved the sweep's state.
    ray_private.number_checkpoints_after(trial_storage, checkpoint_dirs(trial_storage.storage_filesystem,
                                                                        trial_storage.trial_fs_path))
    mlflow = tracking.mlflow_run(cfg, f"{experiment_location(cfg).uri}#{context.get_trial_id()}", name=context.get_trial_name(),
                                 parent=mlflow_parent, params={f"trial.{k}": v for k, v in params.items()})
    run_recipe(cfg, cfg.pretrain.method, WorkerSession(report, trial_storage.storage_filesystem, trial_storage.trial_fs_path,
                                                       ray.tune.get_checkpoint(), default_device(cfg.scaling.use_gpu),
                                                       mlflow_run=mlflow))
    tracking.finish_mlflow_run(mlflow)  # a trial the scheduler stops never gets here: the sweep closes it as KILLED


def _ddp_trial(cfg: RunConfig, sizes: dict, search_metric: str, mlflow_parent: str | None) -> None:
    """A TorchTrainer named after the trial, in the sweep's storage, reporting each epoch to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray.tune.get_context()
    cfg = stage_hub_weights(cfg)  # the sweep's staged copy, before the trial's own storage root
    cfg = with_overrides(cfg, [override("experiment", context.get_trial_id()),
                               override("storage.root", f"{experiment_location(cfg).uri}/ddp-trials")])
    class ValidatedEpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if reaches_tune(metrics[0], search_metric):
                super().after_report(run_context, metrics, checkpoint)

    run_trainer(cfg, cfg.pretrain.method, callbacks=[ValidatedEpochsToTune()], extra_metrics=sizes, mlflow_parent=mlflow_parent)
    tracking.finish_mlflow_run(tracking.mlflow_run(cfg, experiment_location(cfg).uri, name=cfg.experiment))


def reuses_processes(cfg: RunConfig) -> bool:
    """Whether a finished or stopped trial's process runs the next trial (every trial asks for the same resources):
    no new process, torch import and worker setup per trial (a 6-trial sweep of short trials: 37 -> 24 s). Not for
    DDP trials: a trial the scheduler stops at its last result is still winding down its TorchTrainer, which Tune
    does not wait for (Tune then fails the next trial, "Trainable runner reuse requires reset_config()", and its
    sweep waited forever)."""
    return cfg.scaling.max_workers == 1


def reaches_tune(metrics: dict, search_metric: str) -> bool:
    """Whether an epoch's metrics go to Tune: those holding the searched metric. With `train.val_every` > 1 the
    epochs between validations have no val/ metrics, and Tune's schedulers and searchers read the metric from every
    result they get (a checkpoint only comes with a validated epoch: `checkpoint.every` is a multiple of it)."""
    return search_metric in metrics


def run_sweep(cfg: RunConfig, search: SearchConfig, resume: bool, variants: Collection[Variant] = ()):
    """Run (or with `resume`, continue) the sweep; `variants`: the models its trials can draw (TRIAL_MODEL_KEYS),
    whose hub weights are staged (the base config's when the space varies none)."""
    from ray import tune

    from jobs.tune_results import result_loggers, set_aside_cut_short_state, tune_loggers

    cfg = with_absolute_paths(cfg)  # trials do not share the driver's working directory
    connect_ray()
    check_capacity(cfg)  # a trial the cluster can never place would leave the sweep pending forever
    for model in [with_values(cfg, variant) for variant in variants] or [cfg]:  # the models the trials train
        stage_hub_weights(model)
    if streaming.is_packed(cfg) and cfg.scaling.max_workers == 1:
        import ray

        cpus = ray.cluster_resources().get("CPU", 0.0)
        held = trial_resources(cfg).get("CPU", 0.0) * search.max_concurrent_trials
        check_decode_room(cfg, min(held, cpus), cpus, streaming.read_manifest(cfg).modality)
    ray_private.keep_credentials_out_of_tune_runtime_env()
    # With checkpoint.keep set, Tune saves the experiment's state after every checkpoint (so `--resume` never points
    # at a deleted one) and warns, three lines each time, that it "may become a bottleneck": expected here, so quiet.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    root = root_location(cfg)
    fs = storage.filesystem(root) if root.is_s3 else None
    parent = tracking.mlflow_run(cfg, experiment_location(cfg).uri, name=cfg.experiment,
                                 params={f"search.{k}": v for k, v in search.model_dump().items()})
    trainable = tune.with_parameters(trial, base=cfg.to_dict(), search=search.model_dump(), mlflow_parent=parent and parent[1])
    # Tune registers a trainable under its name, per Ray job: two sweeps run at once in one job (a script's Ray
    # tasks) under one name would run each other's trials with the last one's config.
    trainable.__name__ = f"trial-{cfg.experiment}"
    trainable = tune.with_resources(trainable, trial_resources(cfg))
    experiment = experiment_location(cfg)
    if resume and set_aside_cut_short_state(experiment) and tune.Tuner.can_restore(experiment.path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(experiment.path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        # What jobs.analyze needs besides Ray's own files: the base config and the search section.
        storage.write_text(experiment.child(SWEEP_FILE), dump_yaml(sweep_record(cfg, search), sort_keys=False))
        scheduler, search_alg = scheduler_and_searcher(search)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(search),
            tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                                        scheduler=scheduler, search_alg=search_alg, reuse_actors=reuses_processes(cfg)),
            run_config=tune.RunConfig(
                name=cfg.experiment, storage_path=root.path, storage_filesystem=fs, verbose=1,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=kept_checkpoints(cfg, search), checkpoint_score_attribute=search.metric,
                                                        checkpoint_score_order=search.mode),
                failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures),
                callbacks=result_loggers()),
        )
    logging.getLogger("ray.tune.tune").addFilter(_no_tuner_restore_advice)
    with tune_loggers(tuner), ctrl_c_watched() as stopped:
        results = tuner.fit()
    ray_private.worker_lines_settled()  # the trials' last lines before the sweep's summary
    tracking.close_stopped_children(parent)
    best = results.get_best_result(search.metric, search.mode, scope="all") if len(results) > len(results.errors) else None
    tracking.finish_mlflow_run(parent, status="KILLED" if stopped.is_set() else "FINISHED" if best else "FAILED",
                               best=dict(best.metrics_dataframe[[search.metric]].agg(search.mode)) if best else None)
    if stopped.is_set():
        raise Interrupted(f"sweep {cfg.experiment} stopped; every trial's state and checkpoints are kept: continue it "
                          "with --resume")
    if results.errors and len(results.errors) == len(results):
        raise RunFailed(f"sweep {cfg.experiment}: every trial failed; the first: {one_line(results.errors[0])}")
    return results


@contextlib.contextmanager
def ctrl_c_watched() -> Iterator[threading.Event]:
    """An event set when Ctrl-C stopped the Tune run inside, which then returns as if it had finished.

    Tune's own SIGINT handler ends its loop gracefully (experiment state saved, trials stopped), and on that first
    Ctrl-C puts back the handler it replaced: the one set here, so finding it back afterwards is the sign. A second
    Ctrl-C reaches it as KeyboardInterrupt, Python's default. Where Tune sets no handler (off the main thread, or
    TUNE_DISABLE_SIGINT_HANDLER), none is set here either and Ctrl-C is a KeyboardInterrupt."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread() or int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        yield stopped
        return

    def second_ctrl_c(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, second_ctrl_c)
    try:
        yield stopped
    finally:
        if signal.getsignal(signal.SIGINT) is second_ctrl_c:
            stopped.set()
        signal.signal(signal.SIGINT, previous)


def _no_tuner_restore_advice(record: logging.LogRecord) -> bool:
    """Leave out Tune's advice after Ctrl-C ("Resume experiment with: Tuner.restore(...)"): the sweep says --resume."""
    return not record.getMessage().startswith("Experiment has been interrupted")


def kept_checkpoints(cfg: RunConfig, search: SearchConfig) -> int | None:
    """checkpoint.keep per trial; at least 4 under population-based training, whose exploits read other trials'."""
    keep = cfg.checkpoint.keep
    return keep if search.scheduler.name != "pbt" or keep is None else max(keep, 4)


def scheduler_and_searcher(search: SearchConfig):
    """Ray Tune's own scheduler and search algorithm for the sweep file's names, seeded from `search.seed`, the
    search algorithm holding `max_concurrent_trials` (Tune ignores TuneConfig's for a BasicVariantGenerator)."""
    from ray.tune.schedulers import FIFOScheduler, HyperBandForBOHB
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from jobs.tune_results import ResumableASHA

    s = search.scheduler
    if s.name == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        scheduler = PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                            hyperparam_mutations=param_space(search),  # PBT_KEYS only (sweep_config)
                                            quantile_fraction=s.quantile_fraction, synch=s.synch)
    elif s.name == "asha":
        scheduler = ResumableASHA(time_attr="epoch", max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    elif s.name == "bohb":
        scheduler = HyperBandForBOHB(time_attr="epoch", max_t=s.max_t, reduction_factor=s.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if search.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=search.metric, mode=search.mode, seed=search.seed)
    elif search.search_alg == "bohb":
        from ray.tune.search.bohb import TuneBOHB

        searcher = TuneBOHB(metric=search.metric, mode=search.mode, seed=search.seed)
    else:
        return scheduler, BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials)
    return scheduler, ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent_trials)


def trial_resources(cfg: RunConfig) -> dict:
    """What one trial holds: a one-worker trial is the worker (a whole one: its CPUs, GPU and accelerator type),
    so the autoscaler launches a worker node per trial; a DDP trial only drives its TorchTrainer, whose workers
    ask for their own resources."""
    if cfg.scaling.max_workers > 1:
        return {"memory": 2**20}  # a token: Tune refuses an empty request, and a CPU here would starve the workers
    return {"CPU": 1.0, **worker_resources(cfg.scaling)}


if __name__ == "__main__":
    run_module("jobs.sweep")
