"""Where a run's inputs and outputs are: its storage locations, and s3:// data and weights brought to this node.

The config a run keeps in storage holds the user's URIs; each node trains on `localize(cfg)`, where s3://
data and weights are replaced by node-local copies (cluster.storage.cache, once per node under a file lock).

Hub weights (`model.weights: imagenet`, a torchvision weights name, a timm tag) are downloaded once, by the
driver, into their library's cache (`fetch_hub_weights`), and staged under STORAGE_ROOT/_weights/ before any
worker starts (`stage_hub_weights`); a worker reads its own library cache when that holds them, the staged copy
otherwise, and never downloads. A text encoder named by its hub id (`model.backbone: hf:ORG/NAME`) travels the same
way, as a folder; one on S3 (`hf:s3://...`) is copied to each node's cache like s3:// data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from cluster import storage
from cluster.storage import Location, cache
from jobs.streaming import is_packed
from jobs.tracking import absolute_uri
from tl_core import run_dir
from tl_core.checkpoint import META_FILE
from tl_core.config import RunConfig, override, with_overrides
from tl_core.errors import ConfigError
from tl_core.files import user_path
from tl_core.modality import unread_beside
from tl_core.text import is_table_name
from tl_core.text_models import HF_PREFIX, HubModel, hub_repo, is_text_backbone
from tl_core.weights import HF_SAFE_FILE, HF_TORCH_FILE, HubWeights, hub_weights

CHECKPOINT_PREFIX = run_dir.CHECKPOINT_PREFIX
WEIGHTS_DIR = "_weights"  # STORAGE_ROOT/_weights/: hub weights staged for workers (no experiment name starts with _)


def root_location(cfg: RunConfig) -> Location:
    return storage.parse(cfg.storage.root, cfg.storage.endpoint_url)


def experiment_location(cfg: RunConfig) -> Location:
    """ROOT/EXPERIMENT, where Ray lays out the run and we add result.json and config.yaml."""
    return root_location(cfg).child(cfg.experiment)


def checkpoint_dirs(filesystem, directory: str) -> list[str]:
    """The checkpoint directories in `directory` of `filesystem`, newest first (their names sort by epoch)."""
    import pyarrow.fs

    listed = filesystem.get_file_info(pyarrow.fs.FileSelector(directory, allow_not_found=True))
    paths = [info.path for info in listed if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX)]
    return sorted(paths, key=lambda p: Path(p).name, reverse=True)


def read_meta_at(filesystem, path: str) -> dict:
    """meta.json of the checkpoint directory at `path`, read where it lies (local or S3) without the weights."""
    with filesystem.open_input_stream(f"{path}/{META_FILE}") as f:
        return json.loads(f.read())


def checkpoint_metas(experiment: Location) -> Iterator[tuple[str, dict]]:
    """(path, meta.json) of every checkpoint of a run whose meta.json reads as a mapping, newest first; a checkpoint
    cut short (no meta.json: it is written last) or damaged is passed over."""
    filesystem = storage.filesystem(experiment)
    for path in checkpoint_dirs(filesystem, experiment.path):
        try:
            meta = read_meta_at(filesystem, path)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            yield path, meta


def newest_meta(experiment: Location) -> dict | None:
    """meta.json of the newest checkpoint of a run that has a readable one (with its config)."""
    return next((meta for _, meta in checkpoint_metas(experiment) if isinstance(meta.get("config"), dict)), None)


def run_has_progress(experiment: Location) -> bool:
    """Whether a run has anything to resume: a checkpoint or its result.json (a run that failed before its first
    checkpoint leaves Ray's bookkeeping, which does not count)."""
    filesystem = storage.filesystem(experiment)
    return bool(checkpoint_dirs(filesystem, experiment.path)) or storage.exists(experiment.child(run_dir.RESULT_FILE))


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute (workers do not share the driver's working directory), an MLflow file: or sqlite:
    URI's path too, and the S3 endpoint pinned from AWS_ENDPOINT_URL so workers get it too."""
    absolute = lambda path: path if storage.is_uri(path) else str(user_path(path).resolve())  # noqa: E731
    overrides = [override("data.root", absolute(cfg.data.root)), override("storage.root", absolute(cfg.storage.root))]
    weights = cfg.model.weights
    if weights and not storage.is_uri(weights) and user_path(weights).exists() and not _hub(cfg):
        overrides.append(override("model.weights", absolute(weights)))
    encoder = cfg.model.backbone[len(HF_PREFIX):] if is_text_backbone(cfg.model.backbone) else ""
    if encoder and not storage.is_uri(encoder) and user_path(encoder).exists():
        overrides.append(override("model.backbone", f"{HF_PREFIX}{absolute(encoder)}"))
    if cfg.tracking.mlflow is not None:
        overrides.append(override("tracking.mlflow.uri", absolute_uri(cfg.tracking.mlflow.uri)))
    uses_s3 = any(str(v).startswith("s3://") for v in (cfg.data.root, cfg.storage.root, weights, encoder))
    if uses_s3 and not cfg.storage.endpoint_url and os.environ.get("AWS_ENDPOINT_URL"):
        overrides.append(override("storage.endpoint_url", os.environ['AWS_ENDPOINT_URL']))
    return with_overrides(cfg, overrides)


def localize(cfg: RunConfig, weights: bool = True) -> RunConfig:
    """`cfg` as this node reads it: s3:// data and weights replaced by their node-local cached copies; the source
    weights left as named unless `weights` (a run that resumes takes every weight from its checkpoint)."""
    overrides = []
    if cfg.data.root.startswith("s3://") and not is_packed(cfg):  # a packed dataset streams; it is never copied
        data = storage.parse(cfg.data.root, cfg.storage.endpoint_url, field="data.root")
        one_table = is_table_name(data.key) and storage.is_object(data, "data.root")
        local = cache.fetch_object(data, "data.root") if one_table else cache.sync_prefix(data, "data.root", unread=unread_beside)
        overrides.append(override("data.root", local))
    if weights and cfg.model.weights and cfg.model.weights.startswith("s3://"):
        overrides.append(override("model.weights", fetch_weights(cfg.model.weights, cfg.storage.endpoint_url)))
    hub = _hub(cfg) if weights else None
    if hub is not None and hub.cached() is None:  # not in this node's library cache: the copy the driver staged
        staged = staged_hub_weights(cfg, hub)
        overrides.append(override("model.weights", fetch_weights(staged, cfg.storage.endpoint_url) if storage.is_uri(staged) else staged))
    backbone = cfg.model.backbone
    model = _hub_model(cfg)
    if model is not None and model.cached() is None:  # not in this node's Hugging Face cache: the folder the driver staged
        backbone = HF_PREFIX + staged_hub_model(cfg, model).uri
    if backbone.startswith(f"{HF_PREFIX}s3://"):
        location = storage.parse(backbone[len(HF_PREFIX):], cfg.storage.endpoint_url, field="model.backbone")
        backbone = f"{HF_PREFIX}{cache.sync_prefix(location, 'model.backbone')}"
    if backbone != cfg.model.backbone:
        overrides.append(override("model.backbone", backbone))
    return with_overrides(cfg, overrides) if overrides else cfg


def _hub(cfg: RunConfig) -> HubWeights | None:
    weights = cfg.model.weights
    return hub_weights(cfg.model.backbone, weights) if weights and not storage.is_uri(weights) else None


def _hub_model(cfg: RunConfig) -> HubModel | None:
    repo = hub_repo(cfg.model.backbone) if is_text_backbone(cfg.model.backbone) else None
    return HubModel(repo) if repo else None


def fetch_hub_weights(cfg: RunConfig, weights: bool = True) -> None:
    """On the driver, before any worker starts: hub weights (unless not `weights`: a resumed run's) and a hub text
    encoder downloaded into their library's cache if missing."""
    for hub in (_hub(cfg) if weights else None, _hub_model(cfg)):
        if hub is not None:
            hub.download()


def _staged_location(cfg: RunConfig, hub: HubWeights | HubModel) -> Location:
    """Where the driver stages hub weights (a file) or a hub text encoder (a folder): STORAGE_ROOT/_weights/..."""
    return root_location(cfg).child(WEIGHTS_DIR, *hub.staged_dir.split("/"))


def stage_hub_weights(cfg: RunConfig, weights: bool = True) -> RunConfig:
    """Copy hub weights (unless not `weights`: a resumed run's) and a hub text encoder to STORAGE_ROOT/_weights/ (once
    per storage root), where every worker finds them; returns `cfg`, or with `model.weights` naming the staged file
    when this node's library cache lacks them (a trial that starts its own trainer)."""
    cfg = _stage_hub_model(cfg)
    hub = _hub(cfg) if weights else None
    if hub is None:
        return cfg
    cached = hub.cached()
    if cached is None:
        return with_overrides(cfg, [override("model.weights", staged_hub_weights(cfg, hub))])
    target = _staged_location(cfg, hub).child(cached.name)
    if not storage.exists(target, "model.weights"):
        storage.upload_file(cached, target)
    return cfg


def staged_hub_weights(cfg: RunConfig, hub: HubWeights) -> str:
    """The URI (or local path) of the one file staged for hub weights under STORAGE_ROOT/_weights/."""
    location = _staged_location(cfg, hub)
    if location.is_s3:
        names = [o["Key"] for o in storage.list_objects(location, "model.weights")]
    else:
        names = [p.name for p in Path(location.path).glob("*") if p.is_file() and not p.name.startswith(".")]
    if len(names) != 1:
        raise ConfigError(f"model.weights: {hub.name} for {cfg.model.backbone} is neither in this node's {hub.library} "
                          f"cache ({hub.cache_dir}) nor staged as one file under {location.uri}")
    return location.child(names[0]).uri


def _stage_hub_model(cfg: RunConfig) -> RunConfig:
    """stage_hub_weights for a text encoder named by its hub id: its cached folder copied under STORAGE_ROOT/_weights/."""
    model = _hub_model(cfg)
    if model is None:
        return cfg
    cached = model.cached()
    if cached is None:
        return with_overrides(cfg, [override("model.backbone", f"{HF_PREFIX}{staged_hub_model(cfg, model).uri}")])
    location = _staged_location(cfg, model)
    if not storage.exists(location.child("config.json"), "model.backbone"):  # config.json goes last: there means complete
        if location.is_s3:
            storage.upload_dir(cached, location, last="config.json")
        else:
            shutil.copytree(cached, location.path, dirs_exist_ok=True, ignore=lambda _, names: [n for n in names if n == "config.json"])
            shutil.copyfile(cached / "config.json", Path(location.path) / "config.json")
    return cfg


def staged_hub_model(cfg: RunConfig, model: HubModel) -> Location:
    """Where the driver staged a hub text encoder under STORAGE_ROOT/_weights/; ConfigError when it did not."""
    location = _staged_location(cfg, model)
    if not storage.exists(location.child("config.json"), "model.backbone"):
        raise ConfigError(f"model.backbone: {model.repo} is neither in this node's Hugging Face cache ({model.cache_dir()}) "
                          f"nor staged under {location.uri}")
    return location


def fetch_weights(uri: str, endpoint_url: str | None, field: str = "model.weights") -> Path:
    """The local copy of source weights on S3: a state-dict object, a checkpoint prefix, or a finished run
    (whose result.json names its best checkpoint). A prefix that is neither is refused before anything is copied
    (a storage root given by mistake would be copied whole)."""
    location = storage.parse(uri, endpoint_url, field=field)
    if location.key and storage.is_object(location, field):
        return cache.fetch_object(location, field)
    result = location.child(run_dir.RESULT_FILE)
    if storage.is_object(result, field):
        best = run_dir.best_checkpoint(storage.read_text(result, field), uri, field)
        if not best.startswith("s3://"):
            raise ConfigError(f"{field}: run {uri} names no s3:// best_checkpoint in its {run_dir.RESULT_FILE}")
        location = storage.parse(best, endpoint_url, field=field)
    if not storage.is_object(location.child(META_FILE), field) and storage.exists(location, field):
        for name in (HF_SAFE_FILE, HF_TORCH_FILE):  # a Hugging Face model folder: its weights file alone
            if storage.is_object(location.child(name), field):
                return cache.fetch_object(location.child(name), field)
        if storage.is_object(location.child(run_dir.SWEEP_FILE), field):
            raise run_dir.sweep_is_not_a_run(field, uri)
        raise ConfigError(f"{field}: {location.uri} is neither a state-dict object, a finished run ({run_dir.RESULT_FILE}) nor a "
                          f"complete checkpoint ({META_FILE})")
    return cache.sync_prefix(location, field)
