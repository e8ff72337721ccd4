"""The sweep file: a run config plus a `search:` section (the space over dotted config keys, the searcher,
the scheduler). This schema belongs to jobs.sweep; every trial's run config is validated by tl_core.config."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tl_core.config import (
    MetricName,
    MonitorsAMetric,
    RunConfig,
    Section,
    apply_overrides,
    describe,
    from_dict,
    nearest_key,
    override,
    section_at,
    with_overrides,
)
from tl_core.config_file import read_config_file
from tl_core.errors import ConfigError
from tl_core.files import as_given

_DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")

#: How many combinations of the space's values load_sweep validates at most: every key's values alone, then every
#: pair, every triple ... (the whole space, for any space of up to 7 keys with 3 values each).
MAX_CHECKED_COMBINATIONS = 10_000
Variant = tuple[tuple[str, Any], ...]  # ((key, value), ...): what a trial sets on top of the sweep's base config
#: How many models jobs.sweep builds at most to check the trials' (`SearchConfig.variants`): each loads its weights.
MAX_VARIANTS = 16


#: What shapes a trial's resources, which the sweep reserves once for every trial from the run config (Tune's
#: with_resources): a space over them left a DDP trial waiting forever for workers beside the trials holding the CPUs.
RESOURCE_KEYS = ("scaling.num_workers", "scaling.use_gpu", "scaling.accelerator_type", "scaling.resources_per_worker")


#: What population-based training may change in a running trial: hyperparameters that a resume from a checkpoint
#: takes from the new config (the optimizer's groups, the loss, dropout), never the model's or the data's shape.
PBT_KEYS = ("optim.lr", "optim.weight_decay", "optim.l1", "model.dropout", "train.label_smoothing")


class SchedulerConfig(Section):
    name: Literal["asha", "fifo", "bohb", "pbt"] = "asha"  # bohb: HyperBand for BOHB (with search_alg: bohb)
    max_t: int = Field(10, ge=1)  # epochs a trial may run; also every trial's train.epochs
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    perturbation_interval: int = Field(2, ge=1)  # pbt: epochs between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)  # pbt: the bottom share copies the top share
    synch: bool = False  # pbt: every trial waits at each interval and the population is perturbed together

    @model_validator(mode="after")
    def _grace_within_max_t(self) -> SchedulerConfig:
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period: {self.grace_period} is more than max_t {self.max_t}")
        return self


class SearchConfig(Section, MonitorsAMetric):
    space: dict[str, dict[str, list[Any]]]
    num_samples: int = Field(8, ge=1)  # 1 for a space of grid entries only, whose repeats would be the same trials
    max_concurrent_trials: int = Field(2, ge=1)
    search_alg: Literal["random", "grid", "optuna", "bohb"] = "random"  # optuna: TPE; bohb: with scheduler.name bohb
    seed: int = Field(0, ge=0, lt=2**32)  # the searchers' random state
    metric: MetricName = "val/acc"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = SchedulerConfig()
    scale_lr: Literal["none", "linear"] = "none"  # linear: optim.lr x global batch / base_batch_size
    base_batch_size: int = Field(256, ge=1)

    @field_validator("space", mode="before")
    @classmethod
    def _dotted_keys(cls, space: Any) -> Any:
        """Nested keys joined with dots (`optim: {lr: {loguniform: ...}}` is `optim.lr`), the form that
        `--set search.space.optim.lr.loguniform=[...]` writes; of two entries for one key, the later wins, so such an
        override replaces the file's entry."""
        if not isinstance(space, dict):
            return space
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict) -> None:
            for key, value in node.items():
                name = f"{prefix}{key}"
                if isinstance(value, dict) and value and not set(value) & set(_DISTRIBUTIONS) \
                        and (section_at(name.split(".")) is not None or all(isinstance(v, dict) for v in value.values())):
                    walk(f"{name}.", value)  # a section of keys, each with its distribution
                else:
                    flat.pop(name, None)
                    flat[name] = value

        walk("", space)
        for key, spec in flat.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
                raise ValueError(f"{key}: expected one of {', '.join(_DISTRIBUTIONS)} (e.g. {{loguniform: [1.0e-4, 1.0e-1]}}; "
                                 f"got {spec!r})")
            if not isinstance(next(iter(spec.values())), list):
                raise ValueError(f"{key}: {next(iter(spec))} takes a list of values (got {spec!r})")
        return flat

    @field_validator("space")
    @classmethod
    def _valid_space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not space:
            raise ValueError("the search space is empty; give at least one key, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-1]}")
        for key, spec in space.items():
            kind, values = next(iter(spec.items()))
            if is_group(key, values):
                _check_group(key, kind, values)
                continue
            if "." not in key and key not in RunConfig.model_fields and any(isinstance(v, dict) for v in values):
                raise ValueError(f"{key}: draws several keys together, so each of its values is a mapping of config keys "
                                 f"(got {next(v for v in values if not isinstance(v, dict))!r})")
            _check_config_key(key)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"{key}: {kind} values must be finite numbers (got {values})")
            if kind in ("loguniform", "uniform", "randint"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
                    raise ValueError(f"{key}: {kind} needs [lower, upper] with lower < upper (got {values})")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs a positive lower bound (got {values[0]})")
                if kind == "randint" and values[1] - values[0] <= 1:  # Tune's upper bound is excluded
                    raise ValueError(f"{key}: randint {values} draws only {values[0]}, as its upper bound is excluded (as in "
                                     f"Tune and range()); give [{values[0]}, {values[0] + 2}] for {values[0]} or {values[0] + 1}")
            elif not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
        set_by: dict[str, str] = {}
        for entry, spec in space.items():
            for key in keys_set(entry, spec):
                if key in set_by:
                    raise ValueError(f"{set_by[key]} and {entry} both set {key}; draw it in one entry")
                set_by[key] = entry
        return space

    @model_validator(mode="after")
    def _searcher_fits_space_and_scheduler(self) -> SearchConfig:
        if self.search_alg == "grid" and any(next(iter(s)) != "grid" for s in self.space.values()):
            raise ValueError("search_alg: grid needs every space entry to be {grid: [...]}")
        if self.search_alg in ("optuna", "bohb") and any(next(iter(s)) == "grid" for s in self.space.values()):
            raise ValueError(f"search_alg: {self.search_alg} samples its own points; use choice instead of grid in the space")
        if self.search_alg in ("optuna", "bohb") and (group := next((k for k in self.space if self.is_group(k)), None)):
            raise ValueError(f"search_alg: {self.search_alg} draws numbers and words, not the settings {group} draws together; "
                             "use search_alg random or grid, or give each key its own entry")
        if (self.search_alg == "bohb") != (self.scheduler.name == "bohb"):
            raise ValueError("search_alg: bohb and scheduler.name: bohb (HyperBand for BOHB) go together")
        if self.scheduler.name == "pbt":
            fixed = [k for k in self.space if k not in PBT_KEYS]
            if fixed:
                raise ValueError(f"scheduler.name: pbt changes hyperparameters of running trials, which {fixed[0]} is not; "
                                 f"its space may hold {', '.join(PBT_KEYS)}")
            if self.search_alg not in ("random",):
                raise ValueError("scheduler.name: pbt draws its own starting points; use search_alg: random")
            if self.scheduler.synch and self.num_samples > self.max_concurrent_trials:
                raise ValueError(f"scheduler.synch: synchronous PBT waits for the whole population at every interval, so "
                                 f"num_samples ({self.num_samples}) may not exceed max_concurrent_trials "
                                 f"({self.max_concurrent_trials})")
        elif self.scheduler.synch:
            raise ValueError(f"scheduler.synch: applies to scheduler.name pbt, not {self.scheduler.name}")
        return self

    @model_validator(mode="after")
    def _repeats_differ(self, info: ValidationInfo) -> SearchConfig:
        """A space of grid entries only draws nothing: each repeat of it (`num_samples`) would train the same trials
        again, from the same values and the same train.seed (PBT's change values as they run). A stored sweep
        (jobs.analyze's) is read as it ran."""
        if any(next(iter(s)) != "grid" for s in self.space.values()) or self.scheduler.name == "pbt" \
                or self.num_samples == 1 or (info.context or {}).get("stored"):
            return self
        if "num_samples" not in self.model_fields_set:
            object.__setattr__(self, "num_samples", 1)  # the default 8 is for spaces that draw values (frozen: set once,
            return self                                 # here, as pydantic's __init__ keeps self, not a returned copy)
        seeds = ("its train.seed grid already repeats them on other seeds" if "train.seed" in self.space else
                 f"to repeat on other seeds, add train.seed: {{grid: {list(range(self.num_samples))}}} to the space")
        raise ValueError(f"num_samples: {self.num_samples} repeats a space of grid entries only, and every repeat would train "
                         f"the same trials again (the same values, the same train.seed); give num_samples: 1 ({seeds})")

    def is_group(self, key: str) -> bool:
        """Whether the space's entry `key` draws several keys together (`is_group`)."""
        return is_group(key, next(iter(self.space[key].values())))

    def varied_keys(self) -> list[str]:
        """Every config key a trial's drawn values set: the entries' own, and each key a group entry draws."""
        return list(dict.fromkeys(key for entry, spec in self.space.items() for key in keys_set(entry, spec)))

    def trial_values(self) -> list[tuple[str, Any]]:
        """(key, value) pairs that stand for everything the space can draw: every choice, the edges of a range, and
        for a continuous range a fractional value inside it (a key that takes integers refuses it)."""
        values = []
        for key, spec in self.space.items():
            kind, given = next(iter(spec.items()))
            if kind == "randint":
                values += [(key, given[0]), (key, given[1] - 1)]
            elif kind in ("uniform", "loguniform"):
                values += [(key, given[0]), (key, given[1]), (key, given[0] + (given[1] - given[0]) * 0.37)]
            else:
                values += [(key, v) for v in given]
        return values

    def trial_combinations(self) -> Iterator[Variant]:
        """`trial_values` combined across keys: each key's alone, then every pair of keys, every triple ... up to the
        whole space, smallest first (a clash is named by the fewest keys), within MAX_CHECKED_COMBINATIONS."""
        by_key: dict[str, list[Any]] = {}
        for key, value in self.trial_values():
            by_key.setdefault(key, []).append(value)
        left = MAX_CHECKED_COMBINATIONS
        for size in range(1, len(by_key) + 1):
            subsets = list(itertools.combinations(by_key, size))
            left -= sum(math.prod(len(by_key[key]) for key in subset) for subset in subsets)
            if left < 0 and size > 1:
                return
            for subset in subsets:
                for values in itertools.product(*(by_key[key] for key in subset)):
                    yield tuple(zip(subset, values, strict=True))

    def variants(self, keys: Collection[str], limit: int = MAX_VARIANTS) -> list[Variant]:
        """The settings of those `keys` that the space varies, standing for every trial (`trial_values`): all their
        combinations when there are at most `limit`, else one per value of the entry with the most, the other entries'
        values taken in turn (every value in at least one); a group's value gives those of its keys among `keys`.
        Empty when the space varies none of `keys`."""
        by_entry: dict[str, list[Variant]] = {}
        for entry, value in self.trial_values():
            if chosen := tuple((key, v) for key, v in settings(entry, value) if key in keys):
                by_entry.setdefault(entry, [])
                if chosen not in by_entry[entry]:  # a group's values may differ only in keys the model does not read
                    by_entry[entry].append(chosen)
        if not by_entry:
            return []
        if math.prod(len(parts) for parts in by_entry.values()) <= limit:
            combinations = itertools.product(*by_entry.values())
        else:
            combinations = (tuple(parts[i % len(parts)] for parts in by_entry.values())
                            for i in range(max(len(parts) for parts in by_entry.values())))
        return [tuple(setting for part in parts for setting in part) for parts in combinations]

    def reported(self, frame) -> bool:
        """Whether a trial's rows (a DataFrame, or None before any) hold the sweep's metric at least once."""
        return frame is not None and self.metric in frame and bool(frame[self.metric].notna().any())

    def ranking(self, frame) -> tuple[float, float]:
        """A trial's rank, higher first, from its reported rows (a DataFrame): its best epoch's `rank` (its best
        `metric`, a tie going to the lower val/loss at that best)."""
        return max(self.rank(row) for row in frame.dropna(subset=[self.metric]).to_dict("records"))


def is_group(key: str, values: list) -> bool:
    """Whether a space entry draws several keys together: a name of the user's own, not a config key (no dots), whose
    values are mappings of config keys (`source: {choice: [{model.backbone: resnet18, model.weights: null}, ...]}`)."""
    return "." not in key and key not in RunConfig.model_fields and bool(values) and all(isinstance(v, dict) for v in values)


def settings(entry: str, value: Any) -> list[tuple[str, Any]]:
    """The (config key, value) pairs that a space entry's drawn `value` sets in a trial: the entry's own key, or each
    key of a group's mapping (`is_group`; nested sections joined with dots: `{model: {backbone: resnet18}}` sets
    model.backbone)."""
    if not (isinstance(value, dict) and is_group(entry, [value])):
        return [(entry, value)]

    def flat(prefix: tuple[str, ...], mapping: dict) -> Iterator[tuple[str, Any]]:
        for name, v in mapping.items():
            path = (*prefix, *str(name).split("."))
            if isinstance(v, dict) and section_at(path) is not None:
                yield from flat(path, v)
            else:
                yield ".".join(path), v

    return list(flat((), value))


def keys_set(entry: str, spec: dict[str, Any]) -> list[str]:
    """The config keys a space entry (`spec`: its one {kind: values}) sets across its values, each once: the entry's
    own, or a group's keys."""
    return list(dict.fromkeys(key for value in next(iter(spec.values())) for key, _ in settings(entry, value)))


def _check_group(entry: str, kind: str, values: list[dict]) -> None:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", entry):  # it names trial folders and the report's column
        raise ValueError(f"{entry!r}: a group's name takes letters, digits, '_' and '-', beginning with a letter")
    if kind not in ("choice", "grid"):
        raise ValueError(f"{entry}: draws several keys together from a choice or grid of mappings, not {kind}")
    for value in values:
        if not value:
            raise ValueError(f"{entry}: an empty mapping sets nothing; each value names the keys it sets")
        for key, _ in settings(entry, value):
            try:
                _check_config_key(key)
            except ValueError as exc:
                raise ValueError(f"{entry}: {exc}") from None


def _check_config_key(key: str) -> None:
    model: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            near = nearest_key(parts[: i + 1])
            raise ValueError(f"{key}: not a config key{f' (did you mean {near}?)' if near else ''}; allowed in {where}: {', '.join(fields)}")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1 and not is_section:
            raise ValueError(f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        if i == len(parts) - 1 and is_section:
            raise ValueError(f"{key}: is a section; name one of its keys ({', '.join(annotation.model_fields)}), or draw several "
                             f"keys together under a name of your own: NAME: {{choice: [{{{key}.KEY: VALUE, ...}}, ...]}}")
        model = annotation


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, SearchConfig]:
    """A sweep file: the run config every trial starts from (train.epochs: the scheduler's max_t), and its `search:`
    section. Every edge of the space, and their combinations, are applied to the run config and validated, so a bad
    range or a clash of two keys fails here, not in trial 7."""
    raw = read_config_file(path)
    name = as_given(path)  # a node's copy of an s3:// sweep file by its URI
    search_raw = raw.pop("search", None)
    if search_raw is None:
        raise ConfigError(f"{name}: search: required section is missing (a sweep file is a run config plus search:)")
    data = apply_overrides({**raw, "search": search_raw}, overrides)
    search_raw = _max_t_from_epochs(name, data, data.pop("search"))
    try:
        search = SearchConfig.model_validate(search_raw)
    except ValidationError as exc:
        raise ConfigError(f"{name}: {describe(exc, model=SearchConfig, prefix='search.')}") from None
    for key, spec in search.space.items():  # here, not in SearchConfig: a stored sweep file is read, not judged again
        if resource := next((k for k in keys_set(key, spec) if k in RESOURCE_KEYS), None):
            raise ConfigError(f"{name}: search.space: {key}: every trial holds the resources the run config's scaling section "
                              f"asks for, reserved once for the sweep, so they cannot vary between trials"
                              f"{'' if resource == key else f' ({resource})'}; run one sweep per value")
        values = spec.get("grid", [])
        if repeated := [v for i, v in enumerate(values) if v in values[:i]]:
            raise ConfigError(f"{name}: search.space: {key}: grid lists {repeated[0]!r} twice; each grid value runs its own "
                              "trials, so list it once")
    base = from_dict(data, [override("train.epochs", search.scheduler.max_t)], source=name)
    interval, every = search.scheduler.perturbation_interval, base.checkpoint.every
    if search.scheduler.name == "pbt" and interval % every:
        raise ConfigError(f"{name}: checkpoint.every: {every} must divide scheduler.perturbation_interval ({interval}): "
                          "a pbt exploit copies the checkpoint of the epoch it happens at")
    for combination in search.trial_combinations():
        try:
            with_values(base, combination)
        except ConfigError as exc:
            reason = str(exc).split(": ", 1)[-1]
            if len(combination) == 1:
                (key, value), = combination
                raise ConfigError(f"{name}: search.space.{key}: value {shown(value)} is not valid: {reason}") from None
            raise ConfigError(f"{name}: search.space: {named_values(combination)} are not valid together: {reason}") from None
    try:
        kept_by_search(base, search.metric, search.mode)
    except ConfigError as exc:
        raise ConfigError(f"{name}: search.metric: {str(exc).removeprefix('config: ').removeprefix('checkpoint.metric: ')}") from None
    return base, search


def _max_t_from_epochs(name: str, data: dict, search: Any) -> Any:
    """The `search:` section with the scheduler's max_t, which is every trial's train.epochs, taken from the file's
    `train.epochs` where only that is set; both set to different numbers is refused, as the file's epochs would
    silently not be what the trials run."""
    train = data.get("train")
    epochs = train.get("epochs") if isinstance(train, dict) else None
    scheduler = search.get("scheduler", {}) if isinstance(search, dict) else None
    if epochs is None or not isinstance(scheduler, dict):
        return search  # nothing to take, or a section the validation names
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"{name}: train.epochs: {epochs!r} must be a whole number of epochs, at least 1")
    max_t = scheduler.get("max_t")
    if max_t is None:
        return {**search, "scheduler": {**scheduler, "max_t": epochs}}
    if max_t != epochs:
        raise ConfigError(f"{name}: train.epochs: {epochs}, but search.scheduler.max_t: {max_t} is every trial's train.epochs; "
                          "set one of them, or both to the same number")
    return search


def kept_by_search(cfg: RunConfig, metric: str, mode: str) -> RunConfig:
    """`cfg` as a trial runs it: its checkpoints kept by the sweep's metric, as Tune keeps them (a DDP trial's
    TorchTrainer too), and so kept when best.yaml retrains the winner."""
    return with_overrides(cfg, [override("checkpoint.metric", metric), override("checkpoint.mode", mode)])


def with_values(cfg: RunConfig, combination: Variant) -> RunConfig:
    """`cfg` as a trial that draws `combination` ((key, value), ...) runs it."""
    return with_overrides(cfg, [override(key, v) for entry, value in combination for key, v in settings(entry, value)])


def named_values(combination: Variant) -> str:
    """`model.strategy 'lp_ft' and train.epochs 1`: a trial's values of some keys, as messages name them."""
    *firsts, last = (f"{key} {shown(value)}" for key, value in combination)
    return f"{', '.join(firsts)} and {last}" if firsts else last


def listed_values(params: dict, sep: str = " ") -> str:
    """`optim.lr=0.001 model.weights=null`: a trial's values as a config reads them (floats to 4 digits)."""
    return sep.join(f"{key}={config_text(value)}" for key, value in params.items())


def shown(value) -> str:
    """A drawn value in a message: 'lp_ft', 0.1, or a group's settings as the config reads them."""
    return config_text(value) if isinstance(value, dict) else repr(value)


def config_text(value) -> str:
    """A value as the config reads it: `null` (trained from scratch), `true`, 0.001."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict):  # a group's drawn settings
        return "{" + ", ".join(f"{key}: {config_text(v)}" for key, v in value.items()) + "}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
