"""Backbones from torchvision and timm, a replaceable classifier head, source weights in every layout the registry
knows, and freezing strategies.

`model.backbone` is a torchvision name (`resnet18`) or `timm:<name>` (any model timm lists). The head (the last linear
layer, or timm's `pretrained_cfg["classifier"]`: a linear layer or a 1x1 convolution on pooled features) is replaced by
a `ClassifierHead` for the task's classes; a timm model with several heads gets one (`PooledFeatures`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from tl_core.config import ModelConfig, nearest
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

def backbone_names() -> list[str]:
    return list(BACKBONES)


def timm_tags(model: str) -> list[str]:
    """The pretrained tags timm has for the architecture `model` (`a1_in1k`, `tv_in1k`, ... for resnet18)."""
    import timm

    return [name.split(".", 1)[1] for name in timm.list_pretrained(f"{model}.*") if "." in name]


def check_backbone(name: str) -> str:
    """`name` if the registry knows it; ValueError saying what is allowed otherwise."""
    if name.startswith("hf:"):  # a text encoder: whether it exists is checked when it is built
        if len(name) == 3:
            raise ValueError("hf: needs a model after it: a local directory, a cached hub id, or all-MiniLM-L6-v2")
        return name
    if name.startswith(TIMM_PREFIX):
        import timm

        model_name = name[len(TIMM_PREFIX):]
        if not model_name:
            raise ValueError("timm: needs a model name after it, e.g. timm:tf_efficientnet_lite0")
        if model_name.startswith(("hf-hub:", "hf_hub:")):  # timm.create_model's name for a hub repository
            repo = model_name.split(":", 1)[1]
            named = repo.removeprefix("timm/")
            hint = (f"name the model and its tag, {TIMM_PREFIX}{named}, with model.weights: imagenet or its tag"
                    if repo.startswith("timm/") and timm.is_model(named) else
                    "name a timm model (timm:<name>) and give the repository's weights file as model.weights")
            raise ValueError(f"timm's hub names (hf-hub:) are not taken: {hint}")
        if not timm.is_model(model_name):
            near = nearest(model_name, timm.list_models())
            raise ValueError(f"unknown timm model {model_name!r}{f' (did you mean {TIMM_PREFIX}{near}?)' if near else ''}; "
                             "list timm's names with python -c \"import timm; print(timm.list_models("
                             f"'*{model_name.strip().lower()[:6]}*'))\"")
        model, _, tag = model_name.partition(".")  # a pretrained tag picks its normalisation and input size
        if tag and tag not in (tags := timm_tags(model)):
            raise ValueError(f"timm has no pretrained tag {tag!r} for {model} (its tags: {', '.join(tags) or 'none'})")
        return name
    if name not in BACKBONES:
        import timm

        if name[:len(TIMM_PREFIX)].lower() == TIMM_PREFIX:
            hint = f" (the prefix is lower case: {TIMM_PREFIX}{name[len(TIMM_PREFIX):]})"
        elif timm.is_model(name):
            hint = f" (timm has it: {TIMM_PREFIX}{name})"
        elif near := nearest(name, BACKBONES):
            hint = f" (did you mean {near}?)"
        elif near := nearest(name, timm.list_models()):
            hint = f" (did you mean {TIMM_PREFIX}{near}?)"
        else:
            hint = ""
        raise ValueError(f"unknown backbone {name!r}{hint}; allowed: {', '.join(BACKBONES)}, timm:<name> for any timm "
                         "model, or hf:<model> for a text encoder")
    return name


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std that the backbone's pretrained weights were trained with (timm's pretrained_cfg, torchvision's
    weights meta)."""
    mean, std, _ = _pretrained_preprocessing(backbone)
    return mean, std


def pretrained_input_size(backbone: str) -> int:
    """The image size the backbone's pretrained weights were trained and evaluated at: timm's pretrained_cfg
    `input_size`, torchvision's weights' `crop_size` (224 for most; efficientnet_b1 240, timm's test_resnet 160)."""
    return _pretrained_preprocessing(backbone)[2]


def _pretrained_preprocessing(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    if backbone.startswith(TIMM_PREFIX):
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone[len(TIMM_PREFIX):])
        if cfg is None:
            return IMAGENET_MEAN, IMAGENET_STD, 224
        return tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1])
    preset = torchvision.models.get_model_weights(backbone).DEFAULT.transforms()
    return tuple(preset.mean), tuple(preset.std), int(preset.crop_size[0])


class ClassifierHead(nn.Module):
    """Dropout then a linear layer: the part of the model that is replaced for a new task."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # pooled features (N, C, 1, 1) where the replaced classifier was a 1x1 convolution
            x = x.flatten(1)
        return self.linear(self.dropout(x))


def build_model(cfg: ModelConfig, classes: list[str], image_size: int) -> nn.Module:
    """The backbone with a new head for `classes`, source weights loaded (from any known layout) if configured."""
    if cfg.backbone.startswith("hf:"):
        from tl_core.text_models import build_text_model

        return build_text_model(cfg, classes)
    model, head_name = _create_backbone(cfg.backbone, image_size)
    try:
        old = model.get_submodule(head_name)
    except AttributeError:  # an encoder-only variant (timm's gemma4_vit_*_enc) builds no head even when asked for one
        raise ConfigError(f"model.backbone: {cfg.backbone} builds no classifier ({head_name}) to replace; choose a variant "
                          "that classifies") from None
    head = ClassifierHead(_classifier_inputs(old, cfg.backbone, head_name), len(classes), cfg.dropout)
    init_head(head, cfg.head_init)
    set_submodule(model, head_name, head)
    if cfg.weights:
        from tl_core.weights import load_source  # weights name models' heads; models name no weights until here

        load_source(model, head_name, cfg.weights, cfg.backbone, classes, image_size)
    return model


def checkpoint_files(cfg: ModelConfig) -> dict[str, Path]:
    """Files a checkpoint of this model carries besides its weights (name inside the checkpoint -> local file), so
    that it is a complete source for the next stage: a text encoder's config and tokenizer; none for images."""
    if cfg.backbone.startswith("hf:"):
        from tl_core.text_models import checkpoint_files as text_files

        return text_files(cfg.backbone)
    return {}


def _create_backbone(backbone: str, image_size: int) -> tuple[nn.Module, str]:
    """(randomly initialised model, name of its classifier layer)."""
    if not backbone.startswith(TIMM_PREFIX):
        model = torchvision.models.get_model(backbone, weights=None, **BACKBONES[backbone](image_size))
        return model, _last_linear_name(model)
    import timm

    name = backbone[len(TIMM_PREFIX):]
    # num_classes: a linear head even where the tag has none (self-supervised tags: `.mim_in22k`, DINOv2's `.lvd142m`);
    # build_model replaces it.
    try:
        model = timm.create_model(name, pretrained=False, num_classes=1, img_size=image_size)  # transformers take the input size
    except TypeError:  # convolutional nets take any size and no such argument
        model = timm.create_model(name, pretrained=False, num_classes=1)
    except (AssertionError, ValueError) as exc:
        raise ConfigError(f"data.image_size: {backbone} cannot take {image_size} px ({exc})") from None
    _check_patches_see_everything(backbone, getattr(model, "patch_embed", None), image_size)
    classifier = model.pretrained_cfg.get("classifier")
    if isinstance(classifier, (tuple, list)):  # several heads: distilled DeiT, LeViT; CrossViT's branches; VOLO's aux
        return PooledFeatures(model), "head"
    return model, classifier or _last_linear_name(model)


def weight_shapes(backbone: str, image_size: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the backbone's weights when built for `image_size`, by their names in our model (a several-head
    model's under `body.`), built on the meta device: nothing computed or allocated."""
    with torch.device("meta"):
        model, _ = _create_backbone(backbone, image_size)
    return {name: tuple(weight.shape) for name, weight in model.state_dict().items()}


#: What torch and timm models raise for an input size they cannot take (MViTv2's relative positions: IndexError).
INPUT_SIZE_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError)


def run_blank_image(model: nn.Module, image_size: int) -> None:
    """One forward pass of a blank image in evaluation mode: what raises one of INPUT_SIZE_ERRORS where the model
    cannot take the size."""
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))


def takes_image_size(backbone: str, image_size: int) -> bool:
    """Whether the architecture (built without weights) runs a blank image of this size."""
    try:
        run_blank_image(_create_backbone(backbone, image_size)[0], image_size)
    except (ConfigError, *INPUT_SIZE_ERRORS):
        return False
    return True


def image_sizes_near(backbone: str, image_size: int, seconds: float = 10.0) -> list[int]:
    """The nearest sizes below and above `image_size` that the backbone takes, among the multiples of 8 and of its
    patch size (a transformer's), tried nearest first (each try builds the model and runs one blank image) for at most
    `seconds`; empty if none was found in that time."""
    import time

    deadline = time.monotonic() + seconds
    top = 2 * max(image_size, pretrained_input_size(backbone))
    candidates = {size for step in {8, _patch_size(backbone) or 8} for size in range(step, top + 1, step)} - {image_size}
    found: dict[str, int] = {}
    for candidate in sorted(candidates, key=lambda s: (abs(s - image_size), s)):
        side = "below" if candidate < image_size else "above"
        if side in found:
            continue
        if takes_image_size(backbone, candidate):
            found[side] = candidate
        if len(found) == 2 or time.monotonic() > deadline:
            break
    return sorted(found.values())


def _patch_size(backbone: str) -> int | None:
    """The side of a transformer's square patches (timm's `patch_embed.patch_size`), from the architecture built on the
    meta device at its pretrained size; None for a model without patches."""
    if not backbone.startswith(TIMM_PREFIX):
        return None
    try:
        with torch.device("meta"):
            model, _ = _create_backbone(backbone, pretrained_input_size(backbone))
    except ConfigError:
        return None
    patch = getattr(getattr(_timm_model(model), "patch_embed", None), "patch_size", None)
    side = patch[0] if isinstance(patch, (tuple, list)) else patch
    return side if isinstance(side, int) and side > 1 else None


def _check_patches_see_everything(backbone: str, patch_embed: nn.Module | None, image_size: int) -> None:
    """A transformer cuts images into patches; where the size leaves a remainder, timm builds the model all the same
    and the last rows and columns are never seen: refused. Overlapping patches (PVT-v2's 7 px every 4, padded by 3)
    are judged by where their last window ends."""
    patch = getattr(patch_embed, "patch_size", None)
    proj = getattr(patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d) and isinstance(proj.padding, tuple) and (proj.stride != proj.kernel_size or any(proj.padding)):
        (k, _), (s, _), (p, _) = proj.kernel_size, proj.stride, proj.padding
        windows = (image_size + 2 * p - k) // s + 1
        if (unseen := image_size + p - (s * (windows - 1) + k)) > 0:
            raise ConfigError(f"data.image_size: {backbone}'s {k} px patches every {s} px leave the last {unseen} px of "
                              f"{image_size} unseen; use {image_size - unseen} or {image_size - unseen + s}")
    elif isinstance(patch, (tuple, list)) and image_size % patch[0]:
        raise ConfigError(f"data.image_size: {backbone} cuts images into {patch[0]} px patches; use a multiple of "
                          f"{patch[0]} (got {image_size})")


class PooledFeatures(nn.Module):
    """A timm model with several classifier heads (distilled DeiT, LeViT, EfficientFormer, RepViT, SwiftFormer: a class
    and a distillation head; CrossViT: one per branch; VOLO: an auxiliary head) made a model with one: timm's
    `reset_classifier(0)` leaves `body` returning the pooled features its heads read (averaged where they average their
    outputs), and `head` classifies them. A file of the timm model loads into `body` without its heads
    (`tl_core.weights.convert_layout`)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        body.reset_classifier(0)
        for module in body.modules():  # what the reset switched off belongs to the heads (EfficientViM's head weighting)
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.requires_grad:  # kept as a buffer: a file of the timm model still loads; nothing trains it
                    delattr(module, name)
                    module.register_buffer(name, param.detach())
        self.body = body
        self.head = nn.Linear(body.num_features, 1)  # build_model puts the task's head here

    @property
    def removed_heads(self) -> tuple[str, ...]:
        """The prefixes of the removed heads' weights in a file of the timm model (`head.`, `head_dist.`)."""
        return tuple(sorted({name.split(".")[0] + "." for name in self.body.pretrained_cfg["classifier"]}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def init_head(head: ClassifierHead, method: str) -> None:
    if method == "xavier":
        nn.init.xavier_uniform_(head.linear.weight)
        nn.init.zeros_(head.linear.bias)
    elif method == "kaiming":
        nn.init.kaiming_normal_(head.linear.weight, nonlinearity="relu")
        nn.init.zeros_(head.linear.bias)
    # "default": nn.Linear's own initialisation


def _classifier_inputs(layer: nn.Module, backbone: str, name: str) -> int:
    """The width of the features a backbone's classifier takes: a linear layer's, or a 1x1 convolution's on pooled
    features (timm's BiT `resnetv2_*`, `dla*`, `dpn*`)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
        return layer.in_channels
    raise ConfigError(f"model.backbone: {backbone}'s classifier {name} is neither a linear layer nor a 1x1 convolution; "
                      "choose another model")


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


# ---------------------------------------------------------------- freezing strategies

def backbone_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in input-to-output order, grouped into unfreezing stages (also the blocks of
    layer-wise LR decay).

    A model that knows its own stages says so: a text encoder (`unfreeze_blocks()`: its embeddings, then each layer),
    a timm model (its `group_matcher(coarse=True)`: the stem, then each stage or transformer block, then the layers after
    them). Otherwise (torchvision) top-level children, with the one holding the head opened up, and any block
    holding more than half of the backbone opened up too (resnet's layer4, ViT's encoder), so that stages are of
    useful size.
    """
    if hasattr(model, "unfreeze_blocks"):
        return model.unfreeze_blocks()
    head_name, head = find_head(model)
    head_params = {id(p) for p in head.parameters()}
    if (stages := _timm_stages(model)) is not None:
        return [g for g in ([p for p in stage if id(p) not in head_params] for stage in stages) if g]

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
                        and next(u.children(), None) is not None), None)) is not None:
        i = units.index(big)
        units[i:i + 1] = opened(big)
    groups = [[p for p in params(u) if id(p) not in head_params] for u in units]
    return [g for g in groups if g]


def _timm_model(model: nn.Module) -> nn.Module:
    """The timm model in `model`: a several-head model's `body`, or `model` itself."""
    return model.body if isinstance(model, PooledFeatures) else model


def _timm_stages(model: nn.Module) -> list[list[nn.Parameter]] | None:
    """A timm model's parameters as its own coarse grouping orders them (timm's `group_parameters`), with our head
    where the timm model holds it (a several-head model's is outside its `body`); None for a model that is not timm's
    or has no coarse grouping (PiT, MetaFormer, CSATv2, RDNet)."""
    body = _timm_model(model)
    if not hasattr(body, "group_matcher"):
        return None
    try:
        matcher = body.group_matcher(coarse=True)
    except (AssertionError, AttributeError, NotImplementedError):  # declared, but not for coarse grouping
        return None
    from timm.models import group_parameters

    return [stage for _, stage in sorted(group_parameters(body, matcher, return_values=True).items())]


def trainable_blocks(cfg: ModelConfig, n_blocks: int, epoch: int) -> int:
    """How many of `n_blocks` backbone blocks (from the top) train in `epoch` (0-based) under the configured strategy."""
    if cfg.strategy == "full":
        return n_blocks
    if cfg.strategy == "linear_probe":
        return 0
    if cfg.strategy == "lp_ft":  # Kumar et al. 2022: a linear probe first, then everything from the probed head
        return 0 if epoch < cfg.lp_epochs else n_blocks
    return min(epoch // cfg.unfreeze_every, n_blocks)  # gradual_unfreeze: head only, then one more block every unfreeze_every epochs


def apply_strategy(model: nn.Module, cfg: ModelConfig, epoch: int) -> int:
    """Set requires_grad for `epoch` under the configured strategy; returns trainable backbone blocks.

    A pure function of (strategy, epoch): a resumed run gets the same frozen state as an unbroken one.
    """
    blocks = backbone_blocks(model)
    n_trainable = trainable_blocks(cfg, len(blocks), epoch)
    for i, group in enumerate(blocks):
        for p in group:
            p.requires_grad_(i >= len(blocks) - n_trainable)
    for p in find_head(model)[1].parameters():
        p.requires_grad_(True)
    return n_trainable


def updates_batch_norm_statistics(model: nn.Module) -> bool:
    """Whether `model`, as set_train_mode left it, normalises with each batch's statistics somewhere (and updates its
    running ones)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def set_train_mode(model: nn.Module, freeze_bn_stats: bool = False) -> None:
    """`model.train()`, except that a frozen part (a module all of whose parameters are frozen) computes as it does
    in evaluation: its BatchNorm keeps its running statistics, its dropout and drop path are off, so a linear probe
    trains its head on the features it is scored on. With `freeze_bn_stats`, every BatchNorm keeps its statistics."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if (params and not any(p.requires_grad for p in params)) or (freeze_bn_stats and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            module.eval()
