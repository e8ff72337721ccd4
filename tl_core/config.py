"""The run config: one typed, validated, frozen object loaded from YAML plus `--set a.b=c` overrides.

Every job turns its YAML file into a `RunConfig` here and passes it one way, down into the core.
Validation errors become one `ConfigError` line that names the field and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tl_core.errors import ConfigError

#: Every metric the loop reports; anything that monitors a metric must name one of these.
METRIC_NAMES = ("train/loss", "val/loss", "val/acc", "val/acc5", "val/precision", "val/recall", "val/f1", "epoch")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_metric(name: str) -> str:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRIC_NAMES)}")
    return name


MetricName = Annotated[str, AfterValidator(_check_metric)]


class DataConfig(_Section):
    root: str
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    image_size: int = Field(224, ge=8, le=1024)
    augment: bool = True
    hflip: bool = True  # part of `augment`; off for data where mirroring changes the label (digits, text)
    loader_workers: int = Field(2, ge=0, le=64)


class ModelConfig(_Section):
    backbone: str = "resnet18"
    weights: Optional[str] = None
    strategy: Literal["full", "linear_probe", "gradual_unfreeze"] = "full"
    unfreeze_every: int = Field(2, ge=1)
    backbone_lr_mult: float = Field(1.0, ge=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    freeze_bn_stats: bool = False  # keep the source model's BatchNorm statistics (helps few-shot fine-tuning)
    head_init: Literal["default", "xavier", "kaiming"] = "default"

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from tl_core.models import backbone_names  # torchvision import only when a config is validated

        names = backbone_names()
        if name not in names:
            raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(names)}")
        return name


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw", "adagrad", "rmsprop"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1.0e-4, ge=0.0)
    l1: float = Field(0.0, ge=0.0)
    scheduler: Literal["constant", "step", "cosine", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    step_size: int = Field(10, ge=1)  # epochs between decays, `step` only
    gamma: float = Field(0.1, gt=0.0, le=1.0)  # decay factor, `step` only
    min_lr_ratio: float = Field(0.0, ge=0.0, lt=1.0)  # floor of `cosine`/`onecycle`, as a fraction of lr

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ValueError("nesterov: needs name: sgd and momentum > 0")
        return self


class EarlyStoppingConfig(_Section):
    metric: MetricName = "val/acc"
    mode: Literal["max", "min"] = "max"
    patience: Optional[int] = Field(None, ge=1)  # epochs without improvement; null = never stop early
    min_delta: float = Field(0.0, ge=0.0)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: Optional[float] = Field(None, gt=0.0)
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    seed: int = 0


class WorkerRange(_Section):
    """`num_workers: {min: 2, max: 8}`: an elastic run starts once `min` workers fit and grows towards `max`."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "WorkerRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ScalingConfig(_Section):
    num_workers: Union[int, WorkerRange] = 2  # a fixed count, or {min, max} for an elastic run
    use_gpu: bool = False  # one GPU per worker unless resources_per_worker says otherwise
    accelerator_type: Optional[str] = None  # e.g. A10G, L4, H100: only nodes with that accelerator take workers
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    resize_interval_s: float = Field(60.0, gt=0.0)  # elastic runs: how often to consider growing the worker group
    max_failures: int = Field(0, ge=-1)  # -1 = retry forever

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_or_range(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("must be >= 1")
            return value
        if isinstance(value, dict):
            try:
                return WorkerRange.model_validate(value)
            except ValidationError as exc:
                raise ValueError(f"{{min, max}} range: {_describe(exc, WorkerRange).removeprefix('config: ')}") from None
        if isinstance(value, WorkerRange):
            return value
        raise ValueError("expected a number of workers or {min: N, max: M}")

    @model_validator(mode="after")
    def _gpus_need_use_gpu(self) -> "ScalingConfig":
        if self.resources_per_worker.get("GPU", 0) > 0 and not self.use_gpu:
            raise ValueError("resources_per_worker: GPU needs use_gpu: true")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, WorkerRange)

    @property
    def min_workers(self) -> int:
        return self.num_workers.min if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers.max if self.elastic else self.num_workers

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, resources: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in resources.items() if v < 0]
        if bad:
            raise ValueError(f"resource amounts must be >= 0 (got {bad[0]}={resources[bad[0]]})")
        return resources


class CheckpointConfig(_Section):
    keep: Optional[int] = Field(2, ge=1)  # null keeps every checkpoint
    metric: MetricName = "val/acc"
    mode: Literal["max", "min"] = "max"


class StorageConfig(_Section):
    root: str = "./runs"
    endpoint_url: Optional[str] = None


class PretrainConfig(_Section):
    """How jobs.pretrain trains a source model. `supervised`: the classifier on the labelled source task.
    `simclr`: contrastive self-supervised learning on unlabelled images (an ImageFolder whose labels are
    ignored, or a flat folder); its checkpoints hold the backbone only, the projection head is dropped."""

    method: Literal["supervised", "simclr"] = "supervised"
    temperature: float = Field(0.5, gt=0.0, le=10.0)  # NT-Xent softmax temperature
    projection_dim: int = Field(128, ge=8)  # output of the projection head
    projection_hidden: int = Field(512, ge=8)  # its hidden layer
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale range of each view
    color_jitter: float = Field(0.4, ge=0.0, le=1.0)  # brightness/contrast/saturation strength (hue: a quarter of it)


class RunConfig(_Section):
    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    storage: StorageConfig = StorageConfig()
    pretrain: PretrainConfig = PretrainConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict with secrets removed: what is written next to a run."""
        data = self.model_dump(mode="json")
        if data["storage"]["endpoint_url"]:
            data["storage"]["endpoint_url"] = _strip_userinfo(data["storage"]["endpoint_url"])
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config from YAML, expand `${VAR}` / `${VAR:-default}` in its strings from the
    environment, apply `a.b=c` overrides, validate."""
    return from_dict(_expand_env(_read_yaml(path), str(path), ()), overrides, source=str(path))


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, source: str, where: tuple) -> Any:
    """Environment references in string values, so that one config serves a laptop and a cluster
    (`storage.root: ${TL_STORAGE_ROOT:-./runs}`)."""
    if isinstance(value, dict):
        return {k: _expand_env(v, source, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, source, (*where, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name) or default
        if found is None:
            raise ConfigError(f"{source}: {'.'.join(map(str, where))}: environment variable {name} is not set "
                              f"(write ${{{name}:-default}} to give a default)")
        return found

    return _ENV_REF.sub(substitute, value)


def from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> RunConfig:
    data = _apply_overrides(raw, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A new config: `cfg` with `a.b=c` overrides applied and validated again."""
    return from_dict(cfg.model_dump(mode="json"), overrides)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return data


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    data = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=0.01")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from None
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _describe(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first validation error as `field: problem (got value)`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_allowed_keys(err['loc'], model or RunConfig)}"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    more = f" [and {len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{loc}: {msg}{shown}{more}"


def _allowed_keys(loc: tuple, model: Any) -> str:
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    return "; allowed: " + ", ".join(model.model_fields)


# --- sweeps: a run config plus a `search:` section -------------------------------------------------------------

_DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class SchedulerConfig(_Section):
    name: Literal["asha", "fifo"] = "asha"
    max_t: int = Field(10, ge=1)  # epochs a trial may run; also every trial's train.epochs
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)

    @model_validator(mode="after")
    def _grace_within_max_t(self) -> SchedulerConfig:
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period: {self.grace_period} is more than max_t {self.max_t}")
        return self


class SearchConfig(_Section):
    space: dict[str, dict[str, list[Any]]]
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    search_alg: Literal["random", "grid"] = "random"
    seed: int = 0
    metric: MetricName = "val/acc"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = SchedulerConfig()
    scale_lr: Literal["none", "linear"] = "none"  # linear: optim.lr x global batch / base_batch_size
    base_batch_size: int = Field(256, ge=1)

    @field_validator("space")
    @classmethod
    def _valid_space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not space:
            raise ValueError("the search space is empty; give at least one key, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-1]}")
        for key, spec in space.items():
            _check_config_key(key)
            if len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
                raise ValueError(f"{key}: expected one of {', '.join(_DISTRIBUTIONS)} (e.g. {{loguniform: [1.0e-4, 1.0e-1]}})")
            kind, values = next(iter(spec.items()))
            if kind in ("loguniform", "uniform", "randint"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
                    raise ValueError(f"{key}: {kind} needs [lower, upper] with lower < upper (got {values})")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs a positive lower bound (got {values[0]})")
            elif not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
        return space

    @model_validator(mode="after")
    def _grid_needs_grid(self) -> SearchConfig:
        if self.search_alg == "grid" and any(next(iter(s)) != "grid" for s in self.space.values()):
            raise ValueError("search_alg: grid needs every space entry to be {grid: [...]}")
        return self

    def trial_values(self) -> list[dict[str, Any]]:
        """The edge values of every dimension, one dict per value: enough to validate the space against a config."""
        values = []
        for key, spec in self.space.items():
            kind, given = next(iter(spec.items()))
            edges = [given[0], given[1] - 1] if kind == "randint" else given
            values += [{key: v} for v in edges]
        return values


def _check_config_key(key: str) -> None:
    model: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ValueError(f"{key}: not a config key; allowed in {where}: {', '.join(fields)}")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and not is_section:
            raise ValueError(f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        if i == len(parts) - 1 and is_section:
            raise ValueError(f"{key}: is a section; name one of its keys: {', '.join(annotation.model_fields)}")
        model = annotation


def override(key: str, value: Any) -> str:
    """`key=value` for `with_overrides`, with the value written as YAML (so None, lists and strings survive)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, SearchConfig]:
    """A sweep file: the run config every trial starts from, and its `search:` section. Every edge of the
    space is applied to the run config and validated, so a bad range fails here, not in trial 7."""
    raw = _expand_env(_read_yaml(path), str(path), ())
    search_raw = raw.pop("search", None)
    if search_raw is None:
        raise ConfigError(f"{path}: search: required section is missing (a sweep file is a run config plus search:)")
    data = _apply_overrides({**raw, "search": search_raw}, overrides)
    search_raw = data.pop("search")
    try:
        search = SearchConfig.model_validate(search_raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: search.{_describe(exc, model=SearchConfig)}") from None
    base = from_dict(data, (), source=str(path))
    for values in search.trial_values():
        key, value = next(iter(values.items()))
        try:
            with_overrides(base, [override(key, value)])
        except ConfigError as exc:
            raise ConfigError(f"{path}: search.space.{key}: value {value!r} is not valid: {str(exc).split(': ', 1)[-1]}") from None
    return base, search
