"""Optimiser and LR-schedule factories, parameter groups, and the L1 penalty."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from tl_core.config import OptimConfig
from tl_core.models import find_head


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_mult: float, head: str | None = None,
                 layer_decay: float = 1.0) -> list[dict]:
    """(backbone | head) x (decay | no decay) groups. Norm weights and biases (ndim <= 1) get no weight decay; the
    backbone's LR is `lr * backbone_lr_mult` (discriminative LR). With `layer_decay` < 1 the backbone is split by its
    unfreezing blocks (a transformer's layers), each block's LR `layer_decay` times the one above it (layer-wise LR
    decay, as text models are usually fine-tuned).

    Frozen parameters are included too: freezing changes over a run (gradual unfreezing) but the groups,
    and so the optimiser state that a resume restores, do not.
    """
    head_name = head or find_head(model)[0]  # the ClassifierHead, unless the caller names another module
    depth: dict[int, int] = {}  # parameter -> blocks below the top one, with layer decay
    if layer_decay != 1.0:
        from tl_core.models import backbone_blocks

        blocks = backbone_blocks(model)
        depth = {id(p): len(blocks) - 1 - i for i, block in enumerate(blocks) for p in block}
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        is_head = name.startswith(head_name + ".")
        below = depth.get(id(param), 0)
        part = "head" if is_head else f"backbone.{below:03d}" if depth else "backbone"
        decay = "decay" if param.ndim > 1 else "no_decay"
        key = f"{part}/{decay}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "lr": lr * (1.0 if is_head else backbone_lr_mult * layer_decay ** below),
                "weight_decay": weight_decay if decay == "decay" else 0.0,
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=_group_order)]


def _group_order(key: str) -> tuple:
    """Backbone groups from the input up (the order without layer decay too), then the head; decay before no decay."""
    part, decay = key.split("/")
    below = int(part.split(".")[1]) if "." in part else 0
    return (part == "head", -below, decay)


def _sgd(groups, *, lr, momentum, nesterov, betas, eps, weight_decay, fused):
    # Not fused: torch's fused SGD needs a momentum buffer for every parameter or for none, and parameters that
    # gradual unfreezing (or LP-FT) starts training later have none yet.
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def _adam(groups, *, lr, momentum, nesterov, betas, eps, weight_decay, fused):
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def _adamw(groups, *, lr, momentum, nesterov, betas, eps, weight_decay, fused):
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def _adagrad(groups, *, lr, momentum, nesterov, betas, eps, weight_decay, fused):
    return torch.optim.Adagrad(groups, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused)


def _rmsprop(groups, *, lr, momentum, nesterov, betas, eps, weight_decay, fused):  # torch has no fused RMSprop
    return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay)


#: Optimizer name -> factory over parameter groups; `optim.name` is validated against these keys.
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
}


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, backbone_lr_mult: float = 1.0, head: str | None = None,
                    layer_decay: float = 1.0, fused: bool | None = None) -> Optimizer:
    """The configured optimizer over `param_groups`; its step fused where the kernels fit (`fused=None`), or as asked
    (the benchmark and the test compare the two)."""
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay, backbone_lr_mult=backbone_lr_mult, head=head,
                          layer_decay=layer_decay)
    if fused is None:
        fused = fused_kernels_fit([p for g in groups for p in g["params"]])
    return OPTIMIZERS[cfg.name](groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)


#: devices whose optimizer steps run as fused kernels (Adam, AdamW and Adagrad)
FUSED_DEVICES = ("cpu", "cuda")


def fused_kernels_fit(params: list[torch.Tensor]) -> bool:
    """Whether the optimizer step can run as one fused kernel per parameter group instead of a Python loop over
    tensors: every parameter a floating-point tensor on one device that has the kernels. On the CPU it is what a small
    model's step costs most: one thread, a ResNet-18 AdamW step took 49.5 ms looped and 9.0 ms fused (bench.optimizer_step)."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= set(FUSED_DEVICES) and all(p.is_floating_point() for p in params)


def _constant(step: int, *, total_steps: int, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float,
              min_lr_ratio: float) -> float:
    return 1.0


def _step(step: int, *, total_steps: int, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float,
          min_lr_ratio: float) -> float:
    return gamma ** (step // (step_size * steps_per_epoch))


def _cosine(step: int, *, total_steps: int, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float,
            min_lr_ratio: float) -> float:
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _onecycle(step: int, *, total_steps: int, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float,
              min_lr_ratio: float) -> float:
    """torch's OneCycleLR shape: from lr/25 up to lr over the warmup (30% of the run unless set), then cosine."""
    warmup_steps = warmup_steps or max(1, int(0.3 * total_steps))
    if step < warmup_steps:
        start = 1.0 / 25.0  # OneCycleLR's div_factor
        return start + (1.0 - start) * step / warmup_steps
    return _cosine(step, total_steps=total_steps, warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch,
                   step_size=step_size, gamma=gamma, min_lr_ratio=min_lr_ratio)


#: Schedule name -> LR multiplier after warmup, a pure function of the optimiser step (nanoGPT's get_lr).
SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": _constant,
    "step": _step,
    "cosine": _cosine,
    "onecycle": _onecycle,  # has its own warmup from lr/25
}


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int, steps_per_epoch: int,
              step_size: int = 10, gamma: float = 0.1, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at optimiser step `step` (0-based): linear warmup, then the schedule."""
    if schedule != "onecycle" and step < warmup_steps:
        return (step + 1) / warmup_steps
    return SCHEDULES[schedule](step, total_steps=total_steps, warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch,
                               step_size=step_size, gamma=gamma, min_lr_ratio=min_lr_ratio)


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int,
                    later_from_step: int | None = None, later_mult: float = 1.0) -> LambdaLR:
    """A per-optimiser-step LambdaLR over `lr_factor`; its state is one integer, so resume is exact. From
    `later_from_step` on the factor is multiplied by `later_mult` (lp_ft's lower LR once fine-tuning starts)."""
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        phase = later_mult if later_from_step is not None and step >= later_from_step else 1.0
        return phase * lr_factor(step, schedule=cfg.scheduler, total_steps=total, warmup_steps=warmup, steps_per_epoch=steps_per_epoch,
                                 step_size=cfg.step_size, gamma=cfg.gamma, min_lr_ratio=cfg.min_lr_ratio)

    return LambdaLR(optimizer, factor)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over trainable weight matrices and kernels (the parameters that get weight decay)."""
    terms = [p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim > 1]
    return torch.stack(terms).sum() if terms else torch.zeros(())
