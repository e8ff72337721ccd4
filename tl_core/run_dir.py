"""What a finished run leaves beside Ray's own files, in one place: `result.json` and `config.yaml` (and a sweep,
`sweep.yaml`).

    ROOT/EXPERIMENT/result.json   {"best_checkpoint": URI, "best_metric": {...}, "final_metrics": {...},
                                   "epochs_completed": N, "classes": [...], "config": {...}}
    ROOT/EXPERIMENT/config.yaml   the resolved config, secrets removed

Jobs write them (jobs.results); a run directory given as `model.weights` is read through `best_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tl_core.errors import ConfigError

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_PREFIX = "checkpoint_"  # ours (checkpoint_epoch_NNNN) and Ray Tune's (checkpoint_NNNNNN)
SWEEP_FILE = "sweep.yaml"  # a jobs.sweep experiment: its base config and search section, beside Ray Tune's files


def sweep_is_not_a_run(field: str, source: str) -> ConfigError:
    """The error for a sweep given where a run or checkpoint is wanted: what to give instead."""
    return ConfigError(f"{field}: {source} is a sweep, not a run; give one of its trials' checkpoints, or retrain its winner "
                       f"(python -m jobs.analyze {source} writes report/best.yaml)")


def result_summary(*, best_checkpoint: str, best_metric: dict, final_metrics: dict, classes: list[str] | None,
                   config: dict) -> dict[str, Any]:
    """The content of result.json."""
    return {
        "best_checkpoint": best_checkpoint,
        "best_metric": best_metric,
        "final_metrics": {k: v for k, v in final_metrics.items() if isinstance(v, (int, float))},
        "epochs_completed": int(final_metrics["epoch"]),
        "classes": classes,
        "config": config,
    }


def best_checkpoint(result_text: str, source: str, field: str = "model.weights") -> str:
    """The best checkpoint that result.json names; ConfigError (for `field: source`) when it names none, saying so
    when it is a sweep trial's (Ray Tune's result.json: one row of metrics per report)."""
    try:
        best = json.loads(result_text).get("best_checkpoint")
    except (ValueError, AttributeError):
        best = None
    if best is None and '"trial_id"' in result_text.partition("\n")[0]:
        sweep = source.rstrip("/").rpartition("/")[0] or "SWEEP"
        raise ConfigError(f"{field}: {source} is a trial of a sweep, not a run; give one of its checkpoints "
                          f"({CHECKPOINT_PREFIX}NNNNNN inside it), or retrain the sweep's winner (python -m jobs.analyze {sweep} "
                          "writes report/best.yaml)")
    if not isinstance(best, str) or not best:
        raise ConfigError(f"{field}: run {source} names no best_checkpoint in its {RESULT_FILE}")
    return best


def best_of_finished_run(path: Path, source: str, field: str = "model.weights") -> Path:
    """The best checkpoint directory of the finished run at local `path` (its result.json names it); else `path`."""
    if not (path / RESULT_FILE).is_file():
        return path
    best = Path(best_checkpoint((path / RESULT_FILE).read_text(), source, field))
    if not best.is_dir():
        raise ConfigError(f"{field}: run {source}: its best checkpoint {best} is not a directory")
    return best


def is_run_or_checkpoint(path: Path) -> bool:
    """Whether the local folder `path` is a run of ours (its result.json) or a checkpoint (its meta.json)."""
    from tl_core.checkpoint import META_FILE

    return (path / RESULT_FILE).is_file() or (path / META_FILE).is_file()


def local_checkpoint_dir(path: Path, source: str, field: str = "model.weights") -> Path:
    """The checkpoint directory a local `path` names: a finished run's best checkpoint, or `path` itself when it holds
    a checkpoint (its meta.json). ConfigError for `field: source` otherwise, saying what the folder is instead."""
    from tl_core.checkpoint import META_FILE

    path = best_of_finished_run(path, source, field)
    if (path / META_FILE).is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"{field}: {source} is neither a finished run nor a checkpoint directory")
    if (path / SWEEP_FILE).is_file():
        raise sweep_is_not_a_run(field, source)
    started = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
    if started:
        raise ConfigError(f"{field}: {source} holds checkpoints but no {RESULT_FILE}, so the run did not finish; resume it, or "
                          f"give one of its checkpoints (e.g. {path / started[-1]})")
    raise ConfigError(f"{field}: {source} is neither a finished run ({RESULT_FILE}) nor a checkpoint directory ({META_FILE})")
