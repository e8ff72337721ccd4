"""Runs whose data, weights, checkpoints and results live on a real S3 server, and the failures a shared
cluster throws at them: a killed training worker, a killed driver, an S3 outage."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import make_image_folder, write_config
from test_hostile import one_line_exit_2

from cluster import storage
from cluster.local.s3_server import start_s3_server
from jobs import finetune, pretrain
from tl_core.checkpoint import META_FILE, load_model_state, verify_checkpoint

BUCKET = "tl-test"
REPO = Path(__file__).parent.parent


def keys(s3, prefix: str, bucket: str = BUCKET) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def wait_for_object(s3, key: str, timeout: float = 300, bucket: str = BUCKET) -> None:
    deadline = time.monotonic() + timeout
    while key not in keys(s3, key, bucket):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} never appeared")
        time.sleep(0.2)


def last_modified(s3, key: str) -> str:
    return str(s3.client().head_object(Bucket=BUCKET, Key=key)["LastModified"])


def train_workers() -> list[psutil.Process]:
    """The live Ray Train worker processes of this test session's own Ray cluster (children of its raylet)."""
    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in _command_line(p)]


def _command_line(process: psutil.Process) -> str:
    """The process's command line; empty for one that has ended or is a zombie (a worker Ray has just replaced)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


class WorkerKiller:
    """A thread that SIGKILLs one Ray Train worker once `key` (the first checkpoint's meta.json) is on S3, `pause`
    seconds later; `killed` is then [that meta.json's LastModified, the worker's pid]."""

    def __init__(self, s3, key: str, pause: float = 0.0):
        self.killed: list = []

        def kill() -> None:
            wait_for_object(s3, key)
            self.killed.append(last_modified(s3, key))
            time.sleep(pause)
            victim = train_workers()[0]
            victim.send_signal(signal.SIGKILL)
            self.killed.append(victim.pid)

        self.thread = threading.Thread(target=kill, daemon=True)
        self.thread.start()

    def join(self) -> list:
        self.thread.join(5)
        return self.killed


@pytest.mark.integration
@pytest.mark.slow
def test_everything_on_s3_and_a_killed_worker_resumes(ray_cluster, s3, tmp_path):
    """Data and source weights read from S3; checkpoints, config and result.json written there; a training
    worker killed in the middle of an epoch is replaced and the run continues from its last checkpoint."""
    source = make_image_folder(tmp_path / "source", n_classes=2, per_class=8, seed=1)
    target = make_image_folder(tmp_path / "target", n_classes=3, per_class=16, seed=2)
    storage.upload_dir(source, storage.parse("s3://tl-test/data/source"))
    storage.upload_dir(target, storage.parse("s3://tl-test/data/target"))
    s3_runs = {"storage": {"root": "s3://tl-test/runs"}}
    pre = write_config(tmp_path, "s3://tl-test/data/source", "pre.yaml", experiment="s3-pre", train={"epochs": 1},
                       scaling={"num_workers": 1}, **s3_runs)
    assert pretrain.main(["--config", str(pre)]) == 0
    assert json.loads(s3.client().get_object(Bucket=BUCKET, Key="runs/s3-pre/result.json")["Body"].read())[
        "best_checkpoint"].startswith("s3://tl-test/runs/s3-pre/checkpoint_epoch_0001")

    ft = write_config(tmp_path, "s3://tl-test/data/target", "ft.yaml", experiment="s3-ft", train={"epochs": 4},
                      model={"weights": "s3://tl-test/runs/s3-pre"}, checkpoint={"keep": None},
                      scaling={"num_workers": 2, "max_failures": 1}, **s3_runs)
    killer = WorkerKiller(s3, f"runs/s3-ft/checkpoint_epoch_0001/{META_FILE}", pause=0.5)  # into epoch 2
    assert finetune.main(["--config", str(ft)]) == 0
    killed = killer.join()
    assert len(killed) == 2 and not psutil.pid_exists(killed[1])

    result = json.loads(s3.client().get_object(Bucket=BUCKET, Key="runs/s3-ft/result.json")["Body"].read())
    assert result["epochs_completed"] == 4 and result["best_checkpoint"].startswith("s3://tl-test/runs/s3-ft/")
    assert result["config"]["model"]["weights"] == "s3://tl-test/runs/s3-pre"  # the stored config keeps the URIs
    stored = keys(s3, "runs/s3-ft/")
    assert {"runs/s3-ft/result.json", "runs/s3-ft/config.yaml"} <= set(stored)
    for epoch in range(1, 5):
        assert {f"runs/s3-ft/checkpoint_epoch_{epoch:04d}/{f}" for f in ("meta.json", "model.pt", "train_state.pt")} <= set(stored)
    # Epoch 1 was not trained again after the restart: its checkpoint is the one written before the kill.
    assert last_modified(s3, f"runs/s3-ft/checkpoint_epoch_0001/{META_FILE}") == killed[0]
    assert not (tmp_path / "runs").exists()  # nothing went to local disk instead


@pytest.mark.integration
@pytest.mark.slow
def test_killed_driver_then_resume_from_s3(ray_cluster, s3, tmp_path):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=16, seed=3)
    config = write_config(tmp_path, data, experiment="driver-kill", train={"epochs": 4}, checkpoint={"keep": None},
                          scaling={"num_workers": 1}, storage={"root": "s3://tl-test/runs"})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--config", str(config)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_object(s3, f"runs/driver-kill/checkpoint_epoch_0001/{META_FILE}")
    finally:
        driver.kill()
        driver.wait()
    first = last_modified(s3, f"runs/driver-kill/checkpoint_epoch_0001/{META_FILE}")
    assert "runs/driver-kill/result.json" not in keys(s3, "runs/driver-kill/")

    assert finetune.main(["--config", str(config), "--resume"]) == 0
    result = json.loads(s3.client().get_object(Bucket=BUCKET, Key="runs/driver-kill/result.json")["Body"].read())
    assert result["epochs_completed"] == 4
    assert last_modified(s3, f"runs/driver-kill/checkpoint_epoch_0001/{META_FILE}") == first


@pytest.mark.integration
@pytest.mark.slow
def test_s3_outage_fails_in_one_line_and_resume_continues(ray_cluster, s3, tmp_path, capsys):
    # A second server with the session's credentials (which Ray's workers already have), so it can be stopped.
    outage = start_s3_server(tmp_path / "s3", bucket="tl-outage", credentials=(s3.access_key, s3.secret_key))
    try:
        data = make_image_folder(tmp_path / "data", n_classes=3, per_class=16, seed=4)
        config = write_config(tmp_path, data, experiment="outage", train={"epochs": 4}, checkpoint={"keep": None},
                              scaling={"num_workers": 1, "max_failures": 0},
                              storage={"root": "s3://tl-outage/runs", "endpoint_url": outage.endpoint_url})

        def stop_after_the_first_checkpoint():
            wait_for_object(outage, f"runs/outage/checkpoint_epoch_0001/{META_FILE}", bucket="tl-outage")
            outage.stop()

        stopper = threading.Thread(target=stop_after_the_first_checkpoint, daemon=True)
        stopper.start()
        assert finetune.main(["--config", str(config)]) == 1
        stopper.join(60)  # the server stops listening at once, but its clean shutdown can take seconds more
        assert not stopper.is_alive()
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "experiment outage failed" in err[0] and "cannot reach" in err[0], err
        assert s3.secret_key not in err[0] and s3.access_key not in err[0]

        outage.restart()
        stored = keys(outage, "runs/outage/", bucket="tl-outage")
        assert "runs/outage/result.json" not in stored
        complete = sorted({k.split("/")[2] for k in stored if k.endswith(META_FILE)})
        assert complete, stored
        local = tmp_path / "last"
        for name in ("meta.json", "model.pt", "train_state.pt"):
            storage.download(storage.parse(f"s3://tl-outage/runs/outage/{complete[-1]}/{name}", outage.endpoint_url),
                             local / name)
        assert verify_checkpoint(local)["epoch"] == int(complete[-1][-4:])  # the last complete checkpoint is whole

        assert finetune.main(["--config", str(config), "--resume"]) == 0
        result = json.loads(outage.client().get_object(Bucket="tl-outage", Key="runs/outage/result.json")["Body"].read())
        assert result["epochs_completed"] == 4
    finally:
        outage.stop()


def s3_bad_input(case, tmp_path, s3, monkeypatch):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=4)
    runs = {"storage": {"root": "s3://tl-test/bad-input"}}
    if case == "missing bucket":
        return {"storage": {"root": "s3://no-such-bucket/runs"}}, "storage.root: bucket no-such-bucket does not exist"
    if case == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        return runs, "refused the credentials for bucket tl-test"
    if case == "unreachable endpoint":
        from cluster.local.s3_server import free_ports

        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        return runs, "storage.endpoint_url: cannot reach http://127.0.0.1:"
    if case == "data prefix with no objects":
        return {**runs, "data": {"root": "s3://tl-test/bad-input-data/nothing-here"}}, \
            "data.root: there are no objects under s3://tl-test/bad-input-data/nothing-here"
    if case == "data prefix with no images":
        for i in range(2):
            s3.client().put_object(Bucket=BUCKET, Key=f"bad-input-data/text/class_{i}/notes.txt", Body=b"not an image")
        return {**runs, "data": {"root": "s3://tl-test/bad-input-data/text"}}, "data.root: "
    if case == "missing weights object":
        storage.upload_dir(data, storage.parse("s3://tl-test/bad-input-data/ok"))
        return {**runs, "data": {"root": "s3://tl-test/bad-input-data/ok"},
                "model": {"weights": "s3://tl-test/no-such-run/model.pt"}}, \
            "model.weights: there are no objects under s3://tl-test/no-such-run/model.pt"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing bucket", "wrong credentials", "unreachable endpoint",
                                  "data prefix with no objects", "data prefix with no images", "missing weights object"])
def test_s3_bad_input_is_one_line_exit_2_and_writes_nothing(case, s3, tmp_path, monkeypatch, capsys):
    sections, message = s3_bad_input(case, tmp_path, s3, monkeypatch)
    data = sections.pop("data", {"root": str(tmp_path / "data")})
    config = write_config(tmp_path, data["root"], experiment="bad", **sections)
    assert finetune.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert s3.secret_key not in err[-1] and s3.access_key not in err[-1] and "wrong-secret" not in err[-1]
    assert keys(s3, "bad-input/") == []
    assert not (tmp_path / "runs").exists()


def test_a_config_on_s3_is_read_and_named_by_its_uri(s3, tmp_path, capsys):
    """`jobs.analyze` on a sweep stored on S3 says `python -m jobs.finetune --config s3://.../report/best.yaml`, which
    failed ("s3:/tl-test/...: config file not found"): --config reads an s3:// object, and every message about the
    file names its URI, not the node cache's copy."""
    from jobs import sweep
    from jobs.cli import parse_args
    from jobs.preflight import load_and_check

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=6)
    config = write_config(tmp_path, data, experiment="from-s3", scaling={"num_workers": 1})
    s3.client().put_object(Bucket=BUCKET, Key="configs/run.yaml", Body=config.read_bytes())
    cfg = load_and_check(parse_args(["--config", "s3://tl-test/configs/run.yaml", "--set", "optim.lr=0.02"], "jobs.finetune", None))
    assert cfg.experiment == "from-s3" and cfg.optim.lr == 0.02 and cfg.data.root == str(data)
    cases = {"configs/typo.yaml": (b"optim: {lr: 0.1}\n", "s3://tl-test/configs/typo.yaml: experiment: required key is missing"),
             "configs/sweep.yaml": (b"search: {space: {}}\n", "s3://tl-test/configs/sweep.yaml: search: this is a sweep file; "
                                                             "run it with python -m jobs.sweep --config s3://tl-test/configs/sweep.yaml")}
    for key, (body, message) in cases.items():
        s3.client().put_object(Bucket=BUCKET, Key=key, Body=body)
        one_line_exit_2(finetune.main, ["--config", f"s3://tl-test/{key}"], capsys, tmp_path, message)
    one_line_exit_2(sweep.main, ["--config", "s3://tl-test/configs/typo.yaml"], capsys, tmp_path,
                    "s3://tl-test/configs/typo.yaml: search: required section is missing")
    one_line_exit_2(finetune.main, ["--config", "s3://tl-test/configs/gone.yaml"], capsys, tmp_path,
                    "--config: there is no object s3://tl-test/configs/gone.yaml")


@pytest.mark.integration
@pytest.mark.slow
def test_hub_weights_are_downloaded_once_by_the_driver_and_staged_for_every_worker(ray_cluster, s3, tmp_path):
    """`model.weights: imagenet` on a timm backbone, with the Hugging Face hub on 127.0.0.1: the driver downloads
    the file once into its own cache and stages it on S3; both workers (whose caches are empty) read the staged
    copy. A linear probe leaves the backbone as loaded, so the checkpoint shows which weights were trained."""
    from safetensors.torch import load_file
    from test_pretrained import TINY_TIMM, run_with_tiny_timm_hub

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=8, seed=5)
    config = write_config(tmp_path, data, experiment="hub-weights", train={"epochs": 1}, scaling={"num_workers": 2},
                          model={"backbone": TINY_TIMM, "weights": "imagenet", "strategy": "linear_probe"},
                          storage={"root": "s3://tl-test/runs"})
    run, downloads = run_with_tiny_timm_hub("jobs.finetune", config, tmp_path, ray_cluster, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert downloads == 1
    served = load_file(str(tmp_path / "model.safetensors"))
    assert keys(s3, "runs/_weights/") == ["runs/_weights/huggingface/timm/test_resnet.r160_in1k/main/model.safetensors"]
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for key in keys(s3, "runs/hub-weights/checkpoint_epoch_0001/"):
        s3.client().download_file(BUCKET, key, str(checkpoint / Path(key).name))
    trained, _ = load_model_state(checkpoint)
    backbone = [k for k in served if not k.startswith("fc.")]
    assert backbone and all(torch.equal(trained[k], served[k]) for k in backbone)
