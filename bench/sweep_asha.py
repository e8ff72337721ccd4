"""Sweeps: what a Tune trial costs, and what ASHA saves against running every trial to max_t.

1. Per-trial overhead: the wall time of a one-epoch, one-trial sweep against the same epoch run by the core
   loop alone (`tl_core.loop.fit`), in the same process and run.
2. ASHA against FIFO on the same configurations (random search, same seed, so the same sampled values and
   the same training seed): total epochs, wall time and the best metric each finds.
   Target: ASHA spends <= 40% of the epochs and finds a best metric within 1 point (0.01) of the full run.

Data: the demo's source task (digits 0-4) at --image-size px.

    python -m bench.sweep_asha [--samples 12 --max-t 9 --image-size 16]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from bench.common import digits_source, write_result
from jobs.analyze import summarize
from jobs.sweep import run_sweep
from jobs.sweep_config import SearchConfig
from tl_core.checkpoint import LocalReporter
from tl_core.config import from_dict
from tl_core.loop import fit


def base_config(root: Path, image_size: int, experiment: str, epochs: int):
    return from_dict({
        "experiment": experiment,
        "data": {"root": str(digits_source()), "image_size": image_size, "loader_workers": 0, "hflip": False},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "scheduler": "constant"},
        "train": {"epochs": epochs, "batch_size": 64},
        "scaling": {"num_workers": 1},
        "checkpoint": {"keep": 1},
        "storage": {"root": str(root)},
    })


def search(samples: int, max_t: int, scheduler: str) -> SearchConfig:
    return SearchConfig.model_validate({
        "num_samples": samples, "max_concurrent_trials": 2, "seed": 0, "metric": "val/acc", "mode": "max",
        "scheduler": {"name": scheduler, "max_t": max_t, "grace_period": 1, "reduction_factor": 3},
        "space": {"optim.lr": {"loguniform": [1.0e-4, 3.0e-1]}, "train.batch_size": {"choice": [32, 64, 128]},
                  "optim.weight_decay": {"loguniform": [1.0e-6, 1.0e-2]}},
    })


def timed_sweep(cfg, spec: SearchConfig) -> dict:
    started = time.perf_counter()
    results = run_sweep(cfg, spec, resume=False)
    wall = time.perf_counter() - started
    trials = summarize(results, spec)
    return {"wall_s": wall, "trials": len(trials), "epochs": sum(t.epochs[-1] for t in trials),
            "best": max(t.best for t in trials)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--max-t", type=int, default=9)
    parser.add_argument("--image-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="tl-bench-sweep-") as tmp:
            root = Path(tmp)
            one = base_config(root, args.image_size, "one-trial", 1)
            started = time.perf_counter()
            fit(one, LocalReporter(root / "core"))
            core_epoch = time.perf_counter() - started
            trial = timed_sweep(one, search(1, 1, "fifo"))
            overhead = {"core_loop_epoch_s": core_epoch, "one_trial_sweep_s": trial["wall_s"],
                        "ratio": trial["wall_s"] / core_epoch}

            asha = timed_sweep(base_config(root, args.image_size, "asha", args.max_t), search(args.samples, args.max_t, "asha"))
            full = timed_sweep(base_config(root, args.image_size, "full", args.max_t), search(args.samples, args.max_t, "fifo"))
    finally:
        ray.shutdown()
    comparison = {"asha": asha, "full": full, "epoch_fraction": asha["epochs"] / full["epochs"],
                  "wall_fraction": asha["wall_s"] / full["wall_s"], "best_gap": full["best"] - asha["best"],
                  "target": "epoch_fraction <= 0.40 and best_gap <= 0.01"}
    comparison["meets_target"] = comparison["epoch_fraction"] <= 0.40 and comparison["best_gap"] <= 0.01
    write_result("sweep_asha", {"per_trial_overhead": overhead, "asha_vs_full": comparison,
                                "setup": {"samples": args.samples, "max_t": args.max_t, "image_size": args.image_size}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
