"""Run a finished run's best model over new data with Ray Data, writing one Parquet row per input.

    python -m jobs.predict --run RUN_DIR_OR_URI --data DATA --out URI [--top-k 5] [--batch-size 64] [--actors N]
                           [--text-column NAME]

RUN is a finished run (its best checkpoint) or a checkpoint, local or s3://. For an image model DATA is a folder or
s3:// prefix of images (searched recursively), or one image; for a text model, a table file (.csv, .tsv, .jsonl,
.parquet), local or s3://, whose texts are in the column --text-column (default: the run's `data.text_column`). OUT
(local or s3://) receives Parquet files of rows

    path (image file, or the text's row number from 0), predicted (class name), probability, top_k (class names),
    top_k_probability, error (why an input could not be read; then predicted is null)

The model is held by a pool of Ray actors (one per GPU when the cluster has GPUs, else CPU actors; --actors bounds
the pool, which grows with the cluster); images are decoded and transformed as the run validated them. An input
that cannot be read is counted, listed in its row's `error`, never fatal.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from cluster import storage
from jobs import ray_private
from jobs.best_model import load_model, local_checkpoint
from jobs.cli import ArgumentParser, Interrupted, count, guarded, run_module
from tl_core.errors import DataError

log = logging.getLogger("jobs")

SCHEMA = pa.schema([("path", pa.string()), ("predicted", pa.string()), ("probability", pa.float64()),
                    ("top_k", pa.list_(pa.string())), ("top_k_probability", pa.list_(pa.float64())), ("error", pa.string())])


class Predictor:
    """A Ray Data actor: the model, loaded once, applied to batches of encoded images or texts."""

    def __init__(self, checkpoint: str, top_k: int, device: str):
        from tl_core.config import from_dict
        from tl_core.data import image_normalization, image_transforms

        ray_private.hold_torch_to_assigned_cpus()
        self.model, self.description = load_model(local_checkpoint(checkpoint, "--run"), "--run")
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.classes = np.array(self.description["classes"], dtype=object)
        self.top_k = min(top_k, len(self.classes))
        cfg = from_dict(self.description["config"], stored=True)
        self.text = self.description["modality"] == "text"
        if self.text:
            from transformers import AutoTokenizer

            self.tokenizer, self.max_length = AutoTokenizer.from_pretrained(self.description["input"]["tokenizer"]), cfg.data.max_length
        else:
            self.transform = image_transforms(cfg.data, image_normalization(cfg))[1]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        errors: list[str | None] = [None] * n
        if self.text:
            texts = [t if isinstance(t, str) and t.strip() else None for t in batch["text"]]
            errors = [None if t is not None else "empty or not text" for t in texts]
            ok = [i for i, t in enumerate(texts) if t is not None]
            inputs = self.tokenizer([texts[i] for i in ok], truncation=True, max_length=self.max_length, padding=True,
                                    return_tensors="pt") if ok else None
            inputs = {k: inputs[k].to(self.device) for k in ("input_ids", "attention_mask")} if ok else None
        else:
            from tl_core.data import decode_rgb

            images, ok = [], []
            for i, data in enumerate(batch["bytes"]):
                try:
                    images.append(self.transform(decode_rgb(data)))
                    ok.append(i)
                except Exception as exc:  # noqa: BLE001 - an unreadable input is listed, never fatal
                    errors[i] = f"{type(exc).__name__}: {str(exc)[:120]}"
            inputs = torch.stack(images).to(self.device) if ok else None
        predicted, probability = [None] * n, [None] * n
        top_k, top_k_probability = [[] for _ in range(n)], [[] for _ in range(n)]
        if ok:
            with torch.no_grad():
                probs = torch.softmax(self.model(inputs).float(), dim=1).cpu()
            values, indices = probs.topk(self.top_k, dim=1)
            for row, i in enumerate(ok):
                predicted[i], probability[i] = self.classes[indices[row, 0]], float(values[row, 0])
                top_k[i] = list(self.classes[indices[row].numpy()])
                top_k_probability[i] = values[row].tolist()
        # One schema for every batch, whatever its rows hold: a batch with no unreadable input has no error strings
        # to infer a type from, and Parquet files of two schemas are one dataset nobody can read.
        return pa.Table.from_pydict({"path": [str(p) for p in batch["path"]], "predicted": predicted, "probability": probability,
                                     "top_k": top_k, "top_k_probability": top_k_probability, "error": errors}, schema=SCHEMA)


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(__name__, __doc__)
    parser.add_argument("--run", required=True, help="a finished run or a checkpoint, local or s3://")
    parser.add_argument("--data", required=True, help="images (a folder or s3:// prefix) or a text table file")
    parser.add_argument("--out", required=True, help="where the Parquet predictions go, local or s3://")
    parser.add_argument("--top-k", type=count, default=5)
    parser.add_argument("--batch-size", type=count, default=64)
    parser.add_argument("--actors", type=count, default=None, help="the most model actors (default: one per GPU, else half the CPUs)")
    parser.add_argument("--text-column", default=None, help="a text model: DATA's column of texts (default: the run's data.text_column)")
    args = parser.parse_args(argv)
    data, out = storage.parse(args.data, field="--data"), storage.parse(args.out, field="--out")
    storage.check_creatable(out, "--out")
    if storage.has_content(out, "--out"):  # an empty folder is left by a stop before anything was written
        raise DataError(f"--out: {out.uri} already exists; predictions go to a new location")
    checkpoint = local_checkpoint(args.run, "--run")
    _, description = load_model(checkpoint, "--run")  # a run with no usable checkpoint stops here, before Ray starts
    text = description["modality"] == "text"
    if args.text_column and not text:
        raise DataError(f"--text-column: {description['source']['backbone']} is an image model; --text-column is for text models")
    inputs = text_rows(args.data, description, args.text_column) if text else image_paths(data)

    import ray

    from jobs.runner import connect_ray

    connect_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = args.actors or gpus or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)  # CPUs left for the reads
    if text:
        dataset = ray.data.from_items(inputs)
    else:
        dataset = ray.data.read_binary_files(inputs, include_paths=True, filesystem=storage.filesystem(data))
    predictions = dataset.map_batches(Predictor, fn_constructor_args=(str(checkpoint), args.top_k, "cuda" if gpus else "cpu"),
                                      batch_size=args.batch_size, batch_format="numpy",
                                      compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                                      num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    ray_private.no_late_cpu_alarm()
    try:
        predictions.write_parquet(out.path, filesystem=storage.filesystem(out))
    except KeyboardInterrupt:
        partial = f"; {out.uri} holds part of them: remove it or give another --out" if storage.has_content(out, "--out") else ""
        raise Interrupted(f"predictions stopped{partial}") from None
    print(summary(out, len(inputs), "texts" if text else "images", description["source"]["checkpoint"], predictions_errors(out)))
    return 0


def summary(out, n: int, unit: str, checkpoint: str, errors: list[str]) -> str:
    """The last line: how many inputs were predicted, and which could not be read (a text by its row number)."""
    line = f"{out.uri}: {n - len(errors)} of {n} {unit} predicted with {checkpoint}"
    if not errors:
        return line
    named = [f"row {e}" if unit == "texts" else e for e in errors[:5]] + (["..."] if len(errors) > 5 else [])
    return f"{line}; {len(errors)} could not be read (their error column says why): {', '.join(named)}"


def image_paths(data) -> list[str]:
    """Every image file under DATA (a folder or an S3 prefix; or DATA itself, one image file or object), as paths of
    its filesystem; hidden files and folders left out, as a run's index leaves them out."""
    from pathlib import Path

    from torchvision.datasets.folder import IMG_EXTENSIONS

    from tl_core.data import image_files, is_image_path

    one_file = (bool(data.key) and storage.is_object(data, "--data")) if data.is_s3 else Path(data.path).is_file()
    if one_file:
        if not is_image_path(data.uri.rsplit("/", 1)[-1]):
            raise DataError(f"--data: {data.uri} is a file not named like an image ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
        paths = [data.path]
    elif data.is_s3:
        paths = [f"{data.path}/{o['Key']}" for o in storage.list_objects(data, "--data") if is_image_path(o["Key"])]
    else:
        if not Path(data.path).is_dir():
            raise DataError(f"--data: {data.uri} does not exist")
        paths = [p for p in image_files(Path(data.path)) if Path(p).is_file()]  # no FIFO, device or dangling link
    if not paths:
        raise DataError(f"--data: {data.uri} holds no images (files named {', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return paths


def text_rows(data: str, description: dict, text_column: str | None = None) -> list[dict]:
    """{"path": row number, "text"} for every row of the table file DATA, local or s3:// (fetched once to this
    node's cache), from its `text_column` (default: the run's `data.text_column`)."""
    from pathlib import Path

    from cluster.storage import cache
    from tl_core.config import from_dict
    from tl_core.text import TABLE_SUFFIXES, is_table_name, read_table

    column = text_column or from_dict(description["config"], stored=True).data.text_column
    location = storage.parse(data, field="--data")
    if not is_table_name(location.path):
        raise DataError(f"--data: a text model reads a table file ({', '.join(TABLE_SUFFIXES)}), local or s3://, not {data}")
    if location.is_s3:
        if not storage.is_object(location, "--data"):
            raise DataError(f"--data: there is no object {location.uri}")
        path = cache.fetch_object(location, "--data")
    elif Path(data).is_file():
        path = Path(data)
    else:
        raise DataError(f"--data: file {data} does not exist")
    table = read_table(path, [("--text-column" if text_column else "--data", column)], field="--data")
    if not table.num_rows:
        raise DataError(f"--data: {data} has no rows under its header")
    return [{"path": str(i), "text": t} for i, t in enumerate(table.column(column).to_pylist())]


def predictions_errors(out) -> list[str]:
    import pyarrow.dataset

    table = pyarrow.dataset.dataset(out.path, filesystem=storage.filesystem(out), format="parquet",
                                    schema=SCHEMA).to_table(columns=["path", "error"])
    return [p for p, e in zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True) if e is not None]


if __name__ == "__main__":
    run_module("jobs.predict")
