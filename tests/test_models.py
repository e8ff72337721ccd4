import collections
import logging
import os

import pytest
import torch
import torchvision
from torch import nn

from tl_core.config import ModelConfig
from tl_core.errors import ConfigError
from tl_core.models import (
    BACKBONES,
    ClassifierHead,
    apply_strategy,
    backbone_blocks,
    build_model,
    find_head,
    normalization,
    set_train_mode,
)

CLASSES = ["a", "b", "c"]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_with_a_new_head(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=name, dropout=0.1), CLASSES, image_size=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    head_name, head = find_head(model)
    assert isinstance(head, ClassifierHead) and head.dropout.p == 0.1
    blocks = backbone_blocks(model)
    ids = [id(p) for block in blocks for p in block]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(head_name + ".")]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in backbone}  # each backbone parameter once
    assert len(blocks) >= 3
    assert len(normalization(name)[0]) == 3


def test_issue_backbones_are_registered():
    assert {"resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"} <= set(BACKBONES)


def test_vit_needs_a_patch_multiple():
    with pytest.raises(ConfigError, match="data.image_size: vision transformers need a multiple of 16"):
        build_model(ModelConfig(backbone="vit_b_16"), CLASSES, image_size=40)


@pytest.mark.parametrize(("backbone", "patch"), [("timm:vit_tiny_patch16_224", 16), ("timm:eva02_tiny_patch14_224", 14)])
def test_a_timm_transformer_needs_a_multiple_of_its_patch(backbone, patch):
    """timm builds a ViT for 30 px, but its 16 px patches see the first 16 rows and columns only: refused."""
    with pytest.raises(ConfigError, match=f"data.image_size: {backbone} cuts images into {patch} px patches; use a multiple of {patch} "
                                          r"\(got 30\)"):
        build_model(ModelConfig(backbone=backbone), CLASSES, image_size=30)
    assert build_model(ModelConfig(backbone=backbone), CLASSES, image_size=2 * patch) is not None


def test_overlapping_patches_are_judged_by_where_their_last_window_ends():
    """PVT-v2 cuts 7 px patches every 4 px, padded by 3: every size is seen whole (64 px was refused as "not a
    multiple of 7"). Unpadded overlapping windows (16 px every 8) leave a remainder unseen at 70 px, not at 64 or 72."""
    from tl_core.models import _check_patches_see_everything

    assert build_model(ModelConfig(backbone="timm:pvt_v2_b0"), CLASSES, image_size=64)(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    embed = nn.Module()
    embed.patch_size, embed.proj = (16, 16), nn.Conv2d(3, 8, kernel_size=16, stride=8)
    for size in (64, 72):
        _check_patches_see_everything("timm:x", embed, size)
    with pytest.raises(ConfigError, match=r"^data.image_size: timm:x's 16 px patches every 8 px leave the last 6 px of 70 "
                                          r"unseen; use 64 or 72$"):
        _check_patches_see_everything("timm:x", embed, 70)


@pytest.mark.parametrize("method", ["xavier", "kaiming"])
def test_head_init(method):
    torch.manual_seed(0)
    head = find_head(build_model(ModelConfig(head_init=method), ["x"] * 100, image_size=32))[1]
    assert torch.count_nonzero(head.linear.bias) == 0
    fan_in, fan_out = 512, 100
    expected_std = (2 / (fan_in + fan_out)) ** 0.5 if method == "xavier" else (2 / fan_in) ** 0.5
    assert head.linear.weight.std().item() == pytest.approx(expected_std, rel=0.1)


def save_source(tmp_path, num_classes: int, backbone=torchvision.models.resnet18, name="source.pt"):
    torch.manual_seed(1)
    source = backbone(num_classes=num_classes)
    path = tmp_path / name
    torch.save(source.state_dict(), path)
    return path, source


def test_source_with_another_head_loads_backbone_and_reinitialises_head(tmp_path, caplog):
    path, source = save_source(tmp_path, num_classes=10)
    caplog.set_level(logging.INFO, logger="tl_core")
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights=str(path)), CLASSES, image_size=32)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, source.bn1.running_var)
    assert model.fc.linear.weight.shape == (3, 512)
    assert "head re-initialised (skipped fc.linear.weight (10, 512), fc.linear.bias (10,))" in caplog.text


def test_source_with_the_same_head_keeps_it(tmp_path):
    path, source = save_source(tmp_path, num_classes=3)
    model = build_model(ModelConfig(weights=str(path)), CLASSES, image_size=32)
    assert torch.equal(model.fc.linear.weight, source.fc.weight)


@pytest.mark.parametrize("wrap", ["lightning", "simclr_encoder", "ddp"])
def test_a_model_nested_in_a_training_checkpoint_is_found(wrap, tmp_path):
    """A Lightning checkpoint (the module's `model.` attribute under `state_dict`, beside the epoch), a SimCLR
    encoder saved beside its projector, and a DDP `module.` prefix: the backbone is the part under one prefix."""
    path, source = save_source(tmp_path, num_classes=3)
    state = source.state_dict()
    if wrap == "lightning":
        saved = {"epoch": 7, "global_step": 70, "state_dict": {f"model.{k}": v for k, v in state.items()}}
    elif wrap == "simclr_encoder":
        saved = {**{f"online.encoder.{k}": v for k, v in state.items() if not k.startswith("fc.")},
                 "online.projector.0.weight": torch.zeros(64, 512), "online.projector.0.bias": torch.zeros(64)}
    else:
        saved = {f"module.{k}": v for k, v in state.items()}
    torch.save(saved, path)
    model = build_model(ModelConfig(weights=str(path)), CLASSES, image_size=32)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.fc.linear.weight, source.fc.weight) == (wrap != "simclr_encoder")


def test_other_shape_mismatch_names_the_key(tmp_path):
    path, source = save_source(tmp_path, num_classes=3)
    state = source.state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(7, 64, 3, 3)
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"layer2.0.conv1.weight has shape \(7, 64, 3, 3\), model expects \(128, 64, 3, 3\)"):
        build_model(ModelConfig(weights=str(path)), CLASSES, image_size=32)


def test_weights_of_another_backbone_are_rejected(tmp_path):
    path, _ = save_source(tmp_path, num_classes=3, backbone=torchvision.models.resnet50)
    with pytest.raises(ConfigError, match=f"model.weights: {path} does not match the backbone"):
        build_model(ModelConfig(backbone="resnet18", weights=str(path)), CLASSES, image_size=32)


def test_a_checkpoint_of_ours_for_another_backbone_names_the_one_it_was_trained_as(tmp_path):
    from tl_core.checkpoint import save_checkpoint

    source = torchvision.models.resnet18(num_classes=3)
    run = tmp_path / "checkpoint_epoch_0001"
    save_checkpoint(run, source.state_dict(), {"epoch": 1},
                    {"config": {"model": {"backbone": "resnet18"}}, "classes": ["a", "b", "c"], "epoch": 1})
    with pytest.raises(ConfigError, match=f"model.weights: {run} does not match the backbone: .*; it was trained as "
                                          "model.backbone resnet18, this run's is resnet34$"):
        build_model(ModelConfig(backbone="resnet34", weights=str(run)), CLASSES, image_size=32)


def test_a_checkpoint_of_ours_that_fits_another_backbone_names_the_one_it_was_trained_as(tmp_path, caplog):
    """TF-ported EfficientNet-Lite0 weights fit timm's efficientnet_lite0 key for key, and loaded in silence, though
    that model pads otherwise and normalises with ImageNet's statistics, not mean = std = 0.5: the run trained on
    inputs its source never saw. It is named, with the difference in normalisation where there is one."""
    import timm

    from tl_core.checkpoint import save_checkpoint

    def load(trained: str, model: nn.Module, backbone: str) -> str:
        run = tmp_path / trained.replace(":", "_") / "checkpoint_epoch_0001"
        save_checkpoint(run, model.state_dict(), {"epoch": 1}, {"config": {"model": {"backbone": trained}}, "classes": CLASSES, "epoch": 1})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tl_core"):
            build_model(ModelConfig(backbone=backbone, weights=str(run)), CLASSES, image_size=32)
        assert f"weights: {run} was trained as model.backbone {trained}, and this run's is {backbone}: its weights fit" in caplog.text
        return caplog.text

    logged = load("timm:tf_efficientnet_lite0", timm.create_model("tf_efficientnet_lite0", num_classes=3), "timm:efficientnet_lite0")
    assert ("but it normalises images with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), and the source saw them "
            "with mean (0.5, 0.5, 0.5) and std (0.5, 0.5, 0.5): use model.backbone timm:tf_efficientnet_lite0") in logged
    logged = load("resnet18", torchvision.models.resnet18(num_classes=3), "timm:resnet18")  # ImageNet's statistics both
    assert "normalises" not in logged


def test_weights_that_are_not_a_state_dict(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="is not a PyTorch state dict"):
        build_model(ModelConfig(weights=str(bad)), CLASSES, image_size=32)
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.pt")), CLASSES, image_size=32)
    torch.save({0: torch.zeros(1)}, tmp_path / "numbered.pt")  # was an AttributeError traceback
    with pytest.raises(ConfigError, match="numbered.pt is not a PyTorch state dict of tensors"):
        build_model(ModelConfig(weights=str(tmp_path / "numbered.pt")), CLASSES, image_size=32)
    os.mkfifo(tmp_path / "fifo.pt")  # torch.load would wait for a writer forever
    with pytest.raises(ConfigError, match="fifo.pt is neither a file nor a directory"):
        build_model(ModelConfig(weights=str(tmp_path / "fifo.pt")), CLASSES, image_size=32)
    objects = tmp_path / "objects.pt"  # a training checkpoint with a pickled object beside the weights, never loaded
    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "hyper_parameters": collections.OrderedDict(
        lr=0.1), "callbacks": logging.Formatter()}, objects)
    with pytest.raises(ConfigError, match=r"holds a pickled logging.Formatter, and weights never load objects"):
        build_model(ModelConfig(weights=str(objects)), CLASSES, image_size=32)


def test_the_core_reads_torchvision_weights_from_the_local_hub_cache_only(tmp_path, monkeypatch):
    """The core never downloads (the jobs do, once, on the driver)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="ResNet18_Weights.IMAGENET1K_V1 for resnet18 is not in the local torch hub cache"):
        build_model(ModelConfig(weights="ResNet18_Weights.IMAGENET1K_V1"), CLASSES, image_size=32)
    with pytest.raises(ConfigError, match="are not weights for resnet18"):
        build_model(ModelConfig(weights="ResNet50_Weights.IMAGENET1K_V2"), CLASSES, image_size=32)
    # A file placed where torch.hub would have downloaded it is loaded, with the 1000-class head replaced.
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    _, source = save_source(cache, num_classes=1000, name=url.rsplit("/", 1)[1])
    for name in ("IMAGENET1K_V1", "imagenet"):
        model = build_model(ModelConfig(weights=name), CLASSES, image_size=32)
        assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.linear.out_features == 3


def backbone_bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n and not n.startswith("fc.")}


def test_linear_probe_freezes_backbone_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(strategy="linear_probe")
    model = build_model(cfg, CLASSES, image_size=32)
    apply_strategy(model, cfg, epoch=0)
    before = backbone_bn_stats(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        set_train_mode(model)
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32) * 3 + 1), torch.randint(0, 3, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = backbone_bn_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    assert changed == {"fc.linear.weight", "fc.linear.bias"}


def test_full_training_does_move_batchnorm_statistics():
    model = build_model(ModelConfig(strategy="full"), CLASSES, image_size=32)
    apply_strategy(model, ModelConfig(strategy="full"), epoch=0)
    before = backbone_bn_stats(model)
    set_train_mode(model)
    model(torch.randn(4, 3, 32, 32) + 2)
    assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean)


def test_freeze_bn_stats_keeps_every_batchnorm_in_eval_mode():
    model = build_model(ModelConfig(freeze_bn_stats=True), CLASSES, image_size=32)
    set_train_mode(model, freeze_bn_stats=True)
    before = backbone_bn_stats(model)
    model(torch.randn(4, 3, 32, 32) + 2)
    assert all(torch.equal(before[k], v) for k, v in backbone_bn_stats(model).items())
    assert model.training and model.fc.training


@pytest.mark.parametrize(("backbone", "stages"), [
    ("timm:mobilenetv3_small_050", ["conv_stem bn1"] + [f"blocks.{i}" for i in range(6)] + ["conv_head"]),
    ("timm:vgg11", [f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18)] + ["pre_logits"]),
    ("timm:convnext_atto", ["stem"] + [f"stages.{i}" for i in range(4)] + ["head.norm"]),
])
def test_a_timm_model_unfreezes_by_its_own_stages(backbone, stages):
    """timm's own grouping of the model (its `group_matcher`), not a guess from module sizes: MobileNetV3's six stages
    one by one (a size rule saw them as one block, smaller than its last convolution), each of VGG's convolutions."""
    model = build_model(ModelConfig(backbone=backbone), CLASSES, image_size=64)
    names = {id(p): n for n, p in model.named_parameters()}
    prefixes = [prefix for stage in stages for prefix in stage.split()]

    def prefix_of(p: torch.nn.Parameter) -> str:
        return next((prefix for prefix in prefixes if names[id(p)].startswith(prefix + ".")), names[id(p)])

    assert [" ".join(dict.fromkeys(map(prefix_of, block))) for block in backbone_blocks(model)] == stages


def test_gradual_unfreeze_opens_one_block_per_stage_from_the_top():
    cfg = ModelConfig(strategy="gradual_unfreeze", unfreeze_every=2)
    model = build_model(cfg, CLASSES, image_size=32)
    blocks = backbone_blocks(model)
    trainable = lambda: [all(p.requires_grad for p in b) for b in blocks]  # noqa: E731
    assert apply_strategy(model, cfg, epoch=1) == 0 and not any(trainable())
    assert all(p.requires_grad for p in model.fc.parameters())
    assert apply_strategy(model, cfg, epoch=2) == 1 and trainable() == [False] * (len(blocks) - 1) + [True]
    assert apply_strategy(model, cfg, epoch=5) == 2 and trainable()[-2:] == [True, True]
    assert apply_strategy(model, cfg, epoch=100) == len(blocks) and all(trainable())
