"""The recipes, by `pretrain.method`: what trains, what data it reads, and the model it builds.

Jobs pick a recipe by name (a name travels to Ray workers; a function need not) and check its data and
model before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from tl_core.config import DataConfig, RunConfig
from tl_core.data import DatasetIndex, index_unlabelled
from tl_core.loop import fit
from tl_core.modality import index_labelled
from tl_core.models import build_model
from tl_core.simclr import build_simclr_model, fit_simclr


@dataclass(frozen=True)
class Recipe:
    fit: Callable[..., list[dict]]  # fit(cfg, reporter, *, data=None, resume_from=None, device=None, checkpoints=True, mirror=None)
    index: Callable[[DataConfig, int], DatasetIndex]  # index(cfg.data, seed): the data it reads, cleaned and split
    build_model: Callable[[RunConfig, list[str]], nn.Module]  # the model, source weights loaded


RECIPES: dict[str, Recipe] = {
    "supervised": Recipe(fit, index_labelled, lambda cfg, classes: build_model(cfg.model, classes, cfg.data.image_size)),
    "simclr": Recipe(fit_simclr, index_unlabelled, lambda cfg, classes: build_simclr_model(cfg.model, cfg.pretrain, cfg.data.image_size)),
}
