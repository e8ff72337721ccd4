"""Checks before anything is written or any worker starts: storage, the experiment name, the data, the model
and its source weights, and whether the cluster can ever place the workers."""

from __future__ import annotations

import argparse
import json
import logging
import math
import traceback
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import nn

from cluster import storage
from cluster.storage import Location
from jobs import ray_private, streaming
from jobs.staging import fetch_hub_weights, localize, newest_meta, root_location, run_has_progress, with_absolute_paths
from jobs.sweep_config import Variant, named_values, with_values
from jobs.tracking import check_mlflow_uri
from tl_core import run_dir
from tl_core.config import RunConfig, ScalingConfig, left_unread, override, stored_value, value_at, with_overrides
from tl_core.config_file import load_config
from tl_core.data import existing_folder
from tl_core.errors import ConfigError, DataError
from tl_core.modality import check_modality, modality, unread_beside, unread_settings
from tl_core.models import INPUT_SIZE_ERRORS, backbone_blocks, image_sizes_near, run_blank_image
from tl_core.packed import Manifest
from tl_core.recipes import RECIPES
from tl_core.text import OR_ONE_TABLE, is_table_file
from tl_core.text_models import is_text_backbone

log = logging.getLogger("jobs")


def load_and_check(args: argparse.Namespace) -> RunConfig:
    """The config, with everything a user can get wrong checked before Ray or storage is touched."""
    return check_run(load_config(args.config, args.overrides), resume=args.resume)


def check_run(cfg: RunConfig, resume: bool, has_progress: Callable[[Location], bool] = run_has_progress,
              varied: Collection[str] = (), variants: Collection[Variant] = ()) -> RunConfig:
    """`cfg` with local paths made absolute, after checking storage access, the experiment name, data and
    source weights, before anything is written. `has_progress(experiment)` says whether there is anything to resume;
    `varied`: the keys a sweep's space sets in each trial; `variants`: the settings of TRIAL_MODEL_KEYS its trials
    can draw, each model fetched, built and checked in place of the config's own. Settings the run leaves unread are
    then named, in a warning line per reason (after every check, so that a mistake stays one line)."""
    check_mlflow_uri(cfg)
    cfg = with_absolute_paths(cfg)
    root = root_location(cfg)
    storage.check_access(root)
    storage.check_creatable(root, "storage.root")
    if storage.exists(root) and not storage.is_dir(root):
        raise ConfigError(f"storage.root: {root.uri} is a file, not a directory")
    progress = has_progress(root.child(cfg.experiment))
    if resume and not progress:
        raise ConfigError(f"--resume: experiment {cfg.experiment} under {root.uri} has nothing to resume (no checkpoint); "
                          "run it without --resume")
    if not resume and progress:
        raise ConfigError(f"experiment: {root.child(cfg.experiment).uri} already exists; pass --resume to continue it "
                          "or choose another experiment name")
    # A run resumed from a checkpoint takes every weight from it: its source weights may be gone, or out of reach.
    newest = newest_meta(root.child(cfg.experiment)) if resume else None
    weights = newest is None
    # A sweep whose space varies the model checks each model its trials can draw, not the file's own, which none
    # of them may train: its weights are neither fetched nor loaded.
    own_model = not variants
    fetch_hub_weights(cfg, weights and own_model)  # once, here on the driver, before any worker starts
    local = localize(cfg, weights and own_model)
    manifest = streaming.read_manifest(cfg) if streaming.is_packed(cfg) else None
    if manifest is None and not is_table_file(local.data.root):  # before its kind is guessed from what it holds
        existing_folder(local.data.root, "data.root", OR_ONE_TABLE)
    if cfg.pretrain.method == "supervised":
        found = manifest.modality if manifest else None
        kind = check_modality(local, found) if own_model else found or modality(local.data)
    elif text := (f"model.backbone {cfg.model.backbone} is a text model" if is_text_backbone(cfg.model.backbone) else
                  f"data.root {cfg.data.root} holds text (table files)" if modality(local.data) == "text" else None):
        raise ConfigError(f"pretrain.method: {cfg.pretrain.method} pretrains image backbones on class folders of images, and "
                          f"{text}; pretrain a text encoder with pretrain.method: supervised")
    classes, n_train = data_classes_and_size(cfg, local, manifest)
    if own_model:
        model = check_model(cfg, local if weights else with_overrides(local, ["model.weights="]), classes)
        check_batch_norm_batches(cfg, n_train, has_batch_norm(model))
        if newest is not None:
            check_same_run(cfg, classes, root.child(cfg.experiment), model, newest)
    models_checked: dict[Variant, bool] = {}
    for variant in variants:
        check_variant(cfg, variant, manifest, classes, n_train, models_checked)
    if cfg.pretrain.method == "supervised" and (unread := unread_settings(cfg, kind, manifest is not None, varied)):
        log.warning("config: a run on %s%s data does not read %s", "packed " if manifest else "", kind, "; ".join(unread))
    for decider, unread in left_unread(cfg, varied).items():
        log.warning("config: with %s, nothing reads %s", decider, "; ".join(unread))
    for named, model in [("config", cfg)] if own_model else \
            [(f"search.space: a trial with {named_values(v)}", with_values(cfg, v)) for v in variants]:
        if cfg.pretrain.method == "supervised" and (frozen := FROZEN_FIRST.get(model.model.strategy)) and model.model.weights is None:
            sources = "pretrained" if is_text_backbone(model.model.backbone) else "imagenet, a file or a run of ours"
            log.warning("%s: model.strategy: %s %s, and model.weights: null leaves it at random weights, so the head "
                        "learns from random features; give model.weights (%s), or train with model.strategy: full",
                        named, model.model.strategy, frozen, sources)
    if manifest is None and not is_table_file(local.data.root):
        warn_unread_data(cfg, text=cfg.pretrain.method == "supervised" and kind == "text")
    return cfg


def warn_unread_data(cfg: RunConfig, text: bool) -> None:
    """Name the data `data.root` holds beside the splits a run reads (a test split), with the command that scores
    a finished run on it where jobs.predict reads it (a text model a table, an image model a folder) and the run
    has a classifier to score (a SimCLR pretraining has none)."""
    beside = unread_beside(storage.top_level_names(storage.parse(cfg.data.root, cfg.storage.endpoint_url, "data.root"), "data.root"))
    if not beside:
        return
    line = f"data: a run trains on train and validates on val, and does not read {', '.join(beside)} beside them"
    if cfg.pretrain.method == "supervised" and (scorable := [name for name in beside if name.endswith("/") != text]):
        test = next((name for name in scorable if name.lower().startswith("test")), scorable[0])
        line += (f"; to score a finished run on held-out data: python -m jobs.predict --run RUN --data "
                 f"{cfg.data.root.rstrip('/')}/{test.rstrip('/')} --out DEST")
    log.warning("%s", line)


def check_model(cfg: RunConfig, local: RunConfig, classes: list[str]) -> nn.Module:
    """The model `local` (`cfg` as this node reads it) builds, its source weights loaded (bad weights fail here),
    checked against the input size."""
    model = RECIPES[cfg.pretrain.method].build_model(local, classes)
    check_input_size(cfg, model)
    return model


#: The strategies that train the head on a frozen backbone, for a while or throughout.
FROZEN_FIRST = {"linear_probe": "trains the head alone on a frozen backbone",
                "lp_ft": "trains the head alone on a frozen backbone for model.lp_epochs",
                "gradual_unfreeze": "starts with the backbone frozen"}


#: The keys whose values check_run judges beyond the schema (by building the model, fetching its weights, against
#: the data): a sweep that varies them has each model its trials can draw checked (`check_variant`).
TRIAL_MODEL_KEYS = ("model.backbone", "model.weights", "model.strategy", "model.freeze_bn_stats", "data.image_size",
                    "data.max_length", "train.batch_size")


def check_variant(cfg: RunConfig, variant: Variant, manifest: Manifest | None, classes: list[str], n_train: int,
                  models_checked: dict[Variant, bool]) -> None:
    """A sweep trial's model (`cfg` with `variant`) checked as a run's: its hub weights fetched once, here on the
    driver, where the sweep stages them for every trial; the first problem named with the trial's values. A model
    its trials draw at several batch sizes is built once (`models_checked`: whether each one built has BatchNorm)."""
    try:
        trial = with_absolute_paths(with_values(cfg, variant))
        model_key = tuple(item for item in variant if item[0] != "train.batch_size")
        if model_key not in models_checked:
            fetch_hub_weights(trial)
            local = localize(trial)
            if cfg.pretrain.method == "supervised":
                check_modality(local, manifest.modality if manifest else None)
            models_checked[model_key] = has_batch_norm(check_model(trial, local, classes))
        check_batch_norm_batches(trial, n_train, models_checked[model_key])
    except (ConfigError, DataError) as exc:
        raise type(exc)(f"search.space: a trial with {named_values(variant)} cannot run: {exc}") from None


def data_classes_and_size(cfg: RunConfig, local: RunConfig, manifest: Manifest | None) -> tuple[list[str], int]:
    """(class names, training samples) of the run's data: a packed dataset's `manifest` (its shards checked present),
    or the data indexed and cleaned as the recipe reads it."""
    if manifest is not None:
        if cfg.pretrain.method != "supervised":
            raise ConfigError(f"data.root: {cfg.data.root} is a packed dataset, which supervised runs stream; give "
                              f"pretrain.method: {cfg.pretrain.method} an image folder")
        streaming.check_shards(cfg, manifest)
        return manifest.classes, manifest.rows("train")
    try:
        index = RECIPES[cfg.pretrain.method].index(local.data, cfg.train.seed)
    except DataError as exc:  # name the user's s3:// prefix, not this node's cache
        raise DataError(str(exc).replace(local.data.root, cfg.data.root)) from None
    return index.classes, len(index.train)


def check_input_size(cfg: RunConfig, model: nn.Module) -> None:
    """An image backbone that cannot take data.image_size (an input smaller than its kernels, say) is refused here,
    by one forward pass of a blank image, not in the first training step of every worker."""
    if is_text_backbone(cfg.model.backbone):
        return
    size = cfg.data.image_size
    try:
        run_blank_image(model, size)
    except INPUT_SIZE_ERRORS as exc:
        raise ConfigError(f"data.image_size: {cfg.model.backbone} cannot take {size} px images ({_reason(exc)}); "
                          f"{_sizes_it_takes(cfg.model.backbone, size)}") from None


def _sizes_it_takes(backbone: str, size: int) -> str:
    if not (sizes := image_sizes_near(backbone, size)):
        return "no size near it that was tried works either; choose another backbone"
    return f"the nearest {'size' if len(sizes) == 1 else 'sizes'} it takes: {' and '.join(map(str, sizes))}"


def _reason(exc: BaseException) -> str:
    """An exception's first line; for an assertion without a message (timm's HaloNet), the model's line that failed
    (the innermost outside torch, whose `_assert` raises it)."""
    if text := str(exc).strip():
        return text.splitlines()[0]
    torch_dir = str(Path(torch.__file__).parent)
    lines = [frame.line for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith(torch_dir)]
    return f"{type(exc).__name__}: {lines[-1]}" if lines and lines[-1] else type(exc).__name__


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_batch_norm_batches(cfg: RunConfig, n_train: int, batch_norm: bool) -> None:
    """BatchNorm cannot train on batches of one sample; refuse a batch size (or a dataset per worker) that makes them,
    for a supervised run of a model with BatchNorm (`batch_norm`) that trains its statistics (SimCLR's batch size
    has its own check: it needs negatives)."""
    trains_batch_norm = cfg.model.strategy != "linear_probe" and not cfg.model.freeze_bn_stats
    if not (cfg.pretrain.method == "supervised" and batch_norm and trains_batch_norm):
        return
    per_worker = math.ceil(n_train / cfg.scaling.max_workers)
    if min(cfg.train.batch_size, per_worker) < 2:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} with {n_train} training image(s) over {cfg.scaling.max_workers} "
                          f"worker(s) gives BatchNorm batches of one sample, which cannot train; use at least 2 images per worker batch")


def check_same_run(cfg: RunConfig, classes: list[str], experiment: Location, model: nn.Module, meta: dict) -> None:
    """--resume continues the same model (`model`, as this config builds it) on the same classes, and has epochs left
    to train; a difference from its newest checkpoint (`meta`) is named, not discovered mid-load."""
    check_left_to_train(cfg, experiment, meta)
    trained = stored_value(meta["config"], "model.backbone")
    if trained != cfg.model.backbone:
        raise ConfigError(f"--resume: model.backbone is {cfg.model.backbone}, but experiment {cfg.experiment} was trained with {trained}")
    check_same_state(cfg, meta["config"])
    check_same_blocks(cfg, meta, model)
    check_same_shapes(cfg, meta["config"], classes, model)
    if meta.get("classes") is not None and meta["classes"] != classes:
        added, missing = sorted(set(classes) - set(meta["classes"])), sorted(set(meta["classes"]) - set(classes))
        parts = [f"{what}: {', '.join(names)}" for what, names in (("new", added), ("gone", missing)) if names]
        raise ConfigError(f"--resume: data.root's classes differ from experiment {cfg.experiment}'s ({'; '.join(parts) or 'their order changed'})")


#: What a resume continues and cannot change: the shapes of the trained weights (SimCLR's projection too) and the
#: optimizer's state (momentum, Adam's moments). The LR, weight decay, schedule and strategy may change.
SAME_ON_RESUME = ("pretrain.method", "pretrain.projection_dim", "pretrain.projection_hidden", "optim.name")


def check_same_state(cfg: RunConfig, trained: dict) -> None:
    """--resume loads the trained weights and optimizer state: a setting that shapes them (SAME_ON_RESUME), or
    layer-wise LR decay turned on or off (which splits the backbone's optimizer groups by layer), is named with the
    value the run was trained with, before a worker fails to load them."""
    new_start = "start a new experiment from one of its checkpoints (model.weights) to change it"
    for key in SAME_ON_RESUME:
        was = stored_value(trained, key, value_at(cfg, key))
        if was != value_at(cfg, key):
            raise ConfigError(f"--resume: {key} is {value_at(cfg, key)}, but experiment {cfg.experiment} was trained with "
                              f"{was}, whose weights and optimizer state it continues; keep {was}, or {new_start}")
    decay = stored_value(trained, "model.layer_decay", 1.0)
    if (decay == 1.0) != (cfg.model.layer_decay == 1.0):
        raise ConfigError(f"--resume: model.layer_decay is {cfg.model.layer_decay}, but experiment {cfg.experiment} was trained "
                          f"with {decay}; layer-wise decay (below 1) and none (1.0) keep different optimizer groups, so "
                          f"keep {'a value below 1' if decay != 1.0 else '1.0'}, or {new_start}")


def check_same_blocks(cfg: RunConfig, meta: dict, model: nn.Module) -> None:
    """The backbone's unfreezing blocks come from its library (timm's own stages) and may change with it: a run whose
    checkpoint counted another number (`meta["backbone_blocks"]`) cannot load its layer-wise decay's optimizer groups,
    one per block, and opens its blocks on another schedule when gradual unfreezing continues."""
    was = meta.get("backbone_blocks")
    if not isinstance(was, int) or (cfg.model.layer_decay == 1.0 and cfg.model.strategy != "gradual_unfreeze"):
        return
    now = len(backbone_blocks(model))
    if now == was:
        return
    why = f"{cfg.model.backbone} now groups into {now} unfreezing blocks, but experiment {cfg.experiment} was trained with {was}"
    if cfg.model.layer_decay != 1.0:
        raise ConfigError(f"--resume: model.layer_decay: {why}, and layer-wise decay keeps one optimizer group per block, so its "
                          "optimizer state cannot load; start a new experiment from one of its checkpoints (model.weights)")
    log.warning("--resume: model.strategy gradual_unfreeze: %s; unfreezing continues by the %d blocks of today's grouping", why, now)


def check_same_shapes(cfg: RunConfig, trained: dict, classes: list[str], model: nn.Module) -> None:
    """A transformer's position embeddings are shaped by the image size: resumed at another `data.image_size`, its
    weights would not load. The model is built at the size it was trained at and their shapes compared."""
    was = stored_value(trained, "data.image_size", cfg.data.image_size)
    if was == cfg.data.image_size or is_text_backbone(cfg.model.backbone):
        return
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    at_was = RECIPES[cfg.pretrain.method].build_model(with_overrides(cfg, [override("data.image_size", was), "model.weights="]), classes)
    for name, tensor in at_was.state_dict().items():
        if shapes.get(name) != tuple(tensor.shape):
            raise ConfigError(f"--resume: data.image_size is {cfg.data.image_size}, but experiment {cfg.experiment} was trained at "
                              f"{was}, which shapes {cfg.model.backbone}'s {name} ({tuple(tensor.shape)}; at {cfg.data.image_size} px "
                              f"{shapes.get(name)}); keep {was}, or start a new experiment from one of its checkpoints "
                              "(model.weights), which fits them to the new size")


def check_left_to_train(cfg: RunConfig, experiment: Location, newest: dict) -> None:
    """A finished run (its result.json written) resumed with no epoch left is one line, not a cluster start that
    trains nothing and writes result.json again with a config no epoch was trained with. A run killed after its
    last checkpoint, before result.json, does resume: that writes it."""
    location = experiment.child(run_dir.RESULT_FILE)
    if not storage.exists(location, "storage.root"):
        return
    try:
        result = json.loads(storage.read_text(location, "storage.root"))
    except ValueError:
        return
    if newest["epoch"] >= cfg.train.epochs:
        raise ConfigError(f"--resume: experiment {cfg.experiment} has finished its {newest['epoch']} epoch(s); set "
                          f"train.epochs above {newest['epoch']} to train it longer")
    planned = stored_value(result, "config.train.epochs")
    if isinstance(planned, int) and isinstance(result.get("epochs_completed"), int) and result["epochs_completed"] < planned:
        raise ConfigError(f"--resume: experiment {cfg.experiment} stopped early at epoch {result['epochs_completed']} "
                          "(train.early_stopping), so it has nothing left to train")


def worker_resources(scaling: ScalingConfig) -> dict[str, float]:
    """What one training worker holds: `resources_per_worker`, a GPU with `use_gpu` unless it says how many,
    and a sliver of Ray's `accelerator_type:X` resource, which only nodes with that accelerator have."""
    resources = cpu_gpu_per_worker(scaling)
    if scaling.accelerator_type:
        resources[f"accelerator_type:{scaling.accelerator_type}"] = 0.001
    return resources


def cpu_gpu_per_worker(scaling: ScalingConfig) -> dict[str, float]:
    return {**scaling.resources_per_worker, **({"GPU": scaling.resources_per_worker.get("GPU", 1.0)} if scaling.use_gpu else {})}


def check_capacity(cfg: RunConfig) -> None:
    """Fail with a message, not a hang, when the cluster can never place the workers a run needs (all of
    them, or `min` of an elastic range). An autoscaling cluster is judged by what it can grow to."""
    import ray

    capacity = ray_private.autoscaler_max_resources()
    if capacity is None:
        if any(not name.startswith("node_") for name in ray_private.autoscaler_v1_node_types()):
            # A v1 autoscaler with node types to launch does not publish its limits: the run waits for the nodes.
            log.info("the cluster autoscales; waiting for %d worker(s) to be placed", cfg.scaling.min_workers)
            return
        capacity = ray.cluster_resources()
    workers = cfg.scaling.min_workers
    for name, amount in worker_resources(cfg.scaling).items():
        needed = amount * workers
        if needed > capacity.get(name, 0.0) + 1e-9:
            need = f"{workers} workers x {amount:g} {name} need {needed:g}" if workers > 1 else f"a worker needs {amount:g}"
            raise ConfigError(f"scaling.{_asking_key(name, workers, cfg.scaling)}: {need} {name}, but the Ray cluster has "
                              f"{capacity.get(name, 0.0):g}")
    if streaming.is_packed(cfg):
        check_decode_room(cfg, worker_resources(cfg.scaling).get("CPU", 0.0) * workers, capacity.get("CPU", 0.0),
                          streaming.read_manifest(cfg).modality)


def _asking_key(resource: str, workers: int, scaling: ScalingConfig) -> str:
    """The scaling key that makes the workers ask for more of `resource` than the cluster has."""
    if resource.startswith("accelerator_type:"):
        return "accelerator_type"
    if workers > 1:
        return "num_workers"
    if resource == "GPU" and "GPU" not in scaling.resources_per_worker:
        return "use_gpu"
    return "resources_per_worker"


def check_decode_room(cfg: RunConfig, held: float, cpus: float, modality: str) -> None:
    """A packed dataset is read (and images decoded) by Ray Data tasks beside the workers: refuse, rather than wait
    forever, when the workers (or trials) hold so many of the cluster's CPUs that no read or decode task can start.
    `modality`: the manifest's; texts are read as stored, with no decode tasks."""
    decoded = modality != "text"
    needed = max(streaming.READ_TASK_CPUS, cfg.data.decode_cpus if decoded else 0.0)
    if cpus - held + 1e-9 >= needed:
        return
    fewer = "lower scaling.num_workers or scaling.resources_per_worker.CPU (or the concurrent trials)"
    if not decoded:
        raise ConfigError(f"scaling.resources_per_worker: a packed text dataset is read by Ray Data tasks of "
                          f"{streaming.READ_TASK_CPUS:g} CPU beside the workers, but they hold {held:g} of the cluster's "
                          f"{cpus:g} CPUs; {fewer}")
    raise ConfigError(f"data.decode_cpus: a packed dataset is read by Ray Data tasks of {streaming.READ_TASK_CPUS:g} CPU and "
                      f"decoded by tasks of {cfg.data.decode_cpus:g} CPU beside the workers, but they hold {held:g} of the "
                      f"cluster's {cpus:g} CPUs; {fewer}, or data.decode_cpus")
