import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import end_stragglers, make_image_folder, ray_head_processes  # noqa: E402

from cluster.local.s3_server import start_s3_server  # noqa: E402

S3_BUCKET = "tl-test"


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 12 tiny images in class folders."""
    return make_image_folder(tmp_path / "data", n_classes=3, per_class=12, size=16)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One authenticated SeaweedFS S3 server for the session, with bucket tl-test.

    Its credentials and endpoint go into this process's environment before Ray starts, so Ray workers
    inherit them exactly as they would an instance role's. Retries are cut to 3 attempts to keep the
    outage tests short.
    """
    server = start_s3_server(tmp_path_factory.mktemp("s3"), bucket=S3_BUCKET)
    saved = {k: os.environ.get(k) for k in (*server.env(), "AWS_MAX_ATTEMPTS", "TL_CACHE_DIR")}
    os.environ.update(server.env(), AWS_MAX_ATTEMPTS="3", TL_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend, artifacts served from a local folder); its URI."""
    import signal
    import subprocess
    import time
    import urllib.request

    from cluster.local.s3_server import free_ports

    root = tmp_path_factory.mktemp("mlflow")
    port = free_ports(1)[0]
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    with open(root / "server.log", "ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}") from None
            time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)  # the server and the processes it started, nothing else
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="session")
def ray_cluster(s3, tmp_path_factory):
    """One local Ray cluster for the whole test session (2 CPUs, dashboard on 127.0.0.1 only). Its workers get
    library caches of their own (torch hub, Hugging Face hub), empty like a fresh node's."""
    import ray

    from jobs.runner import start_local_ray

    caches = tmp_path_factory.mktemp("worker-caches")
    os.environ.update(HF_HOME=str(caches / "hf"), TORCH_HOME=str(caches / "torch"))
    start_local_ray(num_cpus=2)
    yield ray
    processes = ray_head_processes()
    ray.shutdown()
    if ended := end_stragglers(processes, timeout=15):
        warnings.warn(f"ended {len(ended)} Ray process(es) still running 15 s after ray.shutdown (PIDs {ended}): "
                      "a worker hung in its exit, a known Ray fault", stacklevel=1)


def pytest_collection_modifyitems(config, items):
    """The order that keeps the shared Ray cluster healthy: first every test without Ray, then the tests on
    the shared cluster, then the test that starts a second Ray head.

    Starting processes with multiprocessing's spawn (as the gloo DDP tests do) from this driver process
    after `ray.init` left Ray 2.60's driver unable to see its next TorchTrainer controller come alive (the
    run hung before starting its worker group, reproducibly); a second Ray head beside the shared one
    confuses the processes that look for "the" local cluster.
    """
    def rank(item) -> float:
        if item.get_closest_marker("second_ray_cluster"):
            return 2
        if item.get_closest_marker("scan_ray_logs"):  # after every other run on the shared cluster has logged
            return 1.5
        return 1 if "ray_cluster" in item.fixturenames else 0

    items.sort(key=rank)
