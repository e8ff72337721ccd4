"""No credential ever reaches a config, a message, a run's files or Ray's logs (the rule is tl_core.secrets)."""

import json
import os
from pathlib import Path

import pytest
from helpers import make_image_folder, write_config

from cluster import storage
from jobs import finetune, pretrain, sweep
from tl_core.config import from_dict
from tl_core.config_file import load_config
from tl_core.errors import ConfigError, StorageError

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("MY_API_TOKEN", "tok-123456789")


MINIMAL = {"experiment": "x", "data": {"root": "/data"}}


@pytest.mark.parametrize("field,text", [
    ("experiment", "run-${AWS_SECRET_ACCESS_KEY}"),
    ("data.root", "s3://bucket/${AWS_ACCESS_KEY_ID}/data"),
    ("optim.name", "${AWS_SECRET_ACCESS_KEY}"),
    ("model.weights", "${MY_API_TOKEN:-none}"),
    ("storage.root", "${AWS_SESSION_TOKEN:-./runs}"),
])
def test_a_config_may_not_reference_a_credential(credentials, tmp_path, field, text):
    section, _, key = field.rpartition(".")
    raw = {**MINIMAL, **({section: {key: text}} if section else {key: text})}
    if section == "data":
        raw["data"] = {"root": text}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{field}: $" in str(err.value) and "names a credential" in str(err.value)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)


@pytest.mark.parametrize("override", [f"experiment=run-{SECRET}", f"optim.name={SECRET}", f"storage.root=/runs/{KEY_ID}",
                                      "model.weights=tok-123456789.pt", f"train.early_stopping.metric={SECRET}"])
def test_no_config_value_may_hold_a_credential(credentials, override):
    with pytest.raises(ConfigError) as err:
        from_dict(MINIMAL, [override], source="run.yaml")
    field = override.split("=")[0]
    assert str(err.value).startswith(f"run.yaml: {field.rsplit('.', 1)[0] if field.count('.') else field}") or field in str(err.value)
    assert "holds a credential" in str(err.value)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value) and "tok-123456789" not in str(err.value)


@pytest.mark.parametrize("override", [f"data.root=s3://{KEY_ID}:{SECRET}@bucket/data",
                                      f"tracking.mlflow.uri=https://me:{SECRET}@mlflow.example:5000",
                                      f"model.weights=https://me:{SECRET}@weights.example/r18.pt"])
def test_a_password_in_a_url_is_a_credential_even_if_no_variable_holds_it(override, monkeypatch):
    """Typed into a URL, it would be written to the run's config.yaml and echoed by errors (an s3:// root with one
    said 'cannot reach AWS S3 (for data.root s3://KEY:SECRET@bucket/...)')."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as err:
        from_dict(MINIMAL, [override], source="run.yaml")
    assert f"run.yaml: {override.split('=')[0]}: holds a credential" in str(err.value)
    assert SECRET not in str(err.value)


def test_a_password_in_a_url_on_a_command_line_is_never_echoed(tmp_path, capsys):
    from jobs import predict

    assert predict.main(["--run", str(tmp_path), "--data", f"s3://{KEY_ID}:{SECRET}@bucket/x", "--out",
                         f"https://u:{SECRET}@host/out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and SECRET not in err
    with pytest.raises(StorageError, match=r"^--data: an s3:// URI names a bucket and a prefix, never credentials") as found:
        storage.parse(f"s3://{KEY_ID}:{SECRET}@bucket/x", field="--data")
    assert SECRET not in str(found.value)


@pytest.mark.parametrize("url,message", [
    (f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000", "credential"),
    ("http://user@127.0.0.1:9000", "must not hold credentials"),
    ("127.0.0.1:9000", "expected an http:// or https:// URL"),
    ("ftp://127.0.0.1", "expected an http:// or https:// URL"),
    ("http://", "expected an http:// or https:// URL"),
    ("http://127.0.0.1:port", "expected an http:// or https:// URL"),
])
def test_an_endpoint_is_a_url_without_user_info(credentials, url, message):
    with pytest.raises(ConfigError) as err:
        from_dict({**MINIMAL, "storage": {"endpoint_url": url}}, source="run.yaml")
    assert str(err.value).startswith("run.yaml: storage.endpoint_url: ") and message in str(err.value)
    assert SECRET not in str(err.value) and "user@" not in str(err.value)


@pytest.mark.parametrize("patch", [{"experiment": "run-${AWS_SECRET_ACCESS_KEY}"},
                                   {"storage": {"endpoint_url": f"http://{KEY_ID}:{SECRET}@127.0.0.1:1"}}])
def test_a_job_given_a_credential_says_one_line_without_it_and_writes_nothing(credentials, image_folder, tmp_path, capsys, patch):
    config = write_config(tmp_path, image_folder, **patch)
    assert finetune.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and SECRET not in err[0] and KEY_ID not in err[0]
    assert not (tmp_path / "runs").exists()


def files_holding(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {n[:4]}..." for n in needles if n.encode() in data]
    return found


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.scan_ray_logs
def test_no_credential_in_any_file_of_runs_or_ray_logs(ray_cluster, s3, tmp_path):
    """A finetune, a pretrain, a sweep and its analysis locally, and a finetune stored on the S3 server, with S3
    credentials in the environment (as every Ray test of this session has had); then every file they wrote, every
    object in the bucket and every file under Ray's session directory (logs included) is scanned."""
    from conftest import S3_BUCKET
    from ray._private import worker  # the session directory has no public accessor; a test may look

    from jobs import analyze

    secrets = [s3.env()["AWS_SECRET_ACCESS_KEY"], s3.env()["AWS_ACCESS_KEY_ID"]]
    assert all(os.environ.get(k) == v for k, v in s3.env().items())
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=8, size=16)
    run = write_config(tmp_path, data, experiment="scan-ft", train={"epochs": 1}, scaling={"num_workers": 1})
    assert finetune.main(["--config", str(run)]) == 0
    assert pretrain.main(["--config", str(run), "--set", "experiment=scan-pt"]) == 0
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(run.read_text() + "search: {num_samples: 1, scheduler: {name: fifo, max_t: 1}, "
                          "space: {optim.lr: {choice: [0.001]}}}\n")
    assert sweep.main(["--config", str(sweep_file), "--set", "experiment=scan-sweep"]) == 0
    assert analyze.main([str(tmp_path / "runs" / "scan-sweep")]) == 0
    assert finetune.main(["--config", str(run), "--set", "experiment=scan-s3", "--set", f"storage.root=s3://{S3_BUCKET}/scan"]) == 0
    assert files_holding(tmp_path / "runs", secrets) == []
    client = s3.client()
    objects = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET) for o in page.get("Contents", [])]
    assert any(key.startswith("scan/scan-s3/checkpoint_epoch_") for key in objects)
    holding = []
    for key in objects:  # every object of the session's bucket: this test's and every earlier S3 test's
        body = client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
        holding += [key for secret in secrets if secret in key or secret.encode() in body]
    assert holding == []
    assert files_holding(Path(worker._global_node.get_session_dir_path()), secrets) == []
