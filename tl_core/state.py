"""The training state every recipe shares, defined once (torchtune's named checkpoint keys are the model).

`TrainingState` owns the model, optimizer, scheduler, grad scaler, epoch, global step and early-stopping
state; it saves and restores them under the names in `StateKey`, runs the optimizer step (gradient
accumulation, clipping, AMP) and closes every epoch the same way (divergence check, early stopping, log
line, report with a checkpoint). The recipes (`tl_core.loop.fit`, `tl_core.simclr.fit_simclr`) build one
and read top to bottom around it.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from tl_core.batches import TaskData, move_to
from tl_core.checkpoint import Checkpoint, Mirror, load_checkpoint, save_checkpoint, staging_dir
from tl_core.config import EarlyStoppingConfig, RunConfig
from tl_core.distributed import all_reduce_sum, get_rank, is_main_process, log_rank0, unwrap
from tl_core.errors import ConfigError, TrainingDiverged
from tl_core.metrics import uninformative
from tl_core.models import checkpoint_files
from tl_core.optim import build_optimizer, build_scheduler, l1_penalty

#: `reporter(metrics, checkpoint_dir)`: every rank calls it once per epoch; only rank 0 passes a directory.
Reporter = Callable[[dict[str, float], Optional[str]], None]
#: (epoch) -> where the files of that epoch's checkpoint are copied while they are written (`Mirror`), or None.
CheckpointMirror = Callable[[int], Optional[Mirror]]
#: A train step: (model, inputs, labels) -> {"loss": tensor to minimise, "logged": tensor to average, "n": weight};
#: the optimizer step adds `optim.l1`'s penalty to "loss" for every recipe.
StepFn = Callable[[nn.Module, object, torch.Tensor], dict]


class StateKey:
    """The keys of train_state.pt. Modules trained beside the model (SimCLR's projection) add their own."""

    OPTIMIZER = "optimizer"
    SCHEDULER = "scheduler"
    SCALER = "scaler"
    EARLY_STOPPING = "early_stopping"
    EPOCH = "epoch"
    GLOBAL_STEP = "global_step"
    STOPPED_EARLY = "stopped_early"


class EarlyStopping:
    """Stops after `patience` epochs without an improvement of more than `min_delta` in `metric`; an epoch that
    `step` is told not to count can set a new best but never brings the stop nearer."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.best: float | None = None
        self.bad_epochs = 0

    def step(self, value: float, counts: bool = True) -> bool:
        """Record this epoch's value; True when training should stop."""
        sign = 1.0 if self.cfg.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.cfg.min_delta:
            self.best, self.bad_epochs = value, 0
        elif counts:
            self.bad_epochs += 1
        return self.cfg.patience is not None and self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


# ---------------------------------------------------------------- where and how a recipe computes

def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """`auto` is bf16 on CUDA and full precision on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def default_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu and torch.cuda.is_available() else torch.device("cpu")


#: the smallest input side at which channels_last pays on the CPU (bench.memory_format, one thread: a ResNet-18
#: training step at 32 px took 1.1-1.2x its contiguous time, at 64 px 0.95x)
CPU_CHANNELS_LAST_FROM_PX = 64


def memory_format_for(model: nn.Module, device: torch.device, image_size: int) -> torch.memory_format:
    """channels_last for convolutional nets, whose kernels read NHWC without transposes: always on CUDA (tensor
    cores), on the CPU (oneDNN) from CPU_CHANNELS_LAST_FROM_PX (EfficientNet-Lite0 at 128 px trained in 0.65 of its
    contiguous time, ResNet-50 at 160 px in 0.86); unchanged for transformers."""
    is_conv_net = sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1  # a ViT has one, its patch embedding
    pays = device.type == "cuda" or image_size >= CPU_CHANNELS_LAST_FROM_PX
    return torch.channels_last if is_conv_net and pays else torch.preserve_format


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_009 + rank) % 2**63


# ---------------------------------------------------------------- the state

@dataclass
class TrainingState:
    """Everything a recipe trains and checkpoints. `model` is what model.pt holds; `extra` are modules trained
    with it whose weights live in train_state.pt only (for resume), e.g. SimCLR's projection head."""

    cfg: RunConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stopper: EarlyStopping
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    extra: dict[str, nn.Module] = field(default_factory=dict)
    epoch: int = 0  # epochs completed
    stopped_early: bool = False
    last_lr: float = 0.0  # the head's LR at the last optimizer step: an epoch's reported "lr"

    @classmethod
    def create(cls, cfg: RunConfig, model: nn.Module, device: torch.device, *, steps_per_epoch: int,
               trained: nn.Module | None = None, head: str | None = None, extra: dict[str, nn.Module] | None = None) -> TrainingState:
        """Move `trained` (the module the optimizer updates; `model` unless a recipe wraps it) to `device` and
        build its optimizer (head named `head`, else the ClassifierHead), scheduler and scaler."""
        trained = trained if trained is not None else model
        memory_format = memory_format_for(trained, device, cfg.data.image_size)
        trained.to(device, memory_format=memory_format)
        optimizer = build_optimizer(trained, cfg.optim, backbone_lr_mult=cfg.model.backbone_lr_mult, head=head,
                                    layer_decay=cfg.model.layer_decay)
        optimizer_steps = math.ceil(steps_per_epoch / cfg.train.grad_accum)
        lp_ft = cfg.model.strategy == "lp_ft"
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=optimizer_steps, epochs=cfg.train.epochs,
                                    later_from_step=cfg.model.lp_epochs * optimizer_steps if lp_ft else None,
                                    later_mult=cfg.model.ft_lr_mult)
        amp_dtype = amp_dtype_for(cfg.train.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        return cls(cfg, model, optimizer, scheduler, scaler, EarlyStopping(cfg.train.early_stopping), device,
                   amp_dtype, memory_format, extra or {})

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """train_state.pt: the optimizer, schedule, scaler, counters and early stopping under `StateKey` names."""
        return {
            StateKey.OPTIMIZER: self.optimizer.state_dict(),
            StateKey.SCHEDULER: self.scheduler.state_dict(),
            StateKey.SCALER: self.scaler.state_dict(),
            StateKey.EARLY_STOPPING: self.stopper.state_dict(),
            StateKey.EPOCH: self.epoch,
            StateKey.GLOBAL_STEP: self.scheduler.last_epoch,
            StateKey.STOPPED_EARLY: self.stopped_early,
            **{name: module.state_dict() for name, module in self.extra.items()},
        }

    def load(self, checkpoint: str | Path | Checkpoint) -> None:
        """Continue from `checkpoint` (a directory, or one already loaded and verified)."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        state = ckpt.train_state
        self.model.load_state_dict(ckpt.model_state)
        for name, module in self.extra.items():
            module.load_state_dict(state[name])
        configured = [(group.get("initial_lr", group["lr"]), group.get("weight_decay", 0.0)) for group in self.optimizer.param_groups]
        if (saved := len(state[StateKey.OPTIMIZER]["param_groups"])) != len(configured):
            # preflight names this first where the checkpoint counted its blocks (meta's backbone_blocks)
            raise ConfigError(f"--resume: the checkpoint's optimizer keeps {saved} parameter groups and this config builds "
                              f"{len(configured)} (model.layer_decay keeps one per backbone block, and {self.cfg.model.backbone}'s "
                              "blocks may be grouped differently now); start a new experiment from one of its checkpoints "
                              "(model.weights)")
        self.optimizer.load_state_dict(state[StateKey.OPTIMIZER])
        self.scheduler.load_state_dict(state[StateKey.SCHEDULER])
        self._apply_configured_hyperparameters(configured)
        self.scaler.load_state_dict(state[StateKey.SCALER])
        if StateKey.EARLY_STOPPING in state:  # absent from SimCLR checkpoints written before it had early stopping
            self.stopper.load_state_dict(state[StateKey.EARLY_STOPPING])
        self.epoch = state[StateKey.EPOCH]
        self.stopped_early = bool(state.get(StateKey.STOPPED_EARLY, False))
        log_rank0("resumed at epoch %d", self.epoch)

    def _apply_configured_hyperparameters(self, configured: list[tuple[float, float]]) -> None:
        """After a resume, each group's base LR and weight decay are this run's config's, not the checkpoint's: the
        same when a run simply continues; new ones when population-based training (or a user) changed them."""
        self.scheduler.base_lrs = [lr for lr, _ in configured]
        for group, (lr, weight_decay), factor in zip(self.optimizer.param_groups, configured, self.scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["weight_decay"] = lr, weight_decay
            group["lr"] = lr * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ------------------------------------------------------------ the epoch

    def epochs(self) -> Iterator[int]:
        """The epochs left to train (0-based), nothing when the run had already stopped early."""
        if self.stopped_early:
            return iter(())
        return iter(range(self.epoch, self.cfg.train.epochs))

    def begin_epoch(self, epoch: int, data: TaskData) -> None:
        """Random state, in this process and in the loader workers, is a function of (seed, epoch, rank):
        a resumed run draws exactly what an unbroken one would, on every rank, and ranks draw differently."""
        seed = epoch_seed(self.cfg.train.seed, epoch, get_rank())
        seed_everything(seed)
        data.set_epoch(epoch, seed)

    def validates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) is scored on the validation data: every `train.val_every`-th and the last."""
        done = epoch + 1
        return done % self.cfg.train.val_every == 0 or done == self.cfg.train.epochs

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def train_epoch(self, model: nn.Module, batches: Iterable, step: StepFn) -> float:
        """One pass with gradient accumulation, clipping and AMP; `model` is the (DDP-wrapped) trained module.
        Returns the mean of the steps' `logged` values over every rank, weighted by their `n`."""
        grad_accum = self.cfg.train.grad_accum
        n_batches = len(batches)
        sums = torch.zeros(2, dtype=torch.float64)  # [sum of logged x n, sum of n]
        self.optimizer.zero_grad(set_to_none=True)
        for i, (inputs, labels) in enumerate(batches):
            inputs = move_to(inputs, self.device, self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            group_start = i - i % grad_accum
            group_size = min(grad_accum, n_batches - group_start)  # the last group may be short
            is_last_micro = i == group_start + group_size - 1
            sync = contextlib.nullcontext() if is_last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with self.autocast():
                    out = step(model, inputs, labels)
                loss = out["loss"] + self.cfg.optim.l1 * l1_penalty(unwrap(model)) if self.cfg.optim.l1 > 0 else out["loss"]
                self.scaler.scale(loss / group_size).backward()
            if is_last_micro:
                self.optimizer_step(model)
            sums += torch.tensor([out["logged"].item() * out["n"], out["n"]], dtype=torch.float64)
        all_reduce_sum(sums)
        return (sums[0] / sums[1].clamp(min=1)).item()

    def optimizer_step(self, model: nn.Module) -> None:
        self.last_lr = self.optimizer.param_groups[-1]["lr"]  # the rate this step uses; the scheduler then moves on
        if self.cfg.train.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], self.cfg.train.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # fp16's GradScaler skips the optimizer step whose gradients overflowed (its first steps find the scale);
            # the schedule still advances, as torch's AMP recipe has it, and torch warns as if the order were wrong.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
            self.scheduler.step()

    def end_epoch(self, epoch: int, metrics: dict, meta: dict, reporter: Reporter, *, checkpoint: bool = True,
                  mirror: CheckpointMirror | None = None, last_phase: bool = True) -> bool:
        """Record epoch `epoch` (0-based): refuse a diverged loss, step early stopping (when `metrics` has its metric;
        its patience counts only epochs in the strategy's `last_phase`: a plateau of lp_ft's probe does not end the run
        before it fine-tunes), log, report every rank's metrics (rank 0 with a checkpoint every `checkpoint.every` epochs, at the last and at
        an early stop, unless
        `checkpoint` is False; its files copied to `mirror(epoch + 1)` while they are written, when given). True when
        training should stop."""
        for name in ("train/loss", "val/loss"):
            if name in metrics and not math.isfinite(metrics[name]):
                raise TrainingDiverged(f"epoch {epoch + 1}: {name} is {metrics[name]}; lower optim.lr or set train.clip_grad_norm")
        self.epoch = epoch + 1
        watched = self.cfg.train.early_stopping.metric
        if watched in metrics:  # a val/ metric is measured at validated epochs only (train.val_every)
            self.stopped_early = self.stopper.step(metrics[watched], counts=last_phase)
        n_classes = len(meta["classes"] or ())
        log_rank0("epoch %d/%d  %s", epoch + 1, self.cfg.train.epochs, "  ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch" and not uninformative(k, n_classes)))
        due = self.epoch % self.cfg.checkpoint.every == 0 or self.epoch == self.cfg.train.epochs or self.stopped_early
        if checkpoint and due and is_main_process():
            with staging_dir() as tmp:
                meta = {"config": self.cfg.to_dict(), "epoch": self.epoch, "metrics": metrics, **meta}
                path = save_checkpoint(tmp / "checkpoint", self.model.state_dict(), self.state_dict(), meta,
                                       files=checkpoint_files(self.cfg.model), mirror=mirror(self.epoch) if mirror else None)
                reporter(metrics, str(path))
        else:
            reporter(metrics, None)
        if self.stopped_early:
            log_rank0("early stopping: %s has not improved for %d epoch(s)", self.cfg.train.early_stopping.metric,
                      self.stopper.bad_epochs)
        return self.stopped_early
