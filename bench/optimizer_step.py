"""The optimizer step, fused (what tl_core.optim builds) against torch's default loop over tensors.

For each optimizer the product fuses and each model the transfer study trains, one thread, the same gradients:
seconds per `step()`. Target: fused / looped <= 0.5 for AdamW on ResNet-18, the study's most common cell.

    python -m bench.optimizer_step [--steps 10]
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import argument_parser, write_result
from jobs.cli import count
from tl_core.config import ModelConfig, OptimConfig
from tl_core.models import build_model
from tl_core.optim import OPTIMIZERS, build_optimizer

MODELS = {"resnet18": 32, "timm:tf_efficientnet_lite0": 128}


def seconds_per_step(optimizer: torch.optim.Optimizer, steps: int) -> float:
    optimizer.step()  # state allocated
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--steps", type=count, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for backbone, size in MODELS.items():
        model = build_model(ModelConfig(backbone=backbone), ["a", "b"], size)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for name in OPTIMIZERS:
            fused = build_optimizer(model, OptimConfig(name=name))  # what the product builds
            if not fused.defaults.get("fused"):
                continue  # rmsprop: torch has no fused kernel
            looped = build_optimizer(model, OptimConfig(name=name), fused=False)
            f, loop = seconds_per_step(fused, args.steps), seconds_per_step(looped, args.steps)
            results[f"{backbone} {name}"] = {"fused_ms": round(1000 * f, 2), "looped_ms": round(1000 * loop, 2), "ratio": round(f / loop, 3)}
    ratio = results["resnet18 adamw"]["ratio"]
    write_result("optimizer_step", {"torch_threads": 1, "steps": args.steps, "results": results,
                                    "target": "resnet18 adamw fused/looped <= 0.5", "meets_target": ratio <= 0.5})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
