import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_image_folder  # noqa: E402

from cluster.s3_server import start_s3_server  # noqa: E402

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
def ray_cluster(s3):
    """One local Ray cluster for the whole test session (2 CPUs, dashboard on 127.0.0.1 only)."""
    import ray

    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests that start a second Ray cluster on this machine run last: Ray's processes look for "the" local
    cluster in places a second one can confuse, so the shared cluster's tests run before it ever exists."""
    items.sort(key=lambda item: item.get_closest_marker("second_ray_cluster") is not None)
