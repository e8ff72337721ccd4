"""Training throughput of tl_core's loop against a minimal hand-written PyTorch loop.

Same model (resnet18 at 32 px), same images, transforms and batch size, one process; the two loops
alternate so that drift in machine speed hits both. Target: ratio (core / minimal) >= 0.95.

    python -m bench.core_throughput [--epochs 6]
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision
from torch import nn

from bench.common import argument_parser, digits_source, write_result
from jobs.cli import count
from tl_core.config import from_dict
from tl_core.data import build_loaders, build_transforms, index_image_folder
from tl_core.loop import classification_step
from tl_core.models import build_model, normalization, set_train_mode
from tl_core.state import TrainingState


def minimal_epoch(model, loader, optimizer) -> int:
    model.train()
    seen = 0
    for images, labels in loader:
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--epochs", type=count, default=6, help="timed epochs per loop (fewer are too noisy on 2 shared cores)")
    parser.add_argument("--batch-size", type=count, default=64)
    args = parser.parse_args(argv)

    cfg = from_dict({"experiment": "bench", "data": {"root": str(digits_source()), "image_size": 32, "loader_workers": 0, "hflip": False},
                     "model": {"backbone": "resnet18"}, "optim": {"name": "sgd", "lr": 0.01, "scheduler": "cosine"},
                     "train": {"batch_size": args.batch_size, "epochs": args.epochs + 1}})
    index = index_image_folder(cfg.data, seed=0)
    mean, std = normalization("resnet18")
    loaders = build_loaders(index, cfg.data, batch_size=args.batch_size, mean=mean, std=std, seed=0)
    n_images = len(loaders.train.sampler)

    # The minimal loop: the same files and transforms through torchvision's ImageFolder and a plain DataLoader.
    transform = build_transforms(32, mean, std, train=True, augment=True, hflip=False)
    dataset = torchvision.datasets.ImageFolder(cfg.data.root, transform=transform)
    dataset.samples = dataset.imgs = list(index.train)
    plain_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)

    torch.manual_seed(0)
    core_model = build_model(cfg.model, index.classes, 32)
    plain_model = build_model(cfg.model, index.classes, 32)
    state = TrainingState.create(cfg, core_model, torch.device("cpu"), steps_per_epoch=len(loaders.train))
    step = classification_step(nn.CrossEntropyLoss())
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def core_epoch(epoch: int) -> int:
        state.begin_epoch(epoch, loaders)
        set_train_mode(core_model)
        state.train_epoch(core_model, loaders.train, step)
        return n_images

    core_epoch(0)  # warm-up: allocator, first-touch of files
    minimal_epoch(plain_model, plain_loader, plain_opt)
    core_rates, plain_rates = [], []
    for epoch in range(1, args.epochs + 1):
        for rates, run in ((core_rates, lambda epoch=epoch: core_epoch(epoch)), (plain_rates, lambda: minimal_epoch(plain_model, plain_loader, plain_opt))):
            start = time.perf_counter()
            seen = run()
            rates.append(seen / (time.perf_counter() - start))
    core, plain = statistics.median(core_rates), statistics.median(plain_rates)
    write_result("core_throughput", {
        "setup": {"model": "resnet18", "image_size": 32, "batch_size": args.batch_size, "train_images": n_images,
                  "epochs_timed": args.epochs, "torch_threads": torch.get_num_threads()},
        "core_images_per_s": core, "minimal_images_per_s": plain,
        "core_samples": core_rates, "minimal_samples": plain_rates,
        "ratio_core_over_minimal": core / plain, "target": ">= 0.95", "meets_target": core / plain >= 0.95,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
