"""The transfer study: does a pretrained model need fewer labels than training from scratch? Tuned, on three targets.

Targets (bench/transfer_data.py): `digits` (digits 5-9, near transfer from the digit sources), `shapes` (textured
objects on cluttered backgrounds, far transfer), each with 500 fixed validation images that are reported and never
tuned on; and `docstrings` (text: standard-library docstrings labelled by package, 240 reported validation texts).
Each has a disjoint tuning-validation split, and training sets of 1, 3, 10 or 50 labels per class drawn per seed.

Sources, and the methods each is adapted with (linear probe, full fine-tune, LP-FT):

    none/resnet18     scratch, resnet18 at 32 px                                      (images)
    none/lite0        scratch, EfficientNet-Lite0 at 64 px on digits, 128 px on shapes (images)
    digits-supervised resnet18 at 32 px, trained here on digits 0-4 with their labels   (python -m jobs.pretrain)
    digits-simclr     resnet18 at 32 px, SimCLR here on the digits 0-4 images, no labels
    imagenet          EfficientNet-Lite0 (as above), the ImageNet-1k weights that ship offline
    none/minilm       scratch, the all-MiniLM-L6-v2 architecture with random weights  (text)
    minilm            all-MiniLM-L6-v2's pretrained encoder, offline                  (text)

Fairness: every (target, source, method, labels) cell gets its budget (optim.lr, optim.weight_decay, train.epochs,
and for images trained through the backbone data.augment) from its own ASHA sweep, run by the product's jobs.sweep
on the tuning split (seed 0's training draw); then every seed is scored on the reported validation images with that
budget: seed 0 is the sweep's best trial (its checkpoint scored), the others are trained. Scratch is tuned the same
way on both backbones; the better one is the baseline to beat.

Writes bench/results/transfer.json (one row per run, with `target` and `source`), transfer.png and transfer.md, and
the tables into README.md. Single node: the data and the sweeps' storage are on this machine's disk.

    python -m bench.transfer [--targets digits shapes docstrings] [--labels 1 3 10 50] [--seeds 3] [--trials 4]
                             [--parallel 3] [--sources ...] [--methods ...]   (a part of the grid; the README table is the whole)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import RESULTS, argument_parser
from bench.transfer_data import SPLITS, TEXT_TARGETS, write_split, write_target
from jobs.cli import count, positive_number

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_START, TABLE_END = "<!-- transfer-table -->", "<!-- /transfer-table -->"
WORK = RESULTS / "transfer-work"  # data, source models and sweep runs (not committed)
LITE0 = "timm:tf_efficientnet_lite0"
MINILM = "hf:all-MiniLM-L6-v2"
TEXT_MAX_LENGTH = 64  # tokens per docstring (truncated at 600 characters, ~120 tokens): a first paragraph

#: EfficientNet-Lite0's input size per target: the 8x8 digit scans upsampled to 64 px; the 64 px shapes renders
#: upsampled to 128 px, where ImageNet features see their outlines at a scale they know (measured with a closed-form
#: probe of the features, 10 draws: 30 / 43 / 51 / 62% at 1 / 3 / 10 / 50 labels per class at 64 px, 38 / 53 / 68 / 83%
#: at 128 px, 41 / 53 / 70 / 84% at 160 px, 35 / 50 / 67 / 82% at 224 px); digits' linear probe, 3 seeds: 59 / 68% at
#: 1 / 3 labels per class at 64 px, 48-53 / 65% at 32, 48, 96 and 128 px
LITE0_PX = {"digits": 64, "shapes": 128}

#: source -> (backbone, image size (0: text; None: LITE0_PX), model.weights: None, a pretrained source file, or a
#: short name)
SOURCES = {
    "none/resnet18": ("resnet18", 32, None),
    "none/lite0": (LITE0, None, None),
    "digits-supervised": ("resnet18", 32, "digits-supervised"),
    "digits-simclr": ("resnet18", 32, "digits-simclr"),
    "imagenet": (LITE0, None, "efficientnet_lite0_imagenet"),
    "none/minilm": (MINILM, 0, None),
    "minilm": (MINILM, 0, "pretrained"),
}
METHODS = ("linear_probe", "full", "lp_ft")
LP_EPOCHS = 6  # lp_ft: the probe's epochs, then fine-tuning for the rest of the tuned budget
#: a pretrained image backbone being fine-tuned keeps its BatchNorm statistics frozen below this many labels per class:
#: a few dozen images cannot re-estimate them (measured: LP-FT on 15 digits fell from 0.73 to 0.28 without freezing);
#: 250 can (the own digit source fine-tuned on 50 digits per class: 98.2 ± 0.2% re-estimating, 96.3 ± 1.4% frozen)
FREEZE_BN_BELOW = 50
MAX_EPOCHS = 20
#: a sweep trial scores the tuning images every VAL_EVERY epochs (ASHA's rungs: 2, 6, 18) and at its last, not every
#: epoch: scoring 120 images is most of a few-label trial's epoch
VAL_EVERY = 2
#: cells tuned at once: each sweep runs its trials one after another in one process, and the sweeps and the seeds
#: they hand on queue for the two cores, so one sweep's start-up overlaps another's training
PARALLEL_SWEEPS = 3


@dataclass(frozen=True)
class Cell:
    target: str
    source: str
    method: str
    labels: int

    @property
    def name(self) -> str:
        return f"{self.target}-{self.source.replace('/', '-')}-{self.method}-{self.labels}"


def is_text(source: str) -> bool:
    return SOURCES[source][1] == 0


def cells(targets: list[str], labels: list[int], sources: list[str], methods: list[str]) -> list[Cell]:
    """Every source that fits a target's modality, with each method (scratch: full training only)."""
    return [Cell(t, s, m, n) for t in targets for n in labels for s in sources if is_text(s) == (t in TEXT_TARGETS)
            for m in (("full",) if s.startswith("none/") else methods)]


# ---------------------------------------------------------------- configs

def image_size(cell: Cell) -> int:
    """The cell's input size in pixels (0: text)."""
    size = SOURCES[cell.source][1]
    return LITE0_PX[cell.target] if size is None else size


def freezes_bn_stats(cell: Cell) -> bool:
    """A pretrained image backbone being fine-tuned on fewer than FREEZE_BN_BELOW labels per class."""
    return bool(SOURCES[cell.source][2]) and cell.method != "linear_probe" and image_size(cell) > 0 and cell.labels < FREEZE_BN_BELOW


def cell_config(cell: Cell, data_root: Path, weights: str | None, seed: int) -> dict:
    backbone, size = SOURCES[cell.source][0], image_size(cell)
    model = {"backbone": backbone, "weights": weights, "strategy": cell.method}
    if freezes_bn_stats(cell):
        model["freeze_bn_stats"] = True
    if cell.method == "lp_ft":
        model["lp_epochs"] = LP_EPOCHS
    if size:  # a linear probe sees the images as they are, so the backbone's features are computed once (tl_core.features)
        data = {"root": str(data_root), "image_size": size, "augment": cell.method != "linear_probe", "hflip": cell.target != "digits",
                "loader_workers": 0}
        optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "scheduler": "cosine"}
    else:  # text: AdamW with a warmup, the documented text recipe
        data = {"root": str(data_root), "max_length": TEXT_MAX_LENGTH, "loader_workers": 0}
        optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "scheduler": "cosine", "warmup_epochs": 1}
    return {
        "experiment": cell.name,
        "data": data,
        "model": model,
        "optim": optim,
        "train": {"epochs": MAX_EPOCHS, "batch_size": 16, "seed": seed, "val_every": VAL_EVERY},
        "scaling": {"num_workers": 1},
        "checkpoint": {"keep": 1, "every": MAX_EPOCHS},  # a sweep trial's last epoch only: the study keeps budgets, not weights
        "storage": {"root": str(WORK / "sweeps")},
    }


def search_space(cell: Cell, trials: int) -> dict:
    """The budget a cell's sweep searches, in `trials` trials: a grid of LRs spread evenly in log scale over the
    method's range (a probe takes larger steps than a fine-tune), for images trained through the backbone each tried
    with and without augmentation (random crops can cut a small object out of its image); weight decay and epochs
    drawn per trial. A linear probe is fitted to the features of the images as they are (the usual protocol), which
    are computed once."""
    if is_text(cell.source):  # a pretrained transformer is fine-tuned with small steps; one from scratch takes larger
        low, high = {"linear_probe": (1e-3, 1e-1), "full": (1e-5, 1e-3) if SOURCES[cell.source][2] else (1e-4, 3e-3), "lp_ft": (1e-3, 3e-2)}[cell.method]
    else:
        low, high = {"linear_probe": (1e-3, 1e-1), "full": (1e-4, 1e-2) if SOURCES[cell.source][2] else (3e-4, 3e-2), "lp_ft": (1e-3, 3e-2)}[cell.method]
    augment = {} if is_text(cell.source) or cell.method == "linear_probe" else {"data.augment": {"grid": [True, False]}}
    points = max(1, trials // 2 if augment else trials)
    epochs = [12, MAX_EPOCHS] if cell.method == "lp_ft" else [10, MAX_EPOCHS]
    return {"num_samples": 1, "max_concurrent_trials": 1, "seed": 0, "metric": "val/acc", "mode": "max",
            "scheduler": {"name": "asha", "max_t": MAX_EPOCHS, "grace_period": 2, "reduction_factor": 3},
            "space": {"optim.lr": {"grid": [low * (high / low) ** ((i + 0.5) / points) for i in range(points)]},
                      "optim.weight_decay": {"choice": [0.0, 0.05]}, "train.epochs": {"choice": epochs}, **augment}}


# ---------------------------------------------------------------- the work

def pretrain_source(method: str, out: Path) -> str:
    """A source model on digits 0-4 (supervised or SimCLR), trained with the product's core; returns the state-dict
    file of its backbone (a head for digits 0-4 has the target's shape but the wrong classes)."""
    import torch

    from tl_core.checkpoint import LocalReporter, load_checkpoint
    from tl_core.config import from_dict
    from tl_core.demo_data import write_digits
    from tl_core.recipes import RECIPES

    path = out / f"{method}.pt"
    if path.exists():
        return str(path)
    torch.set_num_threads(1)
    source, _ = write_digits(WORK / "digits-source")
    cfg = {"experiment": f"source-{method}", "data": {"root": str(source), "image_size": 32, "augment": True, "hflip": False,
                                                       "loader_workers": 0, "val_fraction": 0.2},
           "model": {"backbone": "resnet18"}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                                                        "scheduler": "cosine", "warmup_epochs": 1},
           "train": {"epochs": 15, "batch_size": 64, "seed": 0}}
    if method == "simclr":
        cfg["pretrain"] = {"method": "simclr", "temperature": 0.2, "crop_scale": [0.5, 1.0]}
        cfg["train"] = {"epochs": 15, "batch_size": 128, "seed": 0}
        cfg["optim"].update(lr=0.3, weight_decay=1.0e-6)
    recipe = "simclr" if method == "simclr" else "supervised"
    run = out / f"run-{method}"
    if run.exists():  # a study cut short during this pretraining: its checkpoints are kept aside, the pretraining redone
        run.rename(run.with_name(f"{run.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"))
    reporter = LocalReporter(run)
    RECIPES[recipe].fit(from_dict(cfg), reporter, device=torch.device("cpu"))
    state = load_checkpoint(reporter.latest).model_state
    partial = path.with_suffix(".pt.partial")  # the file appears whole or not at all: a study cut short never reads half of it
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, partial)
    partial.replace(path)
    return str(path)


def tune_cell(cell: Cell, data_root: Path, seed0_root: Path, weights: str | None, trials: int) -> dict:
    """The cell's budget from an ASHA sweep with jobs.sweep (the best trial that ran its whole budget), and seed 0's
    reported accuracy (`seed0_acc`): the best trial is seed 0's run (the same training images, seed and budget;
    validation never changes what is trained), so its last checkpoint is scored on the reported images instead of
    being trained again."""
    import torch

    from cluster import storage
    from jobs.staging import experiment_location
    from jobs.sweep import run_sweep
    from jobs.sweep_config import SearchConfig
    from tl_core.config import from_dict

    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = from_dict(cell_config(cell, data_root, weights, seed=0))
    storage.delete(experiment_location(cfg))
    results = run_sweep(cfg, SearchConfig.model_validate(search_space(cell, trials)), resume=False)
    finished = [r for r in results if r.metrics and r.metrics.get("epoch") == r.config["train.epochs"]]
    best = max(finished, key=lambda r: r.metrics["val/acc"])
    seed0_acc = score_checkpoint(best.checkpoint.path, seed0_root)
    storage.delete(experiment_location(cfg))  # the trials' checkpoints: gigabytes over a study, and the budget is all we keep
    budget = {"lr": best.config["optim.lr"], "weight_decay": best.config["optim.weight_decay"], "epochs": best.config["train.epochs"]}
    if "data.augment" in best.config:
        budget["augment"] = best.config["data.augment"]
    return {**budget, "tune_acc": best.metrics["val/acc"], "seed0_acc": seed0_acc, "tune_seconds": round(time.perf_counter() - started, 1)}


def score_checkpoint(checkpoint: str, data_root: Path) -> float:
    """Accuracy of a checkpoint's model (built as its run built it) on the validation images under `data_root`."""
    import torch

    from jobs.best_model import load_model
    from tl_core.config import from_dict
    from tl_core.loop import evaluate
    from tl_core.modality import labelled_data
    from tl_core.state import TrainingState

    model, description = load_model(Path(checkpoint))
    cfg = from_dict({**description["config"], "data": {**description["config"]["data"], "root": str(data_root)}})
    data = labelled_data(cfg)
    state = TrainingState.create(cfg, model, torch.device("cpu"), steps_per_epoch=1)
    return evaluate(model, data.val, state, len(data.classes))["acc"]


def result_row(cell: Cell, seed: int, val_acc: float, budget: dict, seconds: float) -> dict:
    """One row of transfer.json: a seed of a cell, its reported accuracy and the budget it trained with."""
    return {**asdict(cell), "labels_per_class": cell.labels, "backbone": SOURCES[cell.source][0], "seed": seed,
            "freeze_bn_stats": freezes_bn_stats(cell), "val_acc": val_acc, **budget, "seconds": seconds}


def run_seed(cell: Cell, data_root: str, weights: str | None, seed: int, budget: dict) -> dict:
    """One seed of a cell with its tuned budget, scored on the reported validation images (a Ray task)."""
    import torch

    from tl_core.config import from_dict
    from tl_core.loop import fit

    torch.set_num_threads(1)
    cfg = cell_config(cell, Path(data_root), weights, seed)
    cfg["optim"].update(lr=budget["lr"], weight_decay=budget["weight_decay"])
    # the reported images are scored once, after the last epoch: the one the study reports (every epoch reseeds from
    # (seed, epoch), so the model trained is the one scoring every epoch would give)
    cfg["train"].update(epochs=budget["epochs"], val_every=budget["epochs"])
    cfg["checkpoint"]["every"] = budget["epochs"]
    if "augment" in budget:
        cfg["data"]["augment"] = budget["augment"]
    started = time.perf_counter()
    history = fit(from_dict(cfg), lambda metrics, checkpoint_dir: None, device=torch.device("cpu"), checkpoints=False)
    return result_row(cell, seed, history[-1]["val/acc"], budget, round(time.perf_counter() - started, 1))


# ---------------------------------------------------------------- report

def cell_key(row: dict) -> tuple:
    return row["target"], row["source"], row["method"], row["labels_per_class"]


def summarise(rows: list[dict]) -> dict:
    """(target, source, method, labels) -> (mean, std) of val_acc over seeds (a carried row holds them already)."""
    groups: dict[tuple, list[float]] = {}
    carried = {cell_key(r): (r["mean"], r["std"]) for r in rows if r.get("carried")}
    for r in rows:
        if not r.get("carried"):
            groups.setdefault(cell_key(r), []).append(r["val_acc"])
    return {**carried, **{k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in groups.items()}}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def carried_rows(md: str) -> list[dict]:
    """The cells of a committed transfer.md as summary rows (`carried`: mean and std over `seeds`, no per-seed
    values): transfer.json is a run output and not committed, so in a fresh clone a run of part of the grid keeps
    the table's other cells from here (their gaps are then taken from the means as printed, to 0.1 point)."""
    header = re.compile(r"^- (\w+): .*?; (\d+) seeds, (\d+)-trial sweeps; .* took ([\d +]+) min$")
    runs, rows, target, labels = {}, [], None, []
    for line in md.splitlines():
        if m := header.match(line):
            runs[m[1]] = {"seeds": int(m[2]), "trials": int(m[3]), "study_minutes": [float(x) for x in m[4].split("+")]}
        elif m := re.match(r"^\| (\w+): source, method \|(.*)\|$", line):
            target, labels = m[1], [int(c.split("/")[0]) for c in m[2].split("|")]
        elif line.startswith("| **best") or not line.startswith("|"):
            target = None
        elif target and (m := re.match(r"^\| ([\w/-]+), (\w+) \|(.*)\|$", line)):
            for n, value in zip(labels, m[3].split("|"), strict=True):
                if "±" in value:
                    mean, std = (float(x) / 100 for x in value.split("±"))
                    rows.append({"target": target, "source": m[1], "method": m[2], "labels_per_class": n, "carried": True,
                                 "mean": mean, "std": std, **runs[target]})
    return rows


def best_of(table: dict, target: str, labels: int, pretrained: bool) -> tuple[float, str] | None:
    found = [(mean, f"{s} {m}") for (t, s, m, n), (mean, _) in table.items()
             if t == target and n == labels and s.startswith("none/") != pretrained]
    return max(found) if found else None


#: the issues' targets: the best pretrained method minus the best tuned scratch, per labels per class
GAP_TARGETS = {"image": {1: 0.20, 3: 0.15, 10: 0.0, 50: 0.0}, "text": {3: 0.25}}


def markdown(table: dict, rows: list[dict], targets: list[str], labels: list[int]) -> str:
    out = ["Reported validation accuracy (%), mean ± std over seeds, on fixed validation sets never tuned on; every "
           "cell's LR, weight decay and epochs tuned by its own ASHA sweep (jobs.sweep) on separate tuning samples. "
           "Measured on this machine (2 CPU cores):\n"]
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        sizes = SPLITS[target]
        minutes = sorted({m for r in mine for m in as_list(r.get("study_minutes", 0))})  # a value per run of the study
        seeds = max(r["seeds"] if r.get("carried") else r["seed"] + 1 for r in mine)
        ran = sorted({t for r in mine for t in r.get("study_targets", [target])}, key=list(SPLITS).index)  # with the targets
        out.append(f"- {target}: {sizes.val * sizes.classes} reported validation samples, {sizes.tune * sizes.classes} for "
                   f"tuning; {seeds} seeds, {mine[0].get('trials', '?')}-trial sweeps; "
                   f"`python -m bench.transfer --targets {' '.join(ran)} ...` took {' + '.join(f'{m:.0f}' for m in minutes)} min"
                   + ("\n" if target == targets[-1] else ""))
    for target in targets:
        goals = GAP_TARGETS["text" if target in TEXT_TARGETS else "image"]
        head = f"| {target}: source, method | " + " | ".join(f"{n} / class" for n in labels) + " |"
        lines = [head, "|---|" + "---:|" * len(labels)]
        for source in SOURCES:
            for method in METHODS:
                if not any((target, source, method, n) in table for n in labels):
                    continue
                cells_ = [f"{100 * table[(target, source, method, n)][0]:.1f} ± {100 * table[(target, source, method, n)][1]:.1f}"
                          if (target, source, method, n) in table else "" for n in labels]
                lines.append(f"| {source}, {method} | " + " | ".join(cells_) + " |")
        gaps, winners, verdicts = [], [], []
        for n in labels:
            pre, scratch = best_of(table, target, n, True), best_of(table, target, n, False)
            if pre is None or scratch is None:
                gaps.append(""), winners.append(""), verdicts.append("")
                continue
            gap = pre[0] - scratch[0]
            gaps.append(f"{100 * gap:+.1f}")
            winners.append(pre[1])
            verdicts.append(("met" if gap >= goals[n] else "**not met**") + f" (≥ {100 * goals[n]:+.0f})" if n in goals else "")
        lines.append("| **best pretrained − best scratch** | " + " | ".join(gaps) + " |")
        lines.append("| winning pretrained source, method | " + " | ".join(winners) + " |")
        lines.append("| target | " + " | ".join(verdicts) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def plot(table: dict, targets: list[str], labels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4), squeeze=False)
    xs = list(range(len(labels)))
    for ax, target in zip(axes[0], targets, strict=True):
        for source in SOURCES:  # each source with its best method per column
            best = [max((table[(target, source, m, n)] for m in METHODS if (target, source, m, n) in table), default=None)
                    for n in labels]
            measured = [(x, b) for x, b in zip(xs, best, strict=True) if b is not None]
            if measured:
                ax.errorbar([x for x, _ in measured], [100 * b[0] for _, b in measured], yerr=[100 * b[1] for _, b in measured],
                            marker="o", capsize=3, label=source)
        ax.set_xticks(xs, [str(n) for n in labels])
        ax.set_xlabel("labels per class")
        ax.set_ylabel("reported val accuracy (%)")
        ax.set_title(f"target: {target} (best tuned method per source)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--targets", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--labels", type=count, nargs="+", default=[1, 3, 10, 50], choices=[1, 3, 10, 50])
    parser.add_argument("--seeds", type=count, default=3)
    parser.add_argument("--trials", type=count, default=4, help="trials per cell's ASHA sweep")
    parser.add_argument("--parallel", type=count, default=PARALLEL_SWEEPS, help="cells tuned at once")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--report", type=positive_number, metavar="MINUTES",
                        help="only write the outputs from the runs a study cut short left in rows.jsonl (its wall time)")
    args = parser.parse_args(argv)
    if args.report is not None:
        progress = WORK / "rows.jsonl"
        rows = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()] if progress.is_file() else []
        if not rows:  # the outputs would be rewritten from nothing new
            parser.error(f"--report: {progress} holds no runs; it is what a study cut short leaves")
        return report(rows, args, args.report)

    import ray

    from jobs.runner import connect_ray

    started = time.perf_counter()
    connect_ray()
    on_a_core = ray.remote(num_cpus=1)
    sources = {f"digits-{m}": on_a_core(pretrain_source).remote(m, WORK / "sources") for m in ("supervised", "simclr")
               if f"digits-{m}" in args.sources}
    splits = {t: write_target(WORK / t, t) for t in args.targets}
    # A sweep's driver holds no CPU (its trials do); the seeds wait for their cell's budget inside Ray, not here.
    tune, seed_run = ray.remote(num_cpus=0)(tune_cell), on_a_core(run_seed)
    todo = sorted(cells(args.targets, args.labels, args.sources, args.methods), key=heaviest_first)
    tuning: dict = {}  # a sweep in flight -> its cell
    seeds, rows = [], []
    progress = WORK / "rows.jsonl"  # every finished run as it lands, so a study cut short keeps what it measured
    progress.unlink(missing_ok=True)

    def landed(row: dict) -> None:
        rows.append(row)
        with progress.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{len(rows)}] {json.dumps(row)} ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)

    while todo or tuning or seeds:
        while todo and len(tuning) < args.parallel:
            cell = todo.pop(0)
            weights = sources.get(SOURCES[cell.source][2], SOURCES[cell.source][2])  # an own source: its pretraining's result
            roots = [write_split(cell.target, splits[cell.target], WORK / cell.target / f"eval-{cell.labels}-seed{seed}", cell.labels,
                                 seed, tuning=False) for seed in range(args.seeds)]
            tune_root = write_split(cell.target, splits[cell.target], WORK / cell.target / f"tune-{cell.labels}", cell.labels,
                                    seed=0, tuning=True)
            budget = tune.remote(cell, tune_root, roots[0], weights, args.trials)
            tuning[budget] = cell
            seeds += [seed_run.remote(cell, str(root), weights, seed, budget) for seed, root in enumerate(roots) if seed > 0]
        done, _ = ray.wait([*tuning, *seeds], num_returns=1)
        for future in done:
            if future in tuning:
                cell, budget = tuning.pop(future), ray.get(future)
                print(f"tuned {cell.name}: {json.dumps(budget)} ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
                landed(result_row(cell, 0, budget["seed0_acc"], budget, budget["tune_seconds"]))
            else:
                seeds.remove(future)
                landed(ray.get(future))
    return report(rows, args, (time.perf_counter() - started) / 60)


def heaviest_first(cell: Cell) -> tuple:
    """The order cells start in: the most training first (labels, then pixels), so the study ends on light cells that
    fill the cores' last gaps."""
    return -cell.labels, -image_size(cell)


def report(rows: list[dict], args: argparse.Namespace, minutes: float) -> int:
    """Write transfer.json, .png, .md and the README table; rows of cells (target, source, method, labels per class)
    this run did not measure are kept from the transfer.json already there."""
    for row in rows:
        row.setdefault("trials", args.trials)
        row.setdefault("study_minutes", round(minutes, 1))
        row.setdefault("study_targets", args.targets)
    measured = {cell_key(r) for r in rows}
    if (RESULTS / "transfer.json").is_file():
        previous = json.loads((RESULTS / "transfer.json").read_text())
    else:
        previous = carried_rows((RESULTS / "transfer.md").read_text()) if (RESULTS / "transfer.md").is_file() else []
    rows = [r for r in previous if cell_key(r) not in measured] + rows
    targets = [t for t in SPLITS if any(r["target"] == t for r in rows)]
    labels = sorted({r["labels_per_class"] for r in rows})  # every column any target measured; a missing cell stays empty
    table = summarise(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transfer.json").write_text(json.dumps(rows, indent=1))
    plot(table, targets, labels, RESULTS / "transfer.png")
    table_md = markdown(table, rows, targets, labels)
    (RESULTS / "transfer.md").write_text(table_md)
    update_readme(table_md)
    print(table_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
