"""cluster.storage against a real S3 server: parsing, the filesystem Ray writes through, access checks."""

import pytest

from cluster import storage
from cluster.local.s3_server import free_ports
from tl_core.errors import StorageError


@pytest.fixture
def aws_env(s3):
    return s3


def test_parse_local_and_s3(tmp_path, monkeypatch):
    local = storage.parse(str(tmp_path / "runs"))
    assert not local.is_s3 and local.path == str(tmp_path / "runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = storage.parse("s3://tl-test/team/a/")
    assert (s3.bucket, s3.path, s3.endpoint_url) == ("tl-test", "tl-test/team/a", "http://127.0.0.1:9")
    assert storage.parse("s3://tl-test", endpoint_url="http://127.0.0.1:1").endpoint_url == "http://127.0.0.1:1"
    with pytest.raises(StorageError, match="names no valid bucket"):
        storage.parse("s3://x/y")
    with pytest.raises(StorageError, match="neither a local path nor s3://"):
        storage.parse("gs://bucket/prefix")


def test_filesystem_writes_into_the_bucket(aws_env):
    location = storage.parse("s3://tl-test/storage-test/exp")
    storage.check_access(location)
    fs = storage.filesystem(location)
    with fs.open_output_stream(f"{location.path}/result.json") as f:
        f.write(b"{}")
    keys = [o["Key"] for o in aws_env.client().list_objects_v2(Bucket="tl-test")["Contents"]]
    assert "storage-test/exp/result.json" in keys


def test_an_empty_folder_or_prefix_has_no_content_and_a_file_in_it_does(aws_env, tmp_path):
    folder = tmp_path / "out"
    assert not storage.has_content(storage.parse(str(folder)))
    folder.mkdir()
    assert not storage.has_content(storage.parse(str(folder)))
    (folder / "part-0.parquet").write_bytes(b"")
    assert storage.has_content(storage.parse(str(folder)))
    assert storage.has_content(storage.parse(str(folder / "part-0.parquet")))
    prefix = storage.parse("s3://tl-test/has-content/out")
    aws_env.client().put_object(Bucket="tl-test", Key="has-content/out/", Body=b"")  # a folder marker only
    assert not storage.has_content(prefix)
    aws_env.client().put_object(Bucket="tl-test", Key="has-content/out/part-0.parquet", Body=b"")
    assert storage.has_content(prefix)


def test_missing_bucket(aws_env):
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist"):
        storage.check_access(storage.parse("s3://no-such-bucket/x"))


def test_wrong_credentials_never_print_the_key(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(StorageError) as err:
        storage.check_access(storage.parse("s3://tl-test/x"))
    message = str(err.value)
    assert "refused the credentials" in message
    assert aws_env.access_key not in message and "definitely-wrong-secret" not in message


def test_unreachable_endpoint(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="storage.endpoint_url: cannot reach http://127.0.0.1:"):
        storage.check_access(storage.parse("s3://tl-test/x"))


@pytest.mark.parametrize("probe", [storage.check_access, storage.exists, storage.is_object, storage.read_text])
def test_missing_credentials_are_one_line_naming_the_field(probe, tmp_path, monkeypatch):
    """No credentials anywhere in boto3's chain: every probe a run makes before training (the storage root, a
    source model's state-dict object on S3, a run's result.json) says so in one line, not botocore's traceback."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup off this machine
    location = storage.parse("s3://tl-test/sources/r18.pt", endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}", field="model.weights")
    with pytest.raises(StorageError, match=r"^model.weights: no AWS credentials found for s3://tl-test/sources/r18.pt") as err:
        probe(location, "model.weights")
    assert "\n" not in str(err.value)
