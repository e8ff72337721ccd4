"""A node-local copy of S3 data: datasets and source weights are read from local disk, synced once per node.

The copy lives under `$TL_CACHE_DIR` (default ~/.cache/tl-finetune) and carries a manifest of every
object's key, size and ETag. A sync lists the prefix, downloads only what is new or changed, deletes what
is gone, and writes the manifest last; a file lock makes the workers of one node that start together wait
for a single download instead of racing each other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock

from cluster import storage
from cluster.storage import Location
from tl_core.errors import StorageError
from tl_core.files import node_copy_path

log = logging.getLogger(__name__)

MANIFEST = ".tl-manifest.json"


def local_path(location: Location) -> Path:
    return node_copy_path(location.bucket, location.key)


def sync_prefix(location: Location, field: str, unread: Callable[[Collection[str]], Collection[str]] | None = None) -> Path:
    """The local directory mirroring every object under the S3 prefix `location`; `unread(names)`: the top-level
    names (`storage.top_level_of`) whose objects nobody reads here, left on S3 (a dataset's test split)."""
    target = local_path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        listing = {o["Key"]: {"size": o["Size"], "etag": o["ETag"]} for o in storage.list_objects(location, field)}
        if not listing:
            raise StorageError(f"{field}: there are no objects under {location.uri}")
        if unread is not None and (skipped := set(unread(storage.top_level_of(listing)))):
            listing = {key: entry for key, entry in listing.items() if storage.top_level_name(key) not in skipped}
        manifest_path = target / MANIFEST
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if old == listing:
            return target
        manifest_path.unlink(missing_ok=True)  # a sync cut short leaves no manifest and is redone
        wanted = [key for key, entry in listing.items()
                  if not (old.get(key) == entry and (target / key).is_file() and (target / key).stat().st_size == entry["size"])]
        client = storage.s3_client(location)
        with ThreadPoolExecutor(max_workers=storage.TRANSFER_THREADS) as pool:
            list(pool.map(lambda key: storage.download(location.child(key), target / key, field, client), wanted))
        for path in [p for p in target.rglob("*") if p.is_file() and p.name != MANIFEST]:
            if path.relative_to(target).as_posix() not in listing:
                path.unlink()
        manifest_path.write_text(json.dumps(listing))
        log.info("synced %s to %s: %d of %d objects downloaded", location.uri, target, len(wanted), len(listing))
    return target


def fetch_object(location: Location, field: str) -> Path:
    """The local copy of one S3 object, downloaded again when its size or ETag changed."""
    target = local_path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        client = storage.s3_client(location)
        with storage.s3_errors(location, field):
            head = client.head_object(Bucket=location.bucket, Key=location.key)
        entry = {"size": head["ContentLength"], "etag": head["ETag"]}
        stamp = target.with_name(target.name + MANIFEST)
        if target.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == entry:
            return target
        stamp.unlink(missing_ok=True)
        storage.download(location, target, field)
        stamp.write_text(json.dumps(entry))
    return target
