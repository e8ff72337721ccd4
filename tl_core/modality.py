"""Which kind of data a run has (images or text), and the matching index and `TaskData` for the supervised recipe.

`data.modality: auto` (the default) reads a `data.root` that is a table file, or holds table files (train.csv, ...),
as text and one holding class folders as images; the backbone must be of the same kind.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from tl_core.batches import TaskData
from tl_core.config import DataConfig, RunConfig, named_if_set
from tl_core.data import DatasetIndex, image_data, index_image_folder, is_gpu
from tl_core.errors import ConfigError
from tl_core.text import index_text_table, is_table_name, is_text_root, text_data
from tl_core.text_models import is_text_backbone, load_tokenizer


def modality(data: DataConfig) -> str:
    if data.modality != "auto":
        return data.modality
    return "text" if is_text_root(data.root) else "image"


def check_modality(cfg: RunConfig, found: str | None = None) -> str:
    """The run's modality (`found`: what a job read in the data itself, a packed dataset's manifest); ConfigError
    when the backbone is of the other kind, or a text encoder cannot take the configured `data.max_length` (or has
    no tokenizer)."""
    if found and cfg.data.modality not in ("auto", found):
        raise ConfigError(f"data.modality: {cfg.data.modality}, but data.root {cfg.data.root} is a packed {found} dataset")
    kind = found or modality(cfg.data)
    if kind == "text" and not is_text_backbone(cfg.model.backbone):
        raise ConfigError(f"model.backbone: {cfg.model.backbone} is an image model, but data.root {cfg.data.root} holds text"
                          f"{'' if found else ' (table files)'}; use a text encoder, hf:<model>")
    if kind == "image" and is_text_backbone(cfg.model.backbone):
        raise ConfigError(f"model.backbone: {cfg.model.backbone} is a text model, but data.root {cfg.data.root} holds images "
                          "(class folders); use an image backbone, or train.csv/tsv/jsonl/parquet for text")
    if kind == "text":
        load_tokenizer(cfg.model.backbone, cfg.data.max_length)
    return kind


#: The settings only one kind of data reads; a run on the other kind leaves them unread.
ONLY_FOR = {"image": ("data.image_size", "data.augment", "data.hflip", "model.freeze_bn_stats"),
            "text": ("data.text_column", "data.label_column", "data.max_length", "model.pooling")}
#: What a packed dataset fixed when it was packed (its split, a text pack's columns) or streams without (the folder
#: loader's worker processes); and what only a packed one reads.
ONLY_UNPACKED = ("data.val_fraction", "data.loader_workers", "data.text_column", "data.label_column")
ONLY_PACKED = ("data.decode_cpus",)


def unread_settings(cfg: RunConfig, kind: str, packed: bool, varied: Collection[str] = ()) -> list[str]:
    """Each setting (`named_if_set`: changed from its default, or varied by a sweep) that a run on `kind` data
    (`packed` or not) never reads."""
    keys = [key for other, keys in ONLY_FOR.items() if other != kind for key in keys]
    keys += ONLY_UNPACKED if packed else ONLY_PACKED
    return [named for key in dict.fromkeys(keys) if (named := named_if_set(cfg, key, varied))]


def unread_beside(names: Collection[str]) -> list[str]:
    """The data a run leaves unread at a data root split into train and val, given the names at its top ("name/"
    for a folder; `cluster.storage.top_level_names`), as the indexes read it: beside a text dataset's train.* (and
    val.*), the other tables and the folders; beside an image dataset's train/ (and val/), the other folders (a test
    split, say). Other files (a README) and hidden names are no data, and are not named."""
    shown = [n for n in names if not n.startswith(".")]
    tables = {n: Path(n).stem.lower() for n in shown if not n.endswith("/") and is_table_name(n)}
    if "train" in tables.values():
        return sorted(n for n in shown if (n.endswith("/") or n in tables) and tables.get(n) not in ("train", "val"))
    if "train/" in shown:
        return sorted(n for n in shown if n.endswith("/") and n not in ("train/", "val/"))
    return []


def index_labelled(data: DataConfig, seed: int) -> DatasetIndex:
    return index_text_table(data, seed) if modality(data) == "text" else index_image_folder(data, seed)


def labelled_data(cfg: RunConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> TaskData:
    """This rank's `TaskData` of the run's labelled images or text, for batches trained on `device`."""
    if check_modality(cfg) == "text":
        return text_data(cfg, rank=rank, world_size=world_size, pin_memory=is_gpu(device))
    return image_data(cfg, rank=rank, world_size=world_size, device=device)
