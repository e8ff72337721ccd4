"""Run a finished run's best model over new data with Ray Data, writing one Parquet row per input.

    python -m jobs.predict --run RUN_DIR_OR_URI --data DATA --out URI [--top-k 5] [--batch-size 64] [--actors N]
                           [--text-column NAME] [--label-column NAME]

RUN is a finished run (its best checkpoint) or a checkpoint, local or s3://. For an image model DATA is a folder or
s3:// prefix of images (searched recursively), or one image; for a text model, a table file (.csv, .tsv, .jsonl,
.parquet), local or s3://, whose texts are in the column --text-column (default: the run's `data.text_column`). OUT
(local or s3://) receives Parquet files of rows

    path (image file, or the text's row number from 0), label (the input's known class: its first folder under DATA
    where DATA holds class folders, or a table's --label-column value), predicted (class name),
    probability, top_k (class names), top_k_probability, error (why an input could not be read; then predicted is null)

Where inputs have labels (a held-out test set in class folders, or a table with a label column), the predictions
are scored against them: a last line gives accuracy and macro F1, and OUT/_metrics.json the metrics a run's
validation reports (precision, recall, F1, per class, the confusion matrix); readers of OUT's Parquet files skip
names that start with "_".

The model is held by a pool of Ray actors (one per GPU when the cluster has GPUs, else CPU actors; --actors bounds
the pool, which grows with the cluster); images are decoded and transformed as the run validated them. An input
that cannot be read is counted, listed in its row's `error`, never fatal.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import torch

from cluster import storage
from jobs import ray_private
from jobs.best_model import load_model, local_checkpoint
from jobs.cli import ArgumentParser, Interrupted, column_name, count, guarded, run_module
from tl_core.errors import DataError

log = logging.getLogger("jobs")

METRICS_FILE = "_metrics.json"  # pyarrow, pandas and Ray Data read a folder's Parquet files, skipping "_" names
SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string()), ("predicted", pa.string()), ("probability", pa.float64()),
                    ("top_k", pa.list_(pa.string())), ("top_k_probability", pa.list_(pa.float64())), ("error", pa.string())])


class Predictor:
    """A Ray Data actor: the model, loaded once, applied to batches of encoded images or texts."""

    def __init__(self, checkpoint: str, top_k: int, device: str, labelled_under: str | None = None):
        from tl_core.config import from_dict
        from tl_core.data import image_normalization, image_transforms

        ray_private.hold_torch_to_assigned_cpus()
        self.model, self.description = load_model(local_checkpoint(checkpoint, "--run"), "--run")
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.classes = np.array(self.description["classes"], dtype=object)
        self.labelled_under = labelled_under
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
        paths = [str(p) for p in batch["path"]]
        if self.text:  # a string or None; Ray Data hands a column of Nones over as NaNs
            labels = [label if isinstance(label, str) else None for label in batch["label"]]
        else:
            labels = [first_folder(p, self.labelled_under) for p in paths]
        return pa.Table.from_pydict({"path": paths, "label": labels, "predicted": predicted, "probability": probability,
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
    parser.add_argument("--text-column", type=column_name, default=None, help="a text model: DATA's column of texts (default: the run's data.text_column)")
    parser.add_argument("--label-column", type=column_name, default=None,
                        help="a text model: DATA's column of labels to score against (default: the run's data.label_column, where DATA has it)")
    args = parser.parse_args(argv)
    data, out = storage.parse(args.data, field="--data"), storage.parse(args.out, field="--out")
    storage.check_creatable(out, "--out")
    if storage.has_content(out, "--out"):  # an empty folder is left by a stop before anything was written
        raise DataError(f"--out: {out.uri} already exists; predictions go to a new location")
    checkpoint = local_checkpoint(args.run, "--run")
    _, description = load_model(checkpoint, "--run")  # a run with no usable checkpoint stops here, before Ray starts
    text = description["modality"] == "text"
    for option, given in (("--text-column", args.text_column), ("--label-column", args.label_column)):
        if given and not text:
            raise DataError(f"{option}: {description['source']['backbone']} is an image model; {option} is for text models "
                            "(images are labelled by their class folders)")
    if text:
        inputs, labelled_under = text_rows(args.data, description, args.text_column, args.label_column), None
    else:
        inputs = image_paths(data)
        labelled_under = class_folders_root(inputs, data.path, description["classes"])
        if labelled_under is None and (splits := split_folders(inputs, data.path, description["classes"])):
            held_out = next((name for start in ("test", "val") for name in splits if name.lower().startswith(start)), splits[0])
            log.warning("--data: the images under %s are in class folders one level down, so they are predicted but not "
                        "scored; to score one split: --data %s/%s", ", ".join(f"{name}/" for name in splits),
                        data.uri.rstrip("/"), held_out)

    import ray

    from jobs.runner import connect_ray

    connect_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = args.actors or gpus or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)  # CPUs left for the reads
    if text:
        dataset = ray.data.from_items(inputs)
    else:
        dataset = ray.data.read_binary_files(inputs, include_paths=True, filesystem=storage.filesystem(data))
    predictions = dataset.map_batches(Predictor, fn_constructor_args=(str(checkpoint), args.top_k, "cuda" if gpus else "cpu", labelled_under),
                                      batch_size=args.batch_size, batch_format="numpy",
                                      compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                                      num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    ray_private.no_late_cpu_alarm()
    try:
        predictions.write_parquet(out.path, filesystem=storage.filesystem(out))
    except KeyboardInterrupt:
        partial = f"; {out.uri} holds part of them: remove it or give another --out" if storage.has_content(out, "--out") else ""
        raise Interrupted(f"predictions stopped{partial}") from None
    unit = "texts" if text else "images"
    table = read_predictions(out)
    scores = score(table, description["classes"], description["source"]["checkpoint"])
    if scores["count"]:
        storage.write_text(out.child(METRICS_FILE), json.dumps(scores, indent=1))
    print(summary(out, len(inputs), unit, description["source"]["checkpoint"], errors(table)))
    if scores["count"] or scores["unknown_labels"]:
        print(scored(out, scores, unit))
    return 0


def summary(out, n: int, unit: str, checkpoint: str, errors: list[str]) -> str:
    """The summary line: how many inputs were predicted, and which could not be read (a text by its row number)."""
    line = f"{out.uri}: {n - len(errors)} of {n} {unit} predicted with {checkpoint}"
    if not errors:
        return line
    named = [f"row {e}" if unit == "texts" else e for e in errors[:5]] + (["..."] if len(errors) > 5 else [])
    return f"{line}; {len(errors)} could not be read (their error column says why): {', '.join(named)}"


def scored(out, scores: dict, unit: str) -> str:
    """The last line where inputs had labels: how the predictions scored against them, and what was not scored."""
    unknown = scores["unknown_labels"]
    names = ", ".join(repr(n) for n in list(unknown)[:5]) + (", ..." if len(unknown) > 5 else "")
    if not scores["count"]:
        classes = ", ".join(repr(c) for c in scores["classes"][:5]) + (", ..." if len(scores["classes"]) > 5 else "")
        return (f"not scored: no label names a class of the run ({classes}); {sum(unknown.values())} {unit} are labelled "
                f"{names}")
    line = (f"scored against their labels: accuracy {scores['acc']:.3f}, macro F1 {scores['f1']:.3f} over {scores['count']} "
            f"{unit}; every metric in {out.child(METRICS_FILE).uri}")
    if unknown:
        line += f"; {sum(unknown.values())} labelled with no class of the run, not scored: {names}"
    return line


def score(table: pa.Table, classes: list[str], checkpoint: str) -> dict:
    """The predictions of labelled inputs scored as a run's validation is (tl_core.metrics), with the labels that
    name no class of the run counted apart; unreadable inputs are not scored."""
    from collections import Counter

    from tl_core.metrics import confusion_matrix, confusion_scores

    index = {name: i for i, name in enumerate(classes)}
    known, unknown = [], Counter()
    for label, predicted, error in zip(*(table.column(c).to_pylist() for c in ("label", "predicted", "error")), strict=True):
        if label is None or error is not None:
            continue
        if label not in index:
            unknown[label] += 1
            continue
        known.append((index[label], index[predicted]))
    labels, preds = torch.tensor(known, dtype=torch.int64).reshape(-1, 2).unbind(1)
    confusion = confusion_matrix(labels, preds, len(classes))
    return {"checkpoint": checkpoint, "classes": classes, **confusion_scores(confusion), "unknown_labels": dict(unknown)}


def image_paths(data) -> list[str]:
    """Every image file under DATA (a folder or an S3 prefix; or DATA itself, one image file or object), as paths of
    its filesystem; hidden files and folders left out, as a run's index leaves them out."""
    from pathlib import Path

    from torchvision.datasets.folder import IMG_EXTENSIONS

    from tl_core.data import image_files, is_hidden_path, is_image_path, not_images, warn_left_out

    one_file = (bool(data.key) and storage.is_object(data, "--data")) if data.is_s3 else Path(data.path).is_file()
    left_out: list[str] = []  # what a folder holds that is not named as an image
    if one_file:
        if not is_image_path(data.uri.rsplit("/", 1)[-1]):
            raise DataError(f"--data: {data.uri} is a file not named like an image ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
        paths = [data.path]
    elif data.is_s3:
        keys = [o["Key"] for o in storage.list_objects(data, "--data") if not is_hidden_path(o["Key"])]
        paths = [f"{data.path}/{key}" for key in keys if is_image_path(key)]
        left_out = [f"{data.uri.rstrip('/')}/{key}" for key in keys if not is_image_path(key)]
    else:
        if not Path(data.path).is_dir():
            raise DataError(f"--data: {data.uri} does not exist")
        paths = [p for p in image_files(Path(data.path), left_out) if Path(p).is_file()]  # no FIFO, device or dangling link
    if not paths:
        found = f"; it holds {not_images(left_out)}" if left_out else ""
        raise DataError(f"--data: {data.uri} holds no images (files named {', '.join(IMG_EXTENSIONS[:4])}, ...){found}")
    warn_left_out(left_out)
    return paths


def text_rows(data: str, description: dict, text_column: str | None = None, label_column: str | None = None) -> list[dict]:
    """{"path": row number, "text", "label"} for every row of the table file DATA, local or s3:// (fetched once to
    this node's cache), from its `text_column` (default: the run's `data.text_column`) and `label_column` (which
    it must have; default: the run's `data.label_column`, where DATA has that column, else every label is None)."""
    from pathlib import Path

    from cluster.storage import cache
    from tl_core.config import from_dict
    from tl_core.text import TABLE_SUFFIXES, is_table_name, label_name, read_table

    run_data = from_dict(description["config"], stored=True).data
    column, label_key = text_column or run_data.text_column, label_column or run_data.label_column
    if label_column and label_column == column:  # the default label column may be the texts given: then no labels
        raise DataError(f"--label-column: {label_column!r} is the column of texts too; the labels must be in a column of their own")
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
    required = [("--text-column" if text_column else "--data", column)] + ([("--label-column", label_key)] if label_column else [])
    table = read_table(path, required, field="--data", optional=(label_key,))
    if not table.num_rows:
        raise DataError(f"--data: {data} has no rows under its header")
    texts = table.column(column).to_pylist()
    has_labels = label_key in table.column_names and label_key != column
    labels = map(label_name, table.column(label_key).to_pylist()) if has_labels else [None] * len(texts)
    return [{"path": str(i), "text": t, "label": label} for i, (t, label) in enumerate(zip(texts, labels, strict=True))]


def read_predictions(out) -> pa.Table:
    import pyarrow.dataset

    return pyarrow.dataset.dataset(out.path, filesystem=storage.filesystem(out), format="parquet",
                                   schema=SCHEMA).to_table(columns=["path", "label", "predicted", "error"])


def errors(table: pa.Table) -> list[str]:
    """The paths (texts: row numbers) of the inputs that could not be read."""
    return [p for p, e in zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True) if e is not None]


def class_folders_root(paths: list[str], root: str, classes: list[str]) -> str | None:
    """`root` (DATA) where it holds class folders, whose names label the images in them: where the first folder of
    some image under it names a class of the run; then a folder naming none is a class the run lacks, its images
    counted apart. None where no folder names a class (new, unlabelled images): no image has a label."""
    names = set(classes)
    return root if any(first_folder(path, root) in names for path in paths) else None


def split_folders(paths: list[str], root: str, classes: list[str]) -> list[str]:
    """The folders under `root` (DATA) whose own first folders name classes of the run: a dataset root's train/,
    val/ and test/, given as DATA where one split of class folders was meant."""
    names, found = set(classes), set()
    for path in paths:
        if (first := first_folder(path, root)) and first not in found and first_folder(path, f"{root.rstrip('/')}/{first}") in names:
            found.add(first)
    return sorted(found)


def first_folder(path: str, root: str | None) -> str | None:
    """The first folder under `root` on the way to the file at `path`; None for a file directly in it (or no root)."""
    prefix = f"{root.rstrip('/')}/" if root else None
    if prefix is None or not path.startswith(prefix):
        return None
    folder, _, rest = path[len(prefix):].partition("/")
    return folder if rest else None


if __name__ == "__main__":
    run_module("jobs.predict")
