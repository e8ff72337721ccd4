"""The run config: one typed, validated, frozen object loaded from YAML plus `--set a.b=c` overrides.

Every job turns its YAML file into a `RunConfig` here and passes it one way, down into the core.
Validation errors become one `ConfigError` line that names the field and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tl_core.errors import ConfigError
from tl_core.safe_yaml import dump_yaml, parse_yaml
from tl_core.secrets import find_credential

#: Every metric the loop reports; anything that monitors a metric must name one of these.
METRIC_NAMES = ("train/loss", "val/loss", "val/acc", "val/acc5", "val/precision", "val/recall", "val/f1", "epoch")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN or infinite number trains

    @field_validator("*", mode="before")
    @classmethod
    def _a_number_is_not_yes_or_no(cls, value: Any, info) -> Any:
        """pydantic takes `true` as 1 for a number (`epochs: true` trained one epoch): refused."""
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not true/false")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _a_pair_is_two_values(cls, value: Any, info) -> Any:
        """A fixed-length field (`optim.betas`, `pretrain.crop_scale`) given too few or too many values, or one, said
        "betas.1: required key is missing" or "Input should be a valid tuple"."""
        field = cls.model_fields[info.field_name]
        if get_origin(field.annotation) is tuple and Ellipsis not in (args := get_args(field.annotation)):
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise ValueError(f"expected a list of {len(args)} numbers, e.g. {list(field.default)}")
        return value


def _is_number(annotation: Any) -> bool:
    """Whether a field's type is a number (int, float; Optional or Annotated ones too) and not also a bool."""
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    return bool not in args and any(_is_number(a) for a in args)


def _check_metric(name: str) -> str:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRIC_NAMES)}")
    return name


MetricName = Annotated[str, AfterValidator(_check_metric)]

#: The metrics that are better lower (the losses); every other one is better higher (`epoch`: the latest).
LOWER_IS_BETTER = ("train/loss", "val/loss")


def metric_mode(metric: str) -> str:
    """The mode ("min" or "max") in which `metric` improves."""
    return "min" if metric in LOWER_IS_BETTER else "max"


class MonitorsAMetric(BaseModel):
    """A section with `metric` and `mode`: `mode` left out is the metric's own (min for a loss, max for the rest);
    written against it, it is refused, as it would keep or pick the worst (a stored config is not judged again)."""

    @model_validator(mode="before")
    @classmethod
    def _mode_of_the_metric(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mode" not in data and isinstance(data.get("metric"), str):
            return {**data, "mode": metric_mode(data["metric"])}
        return data

    @field_validator("mode", check_fields=False)
    @classmethod
    def _mode_fits_the_metric(cls, mode: str, info: ValidationInfo) -> str:
        metric = info.data.get("metric")  # absent when it failed its own validation
        if metric is None or (info.context or {}).get("stored") or mode == metric_mode(metric):
            return mode
        raise ValueError(f"{mode} would take the {'highest' if mode == 'max' else 'lowest'} {metric} as the best, and "
                         f"{metric} is better {'lower' if metric in LOWER_IS_BETTER else 'higher'}: use "
                         f"{metric_mode(metric)}, or leave mode out")

    def rank(self, metrics: Mapping[str, Any]) -> tuple[float, float]:
        """How good one epoch's `metrics` are, higher first: `metric` oriented by `mode`, then, for a tie (common on a
        few validation images: 15 of them score accuracy in steps of 1/15), the lower val/loss (the higher val/acc
        when the metric is val/loss itself); metrics without the tie-breaker lose ties."""
        value = metrics[self.metric] * (1 if self.mode == "max" else -1)
        other, sign = ("val/acc", 1) if self.metric == "val/loss" else ("val/loss", -1)
        tie = metrics.get(other)
        return value, tie * sign if isinstance(tie, (int, float)) and math.isfinite(tie) else -math.inf


#: The metrics each recipe (`pretrain.method`) reports; SimCLR's val/acc is how often a view finds its partner.
RECIPE_METRICS = {"supervised": METRIC_NAMES, "simclr": ("train/loss", "val/loss", "val/acc", "epoch")}


def _a_location(value: str) -> str:
    """A local path or s3:// URI, never empty: "" is the working directory, which a run would read or write."""
    if not value.strip():
        raise ValueError("empty; give a local path or s3://bucket/prefix")
    return value


PathOrUri = Annotated[str, AfterValidator(_a_location)]


class DataConfig(Section):
    root: PathOrUri
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    image_size: int = Field(224, ge=8, le=1024)  # left out: the image backbone's pretrained input size
    augment: bool = True
    hflip: bool = True  # part of `augment`; off for images where mirroring changes the label (digits, writing)
    loader_workers: int = Field(2, ge=0, le=64)
    modality: Literal["auto", "image", "text"] = "auto"  # auto: table files (train.csv, ...) are text, class folders images
    text_column: str = Field("text", min_length=1)  # text: the columns of the table files
    label_column: str = Field("label", min_length=1)
    max_length: int = Field(128, ge=2, le=32768)  # text: tokens per text, after truncation (batches pad to their longest)
    decode_cpus: float = Field(0.5, gt=0.0, le=64)  # packed datasets: CPUs each Ray Data decode task holds (reads hold 1)

    @model_validator(mode="after")
    def _labels_apart_from_texts(self) -> "DataConfig":
        if self.label_column == self.text_column:  # each text would be its own class
            raise ValueError(f"label_column: {self.label_column!r} is text_column too; the labels must be in a column of their own")
        return self


class ModelConfig(Section):
    backbone: str = "resnet18"
    weights: Optional[str] = None
    strategy: Literal["full", "linear_probe", "gradual_unfreeze", "lp_ft"] = "full"
    unfreeze_every: int = Field(2, ge=1)  # gradual_unfreeze: epochs per unfrozen block
    lp_epochs: int = Field(1, ge=1)  # lp_ft: epochs of linear probing before the whole model is fine-tuned
    ft_lr_mult: float = Field(0.1, gt=0.0, le=1.0)  # lp_ft: the LR schedule's multiplier once fine-tuning starts
    backbone_lr_mult: float = Field(1.0, ge=0.0)
    layer_decay: float = Field(1.0, gt=0.0, le=1.0)  # each backbone block's LR this times the one above (text: ~0.8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    freeze_bn_stats: bool = False  # keep the source model's BatchNorm statistics (helps few-shot fine-tuning)
    head_init: Literal["default", "xavier", "kaiming"] = "default"
    pooling: Literal["mean", "cls"] = "mean"  # text encoders: mean over the tokens, or the first ([CLS]) token

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from tl_core.models import check_backbone  # torchvision (and timm) imported only when a config is validated

        return check_backbone(name)

    @field_validator("weights")
    @classmethod
    def _keywords_in_any_case(cls, name: str | None) -> str | None:
        """`ImageNet` means `imagenet`, `Pretrained` (a text encoder's own weights) `pretrained`."""
        keyword = name.strip().lower() if name is not None else None
        return keyword if keyword in ("imagenet", "pretrained") else name


def _registered(registry: str):
    """A validator: the value must be a key of `tl_core.optim.<registry>` (imported when a config is validated)."""

    def check(name: str) -> str:
        from tl_core import optim

        names = getattr(optim, registry)
        if name not in names:
            raise ValueError(f"unknown name {name!r}; allowed: {', '.join(names)}")
        return name

    return AfterValidator(check)


class OptimConfig(Section):
    name: Annotated[str, _registered("OPTIMIZERS")] = "sgd"  # sgd | adam | adamw | adagrad | rmsprop
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)  # adam, adamw
    eps: float = Field(1.0e-8, gt=0.0, le=1.0)  # adam, adamw, adagrad, rmsprop: added to the denominator
    weight_decay: float = Field(1.0e-4, ge=0.0)
    l1: float = Field(0.0, ge=0.0)
    scheduler: Annotated[str, _registered("SCHEDULES")] = "cosine"  # constant | step | cosine | onecycle
    warmup_epochs: float = Field(0.0, ge=0.0)
    step_size: int = Field(10, ge=1)  # epochs between decays, `step` only
    gamma: float = Field(0.1, gt=0.0, le=1.0)  # decay factor, `step` only
    min_lr_ratio: float = Field(0.0, ge=0.0, lt=1.0)  # floor of `cosine`/`onecycle`, as a fraction of lr

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ValueError("nesterov: needs name: sgd and momentum > 0")
        return self


class EarlyStoppingConfig(Section, MonitorsAMetric):
    metric: MetricName = "val/acc"
    mode: Literal["max", "min"] = "max"
    patience: Optional[int] = Field(None, ge=1)  # measurements without improvement (epochs, or validations of a val/ metric); null = never
    min_delta: float = Field(0.0, ge=0.0)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] = "none"  # balanced: each class's training loss weighted by N / (K x its count)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: Optional[float] = Field(None, gt=0.0)
    val_every: int = Field(1, ge=1)  # epochs between validations; the last epoch always validates
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    seed: int = Field(0, ge=0, lt=2**63)  # torch and numpy take seeds below 2**63 (numpy: below 2**32, reduced)


class WorkerRange(Section):
    """`num_workers: {min: 2, max: 8}`: an elastic run starts once `min` workers fit and grows towards `max`."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "WorkerRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ScalingConfig(Section):
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
                raise ValueError(f"{{min, max}} range: {describe(exc, WorkerRange).removeprefix('config: ')}") from None
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


class CheckpointConfig(Section, MonitorsAMetric):
    keep: Optional[int] = Field(2, ge=1)  # null keeps every checkpoint
    every: int = Field(1, ge=1)  # epochs between checkpoints; the last epoch and an early stop always write one
    metric: MetricName = "val/acc"
    mode: Literal["max", "min"] = "max"


class StorageConfig(Section):
    root: PathOrUri = "./runs"
    endpoint_url: Optional[str] = None  # else AWS_ENDPOINT_URL, else AWS S3

    @field_validator("endpoint_url")
    @classmethod
    def _an_endpoint(cls, url: Optional[str]) -> Optional[str]:
        if url is None:
            return url
        parts = urlsplit(url)
        if parts.username is not None or "@" in parts.netloc:
            raise ValueError("must not hold credentials (user:password@host); they come only from the AWS chain")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host and optional port, e.g. http://127.0.0.1:8333")
        return url


class MlflowConfig(Section):
    uri: str = Field(min_length=1)  # the tracking server, e.g. http://127.0.0.1:5000
    experiment: str = Field(min_length=1, max_length=256)  # MLflow experiment name (created if missing)

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.username is not None or "@" in parts.netloc:
            raise ValueError("must not hold credentials (user:password@host); MLflow reads them from MLFLOW_TRACKING_USERNAME/"
                             "PASSWORD or MLFLOW_TRACKING_TOKEN")
        if parts.scheme not in ("http", "https", "file", "sqlite", "databricks"):
            raise ValueError("expected an http:// or https:// tracking server (or file:, sqlite:, databricks)")
        return uri


class TrackingConfig(Section):
    """Where a run reports besides its storage: TensorBoard events are always written beside the results; MLflow
    when `mlflow` is set."""

    mlflow: Optional[MlflowConfig] = None


class PretrainConfig(Section):
    """How jobs.pretrain trains a source model. `supervised`: the classifier on the labelled source task.
    `simclr`: contrastive self-supervised learning on unlabelled images (an ImageFolder whose labels are
    ignored, or a flat folder); its checkpoints hold the backbone only, the projection head is dropped."""

    method: Literal["supervised", "simclr"] = "supervised"
    temperature: float = Field(0.5, gt=0.0, le=10.0)  # NT-Xent softmax temperature
    projection_dim: int = Field(128, ge=8)  # output of the projection head
    projection_hidden: int = Field(512, ge=8)  # its hidden layer
    # RandomResizedCrop's scale range of each view: the smallest and the largest share of the image a crop covers
    crop_scale: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = (0.2, 1.0)
    color_jitter: float = Field(0.4, ge=0.0, le=1.0)  # brightness/contrast/saturation strength (hue: a quarter of it)

    @field_validator("crop_scale")
    @classmethod
    def _a_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:  # before: every worker failed in its first step (uniform_ expects from <= to)
            raise ValueError(f"[{scale[0]:g}, {scale[1]:g}] is not a range: the smallest crop first")
        return scale


class RunConfig(Section):
    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    storage: StorageConfig = StorageConfig()
    pretrain: PretrainConfig = PretrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _image_size_of_the_backbone(self) -> RunConfig:
        """`data.image_size` left out is the size the image backbone was pretrained at (its pretrained config's), not
        a constant; written out from then on, so a run and its resume, trials and exports agree on it."""
        from tl_core.models import pretrained_input_size
        from tl_core.text_models import is_text_backbone

        if "image_size" in self.data.model_fields_set or is_text_backbone(self.model.backbone):
            return self

        size = pretrained_input_size(self.model.backbone)
        return self if size == self.data.image_size else self.model_copy(
            update={"data": self.data.model_copy(update={"image_size": size})})

    @model_validator(mode="after")
    def _a_schedule_that_does_what_it_says(self, info: ValidationInfo) -> RunConfig:
        """Settings that train, but not as written. A stored config (a finished run's, `from_dict(stored=True)`) is
        not judged again: its model exists, whatever it was trained with."""
        if (info.context or {}).get("stored"):
            return self
        if self.pretrain.method == "simclr" and self.train.batch_size < 2:
            raise ValueError("train.batch_size: 1 gives SimCLR no negatives: each image is contrasted with the others in "
                             "its batch; use at least 2")
        if self.optim.warmup_epochs >= self.train.epochs:
            raise ValueError(f"optim.warmup_epochs: {self.optim.warmup_epochs:g} must be less than train.epochs "
                             f"({self.train.epochs}), or the learning rate never reaches optim.lr")
        if self.train.amp == "fp16" and not self.scaling.use_gpu:  # measured: 20.8 s an epoch against 1.2 s in float32
            raise ValueError("train.amp: fp16 is for GPUs (scaling.use_gpu: true); a CPU emulates it, ~18x slower than "
                             "float32 here: use auto (float32 on CPUs) or bf16")
        if self.model.weights is not None and not self.model.weights.strip():  # trained from random weights, unnoticed
            raise ValueError("model.weights: empty; leave it out, or null, to start from random weights")
        if self.optim.scheduler == "step" and self.optim.step_size >= self.train.epochs:
            raise ValueError(f"optim.step_size: {self.optim.step_size} must be less than train.epochs ({self.train.epochs}) "
                             "with scheduler: step, or the learning rate never decays (scheduler: constant says so)")
        return self

    @model_validator(mode="after")
    def _recipe_uses_every_key(self) -> RunConfig:
        """A key the chosen recipe does not use is refused, never silently ignored; so is a metric it never reports."""
        method = self.pretrain.method
        if method == "simclr":  # the backbone's head is replaced by the projection MLP, and there are no labels
            unused = {"train.label_smoothing": self.train.label_smoothing != 0.0, "train.class_weights": self.train.class_weights != "none",
                      "model.strategy": self.model.strategy != "full",
                      "model.dropout": self.model.dropout != 0.0, "model.head_init": self.model.head_init != "default",
                      "model.layer_decay": self.model.layer_decay != 1.0}
        else:
            default = PretrainConfig()
            unused = {f"pretrain.{k}": getattr(self.pretrain, k) != getattr(default, k) for k in PretrainConfig.model_fields if k != "method"}
        for key, is_set in unused.items():
            if is_set:
                raise ValueError(f"{key}: not used by pretrain.method: {method}; remove it")
        if self.model.strategy == "lp_ft" and self.model.lp_epochs >= self.train.epochs:
            raise ValueError(f"model.lp_epochs: {self.model.lp_epochs} must be less than train.epochs ({self.train.epochs}), "
                             "or lp_ft never fine-tunes")
        if self.model.strategy == "gradual_unfreeze" and self.model.unfreeze_every >= self.train.epochs:
            raise ValueError(f"model.unfreeze_every: {self.model.unfreeze_every} must be less than train.epochs "
                             f"({self.train.epochs}), or gradual_unfreeze never unfreezes a block (a linear probe: "
                             "strategy linear_probe says so)")
        if self.checkpoint.every % self.train.val_every:
            raise ValueError(f"checkpoint.every: {self.checkpoint.every} must be a multiple of train.val_every ({self.train.val_every}): "
                             "a checkpoint holds the metrics of a validated epoch")
        reported = RECIPE_METRICS[method]
        for key, metric in (("checkpoint.metric", self.checkpoint.metric), ("train.early_stopping.metric", self.train.early_stopping.metric)):
            if metric not in reported:
                raise ValueError(f"{key}: pretrain.method: {method} does not report {metric}; it reports {', '.join(reported)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict: what is written next to a run. It holds no credential: `from_dict` refuses them."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict(), sort_keys=False)


def from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config",
              stored: bool = False) -> RunConfig:
    """The validated config of `raw` with `overrides`; `stored`: `raw` is a finished run's config (a checkpoint's, a
    sweep's), which an older version validated, so checks of how it would train are not made again."""
    data = apply_overrides(raw, overrides)
    if (field := find_credential(data)) is not None:
        raise ConfigError(f"{source}: {field}: holds a credential (a credential variable's value, or user:password@ in a "
                          "URL); credentials come only from the environment (the AWS chain: variables, profile, instance "
                          "role; MLFLOW_TRACKING_PASSWORD, HF_TOKEN), never from a config")
    try:
        return RunConfig.model_validate(data, context={"stored": stored})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe(exc)}") from None


def with_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A new config: `cfg` with `a.b=c` overrides applied and validated again."""
    return from_dict(cfg.model_dump(mode="json"), overrides)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    data = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=0.01")
        value = parse_yaml(text, f"--set {key}") if text.strip() else None
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


#: Keys whose value an error does not repeat: a URL may carry user info (the message names the field only); the
#: search space's checks name the entry and value at fault themselves ("(got key: value pairs)" said nothing more).
_NEVER_SHOWN = {"storage.endpoint_url", "search.space"}
#: pydantic's words where they are Python's, not the config's ("a valid dictionary or instance of TrainConfig")
_PLAIN = {"model_type": "expected a section (key: value lines under it)", "dict_type": "expected key: value pairs",
          "string_type": "expected text",
          "string_pattern_mismatch": "expected letters, digits, '.', '_' and '-', beginning with a letter or digit"}


def describe(exc: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """The first validation error as `field: problem (got value)`; `prefix`: where `model` sits (`search.`)."""
    err = exc.errors()[0]
    loc = prefix + ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_allowed_keys(err['loc'], model or RunConfig, prefix)}"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = _PLAIN.get(err["type"], err["msg"].removeprefix("Value error, "))
    if not err["loc"]:  # a check across sections names its own keys
        return prefix + msg
    shown = "" if loc in _NEVER_SHOWN else _got(err.get("input"))
    more = f" [and {len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{loc}: {msg}{shown}{more}"


def _got(value: Any) -> str:
    """What a key was given, in a few words: a scalar itself, a section or a list by its kind (they can be long)."""
    if value is None:
        return " (got no value)"
    if isinstance(value, dict):  # `--set model.backbone=timm:` is read as YAML reads it: a key with no value
        return " (got key: value pairs" + ("; quote a value that ends in ':')" if None in value.values() else ")")
    if isinstance(value, list):
        return " (got a list)"
    return f" (got {value!r})"


def _allowed_keys(loc: tuple, model: Any, prefix: str = "") -> str:
    section = section_at(loc[:-1], model)
    if section is None:
        return ""
    near = nearest_key([str(part) for part in loc], model)
    return (f" (did you mean {prefix}{near}?)" if near else "") + "; allowed: " + ", ".join(section.model_fields)


#: Names other tools give keys of ours (Lightning's max_epochs, Keras's learning_rate, ...): the keys they mean.
_KEY_SYNONYMS = {"learning_rate": "lr", "num_epochs": "epochs", "max_epochs": "epochs", "wd": "weight_decay",
                 "lr_scheduler": "scheduler", "optimizer": "name", "bs": "batch_size", "workers": "num_workers"}


def nearest(name: str, names, cutoff: float = 0.75) -> str | None:
    """The one of `names` nearest to `name`, case, spaces and hyphens aside (for "did you mean"), or None."""
    near = difflib.get_close_matches(_plain(name), list(names), n=1, cutoff=cutoff)
    return near[0] if near else None


def _plain(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def nearest_key(path: list[str], model: Any = RunConfig) -> str | None:
    """The key that an unknown dotted `path` most likely means: a near spelling in its own section (`optim.lrr`), a
    name other tools use (`optim.learning_rate`), or the same name where it is a key of another section (`model.lr`
    is `optim.lr`; only when one section has it); None when none is likely."""
    *section, key = path
    key = _KEY_SYNONYMS.get(_plain(key), _plain(key))
    fields = list(here.model_fields) if (here := section_at(section, model)) is not None else []
    if near := nearest(key, fields):
        return ".".join((*section, near))
    elsewhere = [keys for keys in _dotted_keys(model) if keys[-1] == key]
    return ".".join(elsewhere[0]) if len(elsewhere) == 1 else None


def _dotted_keys(model: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name in model.model_fields:
        yield (*prefix, name)
        if (section := section_at((name,), model)) is not None:
            yield from _dotted_keys(section, (*prefix, name))


def section_at(path: tuple | list, model: Any = RunConfig) -> type[BaseModel] | None:
    """The section that a path of keys names in `model` (("optim",) -> OptimConfig), or None where a key is unknown
    or names a value."""
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def override(key: str, value: Any) -> str:
    """`key=value` for `with_overrides`, with the value written as YAML (so None, lists and strings survive: a trial id
    such as 76333_00000 stays a string, where a bare `experiment=76333_00000` would read as an integer)."""
    return f"{key}={as_yaml(value)}"


def as_yaml(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, tuple):
        value = list(value)
    # one line, however long: messages quote it (a sweep's space, named by --resume, ran over three lines)
    return dump_yaml(value, default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()


#: Settings that some values of another leave unread: {key: (the deciding key, the values that leave it unread)}. A
#: value not listed reads the key, so a new optimizer or schedule is never wrongly said to ignore one.
UNREAD_WHEN: dict[str, tuple[str, tuple[Any, ...]]] = {
    "model.unfreeze_every": ("model.strategy", ("full", "linear_probe", "lp_ft")),
    "model.lp_epochs": ("model.strategy", ("full", "linear_probe", "gradual_unfreeze")),
    "model.ft_lr_mult": ("model.strategy", ("full", "linear_probe", "gradual_unfreeze")),
    "model.backbone_lr_mult": ("model.strategy", ("linear_probe",)),  # the backbone never trains
    "model.layer_decay": ("model.strategy", ("linear_probe",)),
    "optim.momentum": ("optim.name", ("adam", "adamw", "adagrad")),
    "optim.betas": ("optim.name", ("sgd", "adagrad", "rmsprop")),
    "optim.eps": ("optim.name", ("sgd",)),
    "optim.step_size": ("optim.scheduler", ("constant", "cosine", "onecycle")),
    "optim.gamma": ("optim.scheduler", ("constant", "cosine", "onecycle")),
    "optim.min_lr_ratio": ("optim.scheduler", ("constant", "step")),
    "train.early_stopping.metric": ("train.early_stopping.patience", (None,)),  # no patience: early stopping is off
    "train.early_stopping.min_delta": ("train.early_stopping.patience", (None,)),
}


def value_at(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted key (`optim.lr`)."""
    return functools.reduce(getattr, key.split("."), cfg)


def stored_value(config: dict, key: str, default: Any = None) -> Any:
    """`value_at` for a config as a run stored it (a checkpoint's meta.json, result.json): the value of a dotted key,
    or `default` where that config lacks it (an older version wrote no such key)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def named_if_set(cfg: RunConfig, key: str, varied: Collection[str] = ()) -> str | None:
    """`key: value` when the key is changed from its default (a config written whole, as a run's config.yaml is, names
    every key with its default: only a change counts), `key (varied by search.space)` when a sweep varies it (`varied`:
    its space's keys), else None."""
    if key in varied:
        return f"{key} (varied by search.space)"
    *path, name = key.split(".")
    value = value_at(cfg, key)
    return None if value == section_at(path).model_fields[name].default else f"{key}: {as_yaml(value)}"


def left_unread(cfg: RunConfig, varied: Collection[str] = ()) -> dict[str, list[str]]:
    """{"model.strategy: full": ["model.lp_epochs: 3"], ...}: each setting (`named_if_set`) that the value of another
    leaves unread (`UNREAD_WHEN`). A deciding key that a sweep varies leaves nothing unread: some trials read them."""
    unread: dict[str, list[str]] = {}
    for key, (decider, leaving_unread) in UNREAD_WHEN.items():
        if decider not in varied and value_at(cfg, decider) in leaving_unread and (named := named_if_set(cfg, key, varied)):
            unread.setdefault(f"{decider}: {as_yaml(value_at(cfg, decider))}", []).append(named)
    return unread
