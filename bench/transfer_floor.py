"""The transfer study's compute floor: the least time its image grids could take on this machine.

Times, on one thread, a training step per image (all weights, or a linear probe's head on a frozen backbone) and a
scoring pass per image, for each (backbone, input size) bench.transfer uses; then counts the least work each cell of
its grid does under the study's own rules: every trial of the cell's sweep reaches ASHA's first rung (grace_period
epochs, scoring the tuning images each epoch), and every seed trains the shortest budget the sweep searches and scores
the reported images once. No process start, no Tune, no checkpoint, no data loading, every core busy: a floor.

    python -m bench.transfer_floor [--trials 3] [--seeds 3] [--cores 2]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from bench.common import write_result
from bench.transfer import LP_EPOCHS, SOURCES, Cell, cell_config, cells, image_size, search_space
from bench.transfer_data import SPLITS, TEXT_TARGETS


def seconds_per_image(cell: Cell, batch: int = 16, steps: int = 4) -> tuple[float, float]:
    """(a training step, a scoring pass) per image for the cell's model and method (linear_probe or full), one
    thread, no data loading."""
    from tl_core.config import from_dict
    from tl_core.models import apply_strategy, build_model
    from tl_core.state import memory_format_for

    cfg = from_dict(cell_config(cell, Path("unused"), weights=None, seed=0))  # models only: no data is read
    classes = [str(i) for i in range(SPLITS[cell.target].classes)]
    model = build_model(cfg.model, classes, cfg.data.image_size)
    apply_strategy(model, cfg.model, 0)
    layout = memory_format_for(model, torch.device("cpu"), cfg.data.image_size)  # the layout the product trains in
    model = model.to(memory_format=layout)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size).contiguous(memory_format=layout)
    y = torch.randint(0, len(classes), (batch,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    model.train()
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    train = (time.perf_counter() - started) / (steps * batch)
    model.eval()
    with torch.no_grad():
        model(x)
        started = time.perf_counter()
        for _ in range(steps):
            model(x)
    return train, (time.perf_counter() - started) / (steps * batch)


def model_of(cell: Cell) -> tuple[str, int]:
    """What a cell's per-image costs depend on: its backbone and input size."""
    return SOURCES[cell.source][0], image_size(cell)


def floor_seconds(cell: Cell, costs: dict, trials: int, seeds: int) -> dict[str, float]:
    """The least single-core seconds the cell takes: {"sweeps": its sweep's trials to the first rung, "seeds": its
    seeds' shortest budget}; `costs`: method -> seconds per image; LP-FT's first LP_EPOCHS epochs are a probe's."""
    space = search_space(cell, trials)
    sweep_trials = space["num_samples"] * math.prod(len(v["grid"]) for v in space["space"].values() if "grid" in v)
    split = SPLITS[cell.target]
    n, tune, val = cell.labels * split.classes, split.tune * split.classes, split.val * split.classes

    def training(epochs: int) -> float:
        probe = epochs if cell.method == "linear_probe" else min(epochs, LP_EPOCHS) if cell.method == "lp_ft" else 0
        return n * (probe * costs["linear_probe"][0] + (epochs - probe) * costs["full"][0])

    rung = space["scheduler"]["grace_period"]
    tuning = sweep_trials * (training(rung) + rung * tune * costs["full"][1])
    return {"sweeps": tuning, "seeds": seeds * (training(min(space["space"]["train.epochs"]["choice"])) + val * costs["full"][1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="search.num_samples of each cell's sweep (as bench.transfer)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2, help="cores the study's runs share")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    targets = [t for t in SPLITS if t not in TEXT_TARGETS]
    grid = cells(targets, [1, 3, 10, 50], list(SOURCES), ["linear_probe", "full", "lp_ft"])
    costs: dict[tuple, dict] = {}  # (backbone, size) -> method -> (training, scoring) seconds per image
    for cell in grid:
        key = model_of(cell)
        if key not in costs:
            costs[key] = {m: seconds_per_image(Cell(cell.target, cell.source, m, cell.labels)) for m in ("linear_probe", "full")}
            for method, (train, score) in costs[key].items():
                print(f"{key[0]} at {key[1]} px, {method}: {1000 * train:.1f} ms a training image, {1000 * score:.2f} ms a "
                      "scored image", flush=True)
    floors = {c: floor_seconds(c, costs[model_of(c)], args.trials, args.seeds) for c in grid}
    per_target = {t: {part: sum(floors[c][part] for c in grid if c.target == t) / 60 for part in ("sweeps", "seeds")} for t in targets}
    write_result("transfer_floor", {
        "trials": args.trials, "seeds": args.seeds, "cores": args.cores, "cells": {t: sum(c.target == t for c in grid) for t in targets},
        "ms_per_image": {f"{b}@{px} {m}": [round(1000 * v, 2) for v in c] for (b, px), methods in costs.items() for m, c in methods.items()},
        "core_minutes": {t: {part: round(m, 1) for part, m in parts.items()} for t, parts in per_target.items()},
        "wall_minutes_floor": round(sum(m for parts in per_target.values() for m in parts.values()) / args.cores, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
