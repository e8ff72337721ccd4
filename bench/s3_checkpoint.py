"""Checkpoints on S3: what our save + upload costs against boto3 alone, and how long a resume takes.

1. Save + upload of a resnet50-sized checkpoint (weights plus SGD momentum, ~200 MB) to the local S3
   server as a run on S3 does it (`jobs.runner.S3Checkpoints`): `tl_core.checkpoint.save_checkpoint` streaming
   each weights file to S3 while torch.save writes it, then Ray Train's upload function (what was not streamed,
   meta.json last, retries on), against boto3 `upload_file` of the same files, in the same run, alternating,
   median of --repeats. Target: ratio (ours / boto3) <= 1.2.
2. Resume latency: a one-worker TorchTrainer run of resnet50 on S3 is stopped after epoch 1 and started
   again with --resume; the latency is from the restart to the first training step of epoch 2 (the
   epoch-2 report's timestamp minus its epoch time: an upper bound, it includes saving that checkpoint).
   The restore alone (download, sha256 check, load) is timed too.

    python -m bench.s3_checkpoint [--repeats 3] [--skip-resume]
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from bench.common import argument_parser, write_result
from cluster import storage
from cluster.local.s3_server import s3_server
from jobs.cli import count
from tl_core.checkpoint import load_checkpoint, save_checkpoint

BUCKET = "tl-bench"


def resnet50_checkpoint() -> tuple[dict, dict]:
    model = torchvision.models.resnet50()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # fills the momentum buffers, as in a real checkpoint
    return model.state_dict(), {"optimizer": optimizer.state_dict(), "epoch": 1, "global_step": 1}


def time_upload(model_state: dict, train_state: dict, work: Path, n: int) -> dict:
    import ray.train

    from jobs.runner import S3Checkpoints

    ours, saves, plain = [], [], []
    client = storage.s3_client(storage.parse(f"s3://{BUCKET}"))
    for i in range(n):
        checkpoints = S3Checkpoints(storage.parse(f"s3://{BUCKET}/ours/{i}"))
        started = time.perf_counter()
        path = save_checkpoint(work / f"ours-{i}", model_state, train_state, {"epoch": 1}, mirror=checkpoints.mirror(1))
        saves.append(time.perf_counter() - started)
        checkpoints.upload(ray.train.Checkpoint(str(path)), "checkpoint_epoch_0001")  # as Ray Train calls it
        ours.append(time.perf_counter() - started)

        files = sorted(p for p in path.iterdir())  # the same bytes, already on disk
        started = time.perf_counter()
        for f in files:
            client.upload_file(str(f), BUCKET, f"plain/{i}/{f.name}")
        plain.append(time.perf_counter() - started)
    size = sum(p.stat().st_size for p in (work / "ours-0").iterdir())
    return {"checkpoint_mb": round(size / 2**20, 1), "ours_s": ours, "of_which_save_and_stream_s": saves, "boto3_upload_file_s": plain,
            "ratio": statistics.median(ours) / statistics.median(plain), "target": 1.2}


def time_restore(n: int) -> list[float]:
    import ray.train

    fs = storage.filesystem(storage.parse(f"s3://{BUCKET}"))
    times = []
    for i in range(n):
        started = time.perf_counter()
        with ray.train.Checkpoint(f"{BUCKET}/ours/{i}/checkpoint_epoch_0001", filesystem=fs).as_directory() as directory:
            load_checkpoint(directory)
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--repeats", type=count, default=3)
    parser.add_argument("--skip-resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="tl-bench-s3-") as tmp, s3_server(Path(tmp) / "s3", bucket=BUCKET) as server:
        os.environ.update(server.env())
        work = Path(tmp) / "work"
        model_state, train_state = resnet50_checkpoint()
        upload = time_upload(model_state, train_state, work, args.repeats)
        restore = time_restore(args.repeats)
        result = {"upload": upload, "restore_s": restore}
        if not args.skip_resume:
            result["resume"] = resume_latency(Path(tmp))
        write_result("s3_checkpoint", result)
    return 0


def resume_latency(tmp: Path) -> dict:
    """Run 1 epoch of resnet50 on S3, then --resume to 2 epochs; time restart -> first step of epoch 2."""
    import ray

    from bench.common import digits_source
    from jobs.preflight import check_run
    from jobs.results import write_result as write_run_result
    from jobs.runner import run_trainer
    from tl_core.config import from_dict, with_overrides

    cfg = from_dict({
        "experiment": "resume-bench",
        "data": {"root": str(digits_source()), "image_size": 32, "loader_workers": 0},
        "model": {"backbone": "resnet50"},
        "optim": {"name": "sgd", "lr": 0.01, "scheduler": "constant"},
        "train": {"epochs": 1, "batch_size": 64},
        "scaling": {"num_workers": 1},
        "checkpoint": {"keep": 2},
        "storage": {"root": f"s3://{BUCKET}/runs"},
    })
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        first = check_run(cfg, resume=False)
        write_run_result(first, run_trainer(first, recipe="supervised"))
        again = check_run(with_overrides(cfg, ["train.epochs=2"]), resume=True)
        restarted = time.time()
        result = run_trainer(again, recipe="supervised")
    finally:
        ray.shutdown()
    epoch2 = result.metrics
    first_step = epoch2["timestamp"] - epoch2["epoch_time_s"]
    return {"latency_s": first_step - restarted, "epoch_time_s": epoch2["epoch_time_s"],
            "note": "restart = the second TorchTrainer.fit(); includes worker-group start-up and the checkpoint restore"}


if __name__ == "__main__":
    raise SystemExit(main())
