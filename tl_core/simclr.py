"""SimCLR: contrastive self-supervised pretraining (Chen et al., 2020) of any backbone in tl_core.models.

Two augmented views of every image go through the backbone and a projection head; the NT-Xent loss pulls
the two views of an image together and pushes them away from every other view in the *global* batch (all
DDP ranks). After pretraining the projection head is dropped: checkpoints hold the backbone, which
`model.weights` loads like any other source model (a new classifier head is initialised for the target).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from tl_core.checkpoint import Checkpoint, load_checkpoint
from tl_core.config import ModelConfig, PretrainConfig, RunConfig
from tl_core.data import ImageListDataset, SeededSampler, ShardSampler, index_unlabelled
from tl_core.distributed import all_reduce_sum, broadcast_buffers, get_rank, get_world_size, is_distributed, log_rank0, unwrap, wrap_ddp
from tl_core.loop import amp_dtype_for, default_device, epoch_seed, memory_format_for, report_epoch, seed_everything
from tl_core.models import build_model, find_head, normalization, set_submodule
from tl_core.optim import build_optimizer, build_scheduler

# ---------------------------------------------------------------- the loss

def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order; the gradient flows back into this rank's own part only
    (the other ranks' parts are constants here, as in SimCLR's cross-replica concatenation)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent over the global batch, for this rank's anchors: (mean loss, top-1 accuracy of finding the
    positive among all 2N - 1 other views). z1[i] and z2[i] are the two views of image i; local batches must
    have the same size on every rank."""
    n_local = z1.shape[0]
    rank = get_rank()
    z = torch.cat([gather_with_local_grad(F.normalize(z1.float(), dim=1)), gather_with_local_grad(F.normalize(z2.float(), dim=1))])
    n = z.shape[0] // 2  # images in the global batch
    # This rank's anchors: its rows of the first views, then of the second views.
    local = torch.arange(rank * n_local, (rank + 1) * n_local, device=z.device)
    anchors = torch.cat([local, local + n])
    positives = torch.cat([local + n, local])
    logits = z[anchors] @ z.T / temperature
    logits[torch.arange(len(anchors), device=z.device), anchors] = float("-inf")  # a view is not its own pair
    loss = F.cross_entropy(logits, positives)
    accuracy = (logits.argmax(dim=1) == positives).float().mean()
    return loss, accuracy


# ---------------------------------------------------------------- the model

class SimCLRModel(nn.Module):
    """A backbone whose classifier head is replaced by nothing (it emits features), and a projection MLP."""

    def __init__(self, encoder: nn.Module, feature_dim: int, hidden: int, out: int):
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


def build_simclr_model(model_cfg: ModelConfig, pretrain: PretrainConfig, image_size: int) -> SimCLRModel:
    """The configured backbone (source weights loaded if any) without its head, plus the projection head."""
    encoder = build_model(model_cfg, ["_", "_"], image_size)
    head_name, head = find_head(encoder)
    set_submodule(encoder, head_name, nn.Identity())
    return SimCLRModel(encoder, head.linear.in_features, pretrain.projection_hidden, pretrain.projection_dim)


# ---------------------------------------------------------------- the views

class TwoViews:
    """Two independent draws of `transform` of the same image."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def view_transform(image_size: int, mean, std, pretrain: PretrainConfig, hflip: bool) -> v2.Compose:
    """SimCLR's augmentation: a random resized crop, a flip where the data allows it, strong colour jitter
    (most of the time) and random greyscale."""
    s = pretrain.color_jitter
    steps = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=pretrain.crop_scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if s > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(s, s, s, s / 4)], p=0.8))
    steps += [v2.RandomGrayscale(p=0.2), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def build_view_loaders(cfg: RunConfig, index, mean, std, rank: int, world_size: int, pin_memory: bool):
    """Train: shuffled, sharded like DistributedSampler, every batch full (the loss needs equal local batches).
    Val: the same two-view augmentation drawn from a fixed seed, so val metrics are comparable across epochs."""
    views = TwoViews(view_transform(cfg.data.image_size, mean, std, cfg.pretrain, cfg.data.hflip))
    common = dict(num_workers=cfg.data.loader_workers, pin_memory=pin_memory, persistent_workers=cfg.data.loader_workers > 0)
    train_set = ImageListDataset(index.train, views)
    train_sampler = SeededSampler(DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed))
    batch = min(cfg.train.batch_size, len(train_sampler))
    train = DataLoader(train_set, batch_size=batch, sampler=train_sampler, drop_last=True, **common)
    n_val = len(index.val) // world_size * world_size  # equal shards
    val_sampler = SeededSampler(ShardSampler(n_val, rank, world_size))
    val_sampler.augment_seed = cfg.train.seed + 1
    val = DataLoader(ImageListDataset(index.val, views), batch_size=min(2 * batch, max(len(val_sampler), 2)),
                     sampler=val_sampler, drop_last=True, **common)
    return train, val, train_sampler


# ---------------------------------------------------------------- the loop

def fit_simclr(cfg: RunConfig, reporter, *, resume_from: str | Checkpoint | None = None,
               device: Optional[torch.device] = None) -> list[dict]:
    """Pretrain with SimCLR for `cfg.train.epochs`; every epoch reports train/loss, val/loss and val/acc (the
    top-1 accuracy of finding each view's partner) with a checkpoint of the backbone."""
    device = device or default_device(cfg.scaling.use_gpu)
    rank, world_size = get_rank(), get_world_size()
    index = index_unlabelled(cfg.data, seed=cfg.train.seed)
    log_rank0("data: %s", index.summary())
    mean, std = normalization(cfg.model.backbone)
    train_loader, val_loader, train_sampler = build_view_loaders(cfg, index, mean, std, rank, world_size, device.type == "cuda")

    torch.manual_seed(cfg.train.seed)
    model_cfg = cfg.model if resume_from is None else cfg.model.model_copy(update={"weights": None})
    model = build_simclr_model(model_cfg, cfg.pretrain, cfg.data.image_size)
    memory_format = memory_format_for(model, device)
    model = model.to(device, memory_format=memory_format)
    if is_distributed() and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the global batch
    optimizer = build_optimizer(model, cfg.optim, backbone_lr_mult=cfg.model.backbone_lr_mult, head="projection")
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=len(train_loader), epochs=cfg.train.epochs)
    amp_dtype = amp_dtype_for(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch = 0
    if resume_from is not None:
        ckpt = resume_from if isinstance(resume_from, Checkpoint) else load_checkpoint(resume_from)
        model.encoder.load_state_dict(ckpt.model_state)
        model.projection.load_state_dict(ckpt.train_state["projection"])
        optimizer.load_state_dict(ckpt.train_state["optimizer"])
        scheduler.load_state_dict(ckpt.train_state["scheduler"])
        scaler.load_state_dict(ckpt.train_state["scaler"])
        start_epoch = ckpt.train_state["epoch"]
        log_rank0("resumed at epoch %d", start_epoch)
    ddp_model = wrap_ddp(model, device)

    def step(images: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = (x.to(device, non_blocking=True, memory_format=memory_format) for x in images)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            z = ddp_model(torch.cat([x1, x2]))  # one pass: BatchNorm sees both views together
        z1, z2 = z.float().chunk(2)
        return nt_xent(z1, z2, cfg.pretrain.temperature)

    history = []
    for epoch in range(start_epoch, cfg.train.epochs):
        seed = epoch_seed(cfg.train.seed, epoch, rank)
        seed_everything(seed)
        train_sampler.sampler.set_epoch(epoch)
        train_sampler.augment_seed = seed
        started = time.perf_counter()
        model.train()
        sums = torch.zeros(2, dtype=torch.float64)
        for images, _ in train_loader:
            loss, _ = step(images)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            sums += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        all_reduce_sum(sums)
        broadcast_buffers(model)
        model.eval()
        val = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for images, _ in val_loader:
                loss, acc = step(images)
                val += torch.tensor([loss.item(), acc.item(), 1.0], dtype=torch.float64)
        all_reduce_sum(val)
        metrics = {"epoch": epoch + 1, "train/loss": (sums[0] / sums[1].clamp(min=1)).item(),
                   "val/loss": (val[0] / val[2].clamp(min=1)).item(), "val/acc": (val[1] / val[2].clamp(min=1)).item(),
                   "lr": optimizer.param_groups[-1]["lr"], "epoch_time_s": time.perf_counter() - started}
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(f"epoch {epoch + 1}: the contrastive loss is {metrics['train/loss']}; lower optim.lr")
        log_rank0("epoch %d/%d  %s", epoch + 1, cfg.train.epochs,
                  "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
        bare = unwrap(model)
        train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                       "global_step": scheduler.last_epoch, "projection": bare.projection.state_dict()}
        meta = {"config": cfg.to_dict(), "classes": None, "method": "simclr", "epoch": epoch + 1, "metrics": metrics}
        report_epoch(reporter, metrics, bare.encoder, train_state, meta)
        history.append(metrics)
    return history
