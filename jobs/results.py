"""What a finished run leaves for people and for the next stage: result.json and config.yaml (tl_core.run_dir)."""

from __future__ import annotations

from cluster import storage
from jobs import tracking
from jobs.staging import checkpoint_metas, experiment_location, read_meta_at, root_location
from tl_core import run_dir
from tl_core.checkpoint import to_json
from tl_core.config import RunConfig
from tl_core.errors import CheckpointError


def write_result(cfg: RunConfig, result) -> dict:
    """ROOT/EXPERIMENT/result.json (where the best checkpoint is and what the run reached) and config.yaml.

    Both come from the checkpoints in storage, not from Ray's bookkeeping, so that result.json matches storage
    even when a resume replaced or set aside checkpoints that Ray had registered.
    """
    experiment = experiment_location(cfg)
    metas = dict(checkpoint_metas(experiment))  # complete checkpoints only: never name one cut short
    if not metas:
        raise CheckpointError(f"experiment {cfg.experiment}: the run finished without a checkpoint")
    # the best `checkpoint.metric`; a tie goes to the lower val/loss, then to the earlier epoch
    best_path, best_meta = max(metas.items(), key=lambda item: (*cfg.checkpoint.rank(item[1]["metrics"]), -item[1]["epoch"]))
    last = max(metas.values(), key=lambda meta: meta["epoch"])
    final = dict(result.metrics) if result.metrics and result.metrics.get("epoch", 0) >= last["epoch"] else last["metrics"]
    summary = run_dir.result_summary(
        best_checkpoint=f"s3://{best_path}" if root_location(cfg).is_s3 else best_path,
        best_metric={cfg.checkpoint.metric: best_meta["metrics"][cfg.checkpoint.metric], "epoch": best_meta["epoch"]},
        final_metrics=final, classes=best_meta["classes"], config=cfg.to_dict())
    storage.write_text(experiment.child(run_dir.RESULT_FILE), to_json(summary))
    storage.write_text(experiment.child(run_dir.CONFIG_FILE), cfg.to_yaml())
    mlflow = tracking.mlflow_run(cfg, experiment.uri, name=cfg.experiment)  # the run's own, found by its place
    tracking.finish_mlflow_run(mlflow, best=best_meta["metrics"], artifacts={run_dir.RESULT_FILE: to_json(summary),
                                                                             run_dir.CONFIG_FILE: cfg.to_yaml()})
    return summary


def run_summary(result: dict) -> str:
    """A finished run's result.json in words for its last line: "3 epochs, best val/f1 0.8125 at epoch 2"."""
    best = dict(result["best_metric"])
    epoch, epochs = best.pop("epoch"), result["epochs_completed"]
    return (f"{epochs} epoch{'' if epochs == 1 else 's'}, "
            + ", ".join(f"best {name} {value:.4f}" for name, value in best.items()) + f" at epoch {epoch}")


def read_meta(checkpoint) -> dict:
    """meta.json of a Ray checkpoint, read where it lies (local or S3) without downloading the weights."""
    return read_meta_at(checkpoint.filesystem, checkpoint.path)
