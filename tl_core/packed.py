"""A packed dataset: an image folder or a text table cleaned and split once, its samples stored in a few large
Parquet shards.

`python -m jobs.pack_data SOURCE DEST` writes one (jobs/pack_data.py); `data.root: DEST` trains on it by streaming
the shards. Layout of DEST (local or s3://):

    manifest.json              written last: its presence means the dataset is complete (`Manifest`)
    <version>/train-00000.parquet ...   rows: images (image: the file's encoded bytes, label: class index, path: source
    <version>/val-00000.parquet ...           path) or texts (text, label: class index), as the manifest's `modality` says

Parquet rather than WebDataset tar: one columnar file type that pyarrow (already how runs reach S3) and Ray Data
(`read_parquet`) read natively, with the label and path columns readable without touching the image bytes, row
groups that split a shard across readers, and no extra dependency. A shard holds the encoded bytes (JPEG, PNG, ...)
as they were, not decoded pixels, so it is no bigger than the source.

Nothing here imports Ray: the job lists, reads and writes; this module defines the format and decodes rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from tl_core.data import decode_rgb, imbalance
from tl_core.errors import DataError

MANIFEST_FILE = "manifest.json"
FORMAT = "tl-finetune/packed-images/1"
SPLITS = ("train", "val")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("path", pa.string())])
TEXT_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.int32())])


@dataclass
class Manifest:
    """What a packed dataset holds: its classes and splits, counts, shards (paths relative to DEST, with rows and
    bytes), and where it came from (the source URI and its listing's fingerprint, with the split settings)."""

    classes: list[str]
    shards: dict[str, list[dict[str, Any]]]  # split -> [{"path", "rows", "bytes"}]
    source: str
    fingerprint: str
    val_fraction: float
    seed: int
    counts: dict[str, int] = field(default_factory=dict)  # train, val, unreadable, duplicates
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> rows
    unreadable: list[str] = field(default_factory=list)  # the first skipped files (or table rows), for the user to look at
    modality: str = "image"  # or "text"
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """The manifest in `text`; DataError naming `where` when it is not one of ours."""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            manifest = cls(**raw)
            if len(manifest.classes) < 2 or set(manifest.shards) != set(SPLITS) or not all(manifest.shards.values()):
                raise ValueError("classes or shards missing")
            if set(manifest.per_class) != set(SPLITS) or any(set(c) != set(manifest.classes) for c in manifest.per_class.values()):
                raise ValueError("per-class counts missing")
            if manifest.modality not in ("image", "text"):
                raise ValueError(f"modality {manifest.modality!r}")
            for shard in (s for split in manifest.shards.values() for s in split):
                if not isinstance(shard.get("path"), str) or ".." in shard["path"] or not isinstance(shard.get("rows"), int):
                    raise ValueError(f"shard {shard!r}")
        except (ValueError, TypeError, AttributeError) as exc:
            raise DataError(f"data.root: {where} is not a packed dataset's manifest ({exc})") from None
        return manifest

    def rows(self, split: str) -> int:
        return sum(s["rows"] for s in self.shards[split])

    def summary(self) -> str:
        unit, skipped = ("texts", "empty or unlabelled") if self.modality == "text" else ("images", "unreadable")
        return (f"{len(self.classes)} classes, {self.rows('train')} train / {self.rows('val')} val {unit} in "
                f"{len(self.shards['train'])} + {len(self.shards['val'])} shards; skipped {self.counts.get('unreadable', 0)} "
                f"{skipped}, dropped {self.counts.get('duplicates', 0)} duplicates"
                f"{imbalance(self.classes, self.train_counts, unit)}")

    @property
    def train_counts(self) -> list[int]:
        """Training rows of each class, in label order."""
        return [self.per_class["train"][name] for name in self.classes]


def decode_batch(batch: dict[str, np.ndarray], transform: Callable, seed: int | None = None) -> dict[str, np.ndarray]:
    """Rows of a shard -> {"image": array N x C x H x W as `transform` makes it (uint8 crops for a stream, normalised
    later by the worker), "label": int64 array}: each image decoded and transformed (augmented from `seed` and its
    row's path when given, so a row's augmentation is reproducible).
    A row that fails to decode is dropped and counted in "undecodable" (one per row, never fatal mid-epoch)."""
    images, labels = [], []
    dropped = 0
    for data, label, path in zip(batch["image"], batch["label"], batch["path"], strict=True):
        try:
            image = decode_rgb(data)
        except Exception:  # noqa: BLE001 - a damaged row is skipped like an unreadable file
            dropped += 1
            continue
        if seed is not None:
            torch.default_generator.manual_seed((seed * 1_000_003 + hash_path(str(path))) % 2**63)
        images.append(transform(image).numpy())
        labels.append(int(label))
    if not images:
        return {"image": np.zeros((0, 3, 1, 1), dtype=np.uint8), "label": np.zeros(0, dtype=np.int64)}
    return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.int64)}


def hash_path(path: str) -> int:
    """A stable 63-bit number for a path (Python's hash() differs between processes)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little") >> 1
