"""The command-line contract every job shares: arguments, logging, and errors as one line.

A user mistake (`tl_core.errors.UserError`) is one line on stderr and exit status 2; a run that started
and failed is one line and exit status 1; a bug raises with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import sys
from typing import Callable, NoReturn

from tl_core.errors import ConfigError, UserError
from tl_core.secrets import redact


class UsageError(UserError):
    """Arguments the command line cannot take: a missing or unknown argument, a value of the wrong type."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for a command: named as it is run (`python -m MODULE`), described by its docstring's first line, and
    a mistake in the arguments is a UsageError, one line with the usage in it (exit status 2 under `guarded`).
    Its subcommands' parsers (`add_subparsers`) are of this class too; they come with their own `prog`."""

    def __init__(self, module: str | None = None, doc: str | None = None, **kwargs):
        if module is not None:
            kwargs["prog"] = f"python -m {module}"
        if doc:
            kwargs["description"] = doc.strip().splitlines()[0]
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (usage: {' '.join(self.format_usage().split()[1:])})")


def count(text: str) -> int:
    """argparse type of a number of things (a batch size, actors, top-k): a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_number(text: str) -> float:
    """argparse type of a size: a finite number above 0."""
    value = _number(text)
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def fraction(text: str) -> float:
    """argparse type of a share: a number strictly between 0 and 1."""
    value = _number(text)
    if not (0 < value < 1):
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1 (both excluded)")
    return value


def column_name(text: str) -> str:
    """argparse type of a table's column: a name, not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a column of the table, not be empty")
    return text


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def parse_args(argv: list[str] | None, module: str, doc: str | None) -> argparse.Namespace:
    """The arguments of the jobs that run a config: --config, --set (repeatable) and --resume."""
    parser = ArgumentParser(module, doc)
    parser.add_argument("--config", required=True, help="run config YAML, local or s3:// (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.01 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the experiment from its latest checkpoint")
    args = parser.parse_args(argv)
    args.config = local_config(args.config)
    return args


def local_config(config: str) -> str:
    """--config as a file on this machine: an s3:// object (a sweep report's best.yaml, say) fetched to the node
    cache, which messages name by its URI."""
    from cluster import storage

    if not config.strip():
        raise ConfigError("--config: empty; give a run config YAML file, local or s3://")
    if not storage.is_uri(config):
        return config
    from cluster.storage import cache

    location = storage.parse(config, field="--config")
    if not storage.is_object(location, "--config"):
        raise ConfigError(f"--config: there is no object {location.uri}")
    return str(cache.fetch_object(location, "--config"))


class RunFailed(Exception):
    """Training started but failed (after Ray's retries); the message is the workers' first error."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to continue."""


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn a user mistake into one line on stderr and exit status 2, a failed run into one line and
    exit status 1, Ctrl-C into one line and exit status 130; bugs still raise."""

    def wrapper(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv)
        except UserError as exc:
            print(f"error: {redact(str(exc))}", file=sys.stderr)
            return 2
        except RunFailed as exc:
            print(f"error: {redact(str(exc))}", file=sys.stderr)
            return 1
        except (Interrupted, KeyboardInterrupt) as exc:
            print(f"interrupted: {redact(str(exc)) or 'stopped (Ctrl-C)'}", file=sys.stderr)
            return INTERRUPTED

    wrapper.__doc__ = main.__doc__
    return wrapper


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (not the stream it was when the handler was made)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


SAID_BY_PREFLIGHT = ("tl_core.weights", "tl_core.text_models")  # loggers of what jobs.preflight.check_model builds


def setup_logging(in_worker: bool = False) -> None:
    """Our own progress lines at INFO on stderr.

    In a Ray worker the root logger already prints at INFO (Ray sets it up), so our loggers stop there
    instead of printing twice, and Ray's line-per-report echoes (metrics, "Checkpoint successfully created") are turned down,
    as are the lines about source weights: the driver's preflight loaded the same weights into the same model before any
    worker started and said all of it (`weights: loaded ...`), which each worker would say again.
    """
    for name in ("tl_core", "jobs"):
        log = logging.getLogger(name)
        if not log.handlers:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        log.propagate = not in_worker
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ..." per client
    if in_worker:
        from jobs import ray_private

        for name in ray_private.report_echo_logger_names():
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in SAID_BY_PREFLIGHT:
            logging.getLogger(name).setLevel(logging.ERROR)


def run_module(name: str) -> NoReturn:
    """`python -m NAME`: exit with the status of NAME's `main`, run from the importable module, not from the `__main__`
    copy that `-m` executes. Ray pickles a class or function defined in `__main__` by value, with what its globals
    reach (jobs.predict's Ray Data actor class failed so: "cannot pickle '_Classes' object"), and one defined in
    jobs.NAME by reference, as every Ray worker imports it.

    After a Ctrl-C, a second one while the exit's clean-up runs (Ray's shutdown, which can take seconds) ends the
    process at once and quietly, not with Python's "Exception ignored in atexit callback" traceback; the processes of
    a Ray cluster the job started share its fate."""
    status = importlib.import_module(name).main()
    if status == INTERRUPTED:
        signal.signal(signal.SIGINT, lambda *_: os._exit(INTERRUPTED))
    sys.exit(status)
