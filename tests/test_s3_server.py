"""The development S3 server: real SeaweedFS, authentication on, loopback only."""

import boto3
import psutil
import pyarrow.fs
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from cluster.local.s3_server import s3_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3"), bucket="tl-test") as srv:
        yield srv


def test_authenticated_round_trip_with_boto3_and_pyarrow(server):
    client = server.client()
    client.put_object(Bucket="tl-test", Key="runs/x/hello.txt", Body=b"hello")
    assert client.get_object(Bucket="tl-test", Key="runs/x/hello.txt")["Body"].read() == b"hello"
    fs = pyarrow.fs.S3FileSystem(access_key=server.access_key, secret_key=server.secret_key,
                                 endpoint_override=server.endpoint_url.removeprefix("http://"), scheme="http",
                                 region="us-east-1")
    with fs.open_input_stream("tl-test/runs/x/hello.txt") as f:
        assert f.read() == b"hello"


def test_anonymous_and_wrong_secret_are_refused(server):
    anonymous = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError):
        anonymous.list_objects_v2(Bucket="tl-test")
    wrong = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                         aws_access_key_id=server.access_key, aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied"):
        wrong.list_objects_v2(Bucket="tl-test")


def test_two_servers_at_once_and_loopback_only(server, tmp_path):
    with s3_server(tmp_path, bucket="second") as other:
        assert other.endpoint_url != server.endpoint_url
        assert other.endpoint_url.startswith("http://127.0.0.1:")
        assert [b["Name"] for b in other.client().list_buckets()["Buckets"]] == ["second"]
    assert other.process.poll() is not None  # stopped on exit


def test_listens_on_loopback_only(server):
    listening = [c.laddr for c in psutil.Process(server.process.pid).net_connections() if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_secrets_are_not_in_the_repr(server):
    assert server.secret_key not in repr(server)


def test_free_ports_are_below_the_kernels_ephemeral_range():
    """A port handed out for a server to bind later must not be one an outgoing connection can take meanwhile. In CI a
    local head's dashboard once never answered on such a port, most likely taken that way: a port taken after `up`'s
    check does exactly that (tests/test_local_cluster.py)."""
    from pathlib import Path

    from cluster.local.s3_server import free_ports

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(20)
    assert len(set(ports)) == 20 and all(20000 <= p < low for p in ports), ports
