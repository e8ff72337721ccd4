"""Pack an image folder or a text table once into Parquet shards that every run streams:
`python -m jobs.pack_data SOURCE DEST`.

    python -m jobs.pack_data s3://bucket/raw/flowers s3://bucket/packed/flowers [--val-fraction 0.2] [--seed 0]
                             [--shard-mb 256] [--text-column text --label-column label]

SOURCE is an image folder (local or s3://) laid out as `data.root` is: train/ (+ val/) of class folders, or class
folders. The cleaning a run would do (unreadable files skipped and counted, exact duplicates dropped by content
hash, class names, a stratified seeded split when there is no val/) happens here, once, as Ray tasks across the
cluster:

1. stage: the listing, shuffled with the seed (so every shard mixes the classes), is cut into groups of about
   --shard-mb; one task per group reads its files once (from S3 or disk), checks that each decodes, hashes it and
   writes the group to DEST/_staging/<version>/;
2. the driver drops duplicates and splits, from the hashes alone (`tl_core.data.clean_and_split`);
3. write: one task per group keeps its rows that survived and writes DEST/<version>/train-NNNNN.parquet and
   val-NNNNN.parquet; then DEST/manifest.json, last (`tl_core.packed.Manifest`).

SOURCE holding table files where an image folder holds class folders (train.csv + val.csv, or one table; CSV,
JSON lines or Parquet: what `data.root` reads as text), or one table file itself, is packed as text: the tables are
read and cleaned once in the driver, as a text run does (`tl_core.text.index_text_table`: empty texts and missing
labels skipped, duplicates dropped, a stratified split), and the shuffled rows are written as shards of (text,
label) by Ray tasks.

The version is the fingerprint of the source listing (every file's path, size and ETag or mtime) and the split
settings: re-running on an unchanged source does nothing; a changed one is packed again as a new version. A run
cut short resumes: staged groups and written shards that exist are kept, nothing is written twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from cluster import storage
from cluster.storage import Location
from jobs.cli import ArgumentParser, column_name, fraction, guarded, positive_number, run_module
from tl_core.config import DataConfig
from tl_core.data import DatasetIndex, clean_and_split, image_digest, is_image_path, layout_from_paths, read_file_bytes
from tl_core.errors import DataError
from tl_core.modality import unread_beside
from tl_core.packed import MANIFEST_FILE, SCHEMA, SPLITS, TEXT_SCHEMA, Manifest
from tl_core.text import OR_ONE_TABLE, index_text_table, is_table_name

log = logging.getLogger("jobs")

STAGING = "_staging"
READ_THREADS = 16  # concurrent reads per task: S3 objects are small and latency-bound
ROW_GROUP_ROWS = 256  # rows per Parquet row group: the unit a reader (and a Ray Data block) takes at a time


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to SOURCE, with "/"
    size: int
    stamp: str  # ETag (S3) or mtime in ns (local): what tells a changed file


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(__name__, __doc__)
    parser.add_argument("source", help="image folder to pack: local path or s3://bucket/prefix")
    parser.add_argument("dest", help="where the packed dataset goes: local path or s3://bucket/prefix")
    parser.add_argument("--val-fraction", type=fraction, default=0.2, help="validation share when SOURCE has no val/ (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the shuffle into shards")
    parser.add_argument("--shard-mb", type=positive_number, default=256.0, help="target shard size in MB (default 256)")
    parser.add_argument("--text-column", type=column_name, default="text", help="text tables: the column holding the text (default text)")
    parser.add_argument("--label-column", type=column_name, default="label", help="text tables: the column holding the label (default label)")
    args = parser.parse_args(argv)
    source = storage.parse(args.source, field="SOURCE")
    dest = storage.parse(args.dest, field="DEST")
    storage.check_creatable(dest, "DEST")
    shard_bytes = int(args.shard_mb * 2**20)
    tables = list_tables(source)
    if tables:
        if args.label_column == args.text_column:  # each text would be its own class
            raise DataError(f"--label-column: {args.label_column!r} is --text-column too; the labels must be in a column of their own")
        manifest = pack_text(source, dest, tables, args.val_fraction, args.seed, shard_bytes, (args.text_column, args.label_column))
    else:
        manifest = pack(source, dest, args.val_fraction, args.seed, shard_bytes)
    print(f"{dest.uri}: {manifest.summary()}")
    return 0


def pack(source: Location, dest: Location, val_fraction: float, seed: int, shard_bytes: int) -> Manifest:
    files = read_by_runs(source, list_source(source))
    try:
        classes, train_files, val_files = layout_from_paths([f.path for f in files], source.uri)
    except DataError as exc:
        raise as_arguments(exc) from None
    files = [f for f in files if is_image_path(f.path)]  # the version of what is packed: a note changed repacks nothing
    version = fingerprint(files, val_fraction, seed)
    existing = read_manifest(dest)
    if is_current(existing, version, dest, source):
        return existing
    check_dest(dest, source, version[:12])
    created = not storage.exists(dest, "DEST")

    import ray

    from jobs.runner import connect_ray

    connect_ray()
    sizes = {f.path: f.size for f in files}
    given = {path: "train" for path, _ in train_files} | {path: "val" for path, _ in val_files}
    samples = train_files + val_files
    order = samples[:]
    random.Random(seed).shuffle(order)
    groups = cut(order, sizes, shard_bytes)
    staging = dest.child(STAGING, version[:12])
    stage_task = ray.remote(num_cpus=1)(stage_group)
    futures = {stage_task.remote(source, staging, i, group, [given[p] for p, _ in group]): len(group) for i, group in enumerate(groups)}
    digests: dict[str, str | None] = {}
    try:
        for result in progress(futures, len(samples), "read and checked"):
            digests.update(result)
        index = clean_and_split(classes, train_files, val_files, [digests[p] for p, _ in samples], val_fraction, seed)
    except DataError as exc:  # a mistake in the data leaves nothing behind
        storage.delete(dest if created else dest.child(STAGING))
        raise as_arguments(exc) from None
    keep = {path: split for split, rows in (("train", index.train), ("val", index.val)) for path, _ in rows}
    write_task = ray.remote(num_cpus=1)(write_group)
    keep_ref = ray.put(keep)  # one copy in the object store, not one per task
    written = ray.get([write_task.remote(staging, dest, version[:12], i, keep_ref) for i in range(len(groups))])
    shards = {split: [s for group in written for s in group if s["split"] == split] for split in SPLITS}
    for shard in (s for split in shards.values() for s in split):
        del shard["split"]
    manifest = write_manifest(dest, Manifest(classes=index.classes, shards=shards, source=source.uri, fingerprint=version,
                                             val_fraction=val_fraction, seed=seed), index, existing)
    storage.delete(dest.child(STAGING))
    return manifest


def pack_text(source: Location, dest: Location, tables: list[SourceFile], val_fraction: float, seed: int, shard_bytes: int,
              columns: tuple[str, str]) -> Manifest:
    """A text table: cleaned and split once here (as a text run would), its rows shuffled and written as shards of
    about `shard_bytes` by Ray tasks."""
    tables = read_by_runs(source, tables)
    version = fingerprint(tables, val_fraction, seed, list(columns))
    existing = read_manifest(dest)
    if is_current(existing, version, dest, source):
        return existing
    check_dest(dest, source, version[:12])
    index = read_text_source(source, tables, val_fraction, seed, columns)  # a mistake in the data: nothing written yet

    import ray

    from jobs.runner import connect_ray

    connect_ray()
    write_task = ray.remote(num_cpus=1)(write_text_shard)
    futures = {}
    for split, rows in (("train", index.train), ("val", index.val)):
        order = rows[:]
        random.Random(seed).shuffle(order)  # every shard mixes the classes
        groups = cut(order, {text: len(text.encode()) for text, _ in order}, shard_bytes)  # texts are unique: duplicates dropped
        for n, group in enumerate(groups):
            name = f"{version[:12]}/{split}-{n:05d}.parquet"
            futures[write_task.remote(dest, name, [text for text, _ in group], [label for _, label in group])] = len(group)
    written = list(progress(futures, len(index.train) + len(index.val), "written", unit="texts"))
    shards = {split: sorted((s for s in written if s["path"].split("/")[-1].startswith(split)), key=lambda s: s["path"])
              for split in SPLITS}
    return write_manifest(dest, Manifest(classes=index.classes, shards=shards, source=source.uri, fingerprint=version,
                                         val_fraction=val_fraction, seed=seed, modality="text"), index, existing)


def read_text_source(source: Location, tables: list[SourceFile], val_fraction: float, seed: int, columns: tuple[str, str]):
    """The cleaned, split rows of SOURCE's tables (copied from S3 to a temporary folder first); DataError naming
    this command's arguments."""
    with tempfile.TemporaryDirectory(prefix="tl-pack-text-") as tmp:
        root = Path(tmp) if source.is_s3 else Path(source.path)
        if source.is_s3 and tables[0].path == "":  # SOURCE is the table itself
            root = root / Path(source.key).name
        for table in tables if source.is_s3 else ():
            storage.download(source.child(table.path), root / table.path, "SOURCE")
        try:
            return index_text_table(DataConfig(root=str(root), val_fraction=val_fraction, text_column=columns[0],
                                               label_column=columns[1]), seed)
        except DataError as exc:
            raise as_arguments(DataError(str(exc).replace(str(root), source.uri))) from None


#: The config keys that the cleaning a run does names in its errors, and this command's arguments that set them here.
ARGUMENTS = {"data.root": "SOURCE", "data.text_column": "--text-column", "data.label_column": "--label-column",
             "val_fraction=": "--val-fraction "}


def read_by_runs(source: Location, files: list[SourceFile]) -> list[SourceFile]:
    """SOURCE's `files` that a run reads: what lies beside its train and val splits (a test split) is named in a
    warning and left out, of the shards and of the version, so that a changed test split repacks nothing."""
    beside = set(unread_beside(storage.top_level_of(f.path for f in files)))
    if beside:
        log.warning("pack: %s beside train and val in %s is not packed (a run reads train and val only)",
                    ", ".join(sorted(beside)), source.uri)
    return [f for f in files if storage.top_level_name(f.path) not in beside]


def as_arguments(exc: DataError) -> DataError:
    """A mistake found by the cleaning a run does (tl_core.data, tl_core.text), naming this command's arguments."""
    message = str(exc)
    for key, argument in ARGUMENTS.items():
        message = message.replace(key, argument)
    return DataError(message)


def write_manifest(dest: Location, manifest: Manifest, index: DatasetIndex, existing: Manifest | None) -> Manifest:
    """`manifest` completed with what cleaning and splitting `index` counted, written last: DEST is complete."""
    manifest.counts = {"train": len(index.train), "val": len(index.val), "unreadable": len(index.unreadable),
                       "duplicates": index.duplicates}
    manifest.per_class = {split: {c: 0 for c in index.classes} for split in SPLITS}
    for split, rows in (("train", index.train), ("val", index.val)):
        for _, label in rows:
            manifest.per_class[split][index.classes[label]] += 1
    manifest.unreadable = index.unreadable[:100]
    storage.write_text(dest.child(MANIFEST_FILE), manifest.to_json())
    note_earlier_version(existing, dest)
    return manifest


def is_current(existing: Manifest | None, version: str, dest: Location, source: Location) -> bool:
    if existing is not None and existing.fingerprint == version:
        log.info("pack: %s is up to date with %s (version %s)", dest.uri, source.uri, version[:12])
        return True
    return False


def note_earlier_version(existing: Manifest | None, dest: Location) -> None:
    if existing is not None:
        log.info("pack: the shards of the earlier version %s stay under %s/%s until no run reads them",
                 existing.fingerprint[:12], dest.uri, existing.fingerprint[:12])


# ---------------------------------------------------------------- listing

def list_tables(source: Location) -> list[SourceFile]:
    """SOURCE's table files (train.csv, val.jsonl, ...) at its top level, or SOURCE itself when it is one table (its
    path then ""): [] for an image folder."""
    from tl_core.text import is_table_file, table_files

    if source.is_s3:
        one = is_table_name(source.key) and storage.head_object(source, "SOURCE")
        if one:
            return [SourceFile("", one["ContentLength"], one["ETag"])]
        # the top level only: an image folder's million objects are listed once, by list_source
        objects = storage.list_objects(source, "SOURCE", top_level=True)
        return [SourceFile(o["Key"], o["Size"], o["ETag"]) for o in objects
                if is_table_name(o["Key"]) and not o["Key"].startswith(".")]
    root = Path(source.path)
    if is_table_file(root):
        return [SourceFile("", root.stat().st_size, str(root.stat().st_mtime_ns))]
    if not root.is_dir():
        return []  # list_source names the missing directory
    return [SourceFile(p.name, p.stat().st_size, str(p.stat().st_mtime_ns)) for p in table_files(root)]


def list_source(source: Location) -> list[SourceFile]:
    """Every file under SOURCE but hidden ones: `layout_from_paths` takes the images and names the rest."""
    if source.is_s3:
        found = [SourceFile(o["Key"], o["Size"], o["ETag"]) for o in storage.list_objects(source, "SOURCE")]
    else:
        from tl_core.data import existing_folder, image_files

        root = existing_folder(source.path, "SOURCE", OR_ONE_TABLE)
        found, others = [], []
        for path in image_files(root, others) + others:
            info = os.stat(path)
            found.append(SourceFile(Path(path).relative_to(root).as_posix(), info.st_size, str(info.st_mtime_ns)))
    if not found:
        raise DataError(f"SOURCE: {source.uri} holds no files")
    return found


def fingerprint(files: list[SourceFile], val_fraction: float, seed: int, settings: list | None = None) -> str:
    listing = json.dumps([[f.path, f.size, f.stamp] for f in sorted(files, key=lambda f: f.path)] + [val_fraction, seed]
                         + (settings or []))
    return hashlib.sha256(listing.encode()).hexdigest()


def read_manifest(dest: Location) -> Manifest | None:
    location = dest.child(MANIFEST_FILE)
    if not storage.exists(location, "DEST"):
        return None
    return Manifest.from_json(storage.read_text(location, "DEST"), location.uri)


def check_dest(dest: Location, source: Location, version: str) -> None:
    """DEST must be new, empty, or a packed dataset (complete, or this version cut short), and not inside SOURCE."""
    if dest.is_s3 == source.is_s3 and (dest.path + "/").startswith(source.path.rstrip("/") + "/"):
        raise DataError(f"DEST: {dest.uri} is inside SOURCE {source.uri}; pack somewhere else")
    if not dest.is_s3 and Path(dest.path).exists() and not Path(dest.path).is_dir():
        raise DataError(f"DEST: {dest.uri} is a file")
    ours = (MANIFEST_FILE, STAGING, version)
    if storage.exists(dest, "DEST") and not any(storage.exists(dest.child(name), "DEST") for name in ours):
        raise DataError(f"DEST: {dest.uri} holds files and no packed dataset; give a new or empty location")


def cut(order: list[tuple[str, int]], sizes: dict[str, int], shard_bytes: int) -> list[list[tuple[str, int]]]:
    """`order` ((path or text, label) samples) in consecutive groups of about `shard_bytes` (at least one each), a
    sample's size being `sizes` of its first element."""
    groups, group, total = [], [], 0
    for sample in order:
        if group and total + sizes[sample[0]] > shard_bytes:
            groups.append(group)
            group, total = [], 0
        group.append(sample)
        total += sizes[sample[0]]
    return groups + [group] if group else groups


def progress(futures: dict, total: int, verb: str, unit: str = "images"):
    """Each finished task's result as it lands, with a progress line: samples (`unit`) done, per second, time left."""
    import ray

    started, done, last = time.monotonic(), 0, 0.0
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += futures[ready[0]]
        yield ray.get(ready[0])
        elapsed = time.monotonic() - started
        if time.monotonic() - last > 5 or not pending:
            rate = done / max(elapsed, 1e-9)
            log.info("pack: %d/%d %s %s (%.0f %s/s, %s left)", done, total, unit, verb, rate, unit,
                     _duration((total - done) / rate if rate else 0))
            last = time.monotonic()


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ---------------------------------------------------------------- tasks

def stage_group(source: Location, staging: Location, i: int, group: list[tuple[str, int]], given: list[str]) -> dict[str, str | None]:
    """Read, check and hash one group of source files and stage them as one Parquet file; path -> digest (None when
    the file does not decode). A group staged before (a pack cut short) is read back, not read from SOURCE again."""
    target = staging.child(f"group-{i:05d}.parquet")
    filesystem = storage.filesystem(staging)
    if storage.exists(target, "DEST"):
        table = pq.read_table(target.path, columns=["path", "sha256"], filesystem=filesystem)
        return dict(zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True))
    from concurrent.futures import ThreadPoolExecutor

    client = storage.s3_client(source) if source.is_s3 else None

    def read(path: str) -> bytes | None:
        if client is None:
            return read_file_bytes(Path(source.path) / path)
        try:
            return client.get_object(Bucket=source.bucket, Key=f"{source.key}/{path}".lstrip("/"))["Body"].read()
        except Exception:  # noqa: BLE001 - a file that cannot be read is unreadable, like one that does not decode
            return None

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        contents = list(pool.map(read, [p for p, _ in group]))
    digests = [image_digest(data) if data is not None else None for data in contents]
    table = pa.table({"image": [d if h else None for d, h in zip(contents, digests, strict=True)],
                      "label": [label for _, label in group], "path": [p for p, _ in group],
                      "sha256": digests, "given": given},
                     schema=SCHEMA.append(pa.field("sha256", pa.string())).append(pa.field("given", pa.string())))
    write_parquet(table, target)
    return {p: h for (p, _), h in zip(group, digests, strict=True)}


def write_group(staging: Location, dest: Location, version: str, i: int, keep: dict[str, str]) -> list[dict]:
    """The rows of staged group `i` that `keep` names, as train-NNNNN.parquet and val-NNNNN.parquet under
    DEST/<version>/; their shard records ({"split", "path", "rows", "bytes"}). A shard written before is kept."""
    filesystem = storage.filesystem(dest)
    staged = None
    shards = []
    for split in SPLITS:
        name = f"{version}/{split}-{i:05d}.parquet"
        target = dest.child(name)
        if storage.exists(target, "DEST"):
            rows = pq.read_metadata(target.path, filesystem=filesystem).num_rows
        else:
            if staged is None:
                staged = pq.read_table(staging.child(f"group-{i:05d}.parquet").path, filesystem=filesystem)
            mask = [keep.get(p) == split for p in staged.column("path").to_pylist()]
            table = staged.filter(pa.array(mask)).select(SCHEMA.names).cast(SCHEMA)
            rows = table.num_rows
            if rows == 0:
                continue
            write_parquet(table, target)
        if rows:
            shards.append({"split": split, "path": name, "rows": rows, "bytes": filesystem.get_file_info(target.path).size})
    return shards


def write_text_shard(dest: Location, name: str, texts: list[str], labels: list[int]) -> dict:
    """One shard of text rows at DEST/NAME (kept if written before); its record {"path", "rows", "bytes"}."""
    target = dest.child(name)
    if not storage.exists(target, "DEST"):
        write_parquet(pa.table({"text": texts, "label": labels}, schema=TEXT_SCHEMA), target, compression="zstd")
    return {"path": name, "rows": len(texts), "bytes": storage.filesystem(dest).get_file_info(target.path).size}


def write_parquet(table: pa.Table, target: Location, compression: str = "none") -> None:  # "none": encoded images do not compress
    """Whole or not at all: locally under a temporary name renamed into place; on S3 one upload, atomic by itself."""
    filesystem = storage.filesystem(target)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS, compression=compression)
    if target.is_s3:
        with filesystem.open_output_stream(target.path) as f:
            f.write(buffer.getvalue())
        return
    Path(target.path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target.path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, target.path)


if __name__ == "__main__":
    run_module("jobs.pack_data")
