"""The supervised recipe: `fit` trains a classifier on `TaskData` batches; `evaluate` measures it.

`fit` runs the same in one process, under torchrun, or inside a Ray Train worker: the caller sets up the
process group, and metrics and checkpoints leave through `reporter(metrics, checkpoint_dir)`, which every
rank calls once per epoch (only rank 0 passes a checkpoint directory). The training state (optimizer,
schedule, resume, the optimizer step) is `tl_core.state.TrainingState`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from tl_core.batches import TaskData, move_to
from tl_core.checkpoint import Checkpoint
from tl_core.config import RunConfig
from tl_core.data import unbalanced
from tl_core.distributed import broadcast_buffers, get_rank, get_world_size, log_rank0, wrap_ddp
from tl_core.features import probe_features
from tl_core.metrics import ClassificationMeter
from tl_core.modality import labelled_data
from tl_core.models import apply_strategy, backbone_blocks, build_model, find_head, set_train_mode, trainable_blocks, updates_batch_norm_statistics
from tl_core.state import CheckpointMirror, Reporter, TrainingState, default_device

VAL_METRICS = ("loss", "acc", "acc5", "precision", "recall", "f1")


def class_weights(how: str, train_counts: list[int], device: torch.device) -> torch.Tensor | None:
    """The training loss's weight of each class (`train.class_weights`): None for `none`; for `balanced`, as
    scikit-learn's, N / (K x n_c) over the K classes with training samples, so that every class weighs as much in
    the loss as the others, however rare it is (a class with none trains nothing either way: weight 0)."""
    if how == "none":
        return None
    counts = torch.tensor(train_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros(()))
    return weights.to(device)


def _named(classes: list[str], weight: torch.Tensor, shown: int = 8) -> str:
    pairs = [f"{name} {w:.3g}" for name, w in zip(classes, weight.tolist(), strict=True)]
    more = f", ... ({len(pairs)} classes, {weight.min():.3g} to {weight.max():.3g})" if len(pairs) > shown else ""
    return ", ".join(pairs[:shown]) + more


def classification_step(criterion: nn.Module):
    """The train step: cross-entropy of the model's logits."""

    def step(model: nn.Module, inputs, labels: torch.Tensor) -> dict:
        ce = criterion(model(inputs).float(), labels)
        return {"loss": ce, "logged": ce, "n": len(labels)}

    return step


@torch.no_grad()
def evaluate(model: nn.Module, batches, state: TrainingState, num_classes: int, label_smoothing: float = 0.0) -> dict:
    """Metrics over the whole validation set (every rank's shard); call with the unwrapped model."""
    model.eval()
    meter = ClassificationMeter(num_classes)
    sum_criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
    for inputs, labels in batches:
        inputs = move_to(inputs, state.device, state.memory_format)
        labels = labels.to(state.device, non_blocking=True)
        with state.autocast():
            logits = model(inputs).float()
        meter.update(logits, labels, sum_criterion(logits, labels).item())
    return meter.reduce().compute()


#: Where a frozen backbone's blocks begin to train with BatchNorm in them (lp_ft's switch, gradual_unfreeze's first block).
BN_FOLLOWS_BATCHES = ("; from now on their BatchNorm layers normalise with each batch's statistics, not the ones the head "
                      "was probed on (model.freeze_bn_stats: true keeps those)")


def fit(cfg: RunConfig, reporter: Reporter, *, data: TaskData | None = None, resume_from: str | Path | Checkpoint | None = None,
        device: torch.device | None = None, checkpoints: bool = True, mirror: CheckpointMirror | None = None) -> list[dict]:
    """Train for `cfg.train.epochs` (or until early stopping), validating every `train.val_every` epochs and at the
    last; returns each epoch's metrics (val/ ones at validated epochs).

    `data` defaults to the images or text at `cfg.data.root`; `resume_from` (a checkpoint directory, or one
    already loaded) continues a run where it stopped; `checkpoints=False` reports metrics only; `mirror` copies each
    checkpoint's files to the run's storage while they are written.
    """
    device = device or default_device(cfg.scaling.use_gpu)
    if data is None:
        data = labelled_data(cfg, rank=get_rank(), world_size=get_world_size(), device=device)
    log_rank0("data: %s", data.summary())

    torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
    # A resumed run takes every weight from its checkpoint; the source weights need not exist any more.
    model_cfg = cfg.model if resume_from is None else cfg.model.model_copy(update={"weights": None})
    model = build_model(model_cfg, data.classes, cfg.data.image_size)
    state = TrainingState.create(cfg, model, device, steps_per_epoch=len(data.train))
    if resume_from is not None:
        state.load(resume_from)
    weight = class_weights(cfg.train.class_weights, data.train_counts, device)
    if weight is not None:
        log_rank0("class weights (balanced): %s", _named(data.classes, weight))
    elif unbalanced(data.train_counts):
        log_rank0("data: the classes are unbalanced; train.class_weights: balanced weighs them alike in the training loss")
    step = classification_step(nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing))
    # What the loop runs: the model on `data`, or a linear probe's head on the backbone's features computed once.
    trained = model
    if (features := probe_features(cfg, model, data, state)) is not None:
        trained, data = find_head(model)[1], features
        log_rank0("linear probe: the frozen backbone's features computed once, the head trains on them")

    history: list[dict] = []
    n_trainable, ddp_model, n_blocks = None, trained, len(backbone_blocks(model))
    # early stopping's patience counts from the strategy's last phase (lp_ft's fine-tuning, the last unfreeze)
    last_phase_blocks = trainable_blocks(cfg.model, n_blocks, cfg.train.epochs - 1)
    for epoch in state.epochs():
        trainable = apply_strategy(model, cfg.model, epoch)
        set_train_mode(model, cfg.model.freeze_bn_stats)
        if trainable != n_trainable:  # DDP must be rebuilt whenever the set of trainable parameters changes
            # a probe's head met the source's BatchNorm statistics; from here on, the batches' (lp_ft's loss jumps)
            bn_note = BN_FOLLOWS_BATCHES if n_trainable == 0 and updates_batch_norm_statistics(model) else ""
            n_trainable, ddp_model = trainable, wrap_ddp(trained, device)
            log_rank0("epoch %d: %d of %d backbone blocks trainable%s", epoch + 1, trainable, n_blocks, bn_note)
        state.begin_epoch(epoch, data)
        started = time.perf_counter()
        train_loss = state.train_epoch(ddp_model, data.train, step)
        broadcast_buffers(model)
        metrics = {"epoch": epoch + 1, "train/loss": train_loss}
        meta = {"classes": data.classes, "backbone_blocks": n_blocks}
        if state.validates(epoch):
            val = evaluate(trained, data.val, state, len(data.classes), cfg.train.label_smoothing)
            metrics.update({f"val/{k}": val[k] for k in VAL_METRICS})
            meta.update(per_class=val["per_class"], confusion_matrix=val["confusion_matrix"])
        metrics.update({"lr": state.last_lr, "epoch_time_s": time.perf_counter() - started})
        history.append(metrics)
        if state.end_epoch(epoch, metrics, meta, reporter, checkpoint=checkpoints, mirror=mirror,
                           last_phase=trainable == last_phase_blocks):
            break
    return history
