"""What a finished run leaves for people and for the next stage: result.json and config.yaml (tl_core.run_dir)."""

from __future__ import annotations

import json

from cluster import storage
from jobs.staging import experiment_location, root_location
from tl_core import run_dir
from tl_core.checkpoint import META_FILE
from tl_core.config import RunConfig
from tl_core.errors import CheckpointError


def write_result(cfg: RunConfig, result) -> dict:
    """ROOT/EXPERIMENT/result.json (where the best checkpoint is and what the run reached) and config.yaml,
    from Ray Train's Result."""
    best = result.get_best_checkpoint(cfg.checkpoint.metric, cfg.checkpoint.mode) or result.checkpoint
    if best is None:
        raise CheckpointError(f"experiment {cfg.experiment}: the run finished without a checkpoint")
    best_meta = read_meta(best)
    final = dict(result.metrics) if result.metrics else read_meta(result.checkpoint)["metrics"]
    summary = run_dir.result_summary(
        best_checkpoint=f"s3://{best.path}" if root_location(cfg).is_s3 else best.path,
        best_metric={cfg.checkpoint.metric: best_meta["metrics"][cfg.checkpoint.metric], "epoch": best_meta["epoch"]},
        final_metrics=final, classes=best_meta["classes"], config=cfg.to_dict())
    experiment = experiment_location(cfg)
    storage.write_text(experiment.child(run_dir.RESULT_FILE), json.dumps(summary, indent=2))
    storage.write_text(experiment.child(run_dir.CONFIG_FILE), cfg.to_yaml())
    return summary


def read_meta(checkpoint) -> dict:
    """meta.json of a Ray checkpoint, read where it lies (local or S3) without downloading the weights."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{META_FILE}") as f:
        return json.loads(f.read())
