"""A linear probe of unaugmented images computes the backbone's features once (tl_core.features)."""

import math

import pytest
import torch

from tl_core import loop
from tl_core.checkpoint import LocalReporter, load_checkpoint
from tl_core.config import ModelConfig, from_dict
from tl_core.features import changes_in_training
from tl_core.models import apply_strategy, build_model, find_head
from tl_core.state import TrainingState


def config(root, augment: bool, epochs: int = 3, backbone: str = "resnet18"):
    return from_dict({"experiment": "probe", "data": {"root": str(root), "image_size": 16, "loader_workers": 0, "val_fraction": 0.25,
                                                       "augment": augment},
                      "model": {"backbone": backbone, "strategy": "linear_probe"}, "optim": {"name": "adam", "lr": 1e-2},
                      "train": {"epochs": epochs, "batch_size": 8}})


def images_through_the_backbone(monkeypatch) -> list[int]:
    """Every batch size that enters the backbone's first layer during `fit`."""
    seen: list[int] = []

    def counted(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.conv1.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
        return model

    monkeypatch.setattr(loop, "build_model", counted)
    return seen


@pytest.mark.parametrize("augment", [False, True])
def test_the_backbone_runs_once_per_image_without_augmentation_and_every_epoch_with_it(image_folder, tmp_path, monkeypatch, augment):
    seen = images_through_the_backbone(monkeypatch)
    reporter = LocalReporter(tmp_path / "run")
    history = loop.fit(config(image_folder, augment), reporter)
    assert sum(seen) == (27 + 9 if not augment else 3 * (27 + 9))  # 36 images: 27 to train, 9 to validate
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(math.isfinite(h["val/loss"]) for h in history)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    checkpoint = load_checkpoint(reporter.latest)
    assert checkpoint.train_state["global_step"] == 3 * math.ceil(27 / 8)  # as many steps as the image batches give


@pytest.mark.parametrize("backbone", ["resnet18", "timm:resnetv2_18"])
def test_the_features_are_the_backbones_a_cached_probe_scores_as_the_whole_model_does(image_folder, tmp_path, backbone):
    """The probe's last validation, on features computed once, equals scoring its checkpoint through the whole model
    (BiT's features enter its head as a 1x1 map, the input of the convolution the head replaced)."""
    cfg = config(image_folder, augment=False, backbone=backbone)
    reporter = LocalReporter(tmp_path / "run")
    last = loop.fit(cfg, reporter)[-1]
    data = loop.labelled_data(cfg)
    model = build_model(cfg.model, data.classes, 16)
    model.load_state_dict(load_checkpoint(reporter.latest).model_state)
    state = TrainingState.create(cfg, model, torch.device("cpu"), steps_per_epoch=1)
    scored = loop.evaluate(model, data.val, state, len(data.classes))
    assert scored["acc"] == last["val/acc"] and scored["loss"] == pytest.approx(last["val/loss"], rel=1e-5)


@pytest.mark.parametrize("backbone,changes", [("resnet18", False), ("mobilenet_v3_small", True), ("timm:ghostnet_100", True),
                                              ("timm:efficientnet_b0", False)])
def test_features_are_kept_only_where_training_mode_changes_nothing_before_the_head(backbone, changes):
    """ResNet's frozen BatchNorm is fixed; MobileNetV3 keeps a Dropout(0.2) before its last linear layer, and timm's
    GhostNet a functional dropout (drop_rate 0.2), so a probe of either must run the backbone each epoch."""
    cfg = ModelConfig(backbone=backbone, strategy="linear_probe")
    model = build_model(cfg, ["a", "b"], 32)
    apply_strategy(model, cfg, 0)
    assert changes_in_training(model, find_head(model)[1], freeze_bn_stats=False) is changes
