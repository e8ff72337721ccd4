"""Shared by the benchmarks: the data they train on and where their JSON goes."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def digits_source(root: str | Path = "data/digits") -> Path:
    """The demo's source task (digits 0-4, ~900 real images), written once."""
    from tl_core.demo_data import write_digits

    return write_digits(root)[0]


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
