"""What Ray Train adds: a one-worker TorchTrainer's epoch time against tl_core's loop alone.

Both train the same config (resnet18 at 32 px on the digits source task) for the same epochs; the
steady-state epoch is the interval between consecutive epoch reports (train + validation + checkpoint).
Ray start-up and worker-group start-up are reported separately. Target: ratio (trainer / core) <= 1.10.

    python -m bench.trainer_overhead [--epochs 4]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time

import torch

from bench.common import digits_source, write_result
from tl_core.config import from_dict
from tl_core.loop import fit


def steady_epoch(timestamps: list[float]) -> float:
    """Mean interval between epoch reports after the first (which includes start-up)."""
    return (timestamps[-1] - timestamps[0]) / (len(timestamps) - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    storage = tempfile.mkdtemp(prefix="tl-bench-")
    cfg = from_dict({"experiment": "bench-trainer", "data": {"root": str(digits_source()), "image_size": 32, "loader_workers": 0,
                                                            "hflip": False},
                     "model": {"backbone": "resnet18"}, "optim": {"name": "sgd", "lr": 0.05},
                     "train": {"epochs": args.epochs, "batch_size": 64},
                     "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 2}},
                     "checkpoint": {"keep": None}, "storage": {"root": storage}})
    try:
        # The core loop alone, in this process, with the threads a one-worker trainer gets (2 CPUs).
        torch.set_num_threads(2)
        core_times: list[float] = []
        start = time.perf_counter()
        fit(cfg, lambda metrics, checkpoint_dir: core_times.append(time.time()))
        core_total = time.perf_counter() - start

        import ray

        from jobs.common import run_trainer

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        ray_startup = time.perf_counter() - start
        start = time.time()
        result = run_trainer(cfg)
        trainer_total = time.time() - start
        frame = result.metrics_dataframe.sort_values("epoch")
        trainer_times = list(frame["timestamp"])
        ray.shutdown()
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    core_epoch, trainer_epoch = steady_epoch(core_times), steady_epoch(trainer_times)
    write_result("trainer_overhead", {
        "setup": {"model": "resnet18", "image_size": 32, "epochs": args.epochs, "workers": 1, "cpus_per_worker": 2},
        "core_epoch_s": core_epoch, "trainer_epoch_s": trainer_epoch,
        "ratio_trainer_over_core": trainer_epoch / core_epoch, "target": "<= 1.10",
        "meets_target": trainer_epoch / core_epoch <= 1.10,
        "ray_init_s": ray_startup,
        "trainer_startup_s": trainer_times[0] - start - (trainer_times[1] - trainer_times[0]),
        "core_total_s": core_total, "trainer_total_s": trainer_total,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
