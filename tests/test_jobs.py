"""jobs.finetune / jobs.pretrain end to end on the shared local Ray cluster, and their bad-input contract."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from helpers import REPO, make_image_folder, write_config

from jobs import finetune, pretrain
from tl_core.checkpoint import META_FILE, MODEL_FILE, STATE_FILE, load_checkpoint, verify_checkpoint
from tl_core.config import from_dict, with_overrides
from tl_core.errors import CheckpointError, ConfigError


@pytest.mark.integration
def test_finetune_with_two_ddp_workers_then_resume(ray_cluster, image_folder, tmp_path):
    config = write_config(tmp_path, image_folder, checkpoint={"keep": None})
    assert finetune.main(["--config", str(config)]) == 0
    run = tmp_path / "runs" / "tiny"
    result = json.loads((run / "result.json").read_text())
    assert result["epochs_completed"] == 2 and result["classes"] == ["class_0", "class_1", "class_2"]
    assert result["final_metrics"]["val/acc"] > 0.5  # chance is 1/3
    assert set(result["config"]) >= {"data", "model", "optim", "train", "scaling", "checkpoint", "storage"}
    checkpoints = sorted(p.name for p in run.glob("checkpoint_epoch_*"))
    assert checkpoints == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    best = Path(result["best_checkpoint"])
    assert sorted(p.name for p in best.iterdir()) == sorted([META_FILE, MODEL_FILE, STATE_FILE])
    assert verify_checkpoint(best)["metrics"]["val/acc"] == result["best_metric"]["val/acc"]
    assert yaml.safe_load((run / "config.yaml").read_text())["experiment"] == "tiny"

    # The experiment exists: a plain re-run is refused.
    assert finetune.main(["--config", str(config)]) == 2
    # The latest checkpoint is damaged: --resume skips it, goes back to epoch 1's and trains epochs 2-4.
    with open(run / "checkpoint_epoch_0002" / MODEL_FILE, "ab") as f:
        f.write(b"bit rot")
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        verify_checkpoint(run / "checkpoint_epoch_0002")
    assert finetune.main(["--config", str(config), "--resume", "--set", "train.epochs=4"]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["epochs_completed"] == 4
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == [f"checkpoint_epoch_000{i}" for i in (1, 2, 3, 4)]
    assert verify_checkpoint(run / "checkpoint_epoch_0002")["epoch"] == 2  # retrained and rewritten whole
    last = load_checkpoint(run / "checkpoint_epoch_0004")
    steps_per_epoch = math.ceil(math.ceil(27 / 2) / 8)  # 27 train images over 2 ranks, batch 8
    assert last.train_state["global_step"] == 4 * steps_per_epoch
    adam_steps = {int(s["step"]) for s in last.train_state["optimizer"]["state"].values()}
    assert adam_steps == {4 * steps_per_epoch}  # the optimizer state was restored, not restarted


def controller_poll_interval_to(path: Path):
    """A Ray Train callback (it runs in the controller) writing the controller's report poll interval to `path`."""
    import ray.train
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

    class PollInterval(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            path.write_text(os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, "Ray's default"))

    return PollInterval()


@pytest.mark.integration
def test_ray_trains_controller_takes_each_report_promptly_not_at_its_default_2_s_poll(ray_cluster, image_folder, tmp_path,
                                                                                   monkeypatch):
    """A worker's next report waits for the controller's poll (2 s by default), so short epochs took 2 s each: the
    controller a run starts polls every REPORT_POLL_S, and at a user's own interval where one is set."""
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

    from jobs import ray_private
    from jobs.runner import run_trainer

    monkeypatch.delenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR, raising=False)
    seen = tmp_path / "interval"
    cfg = from_dict(yaml.safe_load(write_config(tmp_path, image_folder, train={"epochs": 1}, scaling={"num_workers": 1}).read_text()))
    run_trainer(cfg, "supervised", callbacks=[controller_poll_interval_to(seen)])
    assert float(seen.read_text()) == ray_private.REPORT_POLL_S < 1
    monkeypatch.setenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR, "1.5")
    run_trainer(with_overrides(cfg, ["experiment=own-interval"]), "supervised", callbacks=[controller_poll_interval_to(seen)])
    assert seen.read_text() == "1.5"


@pytest.mark.integration
def test_ctrl_c_stops_a_run_in_one_line_keeping_its_checkpoints_and_resume_finishes_it(ray_cluster, image_folder, tmp_path):
    """Ray Train's own SIGINT handler aborts the run and ends the driver's wait with SystemExit(1), which printed
    nothing: the job now says what it kept and how to go on, with the shell's status for SIGINT."""
    config = write_config(tmp_path, image_folder, train={"epochs": 60}, scaling={"num_workers": 1},
                          checkpoint={"keep": 2})
    run = tmp_path / "runs" / "tiny"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--config", str(config)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(p.name >= "checkpoint_epoch_0002" for p in run.glob("checkpoint_epoch_*")):  # keep: 2 drops some
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130
    assert stderr.strip().splitlines()[-1] == ("interrupted: experiment tiny stopped; its checkpoints are kept: continue "
                                               "it with --resume")
    assert not (run / "result.json").exists() and not (run / ".lock").exists()
    stopped_at = max(int(p.name.rsplit("_", 1)[1]) for p in run.glob("checkpoint_epoch_*"))
    assert 2 <= stopped_at < 60

    assert finetune.main(["--config", str(config), "--resume", "--set", f"train.epochs={stopped_at + 1}"]) == 0
    assert json.loads((run / "result.json").read_text())["epochs_completed"] == stopped_at + 1


@pytest.mark.integration
def test_an_elastic_run_starts_with_the_workers_that_fit(ray_cluster, image_folder, tmp_path):
    """num_workers {min: 1, max: 4} on a 2-CPU cluster: Ray Train starts with what fits instead of waiting for 4."""
    config = write_config(tmp_path, image_folder, train={"epochs": 1},
                          scaling={"num_workers": {"min": 1, "max": 4}, "resize_interval_s": 5})
    assert finetune.main(["--config", str(config)]) == 0
    result = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    assert result["epochs_completed"] == 1
    assert result["config"]["scaling"]["num_workers"] == {"min": 1, "max": 4}


def test_a_finished_run_is_summed_up_in_words_rounded():
    from jobs.results import run_summary

    assert run_summary({"epochs_completed": 3, "best_metric": {"val/f1": 0.8124999403953552, "epoch": 2}}) == \
        "3 epochs, best val/f1 0.8125 at epoch 2"
    assert run_summary({"epochs_completed": 1, "best_metric": {"val/loss": 0.5, "epoch": 1}}) == "1 epoch, best val/loss 0.5000 at epoch 1"


@pytest.mark.integration
def test_pretrain_run_is_a_source_for_finetune(ray_cluster, tmp_path, caplog, capsys):
    source = make_image_folder(tmp_path / "source", n_classes=2, per_class=8, seed=1)
    target = make_image_folder(tmp_path / "target", n_classes=3, per_class=8, seed=2)
    pre = write_config(tmp_path, source, "pre.yaml", experiment="pre", train={"epochs": 1}, scaling={"num_workers": 1})
    assert pretrain.main(["--config", str(pre)]) == 0
    best = json.loads((tmp_path / "runs" / "pre" / "result.json").read_text())["best_metric"]["val/acc"]
    assert capsys.readouterr().out.splitlines()[-1] == (f"pre: 1 epoch, best val/acc {best:.4f} at epoch 1; fine-tune from it with "
                                                        f"model.weights={tmp_path / 'runs' / 'pre' / 'checkpoint_epoch_0001'}")
    ft = write_config(tmp_path, target, "ft.yaml", experiment="ft", train={"epochs": 1}, scaling={"num_workers": 1},
                      model={"weights": str(tmp_path / "runs" / "pre")})
    caplog.set_level("INFO", logger="tl_core")
    assert finetune.main(["--config", str(ft)]) == 0
    assert "head re-initialised (skipped fc.linear.weight (2, 512), fc.linear.bias (2,))" in caplog.text
    assert json.loads((tmp_path / "runs" / "ft" / "result.json").read_text())["epochs_completed"] == 1


@pytest.mark.integration
def test_simclr_pretrain_on_unlabelled_images_then_a_linear_probe(ray_cluster, tmp_path, caplog):
    """jobs.pretrain with method simclr on a flat folder over 2 DDP workers (negatives gathered from both), then
    jobs.finetune's linear probe of that backbone: the projection head is gone, a classifier head is new."""
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for i, path in enumerate(sorted(make_image_folder(tmp_path / "src", n_classes=3, per_class=8, seed=3).rglob("*.png"))):
        (unlabelled / f"{i:03d}.png").write_bytes(path.read_bytes())
    target = make_image_folder(tmp_path / "target", n_classes=3, per_class=8, seed=2)
    pre = write_config(tmp_path, unlabelled, "pre.yaml", experiment="simclr", train={"epochs": 2, "batch_size": 8},
                       pretrain={"method": "simclr", "temperature": 0.2, "projection_dim": 16, "projection_hidden": 32})
    assert pretrain.main(["--config", str(pre)]) == 0
    result = json.loads((tmp_path / "runs" / "simclr" / "result.json").read_text())
    assert result["epochs_completed"] == 2 and result["classes"] is None
    assert 0.0 <= result["final_metrics"]["val/acc"] <= 1.0 and result["final_metrics"]["train/loss"] > 0
    best = load_checkpoint(result["best_checkpoint"])
    assert not any(k.startswith(("projection", "fc")) for k in best.model_state)  # the backbone alone
    assert set(best.train_state["projection"]) >= {"0.weight", "3.weight"}  # kept for a resume only
    ft = write_config(tmp_path, target, "probe.yaml", experiment="probe", train={"epochs": 1}, scaling={"num_workers": 1},
                      model={"weights": str(tmp_path / "runs" / "simclr"), "strategy": "linear_probe"})
    caplog.set_level("INFO", logger="tl_core")
    assert finetune.main(["--config", str(ft)]) == 0
    assert "weights: loaded backbone from " in caplog.text and "(it has no classifier head); a new head for the task" in caplog.text


def bad_weights(tmp_path, data_root):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), path)
    return {"model": {"weights": str(path)}}


BAD_INPUTS = {
    "unknown key": (lambda t, d: {"optim": {"learning_rate": 0.1}}, "optim.learning_rate: unknown key"),
    "wrong type": (lambda t, d: {"train": {"epochs": "many"}}, "train.epochs: Input should be a valid integer"),
    "negative lr": (lambda t, d: {"optim": {"lr": -1.0}}, "optim.lr: Input should be greater than 0"),
    "zero lr": (lambda t, d: {"optim": {"lr": 0.0}}, "optim.lr: Input should be greater than 0"),
    "batch size 0": (lambda t, d: {"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1"),
    "unknown backbone": (lambda t, d: {"model": {"backbone": "resnet7"}}, "model.backbone: unknown backbone 'resnet7'"),
    "unknown optimizer": (lambda t, d: {"optim": {"name": "lamb"}}, "optim.name: unknown name 'lamb'; allowed: sgd"),
    "unknown scheduler": (lambda t, d: {"optim": {"scheduler": "linear"}}, "optim.scheduler: unknown name 'linear'; allowed: constant"),
    "unknown strategy": (lambda t, d: {"model": {"strategy": "half"}}, "model.strategy: Input should be"),
    "missing data": (lambda t, d: {"data": {"root": str(t / "nowhere")}}, "data.root: directory"),
    "data a file": (lambda t, d: {"data": {"root": str(d / "class_0" / "000.png")}}, "000.png is a file, not a folder"),
    "one class": (lambda t, d: {"data": {"root": str(make_image_folder(t / "one", n_classes=1, per_class=4))}}, "found 1 class folder"),
    "empty class": (lambda t, d: [(d / "class_1" / f.name).unlink() for f in list((d / "class_1").iterdir())] and {},
                    "no readable images: class_1"),
    "weights mismatch": (bad_weights, "does not match the backbone"),
    "missing weights": (lambda t, d: {"model": {"weights": str(t / "gone.pt")}}, "model.weights: "),
    "weights of an unfinished run": (lambda t, d: (t / "cut" / "checkpoint_epoch_0001").mkdir(parents=True) or {"model": {"weights": str(t / "cut")}},
                                     "/cut holds checkpoints but no result.json, so the run did not finish"),
    "pretraining method": (lambda t, d: {"pretrain": {"method": "simclr"}}, "pretrain.method: simclr is a pretraining method"),
    "key the recipe ignores": (lambda t, d: {"pretrain": {"temperature": 0.1}}, "pretrain.temperature: not used by pretrain.method: supervised"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, image_folder, tmp_path, capsys):
    make_patch, message = BAD_INPUTS[case]
    patch = make_patch(tmp_path, image_folder)
    config = write_config(tmp_path, image_folder, **patch)
    assert finetune.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("patch,message", [
    ({"model": {"backbone": "hf:all-MiniLM-L6-v2"}}, "pretrain.method: simclr pretrains image backbones on class folders of "
     "images, and model.backbone hf:all-MiniLM-L6-v2 is a text model; pretrain a text encoder with pretrain.method: supervised"),
    ({"data": "text"}, "/texts holds text (table files); pretrain a text encoder with pretrain.method: supervised"),
])
def test_simclr_on_text_is_one_line(patch, message, image_folder, tmp_path, capsys):
    """It said "data.root: found 0 readable image(s)" (a text folder), or started workers that failed: "Unknown model
    hf:all-minilm-l6-v2" (a text encoder)."""
    if patch.get("data") == "text":
        (tmp_path / "texts").mkdir()
        (tmp_path / "texts" / "train.csv").write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(8)))
        patch = {"data": {"root": str(tmp_path / "texts")}}
    config = write_config(tmp_path, image_folder, pretrain={"method": "simclr"}, **patch)
    assert pretrain.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pretrain.method: simclr") and message in err[-1], err
    assert not (tmp_path / "runs").exists()


def test_unparsable_yaml(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("experiment: x\n  data: [\n")
    assert finetune.main(["--config", str(config)]) == 2
    assert "broken.yaml: not valid YAML at line" in capsys.readouterr().err


@pytest.mark.integration
def test_more_workers_than_the_cluster_has_is_an_error_not_a_hang(ray_cluster, image_folder, tmp_path, capsys):
    config = write_config(tmp_path, image_folder, scaling={"num_workers": 16})
    assert finetune.main(["--config", str(config)]) == 2
    assert "scaling.num_workers: 16 workers x 1 CPU need 16 CPU, but the Ray cluster has 2" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_command_line_exit_status_and_single_line(tmp_path, image_folder):
    config = write_config(tmp_path, image_folder, optim={"lr": -3})
    proc = subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", str(config)], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {config}: optim.lr: Input should be greater than 0 (got -3)"]


def test_a_module_that_is_no_job_run_with_python_m_is_one_line_naming_the_jobs():
    """`python -m jobs.runner` (glue) or a misspelt job imported the package and ended with status 0, nothing done."""
    import jobs

    runs_a_job = {p.stem for p in (REPO / "jobs").glob("*.py") if f'run_module("jobs.{p.stem}")' in p.read_text()}
    assert runs_a_job == set(jobs.ENTRY_POINTS)
    for module in ("jobs.runner", "jobs.finetun"):
        proc = subprocess.run([sys.executable, "-m", module, "--config", "x.yaml"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"error: {module} is not a job; the jobs: python -m jobs.{{finetune,pretrain,demo,sweep,analyze,pack_data,predict,export}}"]
    help_text = subprocess.run([sys.executable, "-m", "jobs.export", "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: python -m jobs.export")


def test_a_worker_failure_becomes_one_line():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from jobs.runner import first_error
    from tl_core.errors import DataError

    failure = WorkerGroupError("rank 0 failed", {0: DataError("data.root: directory /x does not exist")})
    assert first_error(failure) == "DataError: data.root: directory /x does not exist"


def test_a_worker_error_of_several_lines_is_told_by_its_first():
    """DDP's error for a parameter without a gradient came out as its last line, "In addition, you can set the
    environment variable TORCH_DISTRIBUTED_DEBUG ...", not the line that says what went wrong."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from jobs.runner import first_error, one_line

    ddp = RuntimeError("Expected to have finished reduction in the prior iteration before starting a new one. This error "
                       "indicates ...\n In addition, you can set the environment variable TORCH_DISTRIBUTED_DEBUG ...")
    assert first_error(WorkerGroupError("rank 0 failed", {0: ddp})) == (
        "RuntimeError: Expected to have finished reduction in the prior iteration before starting a new one. This error "
        "indicates ...")
    loading = RuntimeError("Error(s) in loading state_dict for ResNet:\n\tMissing key(s) in state_dict: \"fc.bias\".")
    assert one_line(loading) == 'RuntimeError: Error(s) in loading state_dict for ResNet: Missing key(s) in state_dict: "fc.bias".'
    # every key of a resnet18 was a line of 3,000 characters ("continue it with --resume ..." at its end)
    every = ", ".join(f'"{key}"' for key in torchvision.models.resnet18().state_dict())
    loading = RuntimeError(f"Error(s) in loading state_dict for ResNet:\n\tMissing key(s) in state_dict: {every}. ")
    assert one_line(loading) == ('RuntimeError: Error(s) in loading state_dict for ResNet: Missing key(s) in state_dict: '
                                 '"conv1.weight", "bn1.weight", "bn1.bias" and 119 more.')
    wrapped = RayTaskError("train", 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad value', None)
    assert one_line(wrapped) == "RayTaskError: ValueError: bad value"


def test_workers_killed_by_rays_memory_monitor_are_one_line_saying_what_to_change():
    """It ended with the last line of Ray's advice on its own settings (RAY_idle_worker_killing_memory_threshold_bytes),
    seen with data.image_size 1024 and batches of 512 on this machine."""
    from ray.exceptions import OutOfMemoryError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from jobs.runner import first_error

    killed = OutOfMemoryError("4 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 127.0.0.1, "
                              "ID: bc37) was 22.58GB used / 23.54GB limit (0.959415)\nOOM kill reason: ...\nRefer to the "
                              "documentation ... set the environment variable `RAY_idle_worker_killing_memory_threshold_bytes`.")
    failure = WorkerGroupError("worker failed", {0: WorkerHealthCheckFailedError("Worker health check failed.", killed)})
    assert first_error(failure) == ("OutOfMemoryError: the node ran low on memory (22.58GB used of 23.54GB) and Ray killed the "
                                    "training workers; lower train.batch_size or data.image_size, or use nodes with more memory")


@pytest.mark.integration
def test_a_resume_past_a_damaged_checkpoint_keeps_the_valid_ones_and_sets_the_damaged_one_aside(ray_cluster, image_folder, tmp_path):
    """The documented case: 2 epochs, the newest model.pt truncated, --resume to 3 epochs. The run finishes, every
    valid checkpoint is kept, the damaged one is moved to damaged/ (not deleted), and result.json matches storage."""
    config = write_config(tmp_path, image_folder, experiment="damaged", scaling={"num_workers": 1},
                          checkpoint={"keep": 2, "metric": "epoch", "mode": "max"})
    assert finetune.main(["--config", str(config)]) == 0
    run = tmp_path / "runs" / "damaged"
    model = run / "checkpoint_epoch_0002" / MODEL_FILE
    model.write_bytes(model.read_bytes()[:100])
    assert finetune.main(["--config", str(config), "--resume", "--set", "train.epochs=3"]) == 0
    (aside,) = (run / "damaged").glob("checkpoint_epoch_0002-*")
    assert (aside / MODEL_FILE).stat().st_size == 100
    kept = sorted(p.name for p in run.glob("checkpoint_epoch_*"))
    assert kept[-2:] == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"] and all(verify_checkpoint(run / n) for n in kept)
    result = json.loads((run / "result.json").read_text())
    assert result["epochs_completed"] == 3 and Path(result["best_checkpoint"]) == run / "checkpoint_epoch_0003"
    assert verify_checkpoint(result["best_checkpoint"])["epoch"] == 3


def listening_sockets(root: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `root` and its descendants."""
    import psutil

    found = set()
    try:
        processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port, process.name()) for c in process.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
def test_a_job_that_starts_its_own_ray_listens_on_loopback_only(image_folder, tmp_path):
    """No RAY_ADDRESS: the job starts Ray itself; every listening socket of its process tree (GCS, raylet, dashboard,
    agents, the training workers and their process group) is on 127.0.0.1, sampled while it trains with 2 workers."""
    import os
    import time

    config = write_config(tmp_path, image_folder, train={"epochs": 3})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--config", str(config)], cwd=Path(__file__).parent.parent,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = set()
    while job.poll() is None:
        seen |= listening_sockets(job.pid)
        time.sleep(0.3)
    assert job.returncode == 0, job.stderr.read()[-2000:]
    assert seen, "no listening socket was sampled"
    assert {name for _, _, name in seen} >= {"gcs_server", "raylet"}
    assert sorted(s for s in seen if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")) == []


def test_the_worker_setup_hook_binds_the_process_group_store_to_its_address_without_importing_torch():
    """Every Ray worker runs the setup hook as it starts: it must not import torch there (a Ray Data reader would pay
    ~1.9 s and ~480 MB for nothing), yet once torch.distributed is imported, rank 0's TCPStore listens on the address
    it was given, not on every interface."""
    script = """
import importlib, socket, sys
from datetime import timedelta
import psutil
from jobs import ray_private
ray_private.bind_process_group_store_to_master_addr()
assert "torch" not in sys.modules, "the setup hook imported torch"
rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the package's attribute of that name is a function
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
store = rendezvous._create_c10d_store("127.0.0.1", port, 0, 1, timedelta(seconds=10))
store.set("k", "v")
print(sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['127.0.0.1']"]


def test_torch_in_a_ray_worker_runs_the_threads_ray_assigned_not_one_per_core(ray_cluster):
    """A worker process may have imported torch before Ray set OMP_NUM_THREADS for the task it runs (an earlier
    task did); run_recipe (Train workers, Tune trials) and the predictor apply it, so concurrent trials do not
    oversubscribe."""
    import ray

    from jobs import ray_private

    @ray.remote(num_cpus=1)
    def threads() -> tuple[int, int]:
        started_with = torch.get_num_threads()
        ray_private.hold_torch_to_assigned_cpus()
        return started_with, torch.get_num_threads()

    started_with, held = ray.get(threads.remote())
    assert held == 1, f"a 1-CPU task runs {held} torch threads (its torch started with {started_with})"


def test_repeated_worker_lines_are_noted_without_colour_codes_off_a_terminal(monkeypatch):
    """Ray's " [repeated 3x across cluster]" note came out green in a driver's log file ("\x1b[32m"); off a terminal
    (pytest captures both streams) our drivers print it plain."""
    from ray._private import ray_logging

    from jobs import ray_private

    monkeypatch.setattr(ray_logging, "_color", ray_logging._color)  # restored after the test
    assert "\x1b[" in ray_logging._color(" [repeated 3x across cluster]")
    ray_private.plain_repeat_notes_off_terminals()
    state = ray_logging.DedupState(timestamp=0, count=3, line="(trial pid=1) epoch 2/2", metadata={}, sources=set())
    assert "\x1b[" not in state.formatted() and state.formatted().startswith("(trial pid=1) epoch 2/2 [repeated 3x across cluster]")


def test_alike_lines_of_concurrent_trials_are_each_printed_as_they_come(ray_cluster, capfd, monkeypatch):
    """Two trials' epoch lines differ only in their numbers: Ray printed the first and folded the second into a
    " [repeated 2x across cluster]" note up to 5 s later (after the sweep's summary), so the second trial's metrics
    were never seen. A driver of ours prints both at once, unless RAY_DEDUP_LOGS asks for Ray's folding."""
    from ray._private import ray_logging
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from jobs import ray_private

    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)  # Ray's default, restored after the test
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    ray_private.worker_lines_as_they_come()
    for pid, acc in ((4301, "0.1986"), (4302, "0.2611")):
        dispatcher.emit({"pid": pid, "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": True, "actor_name": "trial-x",
                         "lines": [f"epoch 2/2  val/acc {acc}"]})
    err = capfd.readouterr().err
    assert "val/acc 0.1986" in err and "val/acc 0.2611" in err and "repeated" not in err

    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")  # the user's choice stands
    ray_private.worker_lines_as_they_come()
    assert ray_logging.RAY_DEDUP_LOGS is True


def test_benign_ray_error_lines_are_not_echoed_to_the_driver(ray_cluster, capfd):
    """Ray Train's controller logs its PreemptionWatcher actor at error level on every run (ray-project/ray#53727);
    a driver of ours leaves that line out (and the others BENIGN_RAY_LINES names, and the traceback of a worker that
    SIGTERM stopped in a weakref callback) and echoes every other worker line as Ray would."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from jobs import ray_private

    ray_private.drop_benign_ray_lines()
    ray_private.drop_benign_ray_lines()  # idempotent: wrapped once
    assert sum(getattr(h, "tl_filtered", False) for n, h in dispatcher.handlers if n == "ray_print_logs") == 1
    benign = ("[2026-11-24 05:04:08,064 E 21390 21427] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
              "and ID: 'ff7d' has constructor arguments in the object store and max_restarts > 0.")
    dispatcher.emit({"pid": 4242, "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": True, "actor_name": "TrainController",
                     "lines": [benign, "epoch 1/2  train/loss 0.5 (a real line)"]})
    # after a Ctrl-C's "interrupted: ... continue it with --resume", as the cluster shuts down
    dispatcher.emit({"pid": 4243, "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": True, "actor_name": "PlacementGroupCleaner",
                     "lines": ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
                               "Continuing to monitor."]})
    # a packed dataset's split coordinator: how to turn on the progress bars we turned off, then each pass's end
    dispatcher.emit({"pid": 4244, "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": True, "actor_name": "SplitCoordinator",
                     "lines": ["Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars "
                               "= True`.", "✔️  Dataset dataset_035A_0 execution finished in 1.65 seconds",
                               "⚠️  Dataset dataset_035A_1 execution failed"]})
    # the GCS stopping an actor that has already exited; another reason to fail a kill is still shown
    kill = "[2026-12-07 14:34:17,423 E 5676 5676] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor 9f36, return status: "
    dispatcher.emit({"pid": "gcs_server", "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": True, "actor_name": "",
                     "lines": [kill + "Invalid: KillActor RPC failed for actor 9f36: RpcError: RPC error: Socket closed rpc_code: 14",
                               kill + "TimedOut: (a reason that matters)"]})
    # a trial process stopped by SIGTERM inside a weakref callback; another ignored exception is shown whole
    stop = ["Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f09a8096480>",
            "Traceback (most recent call last):",
            '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove', "    def _remove(item, selfref=ref(self)):", "",
            '  File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
            "    raise_sys_exit_with_custom_error_message(",
            '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message', "SystemExit: 1"]
    other = ["Exception ignored in: <function Loader.__del__ at 0x7f>", "Traceback (most recent call last):",
             '  File "loader.py", line 3, in __del__', "OSError: the real cause"]
    dispatcher.emit({"pid": 4245, "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": True, "actor_name": "trial",
                     "lines": ["epoch 2/2 (before)", *stop, *other, "epoch 2/2 (after)", *stop[:3]]})
    err = capfd.readouterr().err
    assert "epoch 2/2 (before)" in err and "epoch 2/2 (after)" in err and "sigterm_handler" not in err.split("(after)")[0]
    assert "OSError: the real cause" in err and "Loader.__del__" in err
    assert err.split("(after)")[1].count("Exception ignored in") == 1  # cut off by the batch's end: kept
    assert "epoch 1/2  train/loss 0.5 (a real line)" in err and "PreemptionWatcher" not in err
    assert "Failed to query" not in err
    assert "Progress bars" not in err and "finished in" not in err and "dataset_035A_1 execution failed" in err
    assert "Socket closed" not in err and "TimedOut: (a reason that matters)" in err


def test_ray_datas_hang_warning_is_not_printed_after_the_predictions_are_written(ray_cluster, monkeypatch, capfd, caplog):
    """Ray Data warns once that a dataset "will hang unless more CPUs are freed up" when it executes with no free CPU.
    `write_parquet` executes its result a second time, while predict's model actors may still hold every CPU: on
    this 2-core machine the warning came after the predictions were written. A cluster with free CPUs as the write
    starts is past the warning's one real case, and it is not printed."""
    import ray
    from ray.util import debug

    from jobs import ray_private

    monkeypatch.setattr(debug, "_logged", set())  # as in a fresh predict process
    ray_private.no_late_cpu_alarm()  # free CPUs as the write starts
    monkeypatch.setattr(ray, "available_resources", lambda: {})  # none as the write executes its result
    assert ray.data.range(3).materialize().count() == 3
    assert "will hang" not in caplog.text + capfd.readouterr().err


@pytest.mark.parametrize("scaling,message", [
    ({"num_workers": 4}, "scaling.num_workers: 4 workers x 1 CPU need 4 CPU, but the Ray cluster has 2"),
    ({"num_workers": 1, "resources_per_worker": {"CPU": 3}}, "scaling.resources_per_worker: a worker needs 3 CPU, but the Ray cluster has 2"),
    ({"num_workers": 1, "use_gpu": True}, "scaling.use_gpu: a worker needs 1 GPU, but the Ray cluster has 0"),
    ({"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 2}},
     "scaling.resources_per_worker: a worker needs 2 GPU, but the Ray cluster has 0"),
    ({"num_workers": 1, "accelerator_type": "A10G"},
     "scaling.accelerator_type: a worker needs 0.001 accelerator_type:A10G, but the Ray cluster has 0"),
])
def test_a_capacity_shortfall_names_the_scaling_key_that_asks_for_it(scaling, message, monkeypatch):
    from jobs import preflight

    monkeypatch.setattr(preflight.ray_private, "autoscaler_max_resources", lambda: {"CPU": 2.0})
    cfg = from_dict({"experiment": "x", "data": {"root": "/d"}, "scaling": scaling})
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        preflight.check_capacity(cfg)


@pytest.mark.parametrize("metric,best", [("val/acc", 2), ("val/loss", 4), ("val/f1", 3)])
def test_of_checkpoints_that_tie_the_best_is_the_lower_val_loss_then_the_earlier(tmp_path, metric, best):
    """15 validation images score accuracy in steps of 1/15, so epochs tie; result.json named the earliest. Now the
    lower val/loss wins a tie (the higher val/acc where the metric is val/loss), as in a sweep's ranking, and of
    epochs that tie on both the earlier (val/f1: epochs 1, 3 and 4 tie, 3 and 4 on val/loss too)."""
    from types import SimpleNamespace

    from jobs.results import write_result

    cfg = from_dict({"experiment": "ties", "data": {"root": str(tmp_path)}, "storage": {"root": str(tmp_path / "runs")},
                     "checkpoint": {"metric": metric}})
    rows = [{"val/acc": 0.8, "val/loss": 0.7, "val/f1": 0.7}, {"val/acc": 0.8, "val/loss": 0.5, "val/f1": 0.6},
            {"val/acc": 0.6, "val/loss": 0.4, "val/f1": 0.7}, {"val/acc": 0.7, "val/loss": 0.4, "val/f1": 0.7}]
    for epoch, metrics in enumerate(rows, 1):
        folder = tmp_path / "runs" / "ties" / f"checkpoint_epoch_{epoch:04d}"
        folder.mkdir(parents=True)
        (folder / META_FILE).write_text(json.dumps({"epoch": epoch, "classes": ["a", "b"],
                                                    "metrics": {"epoch": epoch, **metrics}}))
    summary = write_result(cfg, SimpleNamespace(metrics=None))
    assert summary["best_checkpoint"].endswith(f"checkpoint_epoch_{best:04d}") and summary["best_metric"]["epoch"] == best


def test_each_demo_stage_is_headed_before_its_checks_print_anything(tmp_path, monkeypatch, capsys):
    """The source weights a stage's checks load were logged above its header, as if the stage before had loaded them."""
    import contextlib

    from jobs import demo
    from tl_core.config_file import load_config

    cfg = load_config(write_config(tmp_path, tmp_path / "data", experiment="stage"))
    monkeypatch.setattr(demo, "check_run", lambda cfg, resume: print("weights: loaded backbone from SOURCE") or cfg)
    monkeypatch.setattr(demo, "claimed", lambda cfg: contextlib.nullcontext())
    monkeypatch.setattr(demo, "run_trainer", lambda cfg, recipe: None)
    monkeypatch.setattr(demo, "write_result", lambda cfg, result: {"final_metrics": {"val/acc": 0.5}})
    demo.run_stages([("finetune", cfg)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines[0].startswith("=== stage 1/1, fine-tune the source model") and lines[1] == "weights: loaded backbone from SOURCE"
    assert lines[0].endswith(f": {cfg.model.backbone} at {cfg.data.image_size} px, {cfg.train.epochs} epochs ===")
    assert lines[2] == "=== stage 1/1 done in 0 s: val/acc 0.500 ==="
    text = with_overrides(cfg, ["model.backbone=hf:all-MiniLM-L6-v2", "data.max_length=64"])
    demo.run_stages([("text-minilm", text)])  # its length in tokens, where "hf:all-MiniLM-L6-v2 20 epochs" had none
    assert capsys.readouterr().out.splitlines()[1].endswith(f": hf:all-MiniLM-L6-v2 on up to 64 tokens, {cfg.train.epochs} epochs ===")


def test_a_worker_does_not_repeat_the_weights_lines_the_drivers_preflight_printed(capsys):
    """Every stage of the demo said `weights: loaded ...` twice, once from the driver's preflight and once from its
    worker; a worker's other lines (data, epochs) still print."""
    import logging

    from jobs.cli import SAID_BY_PREFLIGHT, setup_logging
    from tl_core import data, text_models, weights

    loggers = [logging.getLogger(name) for name in ("tl_core", "jobs", *SAID_BY_PREFLIGHT)]
    saved = [(log, log.level, log.propagate, log.handlers[:]) for log in loggers]
    try:
        setup_logging(in_worker=True)
        weights.logger.info("weights: loaded backbone from SOURCE")
        text_models.logger.info("weights: loaded hf:minilm's pretrained encoder from DIR")
        data.logger.info("data: 5 classes, 15 train / 881 val images")
        assert capsys.readouterr().err.splitlines() == ["data: 5 classes, 15 train / 881 val images"]
    finally:
        for log, level, propagate, handlers in saved:
            log.setLevel(level)
            log.propagate = propagate
            log.handlers[:] = handlers


def test_the_driver_waits_for_worker_lines_still_coming_before_it_speaks():
    """A sweep's last epoch line came after its summary: Ray's log monitor had not yet passed it on. Lines still
    coming are waited for until they have been quiet a while (never past a bound); lines long quiet cost no wait."""
    import threading
    import time

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from jobs import ray_private

    ray_private.note_when_worker_lines_come()
    try:
        late = threading.Timer(0.4, dispatcher.emit, [{"lines": [], "pid": 1, "ip": "127.0.0.1"}])
        dispatcher.emit({"lines": [], "pid": 1, "ip": "127.0.0.1"})
        late.start()
        start = time.monotonic()
        ray_private.worker_lines_settled(quiet_s=0.5, at_most_s=30)
        assert time.monotonic() - start >= 0.9  # 0.5 s quiet after the line that came at 0.4 s
        start = time.monotonic()
        ray_private.worker_lines_settled(quiet_s=0.5, at_most_s=30)  # quiet long enough already
        assert time.monotonic() - start < 0.45  # not the 0.5 s a wait would take
        dispatcher.emit({"lines": [], "pid": 1, "ip": "127.0.0.1"})
        start = time.monotonic()
        ray_private.worker_lines_settled(quiet_s=30, at_most_s=0.3)
        assert 0.3 <= time.monotonic() - start < 10
    finally:
        dispatcher.remove_handler("tl_last_line")
