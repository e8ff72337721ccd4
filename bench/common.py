"""Shared by the benchmarks: the data they train on and where their JSON goes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line, named as it is run (`python -m bench.NAME`), described by its docstring's first
    line. Numbers of things (steps, seeds, trials) take jobs.cli's `count`: 0 or less is a usage error, exit 2."""
    return argparse.ArgumentParser(f"python -m {module}", description=doc.splitlines()[0])


def digits_tasks(root: str | Path = "data/digits") -> tuple[Path, Path]:
    """The demo's source task (digits 0-4, ~900 real images) and target task (digits 5-9, 3 labelled images per
    class in train/, the others in val/), written once."""
    from tl_core.demo_data import write_digits

    return write_digits(root)


def digits_source(root: str | Path = "data/digits") -> Path:
    """The demo's source task (digits 0-4, ~900 real images), written once."""
    return digits_tasks(root)[0]


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "python": platform.python_version(),
                    "torch": torch.__version__},
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return path
