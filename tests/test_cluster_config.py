"""cluster.yaml (AWS) and the fake multi-node autoscaling config pass Ray's own cluster-config schema
validation, and cluster.yaml has the shape the product promises: a head with no training capacity, GPU worker
types that scale from zero, S3 through instance profiles only, and this project installed at its version."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.local.head import fake_autoscaling_config

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_validation(cluster_yaml):
    validate_config(prepare_config(cluster_yaml))  # raises jsonschema.ValidationError / ValueError when invalid


def test_ray_validation_catches_a_broken_config(cluster_yaml):
    """The check above can fail: a misspelt key and a head type that does not exist are both rejected."""
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**cluster_yaml, "max_worker": 3}))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config({**cluster_yaml, "head_node_type": "nope"}))


def test_head_trains_nothing_and_gpu_workers_scale_from_zero(cluster_yaml):
    types = cluster_yaml["available_node_types"]
    assert types[cluster_yaml["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != cluster_yaml["head_node_type"]}
    assert {t["node_config"]["InstanceType"] for t in workers.values()} >= {"g5.xlarge", "g5.12xlarge"}
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, name
        assert node_type["resources"]["GPU"] >= 1, name
    assert any(t["resources"]["GPU"] > 1 for t in workers.values())  # a multi-GPU type for single-node DDP
    assert 0 < cluster_yaml["idle_timeout_minutes"] <= 30


def test_s3_access_is_an_instance_profile_and_the_file_holds_no_keys(cluster_yaml):
    for name, node_type in cluster_yaml["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|aws_access_key_id", text, re.I)


def test_setup_installs_this_project_at_its_version_with_the_tested_pins(cluster_yaml):
    install = next(c for c in cluster_yaml["setup_commands"] if "pip install" in c and "wheels" in c)
    assert f"~/wheels/tl_finetune-{version('tl-finetune')}-py3-none-any.whl" in install
    assert f'"ray[train,tune,default]=={ray.__version__}"' in install
    import torch
    import torchvision

    assert f'"torch=={torch.__version__.split("+")[0]}"' in install
    assert f'"torchvision=={torchvision.__version__.split("+")[0]}"' in install
    assert cluster_yaml["file_mounts"] == {"~/wheels": "dist/"}
    assert all("--dashboard-host=127.0.0.1" in c for c in cluster_yaml["head_start_ray_commands"] if "--head" in c)


def test_fake_multinode_config_passes_rays_validation():
    config = fake_autoscaling_config("127.0.0.1:6379", max_workers=3, idle_timeout_minutes=0.2)
    validate_config(config)
    assert config["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0}
    workers = config["available_node_types"]["worker.cpu"]
    assert (workers["min_workers"], workers["max_workers"], config["max_workers"]) == (0, 3, 3)
