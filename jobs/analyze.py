"""Report on a sweep: what won, what ASHA stopped and when, and a ready-to-run config for the winner.

    python -m jobs.analyze ROOT/EXPERIMENT          (a local path or s3://bucket/prefix/EXPERIMENT)

Reads the experiment through Ray Tune's ResultGrid and writes ROOT/EXPERIMENT/report/: report.html (one
self-contained file), curves.png, params.png, confusion.png, per_class.json and best.yaml, which
`python -m jobs.finetune --config best.yaml` retrains. Prints a summary table.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from cluster import storage
from jobs.cli import ArgumentParser, guarded, run_module
from jobs.results import read_meta
from jobs.runner import one_line
from jobs.sweep import trial_config
from jobs.sweep_config import SearchConfig, config_text, listed_values
from tl_core.checkpoint import META_FILE
from tl_core.config import RunConfig, describe, from_dict
from tl_core.errors import ConfigError
from tl_core.run_dir import RESULT_FILE, SWEEP_FILE
from tl_core.safe_yaml import parse_yaml


@dataclass
class Trial:
    name: str  # Tune's trial id
    directory: str
    params: dict
    epochs: list[int]
    curve: list[float]  # the sweep metric at each reported epoch
    best: float
    status: str  # "ran to max_t" | "stopped at rung N (epoch E)" | "stopped at epoch E" | "error"
    batch: dict
    rank: tuple[float, float]  # SearchConfig.ranking: higher wins


@dataclass
class Failed:
    """A trial that failed before it reported the sweep's metric (a loss that diverged in its first epoch, ...)."""
    name: str  # Tune's trial id
    params: dict
    error: str  # one line


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(__name__, __doc__)
    parser.add_argument("experiment", help="the sweep's directory: ROOT/EXPERIMENT, local or s3://")
    args = parser.parse_args(argv)

    location = storage.parse(args.experiment, field="experiment")
    base, search, results = load_experiment(location)
    trials = summarize(results, search)
    failed = failed_before_reporting(results, search)
    winner = pick_best(trials)
    best_result = next(r for r in results if _trial_name(r) == winner.directory)
    best_cfg = trial_config(base.to_dict(), search.model_dump(), winner.params)
    best_cfg = with_best_name(best_cfg, base.experiment)
    meta = read_meta(best_checkpoint(best_result, search, location))

    with tempfile.TemporaryDirectory(prefix="tl-report-") as tmp:
        out = Path(tmp)
        write_report(out, trials, failed, winner, search, best_cfg, meta, location.uri)
        published = publish(out, location.child("report"))
    print_summary(trials, failed, winner, search)
    print(f"report: {published}/report.html\nretrain the winner: python -m jobs.finetune --config {published}/best.yaml")
    return 0


def load_experiment(location: storage.Location) -> tuple[RunConfig, SearchConfig, object]:
    from ray import tune
    from ray.tune import ExperimentAnalysis, ResultGrid

    storage.check_access(location, "experiment")  # a missing bucket, refused credentials, an endpoint that never answers: one line
    fs = storage.filesystem(location)
    if not tune.Tuner.can_restore(location.path, storage_filesystem=fs if location.is_s3 else None):
        if storage.exists(location.child(RESULT_FILE), "experiment"):
            raise ConfigError(f"experiment: {location.uri} is a training run ({RESULT_FILE}), not a sweep; analyze takes the "
                              "experiment of a jobs.sweep")
        raise ConfigError(f"experiment: there is no Ray Tune experiment at {location.uri}")
    sweep_file = location.child(SWEEP_FILE)
    try:
        raw = parse_yaml(storage.read_text(sweep_file, "experiment"), sweep_file.uri)
    except FileNotFoundError:
        raise ConfigError(f"experiment: {location.uri} has no {SWEEP_FILE}; was it made by jobs.sweep?") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("search"), dict):
        raise ConfigError(f"{sweep_file.uri}: not a sweep file (a run config plus a search: section)")
    try:
        search = SearchConfig.model_validate(raw.pop("search"), context={"stored": True})  # read, not judged again
    except ValidationError as exc:
        raise ConfigError(f"{sweep_file.uri}: {describe(exc, model=SearchConfig, prefix='search.')}") from None
    base = from_dict(raw, source=sweep_file.uri, stored=True)
    # A trial that has not reported yet has no result file; Tune logs a FileNotFoundError per trial for it, which
    # summarize() says in one line when no trial has reported at all.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        analysis = ExperimentAnalysis(state_file_to_read(location), storage_filesystem=fs if location.is_s3 else None,
                                      default_metric=search.metric, default_mode=search.mode)
    finally:
        quiet.setLevel(level)
    return base, search, ResultGrid(analysis)


def state_file_to_read(location: storage.Location) -> str:
    """The path of the newest experiment_state file of Tune's that reads whole, with its searcher's files: a driver
    killed while saving can leave a newer one cut short, which Tune would pick and fail on."""
    from jobs import tune_results

    saves = tune_results.state_saves(location)
    if not saves:
        raise ConfigError(f"experiment: {location.uri}: Tune has saved no state of the sweep yet (its driver was stopped "
                          "before its first save); `jobs.sweep --resume` starts it again")
    stamp = tune_results.newest_whole_save(location, saves)
    if stamp is None:
        raise ConfigError(f"experiment: {location.uri}: Tune's saves of the sweep's state are cut short (its driver was "
                          "stopped while saving them); `jobs.sweep --resume` sets them aside and starts the sweep again")
    if stamp != saves[0][0]:
        logging.getLogger("jobs").warning("Tune's newest save of the sweep's state, at %s, has a file cut short (its "
                                          "driver was stopped while saving it): the report is of the save at %s",
                                          saves[0][0], stamp)
    return f"{location.path}/experiment_state-{stamp}.json"


def best_checkpoint(result, search: SearchConfig, location: storage.Location):
    """The trial's best kept checkpoint: Tune's own, or for a DDP trial (whose checkpoints its TorchTrainer
    kept) the best reported `checkpoint_path` that still exists."""
    import ray.train

    kept = [(checkpoint, metrics) for checkpoint, metrics in result.best_checkpoints or ()
            if isinstance(metrics.get(search.metric), (int, float)) and not math.isnan(metrics[search.metric])]
    if kept:  # the best, a tie broken as the trials' is (SearchConfig.rank)
        return max(kept, key=lambda item: search.rank(item[1]))[0]
    frame = result.metrics_dataframe
    if "checkpoint_path" in frame:
        fs = storage.filesystem(location)
        rows = frame.dropna(subset=["checkpoint_path", search.metric]).to_dict("records")
        for row in sorted(rows, key=search.rank, reverse=True):
            if fs.get_file_info(f"{row['checkpoint_path']}/{META_FILE}").is_file:
                return ray.train.Checkpoint(row["checkpoint_path"], filesystem=fs)
    raise ConfigError(f"experiment: trial {_trial_name(result)} kept no checkpoint to report on")


def _trial_name(result) -> str:
    return result.path.rstrip("/").rsplit("/", 1)[-1]


def rungs(search: SearchConfig) -> list[int]:
    """ASHA's milestones: grace_period x reduction_factor^k up to max_t."""
    s = search.scheduler
    if s.name != "asha":
        return []
    out, k = [], 0
    while (t := int(s.grace_period * s.reduction_factor**k)) < s.max_t:
        out.append(t)
        k += 1
    return out


def summarize(results, search: SearchConfig) -> list[Trial]:
    trials, milestones = [], rungs(search)
    for result in results:
        frame = result.metrics_dataframe
        if not search.reported(result.metrics_dataframe):
            continue
        # A trial resumed after its driver was killed reports again from its last checkpoint: an epoch can appear
        # twice in its rows, and the later report is the run that went on.
        frame = frame.dropna(subset=[search.metric]).sort_values("epoch", kind="stable").drop_duplicates("epoch", keep="last")
        epochs = [int(e) for e in frame["epoch"]]
        curve = [float(v) for v in frame[search.metric]]
        last = epochs[-1]
        if result.error is not None:
            status = "error"
        elif last >= search.scheduler.max_t:
            status = "ran to max_t"
        else:
            status = f"stopped at rung {milestones.index(last) + 1} (epoch {last})" if last in milestones else f"stopped at epoch {last}"
        row = frame.iloc[-1]
        batch = {k: int(row[k]) for k in ("batch_size_per_worker", "global_batch_size") if k in row}
        trials.append(Trial(str(row.get("trial_id", _trial_name(result))), _trial_name(result),
                            {k: result.config[k] for k in search.space}, epochs, curve,
                            max(curve) if search.mode == "max" else min(curve), status, batch, search.ranking(frame)))
    if not trials:
        errors = [result.error for result in results if result.error is not None]
        if errors and len(errors) == len(results):
            raise ConfigError(f"experiment: every trial failed before reporting {search.metric}; the first: {one_line(errors[0])}")
        raise ConfigError(f"experiment: no trial has reported {search.metric} yet ({len(results)} trial(s) started); if the sweep "
                          "was cut short, continue it with python -m jobs.sweep --config ... --resume")
    return sorted(trials, key=lambda t: t.name)


def failed_before_reporting(results, search: SearchConfig) -> list[Failed]:
    """The trials that failed with nothing to plot: their values (from Tune's params.json, as Tune gives them no
    config) and their error."""
    failed = []
    for result in results:
        if result.error is None or search.reported(result.metrics_dataframe):
            continue
        try:
            with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
                params = json.loads(f.read())
        except FileNotFoundError:  # a trial that failed before Tune wrote its values
            params = {}
        failed.append(Failed(str(result.metrics.get("trial_id", _trial_name(result))), {k: params.get(k) for k in search.space},
                             one_line(result.error)))
    return sorted(failed, key=lambda f: f.name)


def pick_best(trials: list[Trial]) -> Trial:
    """The winner: the best `metric` at any epoch, a tie going to the lower val/loss there (SearchConfig.ranking)."""
    return max(trials, key=lambda t: t.rank)


def with_best_name(cfg: RunConfig, sweep_name: str) -> RunConfig:
    from tl_core.config import override, with_overrides

    return with_overrides(cfg, [override("experiment", f"{sweep_name}-best")])


# --- plots -----------------------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(trials: list[Trial], winner: Trial, search: SearchConfig, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for t in trials:
        is_best = t is winner
        ax.plot(t.epochs, t.curve, lw=2.8 if is_best else 1.0, color="tab:red" if is_best else "tab:gray",
                alpha=1.0 if is_best else 0.6, zorder=3 if is_best else 2, label=f"best: {t.name}" if is_best else None)
        if t.status.startswith("stopped"):
            ax.plot(t.epochs[-1], t.curve[-1], "x", color="black", ms=7, zorder=4)
    for r in rungs(search):
        ax.axvline(r, ls=":", color="tab:blue", lw=0.8)
    ax.plot([], [], "x", color="black", label="stopped by ASHA")
    ax.set(xlabel="epoch", ylabel=search.metric, title=f"{search.metric} of every trial (dotted: ASHA rungs)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole: no tick at 1.25
    ax.legend(loc="best", fontsize=8)  # clear of the curves: the best one is at the top for val/acc, the bottom for a loss
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(trials: list[Trial], search: SearchConfig, path: Path) -> None:
    plt = _pyplot()
    keys = list(search.space)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        kind = next(iter(search.space[key]))
        values = [t.params[key] for t in trials]
        finals = [t.curve[-1] for t in trials]
        colors = ["tab:orange" if t.status.startswith("stopped") else "tab:green" for t in trials]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and kind != "choice":
            ax.scatter(values, finals, c=colors)
            if kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({config_text(v) for v in values})
            ax.scatter([labels.index(config_text(v)) for v in values], finals, c=colors)
            ticks = {config_text(v): _tick(v, width=max(10, 60 // len(labels))) for v in values}  # side by side in 4 in
            ax.set_xticks(range(len(labels)), [ticks[label] for label in labels],
                          fontsize=7 if any("\n" in tick for tick in ticks.values()) else None)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set(xlabel=key, ylabel=f"final {search.metric}")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("final metric against each tuned value (orange: stopped early, green: ran to max_t)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tick(value, width: int = 26) -> str:
    """A drawn value under its axis: a group's settings one per line, long text (a weights path) wrapped at `width`."""
    lines = [f"{key}: {config_text(v)}" for key, v in value.items()] if isinstance(value, dict) else [config_text(value)]
    return "\n".join(part for line in lines for part in textwrap.wrap(line, width) or [line])


def plot_confusion(meta: dict, path: Path) -> None:
    plt = _pyplot()
    matrix, classes = meta["confusion_matrix"], meta["classes"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(int(count)), ha="center", va="center", color="white" if count > top / 2 else "black", fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"best checkpoint (epoch {meta['epoch']}): confusion matrix")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the report ------------------------------------------------------------------------------------------------


def write_report(out: Path, trials: list[Trial], failed: list[Failed], winner: Trial, search: SearchConfig,
                 best_cfg: RunConfig, meta: dict, uri: str) -> None:
    plot_curves(trials, winner, search, out / "curves.png")
    plot_params(trials, search, out / "params.png")
    plot_confusion(meta, out / "confusion.png")
    (out / "best.yaml").write_text(f"# python -m jobs.finetune --config best.yaml   (the winner of sweep {uri})\n"
                                   + best_cfg.to_yaml())
    per_class = {"classes": meta["classes"], "per_class": meta["per_class"], "confusion_matrix": meta["confusion_matrix"],
                 "epoch": meta["epoch"], "metrics": meta["metrics"]}
    (out / "per_class.json").write_text(json.dumps(per_class, indent=2))
    (out / "report.html").write_text(render_html(out, trials, failed, winner, search, best_cfg, meta, uri))


def render_html(out: Path, trials, failed: list[Failed], winner: Trial, search: SearchConfig, best_cfg: RunConfig, meta: dict,
                uri: str) -> str:
    esc = html.escape
    spent = sum(t.epochs[-1] for t in trials)
    full = len(trials) * search.scheduler.max_t
    head = "".join(f"<th>{esc(h)}</th>" for h in ["trial", *search.space, "global batch", f"best {search.metric}", "epochs", "stopped"])
    rows = []
    for t in sorted(trials, key=lambda t: t.rank, reverse=True):
        cells = [t.name, *(config_text(t.params[k]) for k in search.space), str(t.batch.get("global_batch_size", "")),
                 f"{t.best:.4f}", str(t.epochs[-1]), t.status]
        style = ' class="best"' if t is winner else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    failed_rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in [f.name, *(config_text(f.params[k]) for k in search.space)])
                          + f'<td style="text-align:left">{esc(f.error)}</td></tr>' for f in failed)
    failed_table = (f"<h2>Failed before reporting {esc(search.metric)}</h2><table><tr><th>trial</th>"
                    + "".join(f"<th>{esc(k)}</th>" for k in search.space) + f"<th>error</th></tr>{failed_rows}</table>") if failed else ""
    failed_count = f" ({len(failed)} failed before reporting)" if failed else ""
    per_class = meta["per_class"]
    class_rows = "".join(
        f"<tr><td>{esc(str(name))}</td>" + "".join(f"<td>{per_class[k][i]:.3f}</td>" for k in ("precision", "recall", "f1"))
        + f"<td>{per_class['support'][i]}</td></tr>" for i, name in enumerate(meta["classes"]))
    image = lambda name: f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}">'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sweep report: {esc(uri)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}} tr.best{{background:#fde2e2;font-weight:bold}}
img{{max-width:100%;margin:1em 0}} pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>Sweep report</h1>
<p>{esc(uri)}: {len(trials) + len(failed)} trials{failed_count}, metric <b>{esc(search.metric)}</b> ({search.mode}), scheduler {esc(search.scheduler.name)}
(max_t {search.scheduler.max_t}, grace_period {search.scheduler.grace_period}, reduction_factor {search.scheduler.reduction_factor:g}).</p>
<p><b>Epochs spent: {spent}</b> against {full} had every trial run to max_t ({spent / full:.0%}).</p>
<p>Best: <b>{esc(winner.name)}</b>, {esc(search.metric)} {winner.best:.4f}, with
{esc(listed_values(winner.params, ", "))}. Retrain it: <code>python -m jobs.finetune --config best.yaml</code>.</p>
<h2>Trials</h2><table><tr>{head}</tr>{"".join(rows)}</table>
{failed_table}
<h2>Learning curves</h2>{image("curves.png")}
<h2>Final metric against each hyperparameter</h2>{image("params.png")}
<h2>Best checkpoint: per-class metrics (epoch {meta["epoch"]})</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{class_rows}</table>
{image("confusion.png")}
<h2>best.yaml</h2><pre>{esc(best_cfg.to_yaml())}</pre>
</body></html>
"""


def publish(local: Path, target: storage.Location) -> str:
    """Put the report beside the experiment (a local copy, or an upload to S3)."""
    if target.is_s3:
        storage.upload_dir(local, target)
    else:
        shutil.copytree(local, target.path, dirs_exist_ok=True)
    return target.uri


def print_summary(trials: list[Trial], failed: list[Failed], winner: Trial, search: SearchConfig) -> None:
    """One row a trial, best first, in columns as wide as what they hold; the winner marked *, failed trials !."""
    lines = [(" trial", f"best {search.metric}", "epochs", "stopped", "values")]
    lines += [(("*" if t is winner else " ") + t.name, f"{t.best:.4f}", str(t.epochs[-1]), t.status, listed_values(t.params))
              for t in sorted(trials, key=lambda t: t.rank, reverse=True)]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for name, best, epochs, status, values in lines:
        print(f"{name:<{widths[0]}}  {best:>{widths[1]}}  {epochs:>{widths[2]}}  {status:<{widths[3]}}  {values}")
    for f in failed:
        print(f"!{f.name} failed before reporting ({listed_values(f.params)}): {f.error}")
    spent, full = sum(t.epochs[-1] for t in trials), len(trials) * search.scheduler.max_t
    print(f"epochs spent {spent} of {full} without early stopping ({spent / full:.0%})")


if __name__ == "__main__":
    run_module("jobs.analyze")
