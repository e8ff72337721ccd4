"""A packed dataset (jobs.pack_data) streamed to training with Ray Data, instead of copied to every node.

`data.root: DEST` holding manifest.json is read shard by shard with `ray.data.read_parquet`; its images are decoded
and cropped in `map_batches` tasks on the cluster's CPUs (any node's, CPU-only nodes included), and each
Ray Train worker iterates its split of the stream (`get_dataset_shard`) with `iter_torch_batches`. Images travel
as uint8 crops, a quarter of the bytes of float ones through the object store; the worker normalises each batch.
Texts need no decoding: each batch is tokenised by the worker with the model's tokenizer and padded to its longest
text. The core sees a `tl_core.batches.StreamedData`: it never imports Ray.

Epochs: every rank gets the same number of training rows (Ray's equal split; with N workers at most N-1 rows sit
out an epoch, other ones each epoch because the order is shuffled), shuffled from the run's seed and the epoch
(shards were shuffled at pack time; a local shuffle buffer mixes rows across blocks); validation is split
without dropping anything, so every validation image is evaluated exactly once across ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from typing import Callable

import numpy as np
import torch

from cluster import storage
from cluster.storage import Location
from jobs import ray_private
from tl_core.batches import StreamedData
from tl_core.config import RunConfig
from tl_core.errors import DataError
from tl_core.packed import MANIFEST_FILE, Manifest, decode_batch

log = logging.getLogger("jobs")

READ_UNIT_BYTES = 16 * 2**20  # Parquet bytes per read task: Ray's default (128 MiB) puts ~6,000 images in one
SHUFFLE_BUFFER_BATCHES = 8  # the local shuffle buffer holds this many training batches
READ_TASK_CPUS = 1.0  # what a Ray Data read task holds (Ray's default, set here so the pre-flight room check holds)


def data_location(cfg: RunConfig) -> Location:
    return storage.parse(cfg.data.root, cfg.storage.endpoint_url, field="data.root")


def is_packed(cfg: RunConfig) -> bool:
    """Whether `data.root` is a packed dataset (its manifest.json is there)."""
    return storage.exists(data_location(cfg).child(MANIFEST_FILE), "data.root")


def read_manifest(cfg: RunConfig) -> Manifest:
    """The manifest of the packed dataset at `data.root`; DataError when it is not one."""
    location = data_location(cfg).child(MANIFEST_FILE)
    return Manifest.from_json(storage.read_text(location, "data.root"), location.uri)


def check_shards(cfg: RunConfig, manifest: Manifest) -> None:
    """Every shard the manifest names is there, at the size it was written (once, in the driver's pre-flight: not
    again on every worker). A cut or replaced shard failed Ray Data's planning with a Parquet footer traceback."""
    import pyarrow.fs

    location = data_location(cfg)
    filesystem = storage.filesystem(location)
    shards = [s for split in manifest.shards.values() for s in split]
    try:  # the manifest was just read from the same place, so this is a store that went away in between
        infos = filesystem.get_file_info([location.child(shard["path"]).path for shard in shards])
    except OSError as exc:
        raise DataError(f"data.root: cannot list the shards of {location.uri} ({str(exc).splitlines()[0][:200]})") from None
    for shard, info in zip(shards, infos, strict=True):
        if info.type != pyarrow.fs.FileType.File:
            raise DataError(f"data.root: {location.uri}'s manifest names shard {shard['path']}, which is gone; pack it again "
                            "with python -m jobs.pack_data")
        if "bytes" in shard and info.size != shard["bytes"]:
            raise DataError(f"data.root: shard {shard['path']} of {location.uri} has {info.size} bytes where its manifest "
                            f"recorded {shard['bytes']} (cut short or replaced); pack it again with python -m jobs.pack_data")


def datasets(cfg: RunConfig, manifest: Manifest) -> dict:
    """{"train", "val"}: Ray Datasets read lazily from the shards: decoded, transformed images, or texts as stored.

    A decode task takes whole read blocks (batch_size=None: one read unit, ~800 images) and `data.decode_cpus`
    defaults to 0.5, two decode tasks per CPU. Measured on bench.data_scale's 100k set from S3, one worker, images/s
    over batches 60-400 of an epoch, 2 runs each: 1,074 / 1,107 so, against 945 / 963 with batches of 32 and 1 CPU a
    task (the plan before); 853 / 838 with batches of 32, 0.5 CPU a task and reads at 0.1 CPU, one at a time; 846 /
    888 with whole blocks at 1 CPU a task, where Ray fuses the read into the decode (it does not at 0.5 CPU: the two
    hold different CPUs, so reads stay tasks of their own)."""
    import ray.data

    from tl_core.data import image_crops

    context = ray.data.DataContext.get_current()  # each dataset keeps a copy: its split coordinator prints nothing
    context.enable_progress_bars = context.enable_operator_progress_bars = context.print_on_execution_start = False
    location = data_location(cfg)
    filesystem = storage.filesystem(location)
    text = manifest.modality == "text"
    transforms = {} if text else dict(zip(("train", "val"), image_crops(cfg.data), strict=True))

    def stream(split: str):
        paths = [location.child(shard["path"]).path for shard in manifest.shards[split]]
        if text:
            return ray.data.read_parquet(paths, filesystem=filesystem, columns=["text", "label"], num_cpus=READ_TASK_CPUS)
        return (ray.data.read_parquet(paths, filesystem=filesystem, columns=["image", "label", "path"], num_cpus=READ_TASK_CPUS)
                .map_batches(decode_with_threads, fn_kwargs={"transform": transforms[split]},
                             batch_size=None, batch_format="numpy", num_cpus=cfg.data.decode_cpus))

    with read_units(READ_UNIT_BYTES):
        return {split: stream(split) for split in ("train", "val")}


@contextlib.contextmanager
def read_units(size: int):
    """Ray Data's Parquet reader packs row groups into read tasks of `size` bytes while a dataset is planned here
    (RAY_DATA_PARQUET_BIN_PACKING_BYTES, unless a user set it). A decode task takes what a read task read: with Ray's
    128 MiB, 10,000 images of 20 KB made two tasks of unequal size, and one decode task at a time delivered 960
    images/s; with 16 MiB (~800 images a task), 1,056 (measured, bench.data_scale's 10k set, 1 worker)."""
    key = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(size)
    try:
        yield
    finally:
        del os.environ[key]


def decode_with_threads(batch: dict[str, np.ndarray], transform: Callable) -> dict[str, np.ndarray]:
    """decode_batch with torch held to the decode task's CPUs (floor(data.decode_cpus), at least one). Without that,
    a worker's torch has a thread per core, and its idle OpenMP thread spins beside every transform (measured: 0.65
    of a core spent spinning, the stream at 520 instead of 960 images/s)."""
    ray_private.hold_torch_to_assigned_cpus()
    return decode_batch(batch, transform)


def data_config():
    """Ray Train's DataConfig for a packed dataset: an equal split of "train" (DDP ranks step in lockstep), and a
    split of "val" that drops nothing."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    class EveryValidationRowOnce(DataConfig):
        @staticmethod
        def default_ingest_options():
            """Ray Train's defaults but `exclude_resources`, which Ray 2.60's own copy sets, so that every streamed run
            printed a RayDeprecationWarning about it from its DatasetManager (a Train v1 setting; v2 reserves none)."""
            options = DataContext.get_current().execution_options
            return ExecutionOptions(resource_limits=options.resource_limits, preserve_order=options.preserve_order,
                                    verbose_progress=options.verbose_progress)

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=name == "train")):
                    output[i][name] = split
            return output

    return EveryValidationRowOnce()


def tokenized_batches(tokenizer, max_length: int):
    """Ray Data's collate for a stream of texts: a numpy batch -> (the tokenizer's inputs, padded to the batch's
    longest text, labels)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TokenizedBatch(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> tuple[dict, torch.Tensor]:
            inputs = tokenizer([str(t) for t in batch["text"]], truncation=True, max_length=max_length, padding="longest",
                               return_tensors="pt")
            return dict(inputs), torch.from_numpy(batch["label"].astype(np.int64))

    return TokenizedBatch()


class StreamedBatches:
    """(inputs, labels) batches of one rank's split of a stream, `len()` of them per epoch: decoded uint8 images
    through `normalize`, or what `collate` makes of a numpy batch (texts). One of the two is given."""

    def __init__(self, iterator, batch_size: int, rows: int, shuffle: bool, collate=None, normalize=None):
        self.iterator, self.batch_size, self.rows, self.shuffle = iterator, batch_size, rows, shuffle
        self.collate, self.normalize = collate, normalize
        self.drop_last = rows % batch_size == 1 and rows > 1 and shuffle  # a training batch of one breaks BatchNorm
        self.seed = 0

    def __len__(self) -> int:
        return self.rows // self.batch_size if self.drop_last else math.ceil(self.rows / self.batch_size)

    def __iter__(self):
        buffer = self.batch_size * SHUFFLE_BUFFER_BATCHES if self.shuffle else None
        batches = self.iterator.iter_torch_batches(batch_size=self.batch_size, drop_last=self.drop_last, collate_fn=self.collate,
                                                   local_shuffle_buffer_size=buffer,
                                                   local_shuffle_seed=self.seed if self.shuffle else None)
        if self.collate is not None:
            yield from batches
        else:
            for batch in batches:
                yield self.normalize(batch["image"]), batch["label"]


def streamed_data(cfg: RunConfig, manifest: Manifest, shard: Callable[[str], object], world_size: int) -> StreamedData:
    """This rank's `TaskData` over the stream; `shard(name)` is its DataIterator of "train" or "val". `cfg` is as
    this node reads it (a text encoder's tokenizer in the node's cache)."""
    # Ray turns numpy's read-only-array warning off around each conversion with warnings.catch_warnings, which is not
    # thread-safe, and its batches are made in threads: the warning came through now and then, mid-epoch.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    collate = normalize = None
    if manifest.modality == "text":
        from tl_core.text_models import load_tokenizer

        collate = tokenized_batches(load_tokenizer(cfg.model.backbone, cfg.data.max_length), cfg.data.max_length)
    else:
        from tl_core.data import image_normalization

        normalize = image_normalization(cfg)
    train = StreamedBatches(shard("train"), cfg.train.batch_size, manifest.rows("train") // world_size, shuffle=True,
                            collate=collate, normalize=normalize)
    val_rows = math.ceil(manifest.rows("val") / world_size)  # an upper bound: the split is unequal, nothing dropped
    val = StreamedBatches(shard("val"), max(2 * cfg.train.batch_size, 32), val_rows, shuffle=False, collate=collate,
                          normalize=normalize)

    def on_epoch(epoch: int, seed: int) -> None:
        train.seed = (cfg.train.seed * 1_000_003 + epoch) % 2**32

    return StreamedData(manifest.classes, manifest.train_counts, train, val, on_epoch, f"streamed from {cfg.data.root}: {manifest.summary()}")
