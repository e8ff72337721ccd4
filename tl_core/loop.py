"""The training loop: `train_one_epoch`, `evaluate`, and `fit`, which ties them to data, model and checkpoints.

`fit` runs the same in one process, under torchrun, or inside a Ray Train worker: the caller sets up
the process group, and metrics and checkpoints leave through `reporter(metrics, checkpoint_dir)`,
which every rank calls once per epoch (only rank 0 passes a checkpoint directory).
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from tl_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tl_core.config import EarlyStoppingConfig, RunConfig, TrainConfig
from tl_core.data import build_loaders, index_image_folder
from tl_core.distributed import (
    all_reduce_sum,
    broadcast_buffers,
    get_rank,
    get_world_size,
    is_main_process,
    log_rank0,
    unwrap,
    wrap_ddp,
)
from tl_core.metrics import ClassificationMeter
from tl_core.models import apply_strategy, build_model, normalization, set_train_mode
from tl_core.optim import build_optimizer, build_scheduler, l1_penalty

Reporter = Callable[[dict[str, float], Optional[str]], None]


class EarlyStopping:
    """Stops after `patience` epochs without an improvement of more than `min_delta` in `metric`."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.best: float | None = None
        self.bad_epochs = 0

    def step(self, value: float) -> bool:
        """Record this epoch's value; True when training should stop."""
        sign = 1.0 if self.cfg.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.cfg.min_delta:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.cfg.patience is not None and self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """`auto` is bf16 on CUDA and full precision on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
               amp_dtype: torch.dtype | None, l1: float = 0.0) -> dict[str, torch.Tensor]:
    """Forward pass and loss for one batch: {"loss": total loss, "ce": cross-entropy}."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(images)
        ce = criterion(logits.float(), labels)
    loss = ce + l1 * l1_penalty(unwrap(model)) if l1 > 0 else ce
    return {"loss": loss, "ce": ce}


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, criterion, device: torch.device,
                    amp_dtype: torch.dtype | None, cfg: TrainConfig, l1: float = 0.0, freeze_bn_stats: bool = False,
                    memory_format: torch.memory_format = torch.preserve_format) -> float:
    """One pass over the loader with gradient accumulation and clipping; returns the mean loss over all ranks."""
    set_train_mode(model, freeze_bn_stats)
    n_batches = len(loader)
    loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of per-sample loss, samples]
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        group_start = i - i % cfg.grad_accum
        group_size = min(cfg.grad_accum, n_batches - group_start)  # the last group may be short
        is_last_micro = i == group_start + group_size - 1
        sync = contextlib.nullcontext() if is_last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            out = train_step(model, images, labels, criterion, amp_dtype, l1)
            scaler.scale(out["loss"] / group_size).backward()
        if is_last_micro:
            if cfg.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        loss_sum += torch.tensor([out["ce"].item() * len(labels), len(labels)], dtype=torch.float64)
    all_reduce_sum(loss_sum)
    return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
             num_classes: int, memory_format: torch.memory_format = torch.preserve_format) -> dict:
    """Metrics over the whole validation set (every rank's shard); call with the unwrapped model."""
    model.eval()
    meter = ClassificationMeter(num_classes)
    sum_criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=criterion.label_smoothing)
    for images, labels in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).float()
        meter.update(logits, labels, sum_criterion(logits, labels).item())
    return meter.reduce().compute()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def memory_format_for(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for convolutional nets on CUDA (tensor cores read NHWC without transposes); unchanged
    on CPU and for transformers."""
    is_conv_net = sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1  # a ViT has one, its patch embedding
    return torch.channels_last if device.type == "cuda" and is_conv_net else torch.preserve_format


def default_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def fit(cfg: RunConfig, reporter: Reporter, *, resume_from: str | Path | Checkpoint | None = None,
        device: torch.device | None = None, checkpoints: bool = True) -> list[dict]:
    """Train and validate for `cfg.train.epochs` (or until early stopping); returns each epoch's metrics.

    `checkpoints=False` reports metrics only (a study cell that keeps nothing but its accuracy).

    `resume_from` (a checkpoint directory, or one already loaded) continues a run where it stopped.
    """
    device = device or default_device(cfg.scaling.use_gpu)
    rank, world_size = get_rank(), get_world_size()

    index = index_image_folder(cfg.data, seed=cfg.train.seed)
    log_rank0("data: %s", index.summary())
    mean, std = normalization(cfg.model.backbone)
    loaders = build_loaders(index, cfg.data, batch_size=cfg.train.batch_size, mean=mean, std=std, seed=cfg.train.seed,
                            rank=rank, world_size=world_size, pin_memory=device.type == "cuda")

    torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
    # A resumed run takes every weight from its checkpoint; the source weights need not exist any more.
    model_cfg = cfg.model if resume_from is None else cfg.model.model_copy(update={"weights": None})
    model = build_model(model_cfg, index.classes, cfg.data.image_size)
    memory_format = memory_format_for(model, device)
    model = model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim, backbone_lr_mult=cfg.model.backbone_lr_mult)
    steps_per_epoch = math.ceil(len(loaders.train) / cfg.train.grad_accum)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs)
    amp_dtype = amp_dtype_for(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    stopper = EarlyStopping(cfg.train.early_stopping)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    start_epoch = 0

    if resume_from is not None:
        ckpt = resume_from if isinstance(resume_from, Checkpoint) else load_checkpoint(resume_from)
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.train_state["optimizer"])
        scheduler.load_state_dict(ckpt.train_state["scheduler"])
        scaler.load_state_dict(ckpt.train_state["scaler"])
        stopper.load_state_dict(ckpt.train_state["early_stopping"])
        start_epoch = ckpt.train_state["epoch"]
        log_rank0("resumed at epoch %d", start_epoch)
        if ckpt.train_state.get("stopped_early"):
            return []

    history: list[dict] = []
    n_trainable, ddp_model = None, model
    for epoch in range(start_epoch, cfg.train.epochs):
        trainable = apply_strategy(model, cfg.model, epoch)
        if trainable != n_trainable:  # DDP must be rebuilt whenever the set of trainable parameters changes
            n_trainable, ddp_model = trainable, wrap_ddp(model, device)
            log_rank0("epoch %d: %d backbone block(s) trainable", epoch + 1, trainable)
        # Random state, in this process and in the loader workers, is a function of (seed, epoch, rank):
        # a resumed run draws exactly what an unbroken one would, on every rank, and ranks augment differently.
        seed = epoch_seed(cfg.train.seed, epoch, rank)
        seed_everything(seed)
        loaders.set_epoch(epoch, augment_seed=seed)
        started = time.perf_counter()
        train_loss = train_one_epoch(ddp_model, loaders.train, optimizer, scheduler, scaler, criterion, device,
                                     amp_dtype, cfg.train, l1=cfg.optim.l1, freeze_bn_stats=cfg.model.freeze_bn_stats,
                                     memory_format=memory_format)
        broadcast_buffers(model)
        val = evaluate(model, loaders.val, criterion, device, amp_dtype, len(index.classes), memory_format)
        metrics = {
            "epoch": epoch + 1,
            "train/loss": train_loss,
            **{f"val/{k}": val[k] for k in ("loss", "acc", "acc5", "precision", "recall", "f1")},
            "lr": optimizer.param_groups[-1]["lr"],
            "epoch_time_s": time.perf_counter() - started,
        }
        stop = stopper.step(metrics[cfg.train.early_stopping.metric])
        log_rank0("epoch %d/%d  %s", epoch + 1, cfg.train.epochs,
                  "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
        train_state = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "early_stopping": stopper.state_dict(), "epoch": epoch + 1,
            "global_step": scheduler.last_epoch, "stopped_early": stop,
        }
        meta = {"config": cfg.to_dict(), "classes": index.classes, "epoch": epoch + 1, "metrics": metrics,
                "per_class": val["per_class"], "confusion_matrix": val["confusion_matrix"]}
        if checkpoints:
            report_epoch(reporter, metrics, model, train_state, meta)
        else:
            reporter(metrics, None)
        history.append(metrics)
        if stop:
            log_rank0("early stopping: %s has not improved for %d epoch(s)", cfg.train.early_stopping.metric,
                      stopper.bad_epochs)
            break
    return history


def report_epoch(reporter: Reporter, metrics: dict, model: nn.Module, train_state: dict, meta: dict) -> None:
    """Every rank reports; rank 0 also writes the checkpoint that goes with the report."""
    if not is_main_process():
        reporter(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="tl-ckpt-") as tmp:
        path = save_checkpoint(Path(tmp) / "checkpoint", unwrap(model).state_dict(), train_state, meta)
        reporter(metrics, str(path))
