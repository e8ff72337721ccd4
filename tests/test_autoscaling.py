"""Autoscaling on one machine (`python -m cluster.local up --autoscale`, Ray's fake multi-node provider): a
submitted 2-worker finetune makes the autoscaler start worker nodes and the idle timeout removes them again; a
sweep whose trials need more workers than `max_workers` allows runs them in waves."""

import json
import os
import threading
import time

import psutil
import pytest
from helpers import cli, job_client, make_image_folder, wait_for_job, write_config

from cluster.local.s3_server import free_ports


class NodeWatch:
    """Counts the autoscaled worker nodes (the raylets under the head besides its own) every half second."""

    def __init__(self, head_pid: int):
        self.head = psutil.Process(head_pid)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def workers(self) -> int:
        raylets = [p for p in self.head.children(recursive=True) if p.is_running() and _name(p) == "raylet"]
        return max(len(raylets) - 1, 0)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(self.workers())

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.workers() == count:
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def trial_spans(experiment) -> list[tuple[float, float]]:
    """(start, end) of each trial in wall-clock seconds, from Tune's result.json rows."""
    spans = []
    for result in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        spans.append((rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]))
    return spans


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.second_ray_cluster
def test_jobs_scale_worker_nodes_up_and_idle_ones_away(tmp_path):

    env = {**os.environ, "TL_LOCAL_DIR": str(tmp_path / "local")}
    env.pop("RAY_ADDRESS", None)
    up = cli(["up", "--autoscale", "--max-workers", "3", "--idle-timeout-minutes", "0.1",
              "--dashboard-port", str(free_ports(1)[0])], env)
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "local" / "cluster.json").read_text())
    watch = NodeWatch(state["ray_pid"])
    try:
        assert watch.workers() == 0  # the head alone, with no CPU for training
        data = make_image_folder(tmp_path / "data", n_classes=3, per_class=8)
        client = job_client(state["dashboard_url"])

        # No --working-dir: the fake nodes share one session directory, and a node that starts later unpacks
        # the package again under the running driver's feet. The head's venv has the project installed.
        # A finetune with 2 workers of 1 CPU: the head has none, so the autoscaler must add 2 nodes.
        run = write_config(tmp_path, data, "run.yaml", experiment="autoscaled", train={"epochs": 1},
                           scaling={"num_workers": 2, "resources_per_worker": {"CPU": 1}})
        job = client.submit_job(entrypoint=f"python -m jobs.finetune --config {run}")
        assert wait_for_job(client, job) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
        assert (tmp_path / "runs" / "autoscaled" / "result.json").is_file()
        assert max(watch.samples) >= 2
        assert watch.wait_for(0, timeout=90), f"idle worker nodes were not removed: {watch.workers()} left"

        # A sweep of 5 one-worker trials on at most 3 nodes: the last trials wait for a node instead of failing.
        sweep = write_config(tmp_path, data, "sweep.yaml", experiment="waves", train={"batch_size": 8, "epochs": 1},
                             scaling={"num_workers": 1}, checkpoint={"keep": 1},
                             search={"num_samples": 1, "max_concurrent_trials": 5, "metric": "val/acc", "mode": "max",
                                     "scheduler": {"name": "fifo", "max_t": 1},
                                     "space": {"optim.lr": {"grid": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}}})
        job = client.submit_job(entrypoint=f"python -m jobs.sweep --config {sweep}")
        assert wait_for_job(client, job) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
        spans = trial_spans(tmp_path / "runs" / "waves")
        assert len(spans) == 5
        # The trials waited for nodes instead of all starting (or failing) at once, and a later wave started after an
        # earlier trial ended. Not "at most 3 at once": that is the limit Ray's autoscaler keeps, not this product, and
        # its fake provider overshoots it for a moment while it replaces a node (CI saw 4 raylets alive at once, and
        # once 4 trials overlapping by 0.3 s).
        assert 1 <= most_at_once(spans) < len(spans)
        assert max(start for start, _ in spans) >= min(end for _, end in spans)  # a later wave
    finally:
        watch.stop()
        down = cli(["down"], env)
    assert down.returncode == 0, down.stderr
    assert not psutil.pid_exists(state["ray_pid"])
