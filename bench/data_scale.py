"""Data at scale: time to the first training step and loader throughput, an S3 image folder against the same
images packed (jobs.pack_data) and streamed with Ray Data.

For each size (generated JPEGs of 256 px, 10 classes, on the local S3 server, written once under bench/results/):

- pack_s: `python -m jobs.pack_data` from the S3 folder to an S3 packed prefix (Ray tasks on this machine);
- for the folder path (data.root: the S3 folder: synced to the node cache, indexed, read with DataLoaders) and the
  packed path (data.root: the packed prefix, streamed), with 1 and 2 Ray Train workers: a TorchTrainer whose workers
  build the run's own TaskData and iterate two training epochs with no model (the data path alone):
    first_step_s  from trainer.fit() to the first batch on every rank (worker start-up, sync, index, first decode);
    images_per_s  all ranks together, over the second epoch after its first batch (the first epoch's rate would
                  count what the stream decoded ahead while the workers started);
  the packed path runs `--repeats` times and the best of its runs counts, for each measure apart (the shortest first
  step, the highest rate, as for the bare loop below: what else runs on the machine only ever adds time; every run
  is kept under "runs"); the folder path runs twice per worker count: the node cache cold, then warm (its index
  read back, not rebuilt);
- limit_images_per_s: the bare loop: the same files decoded and transformed (224 px, the training transform) from
  local disk by a DataLoader of 2 processes on the same 2 cores, no Ray, no S3 (the best of two passes).

Targets (the issue's): packed first step at the largest size within 1.5x of that at the smallest; packed images/s at
least 0.9x the bare limit; the folder path's second run no longer pays a decode of every image.

    python -m bench.data_scale [--sizes 1000 10000 100000] [--workers 1 2] [--folder-up-to N] [--repeats 2]
                               (--folder-up-to: the folder path only for sizes up to N; the targets are the packed path's)
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.common import RESULTS, argument_parser, write_result
from jobs.cli import count

BUCKET = "tl-bench-data"
CLASSES = 10
IMAGE_PX = 256
TRAIN_PX = 224
BATCH = 64
WORK = RESULTS / "data-scale-work"  # generated images (not committed)


# ---------------------------------------------------------------- data

def _jpeg(seed: int) -> bytes:
    """A 256 px JPEG of a few shapes on a gradient under sensor-like noise: ~20 KB at quality 90, about what a photo
    of that size weighs."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((IMAGE_PX, IMAGE_PX)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 8)):
        x, y, r = rng.uniform(0, IMAGE_PX), rng.uniform(0, IMAGE_PX), rng.uniform(10, 80)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    image = Image.blend(image.filter(ImageFilter.GaussianBlur(1.5)), Image.effect_noise((IMAGE_PX, IMAGE_PX), 45).convert("RGB"), 0.15)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_some(args: tuple[Path, int, int]) -> None:
    root, start, stop = args
    for i in range(start, stop):
        path = root / f"class_{i % CLASSES}" / f"{i:07d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(i))


def generate(n: int) -> Path:
    root = WORK / f"images-{n}"
    step = 2000
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_write_some, [(root, i, min(i + step, n)) for i in range(0, n, step)]))
    return root


# ---------------------------------------------------------------- the data path alone, on Ray Train workers

def iterate_epochs(loop_config: dict) -> None:
    """Two training epochs of the run's own TaskData, no model: when the first batch came, and the second epoch's
    rate."""
    import ray.train

    from jobs.cli import setup_logging
    from jobs.runner import WorkerSession, packed_data
    from jobs.staging import localize
    from tl_core.config import from_dict
    from tl_core.distributed import all_reduce_sum, get_rank, get_world_size
    from tl_core.modality import labelled_data

    setup_logging(in_worker=True)
    cfg = from_dict(loop_config["config"])
    session = WorkerSession(None, None, "", None, None, ray.train.get_dataset_shard if loop_config["packed"] else None)
    data = packed_data(cfg, session) or labelled_data(localize(cfg), rank=get_rank(), world_size=get_world_size())
    first, images, started = None, 0, None
    for epoch in range(2):
        data.set_epoch(epoch, 0)
        for i, (inputs, _) in enumerate(data.train):
            if first is None:
                first = time.time() - loop_config["t0"]
            if epoch == 1 and i == 0:
                started = time.perf_counter()
            elif epoch == 1:
                images += len(inputs)
    elapsed = time.perf_counter() - started
    import torch

    totals = all_reduce_sum(torch.tensor([images, elapsed, first], dtype=torch.float64))
    world = get_world_size()
    if get_rank() == 0:  # Ray Train V2 keeps reported metrics only with a checkpoint: a file on this one machine
        Path(loop_config["out"]).write_text(json.dumps({"first_step_s": round(float(totals[2]) / world, 2),
                                                        "images_per_s": round(float(totals[0]) / (float(totals[1]) / world), 1)}))


def measure(root: str, packed: bool, workers: int, endpoint: str) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs import streaming
    from tl_core.config import from_dict

    cfg = from_dict({"experiment": "data-scale", "data": {"root": root, "image_size": TRAIN_PX, "loader_workers": 2 // workers},
                     "train": {"batch_size": BATCH}, "storage": {"root": tempfile.mkdtemp(prefix="tl-bench-"), "endpoint_url": endpoint},
                     "scaling": {"num_workers": workers, "resources_per_worker": {"CPU": 1.0 / workers}}})
    out = Path(cfg.storage.root) / "measured.json"
    t0 = time.time()
    trainer = TorchTrainer(iterate_epochs, train_loop_config={"config": cfg.to_dict(), "packed": packed, "t0": t0, "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1.0 / workers}),
                           datasets=streaming.datasets(cfg, streaming.read_manifest(cfg)) if packed else None,
                           dataset_config=streaming.data_config() if packed else None,
                           run_config=ray.train.RunConfig(storage_path=cfg.storage.root))
    trainer.fit()
    return json.loads(out.read_text())


def bare_limit(root: Path, passes: int = 2) -> float:
    """Images/s of a DataLoader of 2 processes decoding and transforming the files from local disk: the best of
    `passes` passes (the first may read from disk, not the page cache), so the limit errs high, never low."""
    return max(_bare_pass(root) for _ in range(passes))


def _bare_pass(root: Path) -> float:
    from torch.utils.data import DataLoader

    from tl_core.data import ImageListDataset, build_transforms
    from tl_core.models import IMAGENET_MEAN, IMAGENET_STD

    files = sorted(str(p) for p in root.rglob("*.jpg"))[:5000]
    transform = build_transforms(TRAIN_PX, IMAGENET_MEAN, IMAGENET_STD, train=True, augment=True, hflip=True)
    loader = DataLoader(ImageListDataset([(f, 0) for f in files], transform), batch_size=BATCH, num_workers=2, shuffle=True)
    started, images = None, 0
    for i, (inputs, _) in enumerate(loader):
        if i == 2:
            started = time.perf_counter()
        elif started is not None:
            images += len(inputs)
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--sizes", type=count, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--workers", type=count, nargs="+", default=[1, 2])
    parser.add_argument("--folder-up-to", type=count, default=None, help="run the folder path only for sizes up to this")
    parser.add_argument("--repeats", type=count, default=2, help="runs of the packed path per size and worker count (the best "
                                                                    "rate counts, as for the bare loop)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from cluster import storage
    from cluster.local.s3_server import s3_server
    from jobs import pack_data
    from jobs.runner import connect_ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="tl-bench-s3-") as s3_dir, s3_server(s3_dir, bucket=BUCKET) as server:
        os.environ.update(server.env(), TL_CACHE_DIR=str(Path(s3_dir) / "node-cache"))
        connect_ray()
        for n in args.sizes:
            local = generate(n)
            folder, packed = f"s3://{BUCKET}/raw-{n}", f"s3://{BUCKET}/packed-{n}"
            started = time.perf_counter()
            storage.upload_dir(local, storage.parse(folder))
            row = {"images": n, "mb": round(sum(p.stat().st_size for p in local.rglob("*.jpg")) / 2**20, 1),
                   "upload_s": round(time.perf_counter() - started, 1)}
            started = time.perf_counter()
            assert pack_data.main([folder, packed]) == 0
            row["pack_s"] = round(time.perf_counter() - started, 1)
            row["limit_images_per_s"] = round(bare_limit(local), 1)
            for workers in args.workers:
                runs = [measure(packed, True, workers, server.endpoint_url) for _ in range(args.repeats)]
                row[f"packed_{workers}w"] = {"first_step_s": min(r["first_step_s"] for r in runs),
                                             "images_per_s": max(r["images_per_s"] for r in runs), "runs": runs}
                if args.folder_up_to is not None and n > args.folder_up_to:
                    continue
                row[f"folder_cold_{workers}w"] = measure(folder, False, workers, server.endpoint_url)
                row[f"folder_warm_{workers}w"] = measure(folder, False, workers, server.endpoint_url)
                storage_cache = Path(os.environ["TL_CACHE_DIR"])
                import shutil

                shutil.rmtree(storage_cache, ignore_errors=True)  # the next worker count starts cold too
            rows.append(row)
            print(row, flush=True)
    first, last = rows[0], rows[-1]
    summary = {
        "packed_first_step_ratio_largest_to_smallest": round(last["packed_1w"]["first_step_s"] / first["packed_1w"]["first_step_s"], 2),
        "packed_throughput_vs_limit": {r["images"]: round(r["packed_1w"]["images_per_s"] / r["limit_images_per_s"], 2) for r in rows},
        "targets": {"first_step_ratio": 1.5, "throughput_vs_limit": 0.9},
    }
    write_result("data_scale", {"rows": rows, **summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
