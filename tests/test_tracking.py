"""TensorBoard event files beside every run's results, read back with TensorBoard's own reader."""

import re

import pyarrow.fs
import pytest
from helpers import make_image_folder

from jobs.tracking import TENSORBOARD_DIR, tracked
from tl_core.config import from_dict
from tl_core.loop import fit


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tiny_run(tmp_path, report):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=6, size=16)
    # BatchNorm statistics a scratch resnet18 estimates from three 16 px batches blow its evaluation up (val/loss ~1e19,
    # or inf with inputs 1e-7 apart); these tests are about the events, so the statistics stay as initialised
    cfg = from_dict({"experiment": "tb", "data": {"root": str(data), "image_size": 16, "loader_workers": 0},
                     "model": {"freeze_bn_stats": True}, "train": {"epochs": 3, "batch_size": 4}})
    return fit(cfg, report, checkpoints=False)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_epochs_metrics_are_in_tensorboard_beside_the_results(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        filesystem = pyarrow.fs.S3FileSystem(endpoint_override=s3.endpoint_url, access_key=s3.access_key,
                                             secret_key=s3.secret_key, region="us-east-1")
        directory = "tl-test/runs/tb"
    else:
        filesystem, directory = pyarrow.fs.LocalFileSystem(), str(tmp_path / "runs" / "tb")
    reported = []
    history = tiny_run(tmp_path, tracked(lambda metrics, checkpoint: reported.append(metrics), filesystem, directory))
    assert len(reported) == 3  # the run's own reporter still gets every epoch
    logdir = tmp_path / "read"
    logdir.mkdir()
    pyarrow.fs.copy_files(f"{directory}/{TENSORBOARD_DIR}", str(logdir), source_filesystem=filesystem)
    scalars = read_scalars(logdir)
    assert {"train/loss", "val/loss", "val/acc", "val/f1", "lr"} <= scalars.keys()
    for name in ("train/loss", "val/acc", "lr"):
        assert scalars[name] == [(e["epoch"], pytest.approx(e[name], rel=1e-6)) for e in history]


def test_a_tracking_failure_is_a_warning_not_a_failed_run(tmp_path, caplog):
    class Broken(pyarrow.fs.LocalFileSystem):
        def open_output_stream(self, *args, **kwargs):
            raise OSError("No space left on device")

    reported = []
    tiny_run(tmp_path, tracked(lambda metrics, checkpoint: reported.append(metrics), Broken(), str(tmp_path / "runs")))
    assert len(reported) == 3
    assert "cannot write TensorBoard events" in caplog.text and "No space left on device" in caplog.text


# ---------------------------------------------------------------- MLflow, against a real tracking server

def mlflow_config(tmp_path, uri, experiment="tl-tests"):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=6, size=16)
    return from_dict({"experiment": "tracked", "data": {"root": str(data), "image_size": 16, "loader_workers": 0},
                      "model": {"freeze_bn_stats": True},  # as in tiny_run: finite metrics from a tiny scratch run
                      "train": {"epochs": 3, "batch_size": 4}, "tracking": {"mlflow": {"uri": uri, "experiment": experiment}}})


def test_a_run_in_mlflow_has_its_config_every_epoch_its_best_and_its_result(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.tracking import finish_mlflow_run, mlflow_run

    cfg = mlflow_config(tmp_path, mlflow_server)
    place = str(tmp_path / "runs" / "tracked")
    run = mlflow_run(cfg, place, name="tracked")  # the driver
    history = fit(cfg, tracked(lambda m, c: None, pyarrow.fs.LocalFileSystem(), place, run), checkpoints=False)  # rank 0
    finish_mlflow_run(run, best=history[1], artifacts={"result.json": '{"epochs_completed": 3}'})  # the driver, at the end
    assert mlflow_run(cfg, place, name="tracked") == run  # --resume: the same MLflow run again

    client = MlflowClient(mlflow_server)
    logged = client.get_run(run[1])
    assert logged.data.params["optim.lr"] == str(cfg.optim.lr) and logged.data.params["data.image_size"] == "16"
    assert [(m.step, m.value) for m in client.get_metric_history(run[1], "val/acc")] == [(e["epoch"], e["val/acc"]) for e in history]
    assert logged.data.metrics["best/val/acc"] == history[1]["val/acc"]
    assert [a.path for a in client.list_artifacts(run[1])] == ["result.json"]
    assert logged.info.run_name == "tracked"


def test_an_unreachable_mlflow_server_is_a_warning_and_the_run_goes_on(tmp_path, caplog):
    import time

    from hub_server import closed_port_url

    from jobs.tracking import mlflow_run

    cfg = mlflow_config(tmp_path, closed_port_url())
    started = time.monotonic()
    assert mlflow_run(cfg, str(tmp_path / "runs"), name="tracked") is None
    history = fit(cfg, tracked(lambda m, c: None, pyarrow.fs.LocalFileSystem(), str(tmp_path / "runs"), (cfg.tracking.mlflow.uri, "0")),
                  checkpoints=False)
    assert len(history) == 3 and time.monotonic() - started < 60
    assert "tracking.mlflow: cannot start the MLflow run" in caplog.text and "the run goes on" in caplog.text


def test_mlflow_credentials_never_go_in_a_config():
    from tl_core.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking.mlflow.uri: holds a credential") as err:
        from_dict({"experiment": "x", "data": {"root": "d"}, "tracking": {"mlflow": {"uri": "http://me:secret@127.0.0.1:5000",
                                                                                       "experiment": "e"}}})
    assert "secret" not in str(err.value)


def test_a_relative_sqlite_uri_reaches_the_drivers_database_from_a_worker_elsewhere(tmp_path, monkeypatch):
    """Ray runs each worker in a directory of its own: with `sqlite:///mlflow.db` as written, the workers opened a
    database of their own, which lacked the driver's run, and every epoch's metrics were lost (seen through Ray; in one
    process MLflow's cached store hides it, so the URI the workers are handed is what is checked)."""
    from mlflow.tracking import MlflowClient

    from jobs.staging import with_absolute_paths
    from jobs.tracking import mlflow_run

    (tmp_path / "driver").mkdir()
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    cfg = with_absolute_paths(mlflow_config(tmp_path, "sqlite:///mlflow.db"))  # as the driver hands it to the workers
    assert cfg.tracking.mlflow.uri == f"sqlite:///{tmp_path / 'driver' / 'mlflow.db'}"
    place = str(tmp_path / "runs" / "tracked")
    run = mlflow_run(cfg, place, name="tracked")
    monkeypatch.chdir(tmp_path / "worker")  # rank 0, in its own directory, logs every epoch
    history = fit(cfg, tracked(lambda m, c: None, pyarrow.fs.LocalFileSystem(), place, (cfg.tracking.mlflow.uri, run[1])), checkpoints=False)
    logged = MlflowClient(f"sqlite:///{tmp_path / 'driver' / 'mlflow.db'}").get_metric_history(run[1], "val/acc")
    assert [m.step for m in logged] == [e["epoch"] for e in history]


def test_a_file_store_mlflow_refuses_is_refused_before_the_run(tmp_path, monkeypatch):
    from jobs.tracking import absolute_uri, check_mlflow_uri
    from tl_core.errors import ConfigError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = mlflow_config(tmp_path, "file:./mlruns")
    with pytest.raises(ConfigError, match="tracking.mlflow.uri: MLflow refuses a file: store unless MLFLOW_ALLOW_FILE_STORE=true"):
        check_mlflow_uri(cfg)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_mlflow_uri(cfg)
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("file:./mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("sqlite:////abs/m.db?mode=rw") == "sqlite:////abs/m.db?mode=rw"
    assert absolute_uri("sqlite:///sub/m.db?mode=rw") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}?mode=rw"


@pytest.mark.parametrize("database,message", [
    ("{tmp}/missing/mlflow.db", "{tmp}/missing, the folder of the SQLite database, does not exist"),
    ("/proc/mlflow.db", "cannot write in /proc ("),
])
def test_a_sqlite_database_where_none_can_be_made_is_refused_before_the_run(tmp_path, database, message):
    """MLflow retried opening such a database for minutes, in backoff, before the run began."""
    from jobs.tracking import check_mlflow_uri
    from tl_core.errors import ConfigError, StorageError

    with pytest.raises((ConfigError, StorageError), match=re.escape(f"tracking.mlflow.uri: {message.format(tmp=tmp_path)}")):
        check_mlflow_uri(mlflow_config(tmp_path, f"sqlite:///{database.format(tmp=tmp_path)}"))
    check_mlflow_uri(mlflow_config(tmp_path, f"sqlite:///{tmp_path}/mlflow.db"))
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # checked, nothing written beside the images
