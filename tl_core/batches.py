"""The seam between data and recipes: a recipe trains on `TaskData`, whatever the modality or source.

A recipe never opens a file: it iterates `train` and `val`, which yield `(inputs, labels)` batches, and
hands `inputs` to a model that maps them to logits. Images from a folder (`tl_core.data.ImageData`) are one
implementation; text or batches streamed by a job (Ray Data) plug in here without touching the recipes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch


@runtime_checkable
class TaskData(Protocol):
    """Batches for one rank. `train` is sharded and shuffled per epoch (`set_epoch`), with `len()` batches;
    `val` holds this rank's share of the validation set, every sample exactly once across ranks."""

    classes: list[str]  # class names, in label order ([] for unlabelled data)
    train_counts: list[int]  # training samples of each class, in label order, over every rank
    train: Iterable[tuple[Any, torch.Tensor]]
    val: Iterable[tuple[Any, torch.Tensor]]

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Shuffle for `epoch` (the same order on every rank) and draw its augmentation from `seed`."""

    def summary(self) -> str:
        """One line for the log: sizes and what cleaning dropped."""


class StreamedData:
    """`TaskData` over batches a job streams in (Ray Data shards of a packed dataset): `train` and `val` are
    iterables the job built, with `len()` batches; `on_epoch(epoch, seed)` reseeds the job's shuffle."""

    def __init__(self, classes: list[str], train_counts: list[int], train, val, on_epoch: Callable[[int, int], None], summary: str):
        self.classes, self.train_counts, self.train, self.val = classes, train_counts, train, val
        self._on_epoch, self._summary = on_epoch, summary

    def set_epoch(self, epoch: int, seed: int) -> None:
        self._on_epoch(epoch, seed)

    def summary(self) -> str:
        return self._summary


def move_to(inputs: Any, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> Any:
    """`inputs` on `device`: a tensor (images get `memory_format`), or a tuple, list or dict of them
    (SimCLR's two views, a tokenizer's input_ids and attention_mask)."""
    if isinstance(inputs, torch.Tensor):
        layout = memory_format if inputs.ndim == 4 else torch.preserve_format
        return inputs.to(device, non_blocking=True, memory_format=layout)
    if isinstance(inputs, dict):
        return {k: move_to(v, device, memory_format) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_to(v, device, memory_format) for v in inputs)
    raise TypeError(f"cannot move a batch of {type(inputs).__name__} to a device")
