"""The few places the core touches torch.distributed. The caller sets up the process group."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("tl_core")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def log_rank0(msg: str, *args) -> None:
    if is_main_process():
        logger.info(msg, *args)


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL (Ray Train's backend for GPU workers) reduces CUDA tensors
    only, and refuses a CPU tensor ("No backend type associated with device type cpu"); gloo reduces CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` (on any device) over all ranks in place (a no-op in a single process)."""
    if is_distributed():
        # gloo has no all-reduce for int64 on every build path we care about; doubles are exact to 2**53.
        work = tensor.to(collective_device(), torch.float64, copy=True)
        dist.all_reduce(work)
        tensor.copy_(work)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), so that evaluation uses the checkpointed model."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """The model with BatchNorm statistics taken over the global batch: each BatchNorm layer made a SyncBatchNorm, and
    timm's BatchNormAct2d (a BatchNorm, then its activation: EfficientNet's, RegNet's) timm's SyncBatchNormAct.
    torch's own converter makes the latter a plain SyncBatchNorm, which never calls the activation it keeps."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the parameters that currently require grad; the bare model in a single process.

    DDP fixes its set of synchronised parameters at construction, so callers wrap again whenever
    they change which parameters are trainable (gradual unfreezing).
    """
    if not is_distributed():
        return model
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
