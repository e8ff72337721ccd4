"""`python -m cluster.local up --s3` and `ray job submit` against it: a job that succeeds with its result in
the bucket, a bad config that fails in one line, no secret in any object or log, loopback-only listeners,
and `down` stopping exactly what `up` started."""

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import boto3
import psutil
import pytest
from helpers import REPO, cli, job_client, make_image_folder, parse_exports, wait_for_job, write_config

from cluster.local.s3_server import free_ports

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def listening(pid: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.second_ray_cluster
def test_ray_job_submit_against_a_local_head_with_s3(ray_cluster, tmp_path):
    started = time.time()
    env = {**os.environ, "TL_LOCAL_DIR": str(tmp_path / "local")}
    for key in ("RAY_ADDRESS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        env.pop(key, None)  # the head gets its own S3 server's, not the test session's
    port = free_ports(1)[0]
    up = cli(["up", "--s3", "--num-cpus", "2", "--dashboard-port", str(port)], env)
    assert up.returncode == 0, up.stderr
    state_file = tmp_path / "local" / "cluster.json"
    assert oct(state_file.stat().st_mode & 0o777) == "0o600"
    import json

    state = json.loads(state_file.read_text())
    try:
        exports = parse_exports(up.stdout)
        assert exports["RAY_AUTH_MODE"] == "token" and exports["TL_STORAGE_ROOT"] == "s3://tl-local/runs"
        key, secret = exports["AWS_ACCESS_KEY_ID"], exports["AWS_SECRET_ACCESS_KEY"]
        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], aws_access_key_id=key,
                          aws_secret_access_key=secret, region_name="us-east-1")
        assert "running" in cli(["status"], env).stdout

        # Loopback only: the dashboard, every Ray process of the head (GCS and raylet included) and every port
        # of the S3 server.
        dashboard = [c.laddr.ip for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert dashboard and set(dashboard) == {"127.0.0.1"}
        ray_ports = [a for p in psutil.Process(state["ray_pid"]).children(recursive=True) for a in listening(p.pid)]
        gcs_port = int(state["gcs_address"].rpartition(":")[2])
        assert gcs_port in {p for _, p in ray_ports} and {ip for ip, _ in ray_ports} <= LOOPBACK
        s3_ports = listening(state["s3"]["pid"]) + [a for child in psutil.Process(state["s3"]["pid"]).children(recursive=True)
                                                    for a in listening(child.pid)]
        assert s3_ports and {ip for ip, _ in s3_ports} <= LOOPBACK

        data = make_image_folder(tmp_path / "data", n_classes=3, per_class=8)
        for path in data.rglob("*.png"):
            s3.upload_file(str(path), "tl-local", f"data/tiny/{path.relative_to(data).as_posix()}")
        good = write_config(tmp_path, "s3://tl-local/data/tiny", "good.yaml", experiment="submitted",
                            train={"epochs": 1}, scaling={"num_workers": 1}, storage={"root": "${TL_STORAGE_ROOT}"})
        bad = write_config(tmp_path, "s3://tl-local/data/tiny", "bad.yaml", experiment="submitted-bad",
                           optim={"lr": -1}, storage={"root": "${TL_STORAGE_ROOT}"})

        client = job_client(state["dashboard_url"])
        runtime_env = {"working_dir": str(REPO)}
        good_id = client.submit_job(entrypoint=f"python -m jobs.finetune --config {good}", runtime_env=runtime_env)
        bad_id = client.submit_job(entrypoint=f"python -m jobs.finetune --config {bad}", runtime_env=runtime_env)
        # While the job trains, its workers (and rank 0's torch.distributed store) listen on loopback only too.
        during, done = set(), threading.Event()

        def sample_listeners():
            while not done.is_set():
                with contextlib.suppress(psutil.Error):
                    during.update((a, p.name()) for p in psutil.Process(state["ray_pid"]).children(recursive=True)
                                  for a in listening(p.pid))
                time.sleep(0.3)

        sampler = threading.Thread(target=sample_listeners, daemon=True)
        sampler.start()
        assert wait_for_job(client, bad_id) == "FAILED"
        assert wait_for_job(client, good_id) == "SUCCEEDED", client.get_job_logs(good_id)[-3000:]
        done.set()
        sampler.join(10)
        assert any("RayTrainWorker" in name for _, name in during), sorted({name for _, name in during})
        assert sorted((ip, port, name) for (ip, port), name in during if ip not in LOOPBACK) == []

        stored = [o["Key"] for o in s3.list_objects_v2(Bucket="tl-local", Prefix="runs/")["Contents"]]
        assert "runs/submitted/result.json" in stored
        assert not [k for k in stored if k.startswith("runs/submitted-bad")]
        bad_log = client.get_job_logs(bad_id)
        assert f"error: {bad}: optim.lr: Input should be greater than 0 (got -1)" in bad_log.splitlines()
        assert "Traceback" not in bad_log

        # No secret anywhere: every object in the bucket, both jobs' logs, every Ray log written since `up`.
        texts = {f"s3://tl-local/{k}": s3.get_object(Bucket="tl-local", Key=k)["Body"].read()
                 for page in s3.get_paginator("list_objects_v2").paginate(Bucket="tl-local")
                 for k in (o["Key"] for o in page.get("Contents", []))}
        texts.update({f"job {j}": client.get_job_logs(j).encode() for j in (good_id, bad_id)})
        for log in [*Path("/tmp/ray").glob("session_*/logs/**/*"), tmp_path / "local" / "ray.log"]:
            if log.is_file() and log.stat().st_mtime >= started:
                texts[str(log)] = log.read_bytes()
        assert len(texts) > 20
        leaks = [name for name, body in texts.items() if key.encode() in body or secret.encode() in body]
        assert leaks == []
    finally:
        down = cli(["down"], env)
    assert down.returncode == 0 and down.stderr.strip() == "stopped", down.stderr
    assert not psutil.pid_exists(state["ray_pid"]) and not psutil.pid_exists(state["s3"]["pid"])
    assert "no local cluster" in cli(["status"], env).stdout
    again = cli(["down"], env)  # it said "stopped" with nothing to stop
    assert again.returncode == 0 and again.stderr.strip() == "no local cluster to stop", again.stderr


@pytest.mark.integration
def test_a_dashboard_port_taken_after_the_check_ends_up_with_the_reason(tmp_path, monkeypatch):
    """`up` checks the port, but something can take it before Ray's dashboard binds it. Before, `ray start`
    carried on without a dashboard and `up` waited two minutes, then said only that nothing answered."""
    from cluster.local import head

    monkeypatch.setenv("TL_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "5")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_ports(1)[0]))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as failed:
            head.up(num_cpus=1, dashboard_port=port, with_s3=False, timeout=60)
    message = str(failed.value)
    assert message.startswith("error: ray start exited with") and f"127.0.0.1:{port}" in message, message
    assert "\n" not in message and head.running() is None
