"""Text datasets: read a table of (text, label) rows, clean it, split it, tokenise it once, and build sharded
loaders whose batches are padded per batch (to the longest text in it, never to `max_length`).

`data.root` is a folder holding `train.{csv,tsv,jsonl,parquet}` (+ optional `val.*` in any of those formats) or a single
table file, or that one table file itself (then a stratified, seeded split makes the validation set). Columns
`data.text_column` and `data.label_column` (default `text`, `label`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from tl_core.config import DataConfig, RunConfig
from tl_core.data import (
    DatasetIndex,
    IndexedData,
    ShardSampler,
    drop_unreadable_and_duplicates,
    existing_folder,
    nothing_left_to_validate,
    stratified_split,
    warn_conflicts,
)
from tl_core.errors import DataError

logger = logging.getLogger("tl_core")

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
#: What else `data.root` may be when it is no folder.
OR_ONE_TABLE = ", or one table of texts (.csv, .tsv, .jsonl or .parquet)"


def is_table_name(name: str | Path) -> bool:
    """Whether a file or S3 object so named is read as a table (.csv, .tsv, .jsonl, .parquet, in any case)."""
    return Path(name).suffix.lower() in TABLE_SUFFIXES


def table_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and is_table_name(p) and not p.name.startswith("."))


def is_table_file(path: str | Path) -> bool:
    """Whether `path` is one table file, a text dataset by itself."""
    return is_table_name(path) and Path(path).is_file()


def is_text_root(root: str | Path) -> bool:
    """Whether `root` is a text dataset: a table file, or a folder of them (where an image dataset has class folders)."""
    root = Path(root)
    return is_table_file(root) or (root.is_dir() and bool(table_files(root)))


def read_table(path: Path, columns: list[tuple[str, str]], field: str = "data.root", optional: tuple[str, ...] = ()):
    """A CSV, TSV, JSON-lines or Parquet file as a pyarrow Table with the named columns ((config key, column) pairs);
    DataError naming `field` (or the key of a missing column) when it cannot be read or lacks one. `optional`
    columns are read as the named ones are (a CSV's as text) where the table has them."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    # A CSV's named columns are text whatever they look like: inferred as numbers, label "007" would be class 7 and
    # the text "00123" no text at all. Empty cells and NA markers ("NA", "null", ...) are missing values, as pandas
    # reads them. JSON and Parquet carry their own types. A TSV has no quoting (a field holds no tab nor newline), so
    # a quote in a text is part of it, as GLUE's tables need.
    as_text = pyarrow.csv.ConvertOptions(column_types={column: pa.string() for column in (*(c for _, c in columns), *optional)},
                                         strings_can_be_null=True)
    tabs = pyarrow.csv.ParseOptions(delimiter="\t", quote_char=False)
    readers = {".csv": lambda p: pyarrow.csv.read_csv(p, convert_options=as_text),
               ".tsv": lambda p: pyarrow.csv.read_csv(p, parse_options=tabs, convert_options=as_text),
               ".jsonl": pyarrow.json.read_json, ".parquet": pyarrow.parquet.read_table}
    try:
        table = readers[path.suffix.lower()](str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        if line := first_line_not_utf8(path):
            raise not_utf8(field, path, f"line {line}") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{field}: {path.name} cannot be read as {path.suffix[1:]} ({reason[:200]})") from None
    for key, column in [*columns, *((field, c) for c in optional if c in table.column_names)]:
        if column not in table.column_names:
            raise DataError(f"{key}: {path.name} has no column {column!r}; its columns: {', '.join(table.column_names) or 'none'}")
        if (n := table.column_names.count(column)) > 1:
            raise DataError(f"{key}: {path.name} has {n} columns named {column!r}; which one is meant cannot be told, rename the others")
        try:  # pyarrow's JSON reader keeps bytes that are not UTF-8 in its strings, which fail only when read
            table.column(column).validate(full=True)
        except pa.ArrowInvalid:
            line = first_line_not_utf8(path)
            raise not_utf8(field, path, f"line {line}" if line else f"column {column!r}") from None
    return table


def not_utf8(field: str, path: Path, where: str) -> DataError:
    excel = " (in Excel: CSV UTF-8)" if path.suffix.lower() == ".csv" else ""
    return DataError(f"{field}: {path.name} is not UTF-8 text ({where} is not); tables are read as UTF-8: save it as UTF-8{excel}")


def first_line_not_utf8(path: Path) -> int | None:
    """The number of the first line of the text table `path` (CSV, TSV, JSON lines) that is not UTF-8, if one is not;
    None for Parquet, which has no lines."""
    if path.suffix.lower() == ".parquet":
        return None
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _read_table(path: Path, cfg: DataConfig) -> list[tuple[Any, Any]]:
    """(text, label) of every row of a CSV, TSV, JSON-lines or Parquet file."""
    table = read_table(path, [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)])
    return list(zip(table.column(cfg.text_column).to_pylist(), table.column(cfg.label_column).to_pylist(), strict=True))


def label_name(value: Any) -> str | None:
    """A table's label value as a class name ("7" for 7 and 7.0), or None where it is missing or no scalar."""
    if not isinstance(value, (str, int, float)) or isinstance(value, float) and value != value:  # missing, NaN, a list or object
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _class_order(names: set[str]) -> list[str]:
    """Label values sorted, numerically when every one is an integer (so 2 comes before 10; "01" before "1")."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))  # never by set order: every process must agree
    return sorted(names)


def _train_and_val_files(data_root: str) -> tuple[Path, Path | None]:
    """The table that trains and the one that validates (None: split from the first), at `data.root`."""
    if is_table_file(data_root):
        path = Path(data_root)
        if path.stem.lower() == "train" and (beside := [p.name for p in table_files(path.parent) if p.stem.lower() == "val"]):
            logger.warning("data: %s is split by data.val_fraction, and %s beside it is not read; to validate on it, "
                           "give their folder as data.root", path.name, beside[0])
        return path, None
    root = existing_folder(data_root, "data.root", OR_ONE_TABLE)
    by_name: dict[str, list[Path]] = {}
    for path in table_files(root):
        by_name.setdefault(path.stem.lower(), []).append(path)
    for paths in by_name.values():
        if len(paths) > 1:  # train.csv beside train.parquet: which one is meant cannot be guessed
            raise DataError(f"data.root: {data_root} holds one table in {len(paths)} files ({', '.join(p.name for p in paths)}); keep one")
    tables = {name: paths[0] for name, paths in by_name.items()}
    if "val" in tables and "train" not in tables:
        raise DataError(f"data.root: {data_root} holds {tables['val'].name} but no train.csv, train.tsv, train.jsonl or train.parquet")
    if "train" in tables:
        return tables["train"], tables.get("val")
    if len(tables) == 1:
        return next(iter(tables.values())), None
    raise DataError(f"data.root: {data_root} holds {len(tables)} table files ({', '.join(p.name for p in tables.values())}); "
                    f"name them train.* and val.*, or keep one file")


def index_text_table(cfg: DataConfig, seed: int) -> DatasetIndex:
    """Read, clean (empty or non-string texts and missing or non-scalar labels skipped and counted, exact duplicates
    dropped) and split the text dataset at `cfg.root`; samples are (text, class index)."""
    train_file, val_file = _train_and_val_files(cfg.root)
    rows = {"train": _read_table(train_file, cfg), "val": _read_table(val_file, cfg) if val_file else []}

    skipped, usable = [], {"train": [], "val": []}
    for split, items in rows.items():
        for i, (text, label) in enumerate(items):
            name = label_name(label)
            if not isinstance(text, str) or not text.strip() or name is None:
                skipped.append(f"{split} row {i + 1}")
            else:
                usable[split].append((text, name))
    samples = usable["train"] + usable["val"]
    firsts, _, duplicates, conflicts = drop_unreadable_and_duplicates(samples, [text for text, _ in samples])
    warn_conflicts(conflicts, "text")
    kept = {"train": [s for s in firsts[: len(usable["train"])] if s], "val": [s for s in firsts[len(usable["train"]):] if s]}
    if not kept["train"]:
        raise DataError(f"data.root: {train_file.name} has no row with text in column {cfg.text_column!r} and a label in column "
                        f"{cfg.label_column!r} ({len(rows['train'])} row(s){', each empty, unlabelled or not text' if rows['train'] else ''})")
    classes = _class_order({name for _, name in kept["train"]})
    if len(classes) < 2:
        raise DataError(f"data.label_column: {train_file.name} has {len(classes)} class(es) in column {cfg.label_column!r}; need at least 2")
    unknown = sorted({name for _, name in kept["val"]} - set(classes))
    if unknown:
        raise DataError(f"data.root: {val_file.name} has label(s) that {train_file.name} lacks: {', '.join(unknown[:5])}")
    label_of = {name: i for i, name in enumerate(classes)}
    train = [(text, label_of[name]) for text, name in kept["train"]]
    val = [(text, label_of[name]) for text, name in kept["val"]]
    if not val_file:
        train, val = stratified_split(train, cfg.val_fraction, seed)
    if not val and val_file:
        raise nothing_left_to_validate(val_file.name, train_file.name, len(usable["val"]), len(rows["val"]) - len(usable["val"]),
                                       "are empty or unlabelled", unit="text")
    if not val:
        raise DataError(f"data.root: too few texts for a validation split (val_fraction={cfg.val_fraction})")
    if skipped:
        logger.warning("data: skipped %d empty or unlabelled row(s), e.g. %s", len(skipped), skipped[0])
    return DatasetIndex(classes, train, val, skipped, duplicates, unit="texts", skipped_as="empty or unlabelled")


class TokenizedDataset(torch.utils.data.Dataset):
    """Texts tokenised once, up front (one fast batched call), held as token-id lists."""

    def __init__(self, samples: list[tuple[str, int]], tokenizer, max_length: int):
        texts = [text for text, _ in samples]
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length) if texts else {"input_ids": []}
        self.labels = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


class PadToLongest:
    """Collate: pad a batch to its longest text; returns (inputs dict of tensors, labels)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> tuple[dict, torch.Tensor]:
        labels = torch.tensor([item.pop("labels") for item in items])
        return dict(self.tokenizer.pad(items, return_tensors="pt")), labels


@dataclass
class TextData(IndexedData):
    """`TaskData` over a text table: sharded loaders of (tokenised batch dict, labels)."""

    train_sampler: DistributedSampler

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.train_sampler.set_epoch(epoch)  # text has no augmentation to seed


def text_data(cfg: RunConfig, *, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> TextData:
    """The text dataset at `cfg.data.root`, cleaned, split and tokenised with the backbone's own tokenizer."""
    from tl_core.text_models import load_tokenizer

    index = index_text_table(cfg.data, seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.backbone, cfg.data.max_length)
    collate = PadToLongest(tokenizer)
    common = dict(num_workers=cfg.data.loader_workers, pin_memory=pin_memory, persistent_workers=cfg.data.loader_workers > 0,
                  collate_fn=collate)
    train_set = TokenizedDataset(index.train, tokenizer, cfg.data.max_length)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed)
    train = DataLoader(train_set, batch_size=cfg.train.batch_size, sampler=sampler, **common)
    val_set = TokenizedDataset(index.val, tokenizer, cfg.data.max_length)
    val = DataLoader(val_set, batch_size=max(2 * cfg.train.batch_size, 32), sampler=ShardSampler(len(val_set), rank, world_size), **common)
    return TextData(index, train, val, sampler)
