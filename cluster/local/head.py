"""A local Ray head (and, with --s3, the development S3 server) for `ray job submit` on one machine.

    python -m cluster.local up [--s3] [--num-cpus N | --autoscale [--max-workers 3]] [--dashboard-port 8265]
    eval "$(python -m cluster.local env)"
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.finetune --config configs/demo.yaml
    python -m cluster.local status
    python -m cluster.local down

Everything listens on 127.0.0.1 only, Ray's GCS and raylets included. The head runs `ray start --head --block` in its own session; `down`
stops exactly the processes `up` started, by PID. State (PIDs, ports, and the S3 server's generated
credentials, mode 0600) lives in $TL_LOCAL_DIR, default ~/.cache/tl-finetune/local.

With --autoscale the head has no CPUs and Ray's autoscaler adds 1-CPU worker nodes on demand (up to
--max-workers) and removes them after --idle-timeout-minutes idle: cluster.yaml's behaviour, on one machine
(cluster/local/autoscaling/fake-multinode.yaml).

With --s3 the head's environment carries the S3 endpoint and credentials, and TL_STORAGE_ROOT /
TL_DATA_ROOT point at the bucket, so submitted jobs write their runs there (configs/demo.yaml reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from cluster.local.s3_server import free_ports, start_s3_server
from jobs.cli import ArgumentParser, count, guarded, positive_number
from tl_core.errors import ConfigError
from tl_core.files import user_path
from tl_core.processes import alive, start_stamp

BUCKET = "tl-local"
FAKE_AUTOSCALING = Path(__file__).parent / "autoscaling" / "fake-multinode.yaml"


def state_dir() -> Path:
    return user_path(os.environ.get("TL_LOCAL_DIR") or Path.home() / ".cache" / "tl-finetune" / "local")


def read_state() -> dict | None:
    """What `up` recorded, or None; ConfigError naming the file when it is not what `up` writes."""
    path = state_dir() / "cluster.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not the state `up` writes ({exc}); delete it once no head it started is running") from None
    if not isinstance(state, dict) or not {"ray_pid", "gcs_address", "dashboard_url"} <= state.keys():
        raise ConfigError(f"{path}: not the state `up` writes (it records ray_pid, gcs_address and dashboard_url); "
                          "delete it once no head it started is running")
    return state


def running() -> dict | None:
    """The state of the head `up` started, if it is still running."""
    state = read_state()
    return state if state and alive(state.get("ray_pid"), state.get("ray_started")) else None


def write_state(state: dict) -> None:
    path = state_dir() / "cluster.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the local S3 secret
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2)


def job_env(state: dict) -> dict[str, str]:
    """What a shell (and the head) exports to use this cluster."""
    # Token authentication on (Ray's token is ~/.ray/auth_token, made by `ray start` if missing); clients
    # such as `ray job submit` send it only when RAY_AUTH_MODE says so.
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-host mode: every Ray process (the head's GCS and
    # raylet, autoscaled worker nodes, drivers joining from this shell) binds and connects on 127.0.0.1.
    env = {"RAY_ADDRESS": state["gcs_address"], "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if state.get("s3"):
        s3 = state["s3"]
        env.update(AWS_ACCESS_KEY_ID=s3["access_key"], AWS_SECRET_ACCESS_KEY=s3["secret_key"],
                   AWS_ENDPOINT_URL=s3["endpoint_url"], AWS_DEFAULT_REGION="us-east-1",
                   TL_STORAGE_ROOT=f"s3://{BUCKET}/runs", TL_DATA_ROOT=f"s3://{BUCKET}/data")
    return env


def up(num_cpus: int | None, dashboard_port: int, with_s3: bool, autoscale: dict | None = None, timeout: float = 120.0) -> dict:
    """Start the head (and the S3 server); `autoscale` ({"max_workers", "idle_timeout_minutes"}) makes it a
    head with no CPUs whose autoscaler launches fake worker nodes."""
    if state := running():
        return state
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    state = {"gcs_address": None, "dashboard_url": f"http://127.0.0.1:{dashboard_port}", "ray_pid": None, "s3": None,
             "autoscale": autoscale}
    if with_s3:
        server = start_s3_server(directory / "s3", bucket=BUCKET)
        state["s3"] = {"pid": server.process.pid, "started": start_stamp(server.process.pid), "endpoint_url": server.endpoint_url,
                       "access_key": server.access_key, "secret_key": server.secret_key, "bucket": BUCKET}
    # Free ports for everything Ray would otherwise take from a fixed default, so that this head can run
    # beside another Ray instance on the machine (a test session's, say).
    gcs_port, agent_port, client_port = free_ports(3)
    state["gcs_address"] = f"127.0.0.1:{gcs_port}"
    state["agent_url"] = f"http://127.0.0.1:{agent_port}"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
               "--disable-usage-stats"]
    env = {**os.environ, **{k: v for k, v in job_env(state).items() if k != "RAY_ADDRESS"}}
    env.pop("RAY_ADDRESS", None)
    if autoscale:
        config = directory / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(fake_autoscaling_config(state["gcs_address"], **autoscale), sort_keys=False))
        command += ["--num-cpus=0", f"--autoscaling-config={config}"]
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    elif num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    # A job's `python -m jobs...` is this interpreter, with this project's dependencies, whatever the caller's PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Ray gives its dashboard 60 s to start, then (the dashboard being required) ends `ray start`; a loaded
    # machine gets as long as `up` waits. `up` waits a little longer, so that Ray's reason is what it reports.
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(round(timeout)))
    with open(directory / "ray.log", "ab") as log:
        log_start = log.tell()
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state["ray_pid"], state["ray_started"] = head.pid, start_stamp(head.pid)
    write_state(state)
    _wait_for_dashboard(state, head, timeout, log_start)
    return state


def fake_autoscaling_config(gcs_address: str, max_workers: int, idle_timeout_minutes: float) -> dict:
    """cluster/local/autoscaling/fake-multinode.yaml for a head at `gcs_address`, with its worker limits."""
    config = yaml.safe_load(FAKE_AUTOSCALING.read_text())
    config["provider"]["gcs_address"] = gcs_address
    config["max_workers"] = config["available_node_types"]["worker.cpu"]["max_workers"] = max_workers
    config["idle_timeout_minutes"] = idle_timeout_minutes
    return config


def _wait_for_dashboard(state: dict, head: subprocess.Popen, timeout: float, log_start: int) -> None:
    """Until the dashboard and the head's job agent (which runs submitted jobs) both answer. If `ray start` exits
    instead, its last error line in ray.log (from `log_start`, where this start's lines begin) is the message."""
    limit = timeout + 30  # past Ray's own limit for its dashboard (see `up`)
    deadline = time.monotonic() + limit
    for url in (f"{state['dashboard_url']}/api/version", f"{state['agent_url']}/api/local_raylet_healthz"):
        while not _answers(url):
            if head.poll() is not None:
                down()
                raise SystemExit(f"error: ray start exited with {head.returncode}{_last_error(log_start)}; "
                                 f"see {state_dir() / 'ray.log'}")
            if time.monotonic() > deadline:
                down()
                raise SystemExit(f"error: {url} did not answer within {limit:.0f}s{_last_error(log_start)}; "
                                 f"see {state_dir() / 'ray.log'}")
            time.sleep(1)


def _last_error(log_start: int) -> str:
    """': <the last line of ray.log naming an error>' since `log_start`, or '' if there is none."""
    with open(state_dir() / "ray.log", "rb") as log:
        log.seek(log_start)
        lines = log.read().decode(errors="replace").splitlines()
    errors = [line.strip() for line in lines if re.match(r"\s*\w*(Error|Exception): ", line)]
    return f": {errors[-1].rstrip('.')}" if errors else ""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # an answer all the same (401 without the token)
        return True
    except OSError:
        return False


def down() -> bool:
    """Stop what `up` started: the `ray start --block` process (which stops its Ray processes) and the S3
    server, each by the PID recorded at start, escalating to SIGKILL of its own process group. False when `up` had
    started nothing (or it was already stopped)."""
    state = read_state()
    if not state:
        return False
    s3 = state.get("s3") or {}
    for pid, started in ((state.get("ray_pid"), state.get("ray_started")), (s3.get("pid"), s3.get("started"))):
        if alive(pid, started):  # never a process that only has the number of one `up` started
            _stop_group(pid)
    _forget_ray_address(state["gcs_address"])
    (state_dir() / "cluster.json").unlink(missing_ok=True)
    return True


def _forget_ray_address(gcs_address: str) -> None:
    """`ray start` records its address for `ray.init()` to find; `ray stop` would remove it, so we do, or
    the next plain `ray.init()` on this machine tries to join the stopped head."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.is_file() and path.read_text().strip().rpartition(":")[2] == gcs_address.rpartition(":")[2]:
        path.unlink(missing_ok=True)


def _stop_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM to the process group, SIGKILL if it is still there after `timeout`; returns once it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def describe(state: dict | None) -> str:
    if not state:
        return "no local cluster (python -m cluster.local up [--s3])"
    lines = [f"Ray head   {state['gcs_address']}  ({'running' if alive(state['ray_pid'], state.get('ray_started')) else 'stopped'}, "
             f"pid {state['ray_pid']})",
             f"dashboard  {state['dashboard_url']}   (ray job submit --address {state['dashboard_url']} ...)"]
    if state.get("autoscale"):
        lines.append("autoscale  0-{max_workers} worker nodes of 1 CPU, idle timeout {idle_timeout_minutes} min".format(**state["autoscale"]))
    if state.get("s3"):
        s3 = state["s3"]
        lines.append(f"S3         {s3['endpoint_url']}  bucket {s3['bucket']}  "
                     f"({'running' if alive(s3['pid'], s3.get('started')) else 'stopped'}, pid {s3['pid']})")
    return "\n".join(lines)


def exports(state: dict) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in job_env(state).items())


def port(text: str) -> int:
    """argparse type of a TCP port to listen on: 1 to 65535."""
    value = count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1 to 65535)")
    return value


def port_free(number: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", number))
        except OSError:
            return False
    return True


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser("cluster.local", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start a Ray head on 127.0.0.1 (and the S3 server with --s3)")
    start.add_argument("--s3", action="store_true", help="also start the local S3 server and point jobs at it")
    start.add_argument("--num-cpus", type=count, default=None, help="CPUs of the head (default: all)")
    start.add_argument("--autoscale", action="store_true",
                       help="a head with no CPUs plus autoscaled 1-CPU worker nodes on this machine (fake multi-node)")
    start.add_argument("--max-workers", type=count, default=3, help="with --autoscale: the most worker nodes")
    start.add_argument("--idle-timeout-minutes", type=positive_number, default=0.2,
                       help="with --autoscale: how long an idle worker node lives")
    start.add_argument("--dashboard-port", type=port, default=8265)
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="what is running")
    sub.add_parser("env", help="the exports for this shell: eval \"$(python -m cluster.local env)\"")
    args = parser.parse_args(argv)

    if args.command == "up":
        if args.autoscale and args.num_cpus is not None:
            start.error("--num-cpus and --autoscale: the autoscaled head has no CPUs; choose one")
        if state := running():
            print("already running; `python -m cluster.local down` first to start it with other options", file=sys.stderr)
        elif not port_free(args.dashboard_port):
            start.error(f"--dashboard-port: {args.dashboard_port} is in use on 127.0.0.1; choose another")
        else:
            autoscale = {"max_workers": args.max_workers, "idle_timeout_minutes": args.idle_timeout_minutes} if args.autoscale else None
            state = up(args.num_cpus, args.dashboard_port, args.s3, autoscale)
        print(describe(state), file=sys.stderr)
        print("\n# to use it from this shell:", file=sys.stderr)
        print(exports(state))
    elif args.command == "down":
        print("stopped" if down() else "no local cluster to stop", file=sys.stderr)
    elif args.command == "status":
        print(describe(read_state()))
    elif (state := read_state()) is not None:
        print(exports(state))
    else:
        print(describe(None), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
