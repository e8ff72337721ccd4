"""What a finished run leaves beside Ray's own files, in one place: `result.json` and `config.yaml`.

    ROOT/EXPERIMENT/result.json   {"best_checkpoint": URI, "best_metric": {...}, "final_metrics": {...},
                                   "epochs_completed": N, "classes": [...], "config": {...}}
    ROOT/EXPERIMENT/config.yaml   the resolved config, secrets removed

Jobs write them (jobs.results); a run directory given as `model.weights` is read through `best_checkpoint`.
"""

from __future__ import annotations

import json
from typing import Any

from tl_core.errors import ConfigError

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"


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


def best_checkpoint(result_text: str, source: str) -> str:
    """The best checkpoint that result.json names; ConfigError (for `model.weights: source`) when it names none."""
    try:
        best = json.loads(result_text).get("best_checkpoint")
    except (ValueError, AttributeError):
        best = None
    if not isinstance(best, str) or not best:
        raise ConfigError(f"model.weights: run {source} names no best_checkpoint in its {RESULT_FILE}")
    return best
