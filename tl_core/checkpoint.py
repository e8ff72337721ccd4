"""The checkpoint directory format: model.pt, train_state.pt and meta.json (with the .pt files' sha256).

model.pt is the unwrapped model's state dict; train_state.pt holds the optimizer, scheduler, grad scaler,
epoch, global step and early-stopping state (random state needs no saving: the loop derives it from
(seed, epoch, rank) at every epoch); meta.json holds the config, class names, metrics, per-class metrics,
the confusion matrix and library versions.

A checkpoint is written under a temporary name and renamed into place, and meta.json is written last,
so a directory either verifies completely or is rejected; loading never executes pickled code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Iterator

import torch
import torchvision

from tl_core.errors import CheckpointError
from tl_core.files import as_created
from tl_core.processes import process_exists

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"

#: file name -> a writable stream that receives a copy of that checkpoint file's bytes while it is written (an upload
#: to the run's storage: the checkpoint leaves the node while torch.save runs). Closing it ends the copy.
Mirror = Callable[[str], ContextManager[BinaryIO]]


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    meta: dict[str, Any]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_json(obj: Any) -> str:
    """Strict JSON: a non-finite number (a NaN metric) is written as null, never as the bare NaN that JSON lacks."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), indent=2, allow_nan=False)


def save_checkpoint(directory: str | Path, model_state: dict, train_state: dict, meta: dict,
                    files: dict[str, Path] | None = None, mirror: Mirror | None = None) -> Path:
    """Write a complete checkpoint at `directory` (which must not exist yet), atomically. `files` (name inside the
    checkpoint -> local file) travel with it, checksummed like the weights: what makes it a complete source for
    the next stage (a text model's tokenizer). Each weights file is hashed as it is written, never read back, and
    written to `mirror(its name)` too when given."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        digests = {MODEL_FILE: _save_hashed(model_state, tmp / MODEL_FILE, mirror),
                   STATE_FILE: _save_hashed(train_state, tmp / STATE_FILE, mirror)}
        for name, source in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
            digests[name] = sha256(tmp / name)
        full_meta = {
            **meta,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()},
            "sha256": digests,
        }
        (tmp / META_FILE).write_text(to_json(full_meta))
        as_created(tmp)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class _HashingWriter:
    """A file torch.save writes through (sequentially: its zip writer never seeks), hashing every byte on the way
    and copying it to `copy` when given."""

    def __init__(self, file, copy=None):
        self.file, self.copy, self.digest = file, copy, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        if self.copy is not None:
            self.copy.write(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _save_hashed(obj: Any, path: Path, mirror: Mirror | None = None) -> str:
    with open(path, "wb") as f, (mirror(path.name) if mirror else contextlib.nullcontext()) as copy:
        writer = _HashingWriter(f, copy)
        torch.save(obj, writer)
    return writer.digest.hexdigest()


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint; CheckpointError naming the file if anything is missing or altered."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is missing (incomplete checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is unreadable") from None
    expected = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(expected, dict) or not isinstance(meta.get("epoch"), int):
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is not a checkpoint's (no sha256 or epoch)")
    if not {MODEL_FILE, STATE_FILE} <= expected.keys() or any(".." in Path(n).parts or Path(n).is_absolute() for n in expected):
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} lists the wrong files")
    for name in expected:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: {name} is missing")
        if sha256(path) != expected.get(name):
            raise CheckpointError(f"checkpoint {directory}: {name} fails its sha256 check (corrupt or partial)")
    return meta


def load_model_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, meta) of a verified checkpoint, without its training state."""
    meta = verify_checkpoint(directory)
    return _load_state(Path(directory) / MODEL_FILE, tensors_only=True), meta


def load_checkpoint(directory: str | Path) -> Checkpoint:
    meta = verify_checkpoint(directory)
    directory = Path(directory)
    train_state = _load_state(directory / STATE_FILE, tensors_only=False)
    if not isinstance(train_state.get("epoch"), int):
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} holds no epoch")
    return Checkpoint(model_state=_load_state(directory / MODEL_FILE, tensors_only=True), train_state=train_state, meta=meta)


def is_state_dict_of_tensors(obj: object) -> bool:
    """A model's weights as torch saves them: names to tensors, nothing else."""
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_state(path: Path, tensors_only: bool) -> dict:
    """A dict saved with torch.save, loaded without running pickled code; CheckpointError for anything else
    (a file whose checksum matches can still hold the wrong content)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged or foreign file
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} cannot be loaded ({type(exc).__name__})") from None
    if not isinstance(state, dict) or (tensors_only and not is_state_dict_of_tensors(state)):
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is not a state dict{' of tensors' if tensors_only else ''}")
    return state


_STAGING_PREFIX = "tl-ckpt-"


@contextlib.contextmanager
def staging_dir() -> Iterator[Path]:
    """A temporary directory to write a checkpoint in before it is reported (and copied to the run's storage).
    Its name carries this process's PID, so the copies a killed process left behind (a preempted or OOM-killed
    worker never reaches its `finally`) are removed by the next process on the node that stages one."""
    _remove_stale_staging()
    with tempfile.TemporaryDirectory(prefix=f"{_STAGING_PREFIX}{os.getpid()}-") as tmp:
        yield Path(tmp)


def _remove_stale_staging() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{_STAGING_PREFIX}*-*"):
        pid = path.name[len(_STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


class LocalReporter:
    """A reporter for runs without Ray: keeps every epoch's metrics and copies checkpoints under `root`, the
    newest `keep` of them (all when None)."""

    def __init__(self, root: str | Path, keep: int | None = None):
        self.root = Path(root)
        self.keep = keep
        self.history: list[dict[str, float]] = []
        self.checkpoints: list[Path] = []

    def __call__(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is not None:
            target = self.root / f"checkpoint_{int(metrics['epoch']):06d}"
            shutil.copytree(checkpoint_dir, target)
            self.checkpoints.append(target)
            while self.keep is not None and len(self.checkpoints) > self.keep:
                shutil.rmtree(self.checkpoints.pop(0))

    @property
    def latest(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None
