"""SimCLR: contrastive self-supervised pretraining (Chen et al., 2020) of any backbone in tl_core.models.

Two augmented views of every image go through the backbone and a projection head; the NT-Xent loss pulls
the two views of an image together and pushes them away from every other view in the *global* batch (all
DDP ranks). After pretraining the projection head is dropped: checkpoints hold the backbone, which
`model.weights` loads like any other source model (a new classifier head is initialised for the target).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from tl_core.batches import TaskData, move_to
from tl_core.checkpoint import Checkpoint
from tl_core.config import ModelConfig, PretrainConfig, RunConfig
from tl_core.data import ImageData, image_normalization, index_unlabelled, is_gpu, loaders_for, normalized_on
from tl_core.distributed import all_reduce_sum, broadcast_buffers, get_rank, get_world_size, is_distributed, log_rank0, sync_batch_norm, wrap_ddp
from tl_core.models import build_model, find_head, set_submodule, set_train_mode
from tl_core.state import CheckpointMirror, Reporter, TrainingState, default_device

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


def view_transform(image_size: int, pretrain: PretrainConfig, hflip: bool) -> v2.Compose:
    """SimCLR's augmentation, to a uint8 view: a random resized crop, a flip where the data allows it, strong colour
    jitter (most of the time) and random greyscale."""
    s = pretrain.color_jitter
    steps = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=pretrain.crop_scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if s > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(s, s, s, s / 4)], p=0.8))
    steps.append(v2.RandomGrayscale(p=0.2))
    return v2.Compose(steps)


def view_data(cfg: RunConfig, *, rank: int, world_size: int, device: torch.device | None = None) -> ImageData:
    """Unlabelled images as pairs of views: every batch full and equal on every rank (the loss needs equal
    local batches); validation views drawn from a fixed seed, so val metrics are comparable across epochs. The views
    are normalised by the loader workers, or on `device` when it is a GPU (as for labelled images)."""
    index = index_unlabelled(cfg.data, seed=cfg.train.seed)
    normalize = image_normalization(cfg)
    on_gpu = is_gpu(device)
    view = view_transform(cfg.data.image_size, cfg.pretrain, cfg.data.hflip)
    views = TwoViews(view if on_gpu else v2.Compose([view, normalize]))
    data = loaders_for(index, cfg.data, views, views, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=rank,
                       world_size=world_size, pin_memory=on_gpu, equal_batches=True)
    return normalized_on(data, normalize, device) if on_gpu else data


# ---------------------------------------------------------------- the recipe

def contrastive_step(temperature: float):
    """The train step: NT-Xent of the two views' projections, both views in one forward pass so that BatchNorm
    sees them together. `accuracy` is how often a view finds its partner."""

    def step(model: nn.Module, views: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> dict:
        z1, z2 = model(torch.cat(views)).float().chunk(2)
        nt, accuracy = nt_xent(z1, z2, temperature)
        return {"loss": nt, "logged": nt, "n": 1, "accuracy": accuracy}

    return step


def fit_simclr(cfg: RunConfig, reporter: Reporter, *, data: TaskData | None = None, resume_from: str | Checkpoint | None = None,
               device: Optional[torch.device] = None, checkpoints: bool = True, mirror: CheckpointMirror | None = None) -> list[dict]:
    """Pretrain with SimCLR for `cfg.train.epochs` (or until early stopping); every epoch reports train/loss, and
    every validated one (`train.val_every`) val/loss and val/acc (the top-1 accuracy of finding each view's partner),
    with a checkpoint of the backbone."""
    device = device or default_device(cfg.scaling.use_gpu)
    if data is None:
        data = view_data(cfg, rank=get_rank(), world_size=get_world_size(), device=device)
    log_rank0("data: %s", data.summary())

    torch.manual_seed(cfg.train.seed)
    model_cfg = cfg.model if resume_from is None else cfg.model.model_copy(update={"weights": None})
    model = build_simclr_model(model_cfg, cfg.pretrain, cfg.data.image_size)
    if is_distributed() and device.type == "cuda":
        model = sync_batch_norm(model)
    state = TrainingState.create(cfg, model.encoder, device, steps_per_epoch=len(data.train), trained=model, head="projection",
                                 extra={"projection": model.projection})
    if resume_from is not None:
        state.load(resume_from)
    ddp_model = wrap_ddp(model, device)
    step = contrastive_step(cfg.pretrain.temperature)

    history = []
    for epoch in state.epochs():
        state.begin_epoch(epoch, data)
        started = time.perf_counter()
        set_train_mode(model, cfg.model.freeze_bn_stats)
        train_loss = state.train_epoch(ddp_model, data.train, step)
        broadcast_buffers(model)
        metrics = {"epoch": epoch + 1, "train/loss": train_loss}
        if state.validates(epoch):
            val = evaluate_views(ddp_model, data.val, state, step)
            metrics.update({"val/loss": val["loss"], "val/acc": val["acc"]})
        metrics.update({"lr": state.last_lr, "epoch_time_s": time.perf_counter() - started})
        history.append(metrics)
        if state.end_epoch(epoch, metrics, {"classes": None, "method": "simclr"}, reporter, checkpoint=checkpoints, mirror=mirror):
            break
    return history


@torch.no_grad()
def evaluate_views(model: nn.Module, batches, state: TrainingState, step) -> dict:
    """Mean NT-Xent loss and partner-finding accuracy over the held-out views of every rank."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for views, labels in batches:
        with state.autocast():
            out = step(model, move_to(views, state.device, state.memory_format), labels)
        sums += torch.tensor([out["loss"].item(), out["accuracy"].item(), 1.0], dtype=torch.float64)
    all_reduce_sum(sums)
    return {"loss": (sums[0] / sums[2].clamp(min=1)).item(), "acc": (sums[1] / sums[2].clamp(min=1)).item()}
