"""Every use of Ray's private modules, in one place, each with the reason no public API serves.

Ray's private layout changes between minor versions: when upgrading Ray, this is the file to check, and
jobs/tune_results.py, whose loggers override a private method of Tune's.
"""

from __future__ import annotations

import json
import re
import time


def report_echo_logger_names() -> list[str]:
    """The loggers that echo every report as a line: Ray Train's metrics line, named after its file
    (`logging.getLogger(__file__)`, so only its module path can name it), and the "Checkpoint successfully created"
    line a Tune trial's checkpoint prints each epoch. There is no setting for either."""
    from ray.train._internal import storage
    from ray.train.v2._internal.execution import context

    return [context.__file__, storage.logger.name]


def autoscaler_max_resources() -> dict[str, float] | None:
    """What an autoscaler v2 cluster can grow to (the sum over its node types' max counts), or None.
    `ray.cluster_resources()` only reports the nodes running now; the limits are published nowhere public."""
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config()


def autoscaler_v1_node_types() -> set[str]:
    """The node types a v1 autoscaler knows, read from the status it publishes in the GCS key-value store
    (what `ray status` prints; no public API returns it). Every cluster runs one: without an autoscaling config
    (`ray start` alone, `ray.init()`) its read-only provider's only "node types" are the running nodes, `node_<id>`."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    return {*(report.get("active_nodes") or {}), *(report.get("node_type_mapping") or {}).values()}


def keep_credentials_out_of_tune_runtime_env() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the session tokens from the driver's environment
    into every trial actor's `runtime_env={"env_vars": ...}` (ray.tune.execution.class_cache), and Ray's
    runtime_env_agent.log writes runtime envs in plain text. Trials get credentials the way every other Ray
    process does instead: from the raylet's inherited environment (a cluster the job starts, `cluster.local`)
    or the node's instance role. The set is module state with no setting of its own."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(
        {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


def checkpoint_manager_snapshot_name() -> str:
    """The file in a Ray Train run's directory where its checkpoint manager keeps the checkpoints it registered.
    A resume that sets a damaged checkpoint aside must drop it: Ray refuses to start when a registered checkpoint
    is gone, and would otherwise count (and delete) the epoch written again under the damaged one's name."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def number_checkpoints_after(trial_storage, existing: list[str]) -> None:
    """Make a Tune trial's next checkpoint take the name after the newest of `existing` (its checkpoint directories
    in storage). Tune numbers a trial's checkpoints (checkpoint_000005) on from the ones it had registered when it
    last saved the experiment's state, so a trial resumed after its driver was killed wrote its epochs over the
    checkpoints stored since: the one it resumed from, and a damaged one, included. The number is the trial's
    StorageContext's `current_checkpoint_index` (the last one written; a report adds one before it saves), which
    no public API sets."""
    names = (path.rstrip("/").rsplit("/", 1)[-1] for path in existing)
    numbers = [int(match[1]) for name in names if (match := re.fullmatch(r"checkpoint_(\d+)", name))]
    trial_storage.current_checkpoint_index = max([trial_storage.current_checkpoint_index, *numbers])


def use_single_host_mode() -> None:
    """Ray's single-host mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`): this node's address is 127.0.0.1 and every
    Ray process binds there. The processes Ray starts read the variable from their environment; this process read
    it into `ray_constants` when Ray was first imported, so the constant is set too. No public API chooses it."""
    import os

    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


_listening: list = []  # the sockets handed to TCPStore: kept open for the life of the worker process


def bind_process_group_store_to_master_addr() -> None:
    """Rank 0's TCPStore (the rendezvous of torch.distributed, which Ray Train creates before any code of ours runs)
    listens on every interface (`*:PORT`) unless it is handed a socket already bound. Every Ray worker process runs
    this as it starts (WORKER_RUNTIME_ENV's setup hook); it wraps torch's private store factory, as soon as anything
    imports it, so that rank 0 binds MASTER_ADDR:MASTER_PORT only: 127.0.0.1 on a local cluster, the node's own
    address on a real one. torch has no setting for the listen address; `master_listen_fd` is its way to pass one.

    The wrapping waits for that import (wrapt's post-import hook) rather than importing torch here: a worker that never
    uses torch (Ray Data's readers, Train's controller, a sweep's driver task) would otherwise pay for it as it starts,
    measured ~1.9 s of CPU and ~480 MB of memory per worker process (2.4 s and 557 MB against 0.5 s and 80 MB)."""
    import wrapt

    wrapt.register_post_import_hook(_bind_store_to_master_addr, "torch.distributed.rendezvous")


def _bind_store_to_master_addr(rendezvous) -> None:
    import socket

    create = rendezvous._create_c10d_store

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0:
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        from torch.distributed import TCPStore

        family, kind, proto, _, address = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
        _listening.append(listener)
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, master_listen_fd=listener.fileno(), use_libuv=use_libuv)

    rendezvous._create_c10d_store = create_store


def hold_torch_to_assigned_cpus() -> None:
    """Give torch the thread count Ray set for this task or actor. Ray sets OMP_NUM_THREADS (to the CPUs it assigned,
    unless the user set it) when a task starts, but torch reads it only when first imported: in a worker process that
    imported torch before (an earlier task, or code imported before Ray set it), torch would run the thread count it
    started with, a thread per core of the node unless told otherwise.
    Measured: two 1-CPU sweep trials on 2 cores, each with 2 threads, took 2.8 s an epoch that one alone ran in 0.48 s."""
    import os

    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def quiet_token_auth_notice() -> None:
    """A new local cluster turns Ray's token authentication on by default and says so in a WARNING on every start
    ("Token authentication is enabled for this Ray cluster"); authentication stays on, the notice is not printed.
    Setting RAY_AUTH_MODE=token would do it publicly, but Ray reads that variable when it is imported, so it cannot be
    set from inside a job."""
    import logging

    from ray._private.authentication import authentication_token_setup

    logging.getLogger(authentication_token_setup.__name__).setLevel(logging.ERROR)


#: Lines Ray prints from its own processes that are harmless but read as failures (an `E` log level), or that are
#: noise in a run's log, each with why: a line holding one of these texts (or every text of a tuple) is left out.
BENIGN_RAY_LINES: tuple[str | tuple[str, ...], ...] = (
    # Ray Train's controller starts its PreemptionWatcher actor with arguments in the object store and restarts
    # allowed; the core worker logs that at error level on every run (ray-project/ray#53727), though nothing fails.
    "Actor with class name: 'PreemptionWatcher'",
    # Ray Train's PlacementGroupCleaner asks the state API whether the controller lives; as a run stopped with
    # Ctrl-C shuts the cluster down the API is gone first, and it warns after the run's last line that it will retry.
    "Failed to query Ray Train Controller actor state",
    # A packed dataset's split coordinators, whose progress bars jobs.streaming turns off (they would print per batch),
    # say once how to turn them on, then that each epoch's pass over the split finished ("✔️ Dataset ... execution
    # finished in 1.65 seconds", twice an epoch). A failed pass still says so ("execution failed").
    "Progress bars disabled. To enable, set",
    " execution finished in ",
    # The GCS, stopping an actor whose process has already exited (a packed dataset's split coordinator at a run's
    # end), finds its socket closed: "Failed to kill actor ..., return status: Invalid: KillActor RPC failed for actor
    # ...: RpcError: RPC error: Socket closed rpc_code: 14". The actor is gone, as asked.
    ("Failed to kill actor", "KillActor RPC failed", "Socket closed"),
)


def is_benign(line: str) -> bool:
    return any(all(part in line for part in ((benign,) if isinstance(benign, str) else benign)) for benign in BENIGN_RAY_LINES)


def without_stop_tracebacks(lines: list[str]) -> list[str]:
    """`lines` less the traceback a Ray worker prints when the SIGTERM that stops it (a sweep's trial process, its work
    done) lands while Python runs a weakref callback: Ray's SIGTERM handler raises SystemExit there, which Python can
    only report, "Exception ignored in: <function WeakSet...>", then a traceback through Ray's `sigterm_handler` to
    "SystemExit: 1" (seen once in a CI run, from a trial of a SimCLR sweep that passed). Nothing failed; the process
    was being stopped. Another ignored exception, or a traceback cut off by the batch's end, is kept whole."""
    kept: list[str] = []
    block: list[str] | None = None  # an ignored exception's lines, until its last says what it was
    for line in lines:
        if line.startswith("Exception ignored in"):
            kept += block or []
            block = [line]
        elif block is None:
            kept.append(line)
        else:
            block.append(line)
            if line.startswith("SystemExit"):
                kept += [] if any("in sigterm_handler" in part for part in block) else block
                block = None
    return kept + (block or [])


def worker_lines_as_they_come() -> None:
    """Ray folds lines that read alike but for their numbers, from different processes within 5 s, into the first
    one, marked " [repeated 3x across cluster]" and printed up to 5 s later: a sweep's concurrent trials' epoch lines,
    whose numbers are the point, hid behind one trial's and came after the sweep's summary. Unless RAY_DEDUP_LOGS
    says otherwise, every line is printed as it comes, with its process's prefix."""
    import os

    from ray._private import ray_logging

    if "RAY_DEDUP_LOGS" not in os.environ:  # read by Ray when it is imported, so set here on its module
        ray_logging.RAY_DEDUP_LOGS = False


def plain_repeat_notes_off_terminals() -> None:
    """Ray marks a deduplicated worker line's " [repeated 3x across cluster]" in green whatever it prints to
    (`ray_logging._color`, unlike its line prefixes, which RAY_COLOR_PREFIX=0 turns off): in a log file that is an
    escape sequence. Unless both stdout and stderr are terminals, the note is printed plain."""
    import sys

    from ray._private import ray_logging

    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        ray_logging._color = lambda msg: msg


def drop_benign_ray_lines() -> None:
    """Leave BENIGN_RAY_LINES and a stopped worker's SIGTERM traceback (`without_stop_tracebacks`) out of the worker
    output Ray echoes to this driver. Ray prints worker lines through a handler it registers, as "ray_print_logs", on
    a private dispatcher; there is no public filter, so that handler is wrapped."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def wrap(handler):
        def filtered(data: dict) -> None:
            lines = [line for line in without_stop_tracebacks(data.get("lines", [])) if not is_benign(line)]
            if lines:
                handler({**data, "lines": lines})

        filtered.tl_filtered = True
        return filtered

    with dispatcher._lock:
        dispatcher.handlers = [(name, handler if name != "ray_print_logs" or getattr(handler, "tl_filtered", False) else wrap(handler))
                               for name, handler in dispatcher.handlers]


_last_worker_line = [0.0]  # time.monotonic() when the latest batch of worker lines reached this driver


def note_when_worker_lines_come() -> None:
    """Keep the time the latest worker lines reached this driver, for `worker_lines_settled`: they come through the
    dispatcher Ray prints them from (see `drop_benign_ray_lines`), which has no public hook."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("tl_last_line")
    dispatcher.add_handler("tl_last_line", lambda data: _last_worker_line.__setitem__(0, time.monotonic()))


def worker_lines_settled(quiet_s: float = 1.0, at_most_s: float = 5.0) -> None:
    """Return once no worker line has reached this driver for `quiet_s` (or after `at_most_s`). A worker's lines come
    through Ray's log monitor, which polls the workers' files every 0.1 s, later on a busy machine: a sweep's last
    epoch line, printed as its trial ended, came after the sweep's summary. Lines long quiet cost no wait."""
    deadline = time.monotonic() + at_most_s
    while (wait := min(_last_worker_line[0] + quiet_s, deadline) - time.monotonic()) > 0:
        time.sleep(wait)


#: How often Ray Train's controller takes the workers' reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default 2 s)
REPORT_POLL_S = 0.2


def take_reports_promptly() -> None:
    """Ray Train's controller takes a worker's `ray.train.report` only when it polls the workers, every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default, and a worker holds one report at a time (a queue of one): its
    next report waits for that poll. So an epoch shorter than 2 s (few images, `train.val_every` > 1, a fast GPU) took
    2 s. Measured here (the demo's 15 digits, resnet18 at 32 px, 30 epochs validated every 5): 91 s a run with 2 s,
    48 s with 0.2 s, and no more CPU time (15 epochs validated each: 90 s of the machine's CPU with 2 s, 89 s with
    0.2 s). A poll is a small remote call per worker; one that takes longer is awaited in the next round, and a worker
    is only given up after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), so a short interval fails nothing. Set in
    the driver's environment before a TorchTrainer starts, unless a user set it: Ray hands that variable on to the
    controller it starts (its ENV_VARS_TO_PROPAGATE). No public API sets it."""
    import os

    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

    os.environ.setdefault(HEALTH_CHECK_INTERVAL_S_ENV_VAR, str(REPORT_POLL_S))


def no_late_cpu_alarm() -> None:
    """Ray Data warns, once per process, that a dataset "will hang unless more CPUs are freed up" when it executes on a
    cluster with no free CPU. `write_parquet` executes twice: the write itself, then its materialized result, by which
    time the model actors may still hold every CPU, so on a small machine the warning came after the predictions were
    written. Where CPUs are free as the write starts (the warning's one real case is a cluster with none), its once is
    spent here, under the key Ray Data logs it with."""
    import ray
    from ray.util.debug import log_once

    if ray.available_resources().get("CPU"):
        log_once("cpu_warning")


def tuner_run_config(tuner):
    """The RunConfig a Tuner runs with: a restored one's comes from the experiment's tuner.pkl, with the callbacks the
    sweep began with, and Tuner has no public getter for it."""
    return tuner._local_tuner.get_run_config()
