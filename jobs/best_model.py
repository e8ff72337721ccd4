"""A finished run's best model, loaded as its run built it: what jobs.export writes out and jobs.predict runs."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cluster import storage
from tl_core.checkpoint import load_model_state
from tl_core.config import from_dict
from tl_core.errors import ConfigError
from tl_core.files import as_given, user_path


def local_checkpoint(run: str, field: str = "RUN") -> Path:
    """The best checkpoint of a run (or the checkpoint) `run` names, on this machine; `field` names the argument."""
    from jobs.staging import fetch_weights
    from tl_core import run_dir

    if not run.strip():  # "" would be the working directory
        raise ConfigError(f"{field}: empty; give a finished run or a checkpoint directory, local or s3://")
    if storage.is_uri(run):
        return fetch_weights(run, None, field)
    return run_dir.local_checkpoint_dir(user_path(run), run, field)


def load_model(checkpoint: Path, field: str = "RUN") -> tuple[nn.Module, dict]:
    """The checkpoint's classifier, built as its run built it, in eval mode; and its description (input, classes,
    source: a node's copy of an s3:// checkpoint named by its URI), which jobs.export writes as PATH.json."""
    from tl_core.models import build_model, normalization
    from tl_core.text_models import CHECKPOINT_HF_DIR, is_text_backbone

    state, meta = load_model_state(checkpoint)
    cfg = from_dict(meta["config"], stored=True)
    if cfg.pretrain.method != "supervised" or not meta.get("classes"):
        raise ConfigError(f"{field}: {as_given(checkpoint)} is a {cfg.pretrain.method} pretraining checkpoint, which has no classifier; "
                          "fine-tune it (model.weights: the run) and use that")
    text = is_text_backbone(cfg.model.backbone)
    backbone = f"hf:{checkpoint}" if text else cfg.model.backbone  # a text checkpoint carries its encoder's config
    model = build_model(cfg.model.model_copy(update={"backbone": backbone, "weights": None}), meta["classes"], cfg.data.image_size)
    model.load_state_dict(state)
    model.eval()
    source = {"checkpoint": as_given(checkpoint), "epoch": meta.get("epoch"), "metrics": meta.get("metrics", {}),
              "backbone": cfg.model.backbone, "experiment": cfg.experiment}
    if text:
        inputs = {"tokenizer": str(checkpoint / CHECKPOINT_HF_DIR), "max_length": cfg.data.max_length, "pooling": cfg.model.pooling,
                  "names": ["input_ids", "attention_mask"], "dtype": "int64"}
    else:
        mean, std = normalization(cfg.model.backbone)
        size = cfg.data.image_size
        inputs = {"layout": "NCHW", "channels": "RGB", "size": size, "resize": size, "center_crop": size, "scale": "0-1",
                  "mean": list(mean), "std": list(std), "dtype": "float32", "names": ["images"]}
    return model, {"modality": "text" if text else "image", "input": inputs, "output": "logits", "classes": meta["classes"],
                   "source": source, "config": meta["config"]}
