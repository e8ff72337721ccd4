import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_image_folder  # noqa: E402


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 12 tiny images in class folders."""
    return make_image_folder(tmp_path / "data", n_classes=3, per_class=12, size=16)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (2 CPUs, dashboard on 127.0.0.1 only)."""
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
