"""jobs.sweep (Ray Tune + ASHA) and jobs.analyze on the shared local Ray cluster, and their bad-input contract."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import make_image_folder
from PIL import Image
from pydantic import ValidationError

from cluster import storage
from jobs import analyze, finetune, sweep
from jobs.sweep_config import MAX_CHECKED_COMBINATIONS, SearchConfig, listed_values, load_sweep
from tl_core.errors import ConfigError

REPO = Path(__file__).parent.parent


def write_sweep(tmp_path, data_root, experiment="sweep", name="sweep.yaml", **search) -> Path:
    cfg = {
        "experiment": experiment,
        "data": {"root": str(data_root), "image_size": 16, "loader_workers": 0, "val_fraction": 0.25},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "adam", "lr": 1e-3, "scheduler": "constant"},
        "train": {"batch_size": 8},
        "scaling": {"num_workers": 1},
        "checkpoint": {"keep": 1},
        "storage": {"root": str(tmp_path / "runs")},
        "search": {
            "num_samples": 6, "max_concurrent_trials": 2, "seed": 0, "metric": "val/acc", "mode": "max",
            "scheduler": {"name": "asha", "max_t": 6, "grace_period": 1, "reduction_factor": 2},
            "space": {"optim.lr": {"loguniform": [1.0e-6, 3.0e-2]}, "train.batch_size": {"choice": [4, 8]},
                      "model.dropout": {"uniform": [0.0, 0.5]}},
        },
    }
    for key, value in search.items():
        cfg["search"][key] = {**cfg["search"][key], **value} if isinstance(value, dict) and key != "space" else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def trial_histories(experiment: Path) -> dict[str, list[dict]]:
    """Every trial's reported rows, read from Tune's own result.json files."""
    out = {}
    for result in experiment.glob("*/result.json"):
        out[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return out


def epoch_metrics(row: dict) -> dict:
    """What the product reported for an epoch, without the keys Tune adds to every row (time, pid, iteration...)."""
    return {k: v for k, v in row.items() if k in ("epoch", "epoch_time_s", "lr") or "/" in k}


def test_resuming_a_sweep_whose_config_changed_names_the_first_difference(image_folder, tmp_path):
    """Tune restores the sweep's own space and samples, and analyze reads sweep.yaml: a changed config went unheard,
    or trained the resumed trials with settings the report did not know."""
    config = write_sweep(tmp_path, image_folder)
    base, search = load_sweep(config)
    (tmp_path / "runs" / "sweep").mkdir(parents=True)
    (tmp_path / "runs" / "sweep" / sweep.SWEEP_FILE).write_text(yaml.safe_dump(sweep.sweep_record(base, search)))
    sweep.check_same_sweep(*load_sweep(config))  # as started
    sweep.check_same_sweep(*load_sweep(config, ["storage.endpoint_url=http://127.0.0.1:9", "tracking.mlflow.uri=file:/x",
                                                "tracking.mlflow.experiment=x"]))  # where its services are may move
    for overrides, message in [
        (["optim.lr=0.5"], "--resume: sweep sweep was started with optim.lr: 0.001, and the config now says 0.5; a resume "
                           "continues the sweep as started, so restore it, or start a new sweep (another experiment name)"),
        (["search.num_samples=8"], "--resume: sweep sweep was started with search.num_samples: 6, and the config now says 8;"),
        (["search.space.optim.lr.loguniform=[0.1, 0.5]"], "--resume: sweep sweep was started with search.space: {"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)) as raised:
            sweep.check_same_sweep(*load_sweep(config, overrides))
        assert "\n" not in str(raised.value)  # the spaces, longer than a YAML line, were wrapped over three lines


def test_analyze_counts_an_epoch_reported_again_after_a_resume_once():
    """A resumed trial re-reports from its last checkpoint (epoch 2 here, then 2 and 3 again): each epoch is one point
    of its curve, the later report winning, and the epochs it ran are 3."""
    import pandas as pd

    rows = [{"epoch": 1, "val/acc": 0.2}, {"epoch": 2, "val/acc": 0.4}, {"epoch": 3, "val/acc": 0.1},  # killed after 3
            {"epoch": 2, "val/acc": 0.4}, {"epoch": 3, "val/acc": 0.5}]
    result = type("Result", (), {"metrics_dataframe": pd.DataFrame([{**r, "trial_id": "t0"} for r in rows]), "error": None,
                                 "config": {"optim.lr": 1e-3}, "path": "/runs/sweep/trial_t0"})()
    search = SearchConfig.model_validate({"metric": "val/acc", "mode": "max", "scheduler": {"name": "asha", "max_t": 3},
                                          "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    [trial] = analyze.summarize([result], search)
    assert trial.epochs == [1, 2, 3] and trial.curve == [0.2, 0.4, 0.5] and trial.best == 0.5 and trial.status == "ran to max_t"


def test_analyzes_table_keeps_its_columns_apart_however_wide_a_status_or_metric_name(capsys):
    """The columns had fixed widths: "stopped at rung 2 (epoch 12)" ran into the values beside it, and a metric name
    longer than val/acc pushed its header out of line."""
    import pandas as pd

    search = SearchConfig.model_validate({"metric": "val/precision", "scheduler": {"name": "asha", "max_t": 20, "grace_period": 4},
                                          "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    epochs = {"t0": 20, "t1": 12, "t2": 4}
    results = [type("Result", (), {"metrics_dataframe": pd.DataFrame([{"epoch": e, "val/precision": 0.5 + e / 100,
                                                                       "trial_id": name} for e in range(1, last + 1)]),
                                   "error": None, "config": {"optim.lr": 1e-3}, "path": f"/runs/sweep/trial_{name}"})()
               for name, last in epochs.items()]
    trials = analyze.summarize(results, search)
    analyze.print_summary(trials, [], analyze.pick_best(trials), search)
    table = capsys.readouterr().out.splitlines()[:4]
    starts = {line.index("optim.lr=") for line in table[1:]} | {table[0].index("values")}
    assert len(starts) == 1, table  # every row's values begin under the header's
    assert "stopped at rung 2 (epoch 12)  optim.lr=" in table[2]
    metric_end = {table[0].index("best val/precision") + len("best val/precision")}
    assert metric_end == {line.index(f"{0.5 + epochs[name] / 100:.4f}") + 6 for line, name in zip(table[1:], epochs, strict=True)}, table


@pytest.mark.parametrize("metric,mode,winner", [("val/acc", "max", "t1"), ("val/loss", "min", "t2"), ("val/f1", "max", "t1")])
def test_a_tie_on_the_sweeps_metric_goes_to_the_better_validation_loss(metric, mode, winner):
    """On 15 validation images accuracy moves in steps of 1/15, so trials tie; the winner was the first listed. Now the
    lower val/loss at the tied best wins (the higher val/acc when the metric is val/loss), whatever the order."""
    import pandas as pd

    rows = {"t0": [{"epoch": 1, "val/acc": 0.6, "val/f1": 0.5, "val/loss": 0.9}, {"epoch": 2, "val/acc": 0.8, "val/f1": 0.7, "val/loss": 0.7}],
            "t1": [{"epoch": 1, "val/acc": 0.8, "val/f1": 0.7, "val/loss": 0.5}, {"epoch": 2, "val/acc": 0.7, "val/f1": 0.6, "val/loss": 0.4}],
            "t2": [{"epoch": 1, "val/acc": 0.4, "val/f1": 0.3, "val/loss": 0.4}, {"epoch": 2, "val/acc": 0.75, "val/f1": 0.6, "val/loss": 0.4}]}
    results = [type("Result", (), {"metrics_dataframe": pd.DataFrame([{**r, "trial_id": name} for r in trial]), "error": None,
                                   "config": {"optim.lr": 1e-3}, "path": f"/runs/sweep/trial_{name}"})()
               for name, trial in rows.items()]
    search = SearchConfig.model_validate({"metric": metric, "mode": mode, "scheduler": {"name": "fifo", "max_t": 2},
                                          "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    for order in (results, results[::-1]):
        assert analyze.pick_best(analyze.summarize(order, search)).name == winner
        assert max(order, key=lambda r: search.ranking(r.metrics_dataframe)).path.endswith(winner)  # the sweep's summary
    lacking = pd.DataFrame([{"epoch": 1, metric: results[0].metrics_dataframe[metric].agg(mode)}])  # no tie-breaker
    assert search.ranking(lacking) < search.ranking(results[0].metrics_dataframe)  # loses the tie


def test_the_winners_checkpoint_reported_on_breaks_a_tie_as_the_trials_do(tmp_path):
    """Of a trial's kept checkpoints (Tune's, or a DDP trial's reported paths) the one with the lower val/loss of two
    that tie on the metric is the report's (per-class metrics, confusion matrix); a NaN score is never the best."""
    import pandas as pd

    search = SearchConfig.model_validate({"metric": "val/acc", "scheduler": {"name": "fifo", "max_t": 3},
                                          "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    rows = [{"val/acc": 0.8, "val/loss": 0.7}, {"val/acc": 0.8, "val/loss": 0.5}, {"val/acc": float("nan"), "val/loss": 0.1}]
    tune_kept = type("Result", (), {"best_checkpoints": [(f"ckpt{i}", row) for i, row in enumerate(rows)]})()
    assert analyze.best_checkpoint(tune_kept, search, None) == "ckpt1"
    for i in range(3):
        (tmp_path / f"ckpt{i}").mkdir()
        (tmp_path / f"ckpt{i}" / "meta.json").write_text("{}")
    ddp = type("Result", (), {"best_checkpoints": [], "metrics_dataframe": pd.DataFrame(
        [{**row, "checkpoint_path": str(tmp_path / f"ckpt{i}")} for i, row in enumerate(rows)])})()
    assert analyze.best_checkpoint(ddp, search, storage.parse(str(tmp_path))).path == str(tmp_path / "ckpt1")


def test_analyze_of_a_sweep_whose_every_trial_failed_names_the_first_error():
    """Before: 'no trial has reported val/acc yet', as if the sweep were still starting."""
    failed = [type("Result", (), {"metrics_dataframe": None, "error": RuntimeError(f"Traceback ...\nTrainingDiverged: epoch {i}"),
                                  "config": {}, "path": f"/runs/sweep/trial_t{i}"})() for i in (1, 2)]
    search = SearchConfig.model_validate({"metric": "val/acc", "mode": "max", "scheduler": {"name": "asha", "max_t": 3},
                                          "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    with pytest.raises(ConfigError, match=r"^experiment: every trial failed before reporting val/acc; the first: "
                                          r"RuntimeError: TrainingDiverged: epoch 1$"):
        analyze.summarize(failed, search)
    with pytest.raises(ConfigError, match=r"no trial has reported val/acc yet \(1 trial\(s\) started\); if the sweep was cut short, "
                                          r"continue it with python -m jobs.sweep --config \.\.\. --resume$"):  # still starting
        analyze.summarize([type("Result", (), {"metrics_dataframe": None, "error": None})()], search)


def test_analyze_names_trials_that_failed_before_reporting_with_their_values(tmp_path):
    """Their values come from Tune's params.json (Tune gives such a trial no config); a trial that failed before Tune
    wrote it is still named, its values unknown."""
    import pandas as pd
    import pyarrow.fs

    (tmp_path / "trial_t1").mkdir()
    (tmp_path / "trial_t1" / "params.json").write_text('{"optim.lr": 1e+30}')
    (tmp_path / "trial_t2").mkdir()
    make = lambda name, frame, error: type("Result", (), {  # noqa: E731
        "metrics_dataframe": frame, "error": error, "config": None, "metrics": {"trial_id": name},
        "path": str(tmp_path / f"trial_{name}"), "filesystem": pyarrow.fs.LocalFileSystem()})()
    results = [make("t0", pd.DataFrame([{"epoch": 1, "val/acc": 0.5, "trial_id": "t0"}]), None),
               make("t1", None, RuntimeError("Traceback ...\nTrainingDiverged: epoch 1: train/loss is nan")),
               make("t2", None, RuntimeError("the node died"))]
    search = SearchConfig.model_validate({"metric": "val/acc", "scheduler": {"name": "fifo", "max_t": 1},
                                          "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    failed = analyze.failed_before_reporting(results, search)
    assert [(f.name, f.params, f.error) for f in failed] == [
        ("t1", {"optim.lr": 1e30}, "RuntimeError: TrainingDiverged: epoch 1: train/loss is nan"),
        ("t2", {"optim.lr": None}, "RuntimeError: the node died")]


def test_a_trials_values_are_listed_as_a_config_reads_them():
    """Scratch is `model.weights=null`, as the user writes it (the summary and analyze printed Python's None)."""
    assert listed_values({"model.weights": None, "data.augment": False, "optim.lr": 0.000123456, "train.batch_size": 8,
                          "model.strategy": "lp_ft"}) == ("model.weights=null data.augment=false optim.lr=0.0001235 "
                                                          "train.batch_size=8 model.strategy=lp_ft")


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_asha_analyze_and_retrain_the_winner(ray_cluster, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=12, size=16)
    config = write_sweep(tmp_path, data)
    assert sweep.main(["--config", str(config)]) == 0
    experiment = tmp_path / "runs" / "sweep"
    histories = trial_histories(experiment)
    assert len(histories) == 6
    last_epochs = {name: rows[-1]["epoch"] for name, rows in histories.items()}
    assert min(last_epochs.values()) < 6 and max(last_epochs.values()) == 6  # ASHA stopped some, not all
    for rows in histories.values():
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # one report per epoch
        assert rows[-1]["global_batch_size"] == rows[-1]["batch_size_per_worker"] in (4, 8)
    assert len({rows[-1]["pid"] for rows in histories.values()}) < 6  # a trial's process runs later trials too

    # Each trial's TensorBoard events are its own tensorboard/'s alone: Tune's logger wrote a second set beside them
    # (tags ray/tune/...) and printed a line pointing at the driver's staging folder for those.
    assert "TensorBoard" not in capsys.readouterr().out
    events = list(experiment.rglob("events.out.tfevents.*"))
    assert len(events) == 6 and all(event.parent.name == "tensorboard" for event in events)
    assert analyze.main([str(experiment)]) == 0
    printed = capsys.readouterr().out
    report = experiment / "report"
    assert {p.name for p in report.iterdir()} >= {"report.html", "curves.png", "params.png", "confusion.png", "best.yaml",
                                                  "per_class.json"}
    for png in report.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
    page = (report / "report.html").read_text()
    trial_ids = {rows[-1]["trial_id"]: name for name, rows in histories.items()}
    assert all(trial_id in page for trial_id in trial_ids) and "data:image/png;base64," in page

    # The analysis picked the trial with the best metric, and its best.yaml is that trial's config.
    best_name = max(histories, key=lambda n: max(r["val/acc"] for r in histories[n]))
    best_value = max(r["val/acc"] for r in histories[best_name])
    starred = [line for line in printed.splitlines() if line.startswith("*")]
    assert len(starred) == 1 and float(starred[0].split()[1]) == pytest.approx(best_value)
    best_params = json.loads((experiment / trial_ids[starred[0].split()[0][1:]] / "params.json").read_text())
    best = yaml.safe_load((report / "best.yaml").read_text())
    assert best["optim"]["lr"] == pytest.approx(best_params["optim.lr"])
    assert best["train"]["batch_size"] == best_params["train.batch_size"] and best["train"]["epochs"] == 6
    per_class = json.loads((report / "per_class.json").read_text())
    assert per_class["classes"] == ["class_0", "class_1", "class_2"] and len(per_class["per_class"]["f1"]) == 3

    assert finetune.main(["--config", str(report / "best.yaml"), "--set", "train.epochs=1",
                          "--set", "scaling.num_workers=1"]) == 0
    assert (tmp_path / "runs" / "sweep-best" / "result.json").is_file()


@pytest.mark.integration
@pytest.mark.slow
def test_hub_weights_a_sweep_varies_are_downloaded_once_by_the_driver_and_staged_for_its_trials(ray_cluster, tmp_path):
    """Sources compared in one sweep: a space over `model.weights` with hub weights (the Hugging Face hub on
    127.0.0.1) and a file named relative to the driver's working directory, where no trial runs. The driver fetches
    the hub weights before any trial, as for a run, and stages them; the trials, whose caches lack them, train from
    the staged copy (they failed, "neither in this node's cache nor staged", when only the base's were staged), and
    the file reaches them as an absolute path (a trial read it relative to its own directory: "does not exist")."""
    from test_pretrained import TINY_TIMM, run_with_tiny_timm_hub, tiny_timm_weights

    tiny_timm_weights(tmp_path / "source.safetensors")
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=8, size=16)
    config = write_sweep(tmp_path, data, experiment="hub-sweep", search_alg="grid", num_samples=1,
                         space={"model.weights": {"grid": [None, "imagenet", "source.safetensors"]}})
    sweep_file = yaml.safe_load(config.read_text())
    sweep_file["model"] = {"backbone": TINY_TIMM, "strategy": "linear_probe"}
    sweep_file["search"]["scheduler"] = {"name": "fifo", "max_t": 1}
    config.write_text(yaml.safe_dump(sweep_file))
    run, downloads = run_with_tiny_timm_hub("jobs.sweep", config, tmp_path, ray_cluster, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert downloads == 1
    staged = tmp_path / "runs" / "_weights" / "huggingface" / "timm" / "test_resnet.r160_in1k" / "main" / "model.safetensors"
    assert staged.is_file()
    histories = trial_histories(tmp_path / "runs" / "hub-sweep")
    trained = [rows[-1]["config"]["model.weights"] for rows in histories.values() if rows]
    assert sorted(trained, key=str) == sorted([None, "imagenet", str(tmp_path / "source.safetensors")], key=str), run.stderr[-3000:]


@pytest.mark.integration
def test_a_sweep_over_models_with_their_own_weights_and_sizes_trains_and_retrains_each_as_drawn(ray_cluster, tmp_path, capsys):
    """Scratch resnet18 at 16 px against the offline ImageNet Lite0 probed at 32 px, each drawn whole (a group): every
    trial trains its model with its weights and size, and best.yaml retrains the winner's."""
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=6, size=16)
    scratch = {"model.backbone": "resnet18", "model.weights": None}
    imagenet = {"model.backbone": "timm:tf_efficientnet_lite0", "model.weights": "efficientnet_lite0_imagenet",
                "model.strategy": "linear_probe", "data.image_size": 32}
    config = write_sweep(tmp_path, data, experiment="sources", search_alg="grid", num_samples=1,
                         space={"source": {"grid": [scratch, imagenet]}})
    sweep_file = yaml.safe_load(config.read_text())
    sweep_file["search"]["scheduler"] = {"name": "fifo", "max_t": 1}
    config.write_text(yaml.safe_dump(sweep_file))
    assert sweep.main(["--config", str(config)]) == 0
    experiment = tmp_path / "runs" / "sources"
    drawn = {json.dumps(rows[-1]["config"]["source"], sort_keys=True): rows[-1] for rows in trial_histories(experiment).values()}
    assert set(drawn) == {json.dumps(scratch, sort_keys=True), json.dumps(imagenet, sort_keys=True)}
    for trial_dir in experiment.glob("trial-*"):
        checkpoint = next(trial_dir.glob("checkpoint_*"))
        meta = json.loads((checkpoint / "meta.json").read_text())
        source = json.loads((trial_dir / "params.json").read_text())["source"]
        assert (meta["config"]["model"]["backbone"], meta["config"]["data"]["image_size"]) == \
            (source["model.backbone"], source.get("data.image_size", 16))
    capsys.readouterr()
    assert analyze.main([str(experiment)]) == 0
    winner = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("*"))
    best = yaml.safe_load((experiment / "report" / "best.yaml").read_text())
    won = imagenet if "source={model.backbone: timm:tf_efficientnet_lite0" in winner else scratch
    assert {key: best[key.split(".")[0]][key.split(".")[1]] for key in won} == won, winner
    assert "<th>source</th>" in (experiment / "report" / "report.html").read_text()


def test_a_sweep_with_a_failed_trial_says_so_beside_its_best(ray_cluster, tmp_path, capsys):
    """A trial whose loss diverges fails; the others' best is the result, and the summary says one failed and why
    (it said "2 trials, best ..." alone, the failure only in Tune's log above); so does the report, which left such a
    trial out without a word."""
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=6, size=16)
    config = write_sweep(tmp_path, data, experiment="diverges", search_alg="grid", num_samples=1,
                         space={"optim.lr": {"grid": [1.0e-3, 1.0e30]}})
    sweep_file = yaml.safe_load(config.read_text())
    sweep_file["search"]["scheduler"] = {"name": "fifo", "max_t": 1}
    config.write_text(yaml.safe_dump(sweep_file))
    assert sweep.main(["--config", str(config)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-2]
    assert re.match(r"diverges: 2 trials \(1 failed; the first: TrainingDiverged: epoch 1: (train|val)/loss is nan; lower "
                    r"optim.lr or set train.clip_grad_norm\), best val/acc \d", summary), summary
    assert analyze.main([str(tmp_path / "runs" / "diverges")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len([line for line in printed if line.startswith("*")]) == 1
    failed = [line for line in printed if line.startswith("!")]
    assert len(failed) == 1 and re.search(r" failed before reporting \(optim.lr=1e\+30\): TrainingDiverged: epoch 1: ", failed[0])
    page = (tmp_path / "runs" / "diverges" / "report" / "report.html").read_text()
    assert "2 trials (1 failed before reporting)" in page and "<td>1e+30</td><td style=\"text-align:left\">TrainingDiverged" in page


@pytest.mark.integration
@pytest.mark.slow
def test_killed_sweep_driver_then_resume_keeps_finished_trials(ray_cluster, tmp_path):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=12, size=16)
    # Six trials, one at a time, killed once two have finished: the other four (~1 s each here) cannot all finish in
    # the 3 s the test waits for Tune's snapshot (with four trials, the last two sometimes did, on a quiet machine).
    config = write_sweep(tmp_path, data, experiment="resumed", num_samples=6, max_concurrent_trials=1,
                         scheduler={"name": "fifo", "max_t": 3})
    experiment = tmp_path / "runs" / "resumed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "--config", str(config)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(finished := {n: h for n, h in trial_histories(experiment).items() if h and h[-1]["epoch"] == 3}) < 2:
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.5)
        time.sleep(3)  # the experiment state is saved every second
        finished = {n: h for n, h in trial_histories(experiment).items() if h and h[-1]["epoch"] == 3}
    finally:
        kill_between_saves(driver, experiment)
    at_kill = trial_histories(experiment)  # the driver writes every result.json: nothing changes them until the resume
    assert len(at_kill) < 6 or not all(h and h[-1]["epoch"] == 3 for h in at_kill.values())

    assert sweep.main(["--config", str(config), "--resume"]) == 0
    after = {name: rows for name, rows in trial_histories(experiment).items() if rows}
    complete = {name: rows for name, rows in after.items() if rows[-1]["epoch"] == 3}
    assert len(complete) == 6 and len({rows[-1]["trial_id"] for rows in complete.values()}) == 6
    # A trial begun after Tune's last snapshot of the experiment runs again in a new directory; the partial one stays,
    # untouched. One trial runs at a time, so there is at most one.
    partial = after.keys() - complete.keys()
    assert len(partial) <= 1 and all(after[name] == at_kill[name] for name in partial)
    for name, rows in finished.items():
        # Finished before the kill: not trained again. Killed between such a trial's last report and Tune's next
        # snapshot, the resumed trial finds its last checkpoint complete and reports that epoch once more (jobs.runner).
        again = after[name][len(rows):]
        assert after[name][:len(rows)] == rows and len(again) <= 1
        assert all(epoch_metrics(row) == epoch_metrics(rows[-1]) for row in again)  # its epoch_time_s too: not retrained


def test_asha_resumed_keeps_the_rungs_its_trials_passed(tmp_path):
    """Tune saves no scheduler with a sweep: a resumed ASHA had no rung recorded, so the first trial to report after
    the resume passed every rung, and the next was judged against it alone at rungs it had long passed (a scratch
    trial, through rung 4 at 0.20 in the sweep, was stopped there once resumed, behind a trial at 0.63)."""
    from types import SimpleNamespace

    import pyarrow.fs
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from jobs.tune_results import ResumableASHA

    histories = {"fast": [(4, 0.47), (8, 0.63), (12, 0.74)], "slow": [(4, 0.20), (8, 0.20), (12, 0.37)],
                 "new": []}
    trials = {}
    for name, rows in histories.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text("".join(json.dumps({"epoch": e, "val/acc": v, "trial_id": name}) + "\n"
                                                             for e, v in rows) + '{"epoch": 16, "val/ac')  # a line cut short
        trials[name] = SimpleNamespace(trial_id=name, has_reported_at_least_once=bool(rows),
                                       storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(),
                                                               trial_fs_path=str(tmp_path / name)))

    def resumed(scheduler_class):
        scheduler = scheduler_class(time_attr="epoch", metric="val/acc", mode="max", max_t=20, grace_period=4, reduction_factor=3)
        for trial in trials.values():
            scheduler.on_trial_add(None, trial)
        first = scheduler.on_trial_result(None, trials["fast"], {"epoch": 16, "val/acc": 0.75})
        return first, scheduler.on_trial_result(None, trials["slow"], {"epoch": 16, "val/acc": 0.51})

    assert resumed(ASHAScheduler) == (TrialScheduler.CONTINUE, TrialScheduler.STOP)  # Tune's own, resumed
    assert resumed(ResumableASHA) == (TrialScheduler.CONTINUE, TrialScheduler.CONTINUE)
    scheduler = ResumableASHA(time_attr="epoch", metric="val/acc", mode="max", max_t=20, grace_period=4, reduction_factor=3)
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    assert [dict(recorded) for _, recorded in scheduler._brackets[0]._rungs] == [{"fast": 0.74, "slow": 0.37},
                                                                                  {"fast": 0.47, "slow": 0.20}]
    # A new trial is judged against them: 0.30 at rung 4 is below the cutoff of 0.20 and 0.47 (0.38).
    assert scheduler.on_trial_result(None, trials["new"], {"epoch": 4, "val/acc": 0.30}) == TrialScheduler.STOP


def test_tunes_default_loggers_are_off_only_for_a_sweep_that_names_its_own(monkeypatch):
    """A sweep begun before it named Tune's CSV and JSON loggers resumes with Tune's defaults: turning them off there
    would leave its resumed trials without the results jobs.analyze reads."""
    from types import SimpleNamespace

    from ray.tune import RunConfig
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from jobs.tune_results import NO_DEFAULT_LOGGERS, tune_loggers

    def tuner(callbacks):
        return SimpleNamespace(_local_tuner=SimpleNamespace(get_run_config=lambda: RunConfig(callbacks=callbacks)))

    monkeypatch.delenv(NO_DEFAULT_LOGGERS, raising=False)
    with tune_loggers(tuner([CSVLoggerCallback(), JsonLoggerCallback()])):
        assert os.environ[NO_DEFAULT_LOGGERS] == "1"
    assert NO_DEFAULT_LOGGERS not in os.environ
    with tune_loggers(tuner(None)):
        assert NO_DEFAULT_LOGGERS not in os.environ


def test_a_save_of_tunes_state_cut_short_is_set_aside_and_the_one_before_resumed(tmp_path, caplog):
    """A sweep driver killed while Tune copied its state into local storage leaves a file cut short; Tune's restore
    then failed with a traceback and went on as a new sweep (6 trials resumed so ran 1 more and ended with status 0).
    Tune's temporary files, which its upload can copy to storage empty, are no part of a save (a CI run's finished
    sweep read as cut short, and analyze refused it)."""
    import pickle

    from cluster.storage import parse
    from jobs import tune_results

    experiment = tmp_path / "sweep"
    experiment.mkdir()
    first, second = "2026-12-06_10-00-00", "2026-12-06_11-00-00"
    (experiment / f"experiment_state-{first}.json").write_text('{"trial_data": []}')
    (experiment / f"basic-variant-state-{first}.json").write_bytes(pickle.dumps({"trials": 3}))  # a pickle, so named
    (experiment / f"experiment_state-{second}.json").write_text('{"trial_data": []}')
    (experiment / f"searcher-state-{second}.pkl").write_bytes(pickle.dumps({"trials": 4})[:-2])  # cut short
    for temporary in (f".0b5e-tmp-basic-variant-state-{first}.json", f"tmp-search_gen_state-{first}.json"):
        (experiment / temporary).write_bytes(b"")  # Tune's, copied to storage before it renamed them: no part of a save
    location = parse(str(experiment))
    assert tune_results.set_aside_cut_short_state(location) is True
    assert sorted(p.name for p in experiment.glob("[be]*state-*")) == [f"basic-variant-state-{first}.json", f"experiment_state-{first}.json"]
    assert sorted(p.name.rsplit("-", 2)[0] for p in (experiment / "damaged").iterdir()) == [
        f"experiment_state-{second}.json", f"searcher-state-{second}.pkl"]  # kept, under NAME-TIMESTAMP
    assert tune_results.set_aside_cut_short_state(location) is True  # whole saves stay where they are

    (experiment / f"experiment_state-{first}.json").write_text("")
    assert tune_results.set_aside_cut_short_state(location) is False
    assert not list(experiment.glob("[be]*state-*")) and "it starts again" in caplog.text
    assert tune_results.set_aside_cut_short_state(parse(str(tmp_path / "never-saved"))) is False


@pytest.mark.parametrize("logger", ["CSVResults", "JsonResults"])
def test_a_trial_restarted_from_a_checkpoint_keeps_every_row_it_logged(tmp_path, logger):
    """A trial restarted in the same run (PBT's exploit, a retry after a failure) had its results file copied back from
    storage, which the driver syncs only every so often: a CI run's exploited trial lost its first epoch. A resumed
    sweep, whose driver stages its files in a new folder, still starts from the copy in storage."""
    import shutil
    from types import SimpleNamespace

    import pyarrow.fs

    from jobs import tune_results

    class Trial:  # what Tune's loggers read of a trial
        def __init__(self, local: Path):
            self.local_path, self.config, self.checkpoint = str(local), {"optim.lr": 0.1}, None
            self.storage = SimpleNamespace(trial_fs_path=str(tmp_path / "storage"), storage_filesystem=pyarrow.fs.LocalFileSystem())
            self.init_local_path()  # Tune makes it when it makes the trial

        def init_local_path(self):
            Path(self.local_path).mkdir(parents=True, exist_ok=True)

    def run(callbacks, trial, epochs, sync_after=None):
        callbacks.on_trial_start(0, [], trial)
        for epoch in epochs:
            callbacks.on_trial_result(0, [], trial, {"epoch": epoch})
            if epoch == sync_after:  # the driver's periodic sync to storage
                shutil.copytree(trial.local_path, tmp_path / "storage", dirs_exist_ok=True)
        callbacks.on_trial_error(0, [], trial)

    def epochs(trial):
        text = Path(trial.local_path, "progress.csv" if logger == "CSVResults" else "result.json").read_text()
        if logger == "CSVResults":
            return [int(row["epoch"]) for row in csv.DictReader(text.splitlines())]
        return [json.loads(line)["epoch"] for line in text.splitlines()]

    callbacks, trial = getattr(tune_results, logger)(), Trial(tmp_path / "staging-1")
    run(callbacks, trial, [1, 2], sync_after=1)
    trial.checkpoint = object()  # restarted from a checkpoint, in the same run
    run(callbacks, trial, [3])
    assert epochs(trial) == [1, 2, 3]
    shutil.copytree(trial.local_path, tmp_path / "storage", dirs_exist_ok=True)  # the run's last sync
    resumed = Trial(tmp_path / "staging-2")  # a resumed sweep, staged anew
    resumed.checkpoint = object()
    run(getattr(tune_results, logger)(), resumed, [4])
    assert epochs(resumed) == [1, 2, 3, 4]


@pytest.mark.parametrize("ctrl_c", [True, False])
def test_a_tune_run_stopped_by_ctrl_c_is_told_from_a_finished_one(ctrl_c):
    """Tune's SIGINT handler ends its run gracefully and returns as if it had finished (a sweep then printed its
    "best" and exit status 0). Checked against Tune's own handler setup, as Tuner.fit runs it."""
    from ray.tune.tune import _setup_signal_catching

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    try:
        with sweep.ctrl_c_watched() as stopped:
            tune_saw = _setup_signal_catching()
            if ctrl_c:
                os.kill(os.getpid(), signal.SIGINT)
                assert tune_saw.wait(5)
                with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is Python's default again
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert stopped.is_set() == ctrl_c
        assert signal.getsignal(signal.SIGINT) is before[0]  # the handler from before is back
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGUSR1, before[1])


@pytest.mark.integration
@pytest.mark.slow
def test_two_sweeps_at_once_in_one_ray_job_each_run_their_own_config(ray_cluster, tmp_path):
    """Ray Tune registers a trainable under its name for the whole Ray job: two sweeps started together from one
    script (as Ray tasks) once ran each other's trials with one base config."""
    import ray

    from jobs.sweep_config import load_sweep

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=8, size=16)
    sweeps = {}
    for batch_size in (4, 6):
        config = write_sweep(tmp_path, data, experiment=f"together-{batch_size}", name=f"together-{batch_size}.yaml", num_samples=2,
                             max_concurrent_trials=1, scheduler={"name": "fifo", "max_t": 1}, space={"optim.lr": {"choice": [1.0e-3]}})
        sweeps[batch_size] = load_sweep(config, [f"train.batch_size={batch_size}"])

    def run(base, search) -> list[int]:
        return [r.metrics["batch_size_per_worker"] for r in sweep.run_sweep(base, search, resume=False)]

    together = ray.remote(num_cpus=0)(run)
    done = ray.get([together.remote(base, search) for base, search in sweeps.values()], timeout=300)
    assert done == [[4, 4], [6, 6]]


def test_sweep_config_values_and_rungs(tmp_path):
    config = write_sweep(tmp_path, tmp_path, space={"train.batch_size": {"choice": [16, 32]}, "optim.lr": {"uniform": [0.1, 0.2]}},
                         scale_lr="linear", base_batch_size=64)
    base, search = load_sweep(config)
    cfg = sweep.trial_config(base.to_dict(), search.model_dump(), {"train.batch_size": 32, "optim.lr": 0.2})
    assert cfg.train.batch_size == 32 and cfg.optim.lr == pytest.approx(0.2 * 32 / 64)  # the linear scaling rule
    assert analyze.rungs(search) == [1, 2, 4]
    space = sweep.param_space(search)
    assert set(space) == {"train.batch_size", "optim.lr"}


def test_a_space_entry_can_be_overridden_from_the_command_line(tmp_path):
    """--set splits its key at dots, so an override of the entry `optim.lr` arrives as optim: {lr: ...}; it replaced
    nothing and failed as the unknown key "optim" before nested keys were read as dotted ones."""
    config = write_sweep(tmp_path, tmp_path, space={"optim.lr": {"loguniform": [1e-4, 1e-1]}, "train.batch_size": {"choice": [16, 32]}})
    _, search = load_sweep(config, ["search.space.optim.lr.choice=[0.01, 0.1]", "search.space.model.dropout.uniform=[0, 0.5]"])
    assert search.space == {"optim.lr": {"choice": [0.01, 0.1]}, "train.batch_size": {"choice": [16, 32]},
                            "model.dropout": {"uniform": [0, 0.5]}}
    with pytest.raises(ConfigError, match=r"search.space: optim.rate: not a config key; allowed in optim: name, lr"):
        load_sweep(config, ["search.space.optim.rate.choice=[1]"])


SWEEP_BAD_INPUTS = {
    "empty space": ({"space": {}}, "search.space: the search space is empty"),
    "a randint of one value": ({"space": {"train.batch_size": {"randint": [8, 9]}}},
                               "search.space: train.batch_size: randint [8, 9] draws only 8, as its upper bound is excluded "
                               "(as in Tune and range()); give [8, 10] for 8 or 9"),
    "unknown key": ({"space": {"optim.learning_rate": {"choice": [0.1]}}},
                    "optim.learning_rate: not a config key (did you mean optim.lr?); allowed in optim: name, lr"),
    "grace beyond max_t": ({"scheduler": {"grace_period": 9}}, "search.scheduler: grace_period: 9 is more than max_t 6"),
    "unknown metric": ({"metric": "val/top1"}, "search.metric: unknown metric 'val/top1'"),
    "no samples": ({"num_samples": 0}, "search.num_samples: Input should be greater than or equal to 1"),
    "a misspelt key": ({"num_sample": 4}, "search.num_sample: unknown key (did you mean search.num_samples?); allowed: space"),
    "bad value in space": ({"space": {"optim.name": {"choice": ["sgd", "lamb"]}}}, "search.space.optim.name: value 'lamb'"),
    "bohb without its scheduler": ({"search_alg": "bohb"}, "search_alg: bohb and scheduler.name: bohb (HyperBand for BOHB) go together"),
    "a grid for optuna": ({"search_alg": "optuna", "space": {"optim.lr": {"grid": [0.1, 0.01]}}},
                          "search_alg: optuna samples its own points; use choice instead of grid"),
    "a grid value twice": ({"search_alg": "grid", "num_samples": 1, "space": {"optim.lr": {"grid": [0.1, 0.01, 0.1]}}},
                           "search.space: optim.lr: grid lists 0.1 twice; each grid value runs its own trials, so list it once"),
    "a grid repeated": ({"search_alg": "grid", "space": {"optim.lr": {"grid": [0.1, 0.01]}}},
                        "search.num_samples: 6 repeats a space of grid entries only, and every repeat would train the same "
                        "trials again (the same values, the same train.seed); give num_samples: 1 (to repeat on other seeds, "
                        "add train.seed: {grid: [0, 1, 2, 3, 4, 5]} to the space)"),
    "a resource key": ({"search_alg": "grid", "num_samples": 1, "space": {"scaling.num_workers": {"grid": [1, 2]}}},
                       "search.space: scaling.num_workers: every trial holds the resources the run config's scaling section "
                       "asks for, reserved once for the sweep, so they cannot vary between trials"),
    "pbt on a fixed key": ({"scheduler": {"name": "pbt"}}, "pbt changes hyperparameters of running trials, which train.batch_size"),
    "synch without pbt": ({"scheduler": {"synch": True}}, "scheduler.synch: applies to scheduler.name pbt, not asha"),
    "synch pbt beyond the concurrency": ({"scheduler": {"name": "pbt", "synch": True}, "space": {"optim.lr": {"choice": [0.1]}}},
                                         "num_samples (6) may not exceed max_concurrent_trials (2)"),
    "unknown searcher": ({"search_alg": "hyperopt"}, "search.search_alg: Input should be 'random', 'grid', 'optuna' or 'bohb'"),
    "two keys that clash": ({"space": {"model.strategy": {"choice": ["full", "lp_ft"]}, "train.epochs": {"choice": [1, 4]}}},
                            "search.space: model.strategy 'lp_ft' and train.epochs 1 are not valid together: model.lp_epochs: "
                            "1 must be less than train.epochs (1)"),
    "three keys that clash": ({"space": {"model.strategy": {"choice": ["full", "lp_ft"]}, "model.lp_epochs": {"choice": [1, 3]},
                                         "train.epochs": {"choice": [2, 6]}}},
                              "search.space: model.lp_epochs 3, model.strategy 'lp_ft' and train.epochs 2 are not valid together"),
    "weights a trial cannot load": ({"space": {"model.weights": {"choice": [None, "missing.pt"]}}},
                                    "search.space: a trial with model.weights 'missing.pt' cannot run: model.weights: "
                                    "missing.pt does not exist"),
    "a section drawn whole": ({"space": {"model": {"choice": [{"backbone": "resnet18"}]}}},
                              "search.space: model: is a section; name one of its keys (backbone, weights, "),
    "a group drawn from a range": ({"space": {"source": {"uniform": [{"optim.lr": 0.1}, {"optim.lr": 0.2}]}}},
                                   "search.space: source: draws several keys together from a choice or grid of mappings, "
                                   "not uniform"),
    "a group's name that would make a folder": ({"space": {"a/b": {"choice": [{"optim.lr": 0.1}]}}},
                                                "search.space: 'a/b': a group's name takes letters, digits, '_' and '-', "
                                                "beginning with a letter"),
    "a group's unknown key": ({"space": {"source": {"choice": [{"model.backbon": "resnet18"}]}}},
                              "search.space: source: model.backbon: not a config key (did you mean model.backbone?)"),
    "a group's value that is no mapping": ({"space": {"source": {"choice": [{"optim.lr": 0.1}, 4]}}},
                                           "search.space: source: draws several keys together, so each of its values is a "
                                           "mapping of config keys (got 4)"),
    "a key drawn by two entries": ({"space": {"source": {"choice": [{"optim.lr": 0.1, "model.dropout": 0.1}]},
                                              "optim.lr": {"choice": [0.2]}}},
                                   "search.space: optim.lr and source both set optim.lr; draw it in one entry"),
    "a group's resource key": ({"search_alg": "grid", "num_samples": 1, "space": {"source": {"grid": [{"scaling.num_workers": 2}]}}},
                               "search.space: source: every trial holds the resources the run config's scaling section asks "
                               "for, reserved once for the sweep, so they cannot vary between trials (scaling.num_workers)"),
    "a group for optuna": ({"search_alg": "optuna", "space": {"source": {"choice": [{"optim.lr": 0.1}]}}},
                           "search.search_alg: optuna draws numbers and words, not the settings source draws together"),
    "a group's keys that clash": ({"space": {"source": {"choice": [{"model.strategy": "lp_ft", "train.epochs": 1}]}}},
                                  "search.space.source: value {model.strategy: lp_ft, train.epochs: 1} is not valid: "
                                  "model.lp_epochs: 1 must be less than train.epochs (1)"),
    "a group's weights its backbone cannot load": (
        {"space": {"source": {"choice": [{"model.backbone": "resnet18", "model.weights": "efficientnet_lite0_imagenet"}]}}},
        "search.space: a trial with model.backbone 'resnet18' and model.weights 'efficientnet_lite0_imagenet' cannot run: "
        "model.weights: efficientnet_lite0_imagenet are weights for model.backbone: timm:tf_efficientnet_lite0, not resnet18"),
    "lp_epochs beyond max_t": ({"space": {"model.strategy": {"choice": ["full", "lp_ft"]}, "model.lp_epochs": {"choice": [1, 6]}}},
                               "search.space: model.lp_epochs 6 and model.strategy 'lp_ft' are not valid together: "
                               "model.lp_epochs: 6 must be less than train.epochs (6)"),
}


def test_a_trial_and_the_retrained_winner_keep_checkpoints_by_the_sweeps_metric(tmp_path, monkeypatch, caplog):
    """Tune keeps a trial's checkpoints by search.metric; best.yaml (the winner's trial config) kept checkpoint.metric,
    so a sweep judged on val/loss retrained its winner keeping the best val/acc, and a DDP trial's TorchTrainer kept
    its own by that too. A checkpoint.metric the sweep file sets, which no trial reads, is named in a warning."""
    config = write_sweep(tmp_path, make_image_folder(tmp_path / "data", n_classes=2, per_class=4), metric="val/loss", mode="min")
    base, search = load_sweep(config, ["checkpoint.metric=val/f1"])
    cfg = sweep.trial_config(base.to_dict(), search.model_dump(), {"optim.lr": 0.01})
    assert (cfg.checkpoint.metric, cfg.checkpoint.mode, cfg.optim.lr) == ("val/loss", "min", 0.01)

    monkeypatch.setattr(sweep, "run_sweep", lambda *args, **kwargs: type("NoTrials", (list,), {"errors": []})())
    assert sweep.main(["--config", str(config), "--set", "checkpoint.metric=val/f1"]) == 1
    assert ("config: in a sweep, search.metric val/loss keeps the trials' checkpoints (and best.yaml's); nothing reads "
            "checkpoint.metric: val/f1") in caplog.text
    caplog.clear()
    assert sweep.main(["--config", str(config), "--set", "experiment=again"]) == 1  # checkpoint.metric left as it was
    assert "nothing reads checkpoint.metric" not in caplog.text

    simclr = write_sweep(tmp_path, tmp_path / "data", name="simclr.yaml", metric="val/f1", mode="max",
                         space={"optim.lr": {"loguniform": [1.0e-4, 1.0e-1]}})
    with pytest.raises(ConfigError, match=r"search.metric: pretrain.method: simclr does not report val/f1; it reports "):
        load_sweep(simclr, ["pretrain.method=simclr"])


def test_a_space_of_grid_entries_only_runs_once_unless_num_samples_is_given():
    """Nothing in such a space is drawn, so each repeat (num_samples, default 8) trained the same trials again from the
    same train.seed: `search_alg: grid` with the default ran every trial 8 times. It runs once; a num_samples given
    for it is refused (the bad-input table), a space that draws anything keeps the default, and PBT (which changes its
    trials' values) and a stored sweep (jobs.analyze reads it as it ran) are left as they are."""
    grid = {"optim.lr": {"grid": [0.1, 0.01]}, "train.seed": {"grid": [0, 1]}}
    assert SearchConfig(space=grid, search_alg="grid").num_samples == 1
    assert SearchConfig(space=grid).num_samples == 1  # random search over grid entries draws nothing either
    assert SearchConfig(space={**grid, "model.dropout": {"uniform": [0.0, 0.5]}}).num_samples == 8
    assert SearchConfig.model_validate({"space": grid, "num_samples": 3}, context={"stored": True}).num_samples == 3
    pbt = {"space": {"optim.lr": {"grid": [0.1, 0.01]}}, "num_samples": 4, "scheduler": {"name": "pbt"}}
    assert SearchConfig.model_validate(pbt).num_samples == 4
    with pytest.raises(ValidationError, match=r"num_samples: 2 repeats a space of grid entries only, .*; give num_samples: 1 "
                                              r"\(its train.seed grid already repeats them on other seeds\)"):
        SearchConfig(space=grid, num_samples=2)


def test_sweep_checks_combinations_of_keys_smallest_first_within_a_budget():
    """Every key alone, then every pair, ...: the whole product of a small space; a large one stops at the size whose
    combinations would pass the budget, never before every pair."""
    small = SearchConfig(space={"optim.lr": {"choice": [0.1, 0.2]}, "train.epochs": {"choice": [1, 2, 3]},
                                "model.dropout": {"choice": [0.0, 0.5]}})
    sizes = [len(c) for c in small.trial_combinations()]
    assert sizes == sorted(sizes) and sizes.count(1) == 7 and sizes.count(2) == 2 * 3 + 2 * 2 + 3 * 2 and sizes.count(3) == 12
    keys = ("optim.lr", "optim.weight_decay", "optim.l1", "optim.momentum", "optim.min_lr_ratio", "optim.gamma", "model.dropout",
            "model.backbone_lr_mult", "train.label_smoothing")
    large = SearchConfig(space={key: {"choice": [0.1, 0.2, 0.3]} for key in keys})
    combos = list(large.trial_combinations())
    # 9 keys of 3 values: 27 alone, 36 * 9 pairs, 84 * 27 triples; the 126 * 81 quadruples would pass the budget
    assert [sum(len(c) == size for c in combos) for size in (1, 2, 3, 4)] == [27, 36 * 9, 84 * 27, 0]
    assert len(combos) <= MAX_CHECKED_COMBINATIONS


def test_a_sweep_checks_every_model_its_trials_can_draw_within_a_budget():
    """Every combination of the model keys' values (the schema-checked `trial_values`), or past the budget one per
    value of the longest list, every value in one; keys the model does not depend on are not varied."""
    space = {"model.backbone": {"choice": ["resnet18", "resnet34"]}, "model.weights": {"choice": [None, "a.pt", "b.pt"]},
             "optim.lr": {"choice": [0.1, 0.2]}}
    keys = ("model.backbone", "model.weights")
    variants = SearchConfig(space=space).variants(keys)
    assert len(variants) == 6 and len(set(variants)) == 6
    assert all(tuple(key for key, _ in variant) == keys for variant in variants)
    few = SearchConfig(space=space).variants(keys, limit=4)
    assert [dict(v) for v in few] == [{"model.backbone": "resnet18", "model.weights": None},
                                      {"model.backbone": "resnet34", "model.weights": "a.pt"},
                                      {"model.backbone": "resnet18", "model.weights": "b.pt"}]
    assert SearchConfig(space={"optim.lr": {"choice": [0.1]}}).variants(keys) == []
    sizes = SearchConfig(space={"train.batch_size": {"randint": [2, 9]}}).variants(["train.batch_size"])
    assert sizes == [(("train.batch_size", 2),), (("train.batch_size", 8),)]  # a range's edges


def test_a_group_draws_several_keys_together_in_every_trial_and_check(tmp_path, monkeypatch):
    """A backbone and the weights, strategy and input size that go with it, drawn as one (`source`): a scratch resnet18
    against the offline ImageNet Lite0, which resnet18 cannot load and which no space of separate keys could pair."""
    import dataclasses

    from jobs.preflight import TRIAL_MODEL_KEYS, check_run
    from jobs.sweep import sweep_has_progress, with_absolute_space
    from tl_core.recipes import RECIPES

    built = []
    recipe = RECIPES["supervised"]
    monkeypatch.setitem(RECIPES, "supervised", dataclasses.replace(
        recipe, build_model=lambda cfg, classes: built.append((cfg.model.backbone, cfg.model.weights, cfg.data.image_size))
        or recipe.build_model(cfg, classes)))
    scratch = {"model.backbone": "resnet18", "model.weights": None}
    lite0 = {"model": {"backbone": "timm:tf_efficientnet_lite0", "weights": "efficientnet_lite0_imagenet", "strategy": "lp_ft",
                       "lp_epochs": 2}, "data.image_size": 32}
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=4)
    config = write_sweep(tmp_path, data, space={"source": {"grid": [scratch, lite0]}, "optim.lr": {"choice": [0.1, 0.01]}})
    base, search = load_sweep(config)
    assert sorted(search.varied_keys()) == ["data.image_size", "model.backbone", "model.lp_epochs", "model.strategy",
                                            "model.weights", "optim.lr"]
    variants = search.variants(TRIAL_MODEL_KEYS)
    assert [dict(v) for v in variants] == [scratch, {"model.backbone": "timm:tf_efficientnet_lite0",
                                                     "model.weights": "efficientnet_lite0_imagenet", "model.strategy": "lp_ft",
                                                     "data.image_size": 32}]
    check_run(base, resume=False, has_progress=sweep_has_progress, varied=search.varied_keys(), variants=variants)
    assert sorted(built, key=str) == [("resnet18", None, 16), ("timm:tf_efficientnet_lite0", "efficientnet_lite0_imagenet", 32)]

    params = sweep.param_space(search)
    assert params["source"] == {"grid_search": [scratch, lite0]}
    trial = sweep.trial_config(base.to_dict(), search.model_dump(), {"source": lite0, "optim.lr": 0.1})
    assert (trial.model.backbone, trial.model.strategy, trial.model.lp_epochs, trial.data.image_size, trial.optim.lr) == \
        ("timm:tf_efficientnet_lite0", "lp_ft", 2, 32, 0.1)
    assert listed_values({"source": scratch, "optim.lr": 0.1}) == "source={model.backbone: resnet18, model.weights: null} optim.lr=0.1"

    # A path among a group's values is made absolute, as a single key's is: trials run in other directories.
    monkeypatch.chdir(tmp_path)
    torch_save = tmp_path / "src.pt"
    torch_save.write_bytes(b"")
    _, search = load_sweep(config, ["search.space.source.grid=[{model.weights: src.pt, model.dropout: 0.1}]"])
    assert with_absolute_space(base, search).space["source"] == {"grid": [{"model.weights": str(torch_save), "model.dropout": 0.1}]}


def test_the_params_plot_puts_a_groups_settings_one_per_line_under_its_axis():
    """A group's value as one tick label ran across its neighbours' plots, unreadable."""
    assert analyze._tick({"model.backbone": "resnet18", "model.weights": None}) == "model.backbone: resnet18\nmodel.weights: null"
    assert analyze._tick("/data/sources/run-supervised-digits-0-4") == "/data/sources/run-\nsupervised-digits-0-4"
    assert analyze._tick(0.001) == "0.001"


def test_a_sweep_checks_the_models_its_trials_draw_not_the_files_own(tmp_path):
    """The sweep file's backbone (resnet18, the default) is no trial's when the space varies it: its misfit weights
    were refused (and hub weights would have been downloaded) though every trial trains the Lite0 they fit."""
    from jobs.preflight import TRIAL_MODEL_KEYS, check_run
    from jobs.sweep import sweep_has_progress

    config = write_sweep(tmp_path, make_image_folder(tmp_path / "data", n_classes=2, per_class=4),
                         space={"model.backbone": {"choice": ["timm:tf_efficientnet_lite0"]}})
    sweep_file = yaml.safe_load(config.read_text())
    sweep_file["model"] = {"weights": "efficientnet_lite0_imagenet"}
    config.write_text(yaml.safe_dump(sweep_file))

    def check(overrides=()):
        base, search = load_sweep(config, overrides)
        return check_run(base, resume=False, has_progress=sweep_has_progress, varied=search.space,
                         variants=search.variants(TRIAL_MODEL_KEYS))

    assert check().model.backbone == "resnet18"
    with pytest.raises(ConfigError, match=re.escape("search.space: a trial with model.backbone 'resnet18' cannot run: "
                                                    "model.weights: efficientnet_lite0_imagenet are weights for")):
        check(["search.space.model.backbone.choice=[resnet18, 'timm:tf_efficientnet_lite0']"])


def test_a_sweep_builds_each_model_once_and_checks_each_batch_size_its_trials_draw(tmp_path, monkeypatch):
    """A model drawn at several batch sizes was built, its weights loaded, once per size."""
    import dataclasses

    from jobs.preflight import TRIAL_MODEL_KEYS, check_run
    from jobs.sweep import sweep_has_progress
    from tl_core.recipes import RECIPES

    built = []
    recipe = RECIPES["supervised"]
    monkeypatch.setitem(RECIPES, "supervised", dataclasses.replace(
        recipe, build_model=lambda cfg, classes: built.append(cfg.model.backbone) or recipe.build_model(cfg, classes)))
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=4)
    space = {"model.backbone": {"choice": ["resnet18", "mobilenet_v3_small"]}, "train.batch_size": {"choice": [2, 4, 8]}}
    base, search = load_sweep(write_sweep(tmp_path, data, space=space))
    check_run(base, resume=False, has_progress=sweep_has_progress, varied=search.space, variants=search.variants(TRIAL_MODEL_KEYS))
    assert sorted(built) == ["mobilenet_v3_small", "resnet18"]
    space["train.batch_size"]["choice"] = [1, 4]
    base, search = load_sweep(write_sweep(tmp_path, data, space=space))
    with pytest.raises(ConfigError, match=re.escape("search.space: a trial with model.backbone 'resnet18' and train.batch_size 1 "
                                                    "cannot run: train.batch_size: 1 with 6 training image(s)")):
        check_run(base, resume=False, has_progress=sweep_has_progress, varied=search.space,
                  variants=search.variants(TRIAL_MODEL_KEYS))


def test_pbt_needs_a_checkpoint_at_every_perturbation(tmp_path, capsys):
    space = {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}
    config = write_sweep(tmp_path, make_image_folder(tmp_path / "data", n_classes=2, per_class=4), space=space,
                         scheduler={"name": "pbt", "perturbation_interval": 2})
    assert sweep.main(["--config", str(config), "--set", "checkpoint.every=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {config}: checkpoint.every: 3 must divide scheduler.perturbation_interval (2): a pbt exploit "
                       "copies the checkpoint of the epoch it happens at"), err
    assert not (tmp_path / "runs").exists()
    base, _ = load_sweep(config, ["checkpoint.every=2"])  # one at every perturbation
    assert base.checkpoint.every == 2


@pytest.mark.integration
@pytest.mark.parametrize("scaling,message", [
    ({"resources_per_worker": {"CPU": 8}}, "scaling.resources_per_worker: a worker needs 8 CPU, but the Ray cluster has 2"),
    ({"use_gpu": True}, "scaling.use_gpu: a worker needs 1 GPU, but the Ray cluster has 0"),
])
def test_a_sweep_whose_trials_the_cluster_cannot_place_is_an_error_not_a_hang(ray_cluster, image_folder, tmp_path, capsys,
                                                                               scaling, message):
    """Tune left such trials pending forever (a sweep with resources_per_worker.CPU: 8 on 2 CPUs waited until killed)."""
    config = write_sweep(tmp_path, image_folder)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "scaling": {"num_workers": 1, **scaling}}))
    assert sweep.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}", err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", list(SWEEP_BAD_INPUTS))
def test_sweep_bad_input_is_one_line_exit_2_and_launches_nothing(case, tmp_path, capsys):
    patch, message = SWEEP_BAD_INPUTS[case]
    config = write_sweep(tmp_path, make_image_folder(tmp_path / "data", n_classes=2, per_class=4), **patch)
    assert sweep.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "runs").exists()


def test_analyze_needs_an_experiment(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert analyze.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == f"error: experiment: there is no Ray Tune experiment at {tmp_path / 'empty'}"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text("{}")
    assert analyze.main([str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: experiment: {tmp_path / 'run'} is a training run (result.json), "
                                               "not a sweep; analyze takes the experiment of a jobs.sweep")


def test_analyze_of_a_sweep_with_no_whole_save_of_its_state_is_one_line(image_folder, tmp_path, capsys):
    """Its driver stopped before Tune's first save, or while saving every one: one line saying what --resume does."""
    experiment = tmp_path / "runs" / "sweep"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    (experiment / "sweep.yaml").write_text(yaml.safe_dump(sweep.sweep_record(*load_sweep(write_sweep(tmp_path, image_folder)))))
    for save, message in [(None, "Tune has saved no state of the sweep yet (its driver was stopped before its first save)"),
                          ("", "Tune's saves of the sweep's state are cut short (its driver was stopped while saving them)")]:
        if save is not None:
            (experiment / "experiment_state-2026-12-06_10-00-00.json").write_text(save)
        before = sorted(p.name for p in experiment.iterdir())
        assert analyze.main([str(experiment)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: experiment: {experiment}: {message}; `jobs.sweep --resume`"), err
        assert sorted(p.name for p in experiment.iterdir()) == before  # analyze reads: nothing set aside or written


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("searcher,scheduler", [("optuna", "asha"), ("bohb", "bohb")])
def test_optuna_and_bohb_search_through_ray_tunes_own_integrations(searcher, scheduler, ray_cluster, tmp_path):
    """TPE (Optuna) with ASHA, and BOHB with HyperBand for BOHB: every trial runs, the searcher proposes distinct
    points inside the space, and the sweep's report is written."""
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=8, size=16)
    config = write_sweep(tmp_path, data, experiment=f"sweep-{searcher}", num_samples=4, search_alg=searcher,
                         scheduler={"name": scheduler, "max_t": 3, "grace_period": 1, "reduction_factor": 2},
                         space={"optim.lr": {"loguniform": [1.0e-4, 3.0e-2]}, "model.dropout": {"choice": [0.0, 0.3]}})
    # Validation every 2 epochs: the searchers and schedulers, which read the metric from every result, get
    # validated epochs only (2 and the last, 3).
    assert sweep.main(["--config", str(config), "--set", "train.val_every=2", "--set", "checkpoint.every=2"]) == 0
    histories = trial_histories(tmp_path / "runs" / f"sweep-{searcher}")
    assert len(histories) == 4 and all(rows for rows in histories.values())
    assert {r["epoch"] for rows in histories.values() for r in rows} <= {2, 3}
    lrs = {rows[0]["config"]["optim.lr"] for rows in histories.values()}
    assert len(lrs) == 4 and all(1e-4 <= lr <= 3e-2 for lr in lrs)
    assert analyze.main([str(tmp_path / "runs" / f"sweep-{searcher}")]) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_population_based_training_copies_a_better_trial_and_trains_on_with_new_hyperparameters(ray_cluster, tmp_path):
    """PBT through Ray Tune: a trial in the bottom quantile takes a top trial's checkpoint and goes on from its epoch
    with a perturbed LR, which its optimizer really uses (the resume takes LR and weight decay from the new config).
    Synchronous PBT and a loss (no ties) make the exploit certain: both trials meet at epoch 2, the worse copies the
    better one's epoch-2 checkpoint and trains epoch 3 (asynchronous PBT may exploit only at the last epoch, when no
    epoch is left to train)."""
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=8, size=16)
    config = write_sweep(tmp_path, data, experiment="sweep-pbt", num_samples=2, metric="val/loss", mode="min",
                         scheduler={"name": "pbt", "max_t": 3, "perturbation_interval": 2, "quantile_fraction": 0.5,
                                    "synch": True},
                         space={"optim.lr": {"loguniform": [1.0e-5, 3.0e-2]}, "model.dropout": {"choice": [0.0, 0.3]}})
    assert sweep.main(["--config", str(config)]) == 0
    histories = trial_histories(tmp_path / "runs" / "sweep-pbt")
    assert len(histories) == 2 and all(rows[-1]["epoch"] == 3 for rows in histories.values())
    exploited = [rows for rows in histories.values() if len({r["trial_lr"] for r in rows}) > 1]
    assert len(exploited) == 1, "the bottom trial of two was not exploited exactly once"
    (rows,) = exploited  # Tune does not log the result that triggered the exploit: epochs 1 and 3
    assert rows[0]["epoch"] == 1 and rows[-1]["epoch"] == 3 and rows[-1]["trial_lr"] != rows[0]["trial_lr"]
    assert all(r["trial_lr"] == rows[0]["trial_lr"] for r in rows if r["epoch"] <= 2)  # it went on from epoch 2
    assert rows[-1]["lr"] == pytest.approx(rows[-1]["trial_lr"])  # constant schedule: the new LR is used


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_trials_run_a_torch_trainer_and_are_analyzed(ray_cluster, tmp_path):
    """Two DDP trials, one after the other. Tune reused the first's process for the second, but that process was
    still winding down its TorchTrainer after the last result, past Tune's 2 s wait: the second trial ended in
    ERROR ("Trainable runner reuse requires reset_config() ...") and the sweep then waited forever."""
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=12, size=16)
    config = write_sweep(tmp_path, data, experiment="ddp-sweep", num_samples=1, max_concurrent_trials=1,
                         scheduler={"name": "asha", "max_t": 3, "grace_period": 3},  # ASHA stops each trial at its last result
                         space={"optim.lr": {"grid": [1.0e-3, 2.0e-3]}})
    assert sweep.main(["--config", str(config), "--set", "scaling.num_workers=2", "--set", "train.val_every=2",
                       "--set", "checkpoint.every=2"]) == 0
    experiment = tmp_path / "runs" / "ddp-sweep"
    histories = trial_histories(experiment)
    assert len(histories) == 2
    for rows in histories.values():
        assert [r["epoch"] for r in rows] == [2, 3]  # validated epochs only reach Tune (val_every 2, and the last)
        assert rows[-1]["global_batch_size"] == 16 and rows[-1]["batch_size_per_worker"] == 8  # 2 workers x 8
        assert rows[-1]["checkpoint_path"].startswith(str(experiment / "ddp-trials"))
    assert analyze.main([str(experiment)]) == 0
    assert json.loads((experiment / "report" / "per_class.json").read_text())["epoch"] in (2, 3)


@pytest.mark.integration
@pytest.mark.slow
def test_a_sweep_of_a_simclr_pretrain_trains_simclr(ray_cluster, tmp_path):
    """The trial runs the recipe the config names: SimCLR's checkpoints hold a backbone and no classes."""
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=12, size=16)
    config = write_sweep(tmp_path, data, experiment="simclr-sweep", num_samples=2, metric="val/loss", mode="min",
                         scheduler={"name": "fifo", "max_t": 2}, space={"optim.lr": {"choice": [0.01, 0.05]}})
    overrides = ["pretrain.method=simclr", "pretrain.projection_dim=16", "pretrain.projection_hidden=32",
                 "checkpoint.metric=val/loss", "checkpoint.mode=min"]
    assert sweep.main(["--config", str(config), *[a for o in overrides for a in ("--set", o)]]) == 0
    experiment = tmp_path / "runs" / "simclr-sweep"
    histories = trial_histories(experiment)
    assert len(histories) == 2 and all([r["epoch"] for r in rows] == [1, 2] for rows in histories.values())
    assert all("val/acc5" not in rows[-1] for rows in histories.values())  # SimCLR reports no classification metrics
    meta = json.loads(next(experiment.glob("*/checkpoint_*/meta.json")).read_text())
    assert meta["method"] == "simclr" and meta["classes"] is None


@pytest.mark.integration
@pytest.mark.slow
def test_a_sweep_trial_resumes_past_a_corrupt_checkpoint(ray_cluster, tmp_path, caplog):
    """Kill the sweep driver mid-trial and damage the trial's newest checkpoint: --resume continues the trial from
    the newest checkpoint that verifies (the one before), as a Train run does. A later save of Tune's state cut short
    (a driver killed while copying it to storage) is set aside, and the whole one before it resumed."""
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=12, size=16)
    config = write_sweep(tmp_path, data, experiment="corrupt", num_samples=1, scheduler={"name": "fifo", "max_t": 10},
                         space={"optim.lr": {"choice": [1.0e-3]}})
    keep_all = ["--set", "checkpoint.keep=null"]
    experiment = tmp_path / "runs" / "corrupt"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "--config", str(config), *keep_all], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list(experiment.glob("*/checkpoint_*/meta.json"))) < 3:
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.2)
        time.sleep(2)  # the experiment state is saved every second
    finally:
        kill_between_saves(driver, experiment)
    wait_for_the_end_of_its_workers(driver.pid)  # a trial still saving would write the checkpoint damaged below
    epochs = {p.parent.name: json.loads(p.read_text())["epoch"] for p in experiment.glob("*/checkpoint_*/meta.json")}
    assert len(epochs) < 10, "the trial finished before the driver was killed"
    newest = max(experiment.glob("*/checkpoint_*/meta.json")).parent
    with open(newest / "model.pt", "ab") as f:
        f.write(b"bit rot")
    damaged = (newest / "model.pt").read_bytes()
    (experiment / "experiment_state-2099-01-01_00-00-00.json").write_text('{"trial_data": [')
    assert analyze.main([str(experiment)]) == 0  # the report of the whole save before it, said in a warning
    assert "the report is of the save at" in caplog.text

    assert sweep.main(["--config", str(config), "--resume", *keep_all]) == 0
    assert [p.name.rsplit("-", 2)[0] for p in (experiment / "damaged").iterdir()] == ["experiment_state-2099-01-01_00-00-00.json"]
    (rows,) = trial_histories(experiment).values()
    assert rows[-1]["epoch"] == 10
    restart = max(i for i, r in enumerate(rows) if i > 0 and r["iterations_since_restore"] == 1)
    # The restored trial's first epoch is the damaged checkpoint's: it resumed from the one before, not from scratch
    # (and reported that one's epoch again first where Tune's last save of its state had not registered it).
    damaged_epoch = epochs[newest.name]
    assert [r["epoch"] for r in rows[restart:restart + 2]] in ([damaged_epoch, damaged_epoch + 1], [damaged_epoch - 1, damaged_epoch])
    # No epoch was written over a checkpoint stored before: Tune numbers them on from those it had registered.
    after = {p.parent.name: json.loads(p.read_text())["epoch"] for p in experiment.glob("*/checkpoint_*/meta.json")}
    assert {name: after[name] for name in epochs} == epochs and (newest / "model.pt").read_bytes() == damaged
    assert sorted(after.values()) == sorted([*range(1, 11), epochs[newest.name]])  # every epoch, the damaged one kept


def kill_between_saves(driver: subprocess.Popen, experiment: Path) -> None:
    """SIGKILL a sweep's driver at a moment when its state in storage reads whole: checked while the driver is stopped
    (SIGSTOP), so that nothing changes between the check and the kill. A kill that cuts a save short (Tune writes the
    files in storage in place) is tested on its own: test_a_save_of_tunes_state_cut_short_..."""
    import pyarrow.fs

    from jobs import tune_results

    for _ in range(50):
        driver.send_signal(signal.SIGSTOP)
        if all(tune_results.reads_whole(pyarrow.fs.LocalFileSystem(), str(path)) for path in experiment.glob("*state-*")):
            break
        driver.send_signal(signal.SIGCONT)
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()


def wait_for_the_end_of_its_workers(driver_pid: int, seconds: float = 60) -> None:
    """Until Ray has ended every actor of the job whose driver had `driver_pid` (it does so when the driver dies)."""
    from ray.util.state import list_actors, list_jobs

    (job,) = [job for job in list_jobs() if job.driver_info and int(job.driver_info.pid) == driver_pid]
    deadline = time.monotonic() + seconds
    while list_actors(filters=[("job_id", "=", job.job_id), ("state", "=", "ALIVE")]):
        assert time.monotonic() < deadline, f"the workers of job {job.job_id} outlived its driver by {seconds} s"
        time.sleep(0.2)


@pytest.mark.parametrize("searcher,scheduler", [("random", "asha"), ("grid", "fifo"), ("optuna", "asha"), ("bohb", "bohb")])
def test_every_search_algorithm_holds_max_concurrent_trials(searcher, scheduler):
    """Tune ignores TuneConfig(max_concurrent_trials) for a BasicVariantGenerator (random and grid search) with only a
    warning, so the search algorithm itself must hold the limit."""
    space = {"optim.lr": {"grid": [0.1, 0.01]} if searcher == "grid" else {"loguniform": [1.0e-4, 1.0e-1]}}
    search = SearchConfig.model_validate({"space": space, "search_alg": searcher, "max_concurrent_trials": 3,
                                          "scheduler": {"name": scheduler, "max_t": 3}})
    _, search_alg = sweep.scheduler_and_searcher(search)
    limit = getattr(search_alg, "max_concurrent", None) or getattr(search_alg, "_max_concurrent", None)
    assert limit == 3, type(search_alg).__name__
