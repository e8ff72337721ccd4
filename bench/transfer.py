"""The transfer-learning study: target accuracy against labels per class, pretrained against scratch.

Source task: digits 0-4 (scikit-learn's bundled UCI digits, ~900 images). Target task: digits 5-9, a fixed
validation set of VAL_PER_CLASS images per digit, and training sets of 1, 3, 10 or 50 labels per digit (or all
the rest), drawn per seed. Methods, resnet18 at 32 px:

    scratch          random initialisation, every layer trained
    linear_probe     the supervised source model frozen, a new linear head trained
    finetune         the supervised source model, every layer trained (see cell_config for the recipe)
    simclr_finetune  the same recipe from a SimCLR model pretrained on the source images without their labels

The two source models are pretrained once; every (method, labels, seed) cell is a Ray task, so the cells run in
parallel on the cluster (`ray job submit -- python -m bench.transfer`, or locally with a Ray it starts). Writes
bench/results/transfer.json (one row per cell), transfer.png and transfer.md, and the table into README.md.

    python -m bench.transfer [--seeds 3] [--labels 1 3 10 50]     (0 = all labels)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS

IMAGE_SIZE = 32
VAL_PER_CLASS = 20
METHODS = ("scratch", "linear_probe", "finetune", "simclr_finetune")
README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_START, TABLE_END = "<!-- transfer-table -->", "<!-- /transfer-table -->"


# ---------------------------------------------------------------- data (written per task: nothing is shared)

def write_study_data(root: Path, task: str, labels_per_class: int = 0, seed: int = 0) -> Path:
    """`task` "source": ROOT/source, digits 0-4. "target": ROOT/target/{train,val}, digits 5-9 (val fixed,
    train drawn by `seed`, `labels_per_class` 0 = all)."""
    from tl_core.demo_data import load_digits_by_class, save_digit

    digits, by_digit = load_digits_by_class()
    save = lambda folder, i: save_digit(digits, i, folder)  # noqa: E731
    for digit, indices in sorted(by_digit.items()):
        if (digit < 5) != (task == "source"):
            continue
        if task == "source":
            for i in indices:
                save(root / "source" / str(digit), i)
            continue
        pool = indices[:]
        random.Random(1000 + digit).shuffle(pool)  # the validation set never depends on the seed
        val, rest = pool[:VAL_PER_CLASS], pool[VAL_PER_CLASS:]
        random.Random(seed * 100 + digit).shuffle(rest)
        for i in val:
            save(root / "target" / "val" / str(digit), i)
        for i in rest[:labels_per_class] if labels_per_class else rest:
            save(root / "target" / "train" / str(digit), i)
    return root / task


# ---------------------------------------------------------------- configs

def base_config(data_root: Path, seed: int) -> dict:
    return {
        "experiment": "transfer",
        "data": {"root": str(data_root), "image_size": IMAGE_SIZE, "augment": True, "hflip": False, "loader_workers": 0,
                 "val_fraction": 0.2},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4, "scheduler": "cosine"},
        "train": {"epochs": 12, "batch_size": 32, "seed": seed},
        "scaling": {"num_workers": 1},
    }


def cell_config(method: str, data_root: Path, weights: str | None, labels_per_class: int, seed: int) -> dict:
    """The recipe of one cell. Few labels get more epochs (an epoch is one or two steps) and, when fine-tuning,
    the source's BatchNorm statistics kept and the backbone at 0.3 x the head's LR (re-estimating the statistics
    from a few dozen images hurt at every few-shot count tried); 50+ labels fine-tune like scratch trains."""
    cfg = base_config(data_root, seed)
    many = labels_per_class == 0 or labels_per_class >= 50
    cfg["train"] = {"epochs": 8 if many else 40 if labels_per_class <= 3 else 20, "batch_size": 16, "seed": seed}
    if method == "scratch":
        cfg["optim"]["lr"] = 0.01  # 0.05 diverges without a source model
    elif method == "linear_probe":
        cfg["model"] = {"backbone": "resnet18", "weights": weights, "strategy": "linear_probe"}
        cfg["optim"].update(lr=0.05, weight_decay=0.0)
    elif many:  # finetune, simclr_finetune
        cfg["model"] = {"backbone": "resnet18", "weights": weights, "strategy": "full"}
        cfg["optim"]["lr"] = 0.01
    else:
        cfg["model"] = {"backbone": "resnet18", "weights": weights, "strategy": "full", "backbone_lr_mult": 0.3,
                        "freeze_bn_stats": True}
        cfg["optim"]["lr"] = 0.02
    return cfg


# ---------------------------------------------------------------- Ray tasks

def pretrain(method: str) -> tuple[dict, dict]:
    """The source model's backbone (a state dict), and a summary: its last epoch's metrics and the time taken."""
    import torch

    from tl_core.checkpoint import LocalReporter, load_checkpoint
    from tl_core.config import from_dict
    from tl_core.loop import fit
    from tl_core.models import build_model, find_head
    from tl_core.simclr import fit_simclr

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tl-transfer-") as tmp:
        source = write_study_data(Path(tmp) / "data", "source")
        cfg = base_config(source, seed=0)
        cfg["optim"]["warmup_epochs"] = 1
        if method == "simclr":
            cfg["pretrain"] = {"method": "simclr", "temperature": 0.2, "crop_scale": [0.5, 1.0]}
            cfg["train"] = {"epochs": 15, "batch_size": 128, "seed": 0}
            cfg["optim"].update(lr=0.3, weight_decay=1.0e-6)
        reporter = LocalReporter(Path(tmp) / "run")
        started = time.perf_counter()
        history = (fit_simclr if method == "simclr" else fit)(from_dict(cfg), reporter, device=torch.device("cpu"))
        state = load_checkpoint(reporter.latest).model_state
        # The backbone only: a head trained on digits 0-4 has the target's shape but the wrong classes.
        head = find_head(build_model(from_dict(cfg).model, ["_"] * 5, IMAGE_SIZE))[0]
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    return state, {"final": history[-1], "seconds": time.perf_counter() - started}


def run_cell(method: str, labels_per_class: int, seed: int, weights_state) -> dict:
    """One (method, labels per class, seed): train on the target subset, return the final epoch's val/acc."""
    import torch

    from tl_core.config import from_dict
    from tl_core.loop import fit

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tl-transfer-") as tmp:
        target = write_study_data(Path(tmp) / "data", "target", labels_per_class, seed)
        weights = None
        if weights_state is not None:
            weights = str(Path(tmp) / "source.pt")
            torch.save(weights_state, weights)
        cfg = from_dict(cell_config(method, target, weights, labels_per_class, seed))
        started = time.perf_counter()
        history = fit(cfg, lambda metrics, checkpoint_dir: None, device=torch.device("cpu"), checkpoints=False)
    return {"method": method, "labels_per_class": labels_per_class or "all", "seed": seed,
            "val_acc": history[-1]["val/acc"], "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- report

def summarise(rows: list[dict], labels: list) -> dict:
    table = {}
    for method in METHODS:
        for n in labels:
            accs = [r["val_acc"] for r in rows if r["method"] == method and r["labels_per_class"] == n]
            if accs:
                table[(method, n)] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0)
    return table


def markdown(table: dict, labels: list, seeds: int, minutes: float) -> str:
    head = "| method | " + " | ".join(f"{n} / class" if n != "all" else "all labels" for n in labels) + " |"
    lines = [head, "|---|" + "---:|" * len(labels)]
    for method in METHODS:
        cells = [f"{100 * table[(method, n)][0]:.1f} ± {100 * table[(method, n)][1]:.1f}" if (method, n) in table else "" for n in labels]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    gains = [f"{100 * (table[('finetune', n)][0] - table[('scratch', n)][0]):+.1f}" for n in labels]
    lines.append("| **finetune − scratch** | " + " | ".join(gains) + " |")
    return (f"Target val accuracy (%) on digits 5-9 ({VAL_PER_CLASS * 5} fixed validation images), mean ± std over "
            f"{seeds} seeds; resnet18 at {IMAGE_SIZE} px, sources pretrained on digits 0-4. `python -m bench.transfer`, "
            f"{minutes:.1f} min on this machine.\n\n" + "\n".join(lines) + "\n")


def plot(table: dict, labels: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        means = [100 * table[(method, n)][0] for n in labels]
        stds = [100 * table[(method, n)][1] for n in labels]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xticks(xs, [str(n) for n in labels])
    ax.set_xlabel("labels per class")
    ax.set_ylabel("target val accuracy (%)")
    ax.set_title("digits 0-4 -> 5-9, resnet18")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(table_md: str) -> None:
    text = README.read_text()
    if TABLE_START in text and TABLE_END in text:
        before, _, rest = text.partition(TABLE_START)
        _, _, after = rest.partition(TABLE_END)
        README.write_text(f"{before}{TABLE_START}\n{table_md}{TABLE_END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--labels", type=int, nargs="+", default=[1, 3, 10, 50], help="labels per class; 0 = all")
    args = parser.parse_args(argv)

    import ray

    from jobs.runner import connect_ray

    started = time.perf_counter()
    connect_ray()
    remote = ray.remote(num_cpus=1)
    # SimCLR pretrains first (the longest task); every cell waits only for the source it needs, so scratch
    # cells fill the cluster while the sources train.
    sources = {m: remote(pretrain).options(num_returns=2).remote(m) for m in ("simclr", "supervised")}
    weights = {"scratch": None, "linear_probe": sources["supervised"][0], "finetune": sources["supervised"][0],
               "simclr_finetune": sources["simclr"][0]}
    order = sorted(METHODS, key=lambda m: m != "scratch")
    futures = [remote(run_cell).remote(method, n, seed, weights[method])
               for method in order for n in args.labels for seed in range(args.seeds)]
    for name, (_, summary) in sources.items():
        summary = ray.get(summary)
        print(f"source {name}: {summary['seconds']:.0f}s, final {json.dumps({k: round(v, 3) for k, v in summary['final'].items()})}", flush=True)
    rows = []
    pending = {f: i for i, f in enumerate(futures)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        row = ray.get(done[0])
        del pending[done[0]]
        rows.append({k: row[k] for k in ("method", "labels_per_class", "seed", "val_acc")})
        print(f"[{len(rows)}/{len(futures)}] {json.dumps(row)}", flush=True)
    labels = [n or "all" for n in args.labels]
    table = summarise(rows, labels)
    minutes = (time.perf_counter() - started) / 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transfer.json").write_text(json.dumps(rows, indent=1))
    plot(table, labels, RESULTS / "transfer.png")
    table_md = markdown(table, labels, args.seeds, minutes)
    (RESULTS / "transfer.md").write_text(table_md)
    update_readme(table_md)
    print(table_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
