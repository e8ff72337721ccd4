"""Sweeps: what a Tune trial costs, what ASHA saves against running every trial to max_t, and how the smarter
searchers compare on the same task and budget.

1. Per-trial overhead: the wall time of a one-epoch, one-trial sweep against the same epoch run by the core
   loop alone (`tl_core.loop.fit`), in the same process and run. Data: the demo's source task (digits 0-4).
2. On a task hard enough that configurations do not tie at 100% (bench.transfer's `shapes` target, 50 labels per
   class, its 500 reported validation images; ImageNet EfficientNet-Lite0 fine-tuned at 64 px, the study's own
   config), the same budget of --samples trials with max_t --max-t epochs for each of:
     fifo          random search, every trial to max_t (what ASHA saves against)
     asha          random search (the same sampled configurations and training seeds as fifo) + ASHA
     optuna+asha   Optuna's TPE + ASHA
     bohb          TuneBOHB + HyperBand for BOHB
   Each: epochs spent, wall time, the best val/acc, and the best val/acc reached against epochs spent (the curve,
   and the epochs each needed to come within 1 point of the best any fifo trial reached).
   Target: ASHA spends <= 40% of fifo's epochs and finds a best metric within 1 point (0.01) of fifo's.

    python -m bench.sweep_asha [--samples 24 --max-t 9] [--searchers fifo asha optuna+asha bohb] [--name sweep_asha]
                               (--name: the result's file names, bench/results/NAME.json and NAME.png)
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, argument_parser, digits_source, write_result
from jobs.analyze import summarize
from jobs.cli import count
from jobs.sweep import run_sweep
from jobs.sweep_config import SearchConfig
from tl_core.checkpoint import LocalReporter
from tl_core.config import from_dict
from tl_core.loop import fit

#: searcher name -> (search.search_alg, search.scheduler.name)
SEARCHERS = {"fifo": ("random", "fifo"), "asha": ("random", "asha"), "optuna+asha": ("optuna", "asha"), "bohb": ("bohb", "bohb")}
WITHIN = 0.01  # "within 1 point" of fifo's best


def digits_config(root: Path, experiment: str, epochs: int):
    return from_dict({
        "experiment": experiment,
        "data": {"root": str(digits_source()), "image_size": 16, "loader_workers": 0, "hflip": False},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "scheduler": "constant"},
        "train": {"epochs": epochs, "batch_size": 64},
        "scaling": {"num_workers": 1},
        "checkpoint": {"keep": 1},
        "storage": {"root": str(root)},
    })


def shapes_config(root: Path, experiment: str, epochs: int):
    """bench.transfer's cell (shapes, imagenet, full, 50 labels per class), on the reported validation images."""
    from bench.transfer import WORK, Cell, cell_config
    from bench.transfer_data import write_split, write_target

    cell = Cell("shapes", "imagenet", "full", 50)
    data = write_split("shapes", write_target(WORK / "shapes", "shapes"), WORK / "shapes" / "sweep-bench-50", 50, seed=0,
                       tuning=False)
    cfg = cell_config(cell, data, "efficientnet_lite0_imagenet", seed=0)
    cfg.update(experiment=experiment, storage={"root": str(root)})
    cfg["train"]["epochs"] = epochs
    return from_dict(cfg)


def search(samples: int, max_t: int, searcher: str) -> SearchConfig:
    search_alg, scheduler = SEARCHERS[searcher]
    return SearchConfig.model_validate({
        "num_samples": samples, "max_concurrent_trials": 2, "seed": 0, "metric": "val/acc", "mode": "max",
        "search_alg": search_alg,
        "scheduler": {"name": scheduler, "max_t": max_t, "grace_period": 1, "reduction_factor": 3},
        "space": {"optim.lr": {"loguniform": [1.0e-5, 3.0e-2]}, "train.batch_size": {"choice": [16, 32, 64]},
                  "optim.weight_decay": {"loguniform": [1.0e-4, 1.0e-1]}},
    })


def timed_sweep(cfg, spec: SearchConfig) -> dict:
    started = time.perf_counter()
    results = run_sweep(cfg, spec, resume=False)
    wall = time.perf_counter() - started
    trials = summarize(results, spec)
    return {"wall_s": round(wall, 1), "trials": len(trials), "epochs": sum(len(t.epochs) for t in trials),
            "best": max(t.best for t in trials), "curve": best_so_far(results, spec.metric)}


def best_so_far(results, metric: str) -> list[tuple[int, float]]:
    """(epochs spent by the whole sweep, the best metric any trial had reported by then), in the order the epochs
    were reported (each report carries its wall-clock timestamp)."""
    reports = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is not None and metric in frame:
            reports += [(float(t), float(v)) for t, v in zip(frame["timestamp"], frame[metric], strict=True)]
    curve, best = [], float("-inf")
    for spent, (_, value) in enumerate(sorted(reports), start=1):
        best = max(best, value)
        curve.append((spent, best))
    return curve


def epochs_to_reach(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((spent for spent, best in curve if best >= level), None)


def plot(sweeps: dict[str, dict], samples: int, max_t: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sweep in sweeps.items():
        spent, best = zip(*sweep["curve"], strict=True)
        ax.step(spent, [100 * b for b in best], where="post", label=f"{name} ({sweep['epochs']} epochs)")
    ax.set_xlabel("epochs spent by the sweep")
    ax.set_ylabel("best val accuracy so far (%)")
    ax.set_title(f"shapes, 50 labels/class, Lite0 fine-tuned: {samples} trials, max_t {max_t}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--samples", type=count, default=24)
    parser.add_argument("--max-t", type=count, default=9)
    parser.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=list(SEARCHERS))
    parser.add_argument("--name", default="sweep_asha", help="write bench/results/NAME.json and NAME.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="tl-bench-sweep-") as tmp:
            root = Path(tmp)
            one = digits_config(root, "one-trial", 1)
            started = time.perf_counter()
            fit(one, LocalReporter(root / "core"))
            core_epoch = time.perf_counter() - started
            trial = timed_sweep(one, SearchConfig.model_validate({
                "num_samples": 1, "seed": 0, "scheduler": {"name": "fifo", "max_t": 1},
                "space": {"optim.lr": {"choice": [0.01]}}}))
            overhead = {"core_loop_epoch_s": round(core_epoch, 1), "one_trial_sweep_s": trial["wall_s"],
                        "ratio": round(trial["wall_s"] / core_epoch, 2)}
            sweeps = {name: timed_sweep(shapes_config(root, name.replace("+", "-"), args.max_t), search(args.samples, args.max_t, name))
                      for name in args.searchers}
    finally:
        ray.shutdown()
    payload = {"per_trial_overhead": overhead, "sweeps": sweeps,
               "setup": {"samples": args.samples, "max_t": args.max_t, "task": "shapes, 50 labels/class, 500 val images",
                         "model": "timm:tf_efficientnet_lite0, ImageNet weights, full fine-tune, 64 px"}}
    if "fifo" in sweeps:
        full = sweeps["fifo"]
        for sweep in sweeps.values():
            sweep["epoch_fraction"] = round(sweep["epochs"] / full["epochs"], 3)
            sweep["best_gap"] = round(full["best"] - sweep["best"], 4)
            sweep["epochs_to_within_1pt"] = epochs_to_reach(sweep["curve"], full["best"] - WITHIN)
        if "asha" in sweeps:
            asha = sweeps["asha"]
            payload["asha_target"] = {"target": "epoch_fraction <= 0.40 and best_gap <= 0.01",
                                      "meets_target": asha["epoch_fraction"] <= 0.40 and asha["best_gap"] <= WITHIN}
    plot(sweeps, args.samples, args.max_t, RESULTS / f"{args.name}.png")
    write_result(args.name, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
