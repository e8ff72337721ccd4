"""Tiny, learnable image datasets made on the spot, run configs for them, and driving `cluster.local`."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

COLORS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 200)]


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 12, size: int = 16, seed: int = 0,
                      layout: str = "flat") -> Path:
    """Class i is an image tinted COLORS[i] with a bright bar at a class-specific row, plus noise.

    layout "flat": ROOT/class_x/*.png; "split": ROOT/train/class_x and ROOT/val/class_x (a quarter each).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(n_classes):
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3)).astype(np.int16)
            img += np.array(COLORS[c % len(COLORS)], dtype=np.int16) // 2
            row = (c * size) // n_classes
            img[row:row + max(1, size // 8), :, :] = 255
            split = ("val" if i % 4 == 0 else "train") if layout == "split" else None
            folder = root / split / f"class_{c}" if split else root / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def write_config(tmp_path, data_root, name="run.yaml", **sections) -> Path:
    cfg = {
        "experiment": "tiny",
        "data": {"root": str(data_root), "image_size": 16, "loader_workers": 0, "val_fraction": 0.25},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "adam", "lr": 1e-3, "scheduler": "constant"},
        "train": {"epochs": 2, "batch_size": 8},
        "scaling": {"num_workers": 2},
        "checkpoint": {"keep": 2, "metric": "val/acc", "mode": "max"},
        "storage": {"root": str(tmp_path / "runs")},
    }
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


REPO = Path(__file__).parent.parent


def cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.local", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def parse_exports(text: str) -> dict[str, str]:
    pairs = (shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in text.splitlines()
             if line.startswith("export "))
    return dict(pairs)


def wait_for_job(client, job_id: str, timeout: float = 400) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status}")
        time.sleep(2)
    return status


def job_client(dashboard_url: str):
    """A JobSubmissionClient for a head started by `cluster.local up`, sending Ray's token (which `ray start`
    keeps in ~/.ray/auth_token) whatever auth mode this process's Ray was imported with."""
    import os

    from ray.job_submission import JobSubmissionClient

    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return JobSubmissionClient(dashboard_url, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})


def ray_head_processes():
    """This process's Ray head (the GCS and raylet `ray.init` started) and every process under it: its workers."""
    import psutil

    heads = [p for p in psutil.Process().children() if p.name() in ("gcs_server", "raylet")]
    return heads + [child for head in heads for child in head.children(recursive=True)]


def end_stragglers(processes, timeout: float) -> list[int]:
    """Wait up to `timeout` s for `processes` (psutil.Process objects, which know their start time, so a reused PID
    is never hit) to exit, then SIGKILL those still running; returns their PIDs. Ray 2.60 sometimes leaves an async
    actor's worker (a Train controller, ~1 GB) deadlocked in its C++ exit handlers after its actor has ended; no
    signal it handles ends it, and the raylet no longer knows it, so it would outlive the test session."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in alive]
