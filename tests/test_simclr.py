"""SimCLR: the NT-Xent loss (against a direct computation, aligned against shuffled views, 2 ranks against
1), unlabelled data, and a short pretraining whose backbone a linear probe prefers to a random one."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_image_folder

from tl_core.checkpoint import LocalReporter, load_checkpoint
from tl_core.config import DataConfig, from_dict
from tl_core.data import index_unlabelled
from tl_core.errors import DataError
from tl_core.simclr import nt_xent


def direct_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The loss of the SimCLR paper written out: for each of the 2N views, -log of its positive's share of
    exp(similarity / t) over the 2N - 1 other views, averaged."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / others)
    return total / (2 * n)


def test_nt_xent_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5, 1.0):
        loss, _ = nt_xent(z1, z2, t)
        assert loss.item() == pytest.approx(direct_nt_xent(z1, z2, t), rel=1e-5)


def test_aligned_views_score_lower_than_shuffled_ones():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(16, 8, generator=g)
    z2 = z1 + 0.05 * torch.randn(16, 8, generator=g)  # each image's second view close to its first
    aligned, aligned_acc = nt_xent(z1, z2, 0.5)
    shuffled, shuffled_acc = nt_xent(z1, z2[torch.randperm(16, generator=g)], 0.5)
    assert aligned < shuffled - 1.0
    assert aligned_acc == 1.0 and shuffled_acc < 0.5


def _rank(rank, world_size, init_file, z1, z2, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    n = len(z1) // world_size
    local1 = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    local2 = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss, acc = nt_xent(local1, local2, 0.3)
    loss.backward()
    out[rank] = (loss.item(), acc.item(), local1.grad.clone(), local2.grad.clone())
    dist.destroy_process_group()


def test_two_ranks_gathered_loss_equals_one_rank_on_the_whole_batch(tmp_path):
    """Each rank's anchors meet every view of the global batch: the mean of the 2 ranks' losses is the 1-rank
    loss of the concatenated batch, and each rank's gradient reaches its own embeddings."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    whole, whole_acc = nt_xent(z1, z2, 0.3)
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, tmp_path / "init", z1, z2, out), nprocs=2, join=True)
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(whole.item(), rel=1e-5)
    assert (out[0][1] + out[1][1]) / 2 == pytest.approx(whole_acc.item())
    assert all(out[r][2].abs().sum() > 0 and out[r][3].abs().sum() > 0 for r in (0, 1))


def test_batch_norm_synced_across_gpus_keeps_the_activations_timm_fuses_into_it():
    """SimCLR on several GPUs syncs BatchNorm; torch's converter made EfficientNet-Lite0's BatchNormAct2d layers plain
    SyncBatchNorm, which never calls the ReLU6 they hold: the network lost its activations (sync_batch_norm keeps them).
    Outside training a synced layer computes as a plain one, so the converted model must compute as the original."""
    from tl_core.config import ModelConfig, PretrainConfig
    from tl_core.distributed import sync_batch_norm
    from tl_core.simclr import build_simclr_model

    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone="timm:tf_efficientnet_lite0"), PretrainConfig(), 64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        synced = sync_batch_norm(model)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        assert torch.allclose(synced(images), expected, atol=1e-5)


def test_unlabelled_data_is_a_flat_folder_or_class_folders_whose_labels_are_ignored(tmp_path):
    classed = make_image_folder(tmp_path / "classed", n_classes=2, per_class=6)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(classed.rglob("*.png"))):
        (flat / f"{i:03d}.png").write_bytes(path.read_bytes())
    (flat / "notes.txt").write_text("not an image")
    for root in (classed, flat):
        index = index_unlabelled(DataConfig(root=str(root), val_fraction=0.25), seed=0)
        assert len(index.train) + len(index.val) == 12 and len(index.val) == 3
        assert index.classes == [] and {label for _, label in index.train} == {0}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.root: found 0 readable image"):
        index_unlabelled(DataConfig(root=str(tmp_path / "empty")), seed=0)


def test_unlabelled_data_split_into_train_and_val_is_read_as_a_labelled_run_reads_it(tmp_path):
    """SimCLR read every image under the root, a test/ split too, and re-split train/ and val/ at random, while the run
    warned that it did not read test/ (and on S3 the node's copy left test/ out). Now: train/ trains, val/ validates,
    nothing beside them is read; without val/, a random share of train/ validates."""
    root = make_image_folder(tmp_path / "data", n_classes=2, per_class=8, layout="split")  # 12 train, 4 val
    make_image_folder(root / "test", n_classes=2, per_class=4, seed=1)
    index = index_unlabelled(DataConfig(root=str(root), val_fraction=0.25), seed=0)
    assert sorted(Path(p).parent.parent.name for p, _ in index.train) == ["train"] * 12
    assert sorted(Path(p).parent.parent.name for p, _ in index.val) == ["val"] * 4
    for path in sorted((root / "val").rglob("*.png"))[1:]:
        path.unlink()
    with pytest.raises(DataError, match=rf"data.root: {root}/val/ has 1 readable image\(s\) \(repeats of earlier ones not "
                                        r"counted\); need at least 2"):  # a view's partner is found among the others
        index_unlabelled(DataConfig(root=str(root)), seed=0)
    shutil.rmtree(root / "val")
    index = index_unlabelled(DataConfig(root=str(root), val_fraction=0.25), seed=0)
    assert len(index.train) == 9 and len(index.val) == 3
    assert {Path(p).parent.parent.name for p, _ in index.train + index.val} == {"train"}
    for path in sorted((root / "train").rglob("*.png"))[1:]:
        path.unlink()
    with pytest.raises(DataError, match=r"data.root: found 1 readable image"):
        index_unlabelled(DataConfig(root=str(root)), seed=0)


def make_textures(root, per_class=24, size=16, seed=0):
    """3 classes, each one smooth random texture, seen through what a camera varies: a shift of up to 3 px,
    per-channel gain and offset, sensor noise. The colour differences swamp the texture in random features."""
    import numpy as np
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    textures = [gaussian_filter(rng.normal(0, 1, (size, size)), 1.0) for _ in range(3)]
    textures = [(t - t.min()) / (t.max() - t.min()) for t in textures]
    for c, texture in enumerate(textures):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shifted = np.roll(texture, shift=(rng.integers(-3, 4), rng.integers(-3, 4)), axis=(0, 1))
            gain, offset = rng.uniform(0.2, 1.0, size=3), rng.uniform(0, 0.5, size=3)
            img = (shifted[..., None] * gain + offset) * 200 + rng.normal(0, 10, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_a_short_simclr_pretrain_gives_a_better_linear_probe_than_random_weights(tmp_path):
    from tl_core.loop import fit
    from tl_core.simclr import fit_simclr

    data = make_textures(tmp_path / "textures")
    base = {"experiment": "simclr", "data": {"root": str(data), "image_size": 16, "loader_workers": 0, "val_fraction": 0.25},
            "model": {"backbone": "resnet18"}, "optim": {"name": "adam", "lr": 1e-3, "scheduler": "cosine", "weight_decay": 1e-6},
            "train": {"epochs": 40, "batch_size": 16},
            "pretrain": {"method": "simclr", "temperature": 0.2, "crop_scale": [0.6, 1.0], "projection_dim": 32, "projection_hidden": 128}}
    reporter = LocalReporter(tmp_path / "simclr", keep=1)
    history = fit_simclr(from_dict(base), reporter)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert not any(k.startswith("projection") for k in load_checkpoint(reporter.latest).model_state)

    def probe(weights):
        supervised = {k: v for k, v in base.items() if k != "pretrain"}  # the probe is a supervised run
        cfg = from_dict({**supervised, "model": {"backbone": "resnet18", "strategy": "linear_probe", "weights": weights},
                         "optim": {"name": "adam", "lr": 1e-2, "scheduler": "constant"}, "train": {"epochs": 15, "batch_size": 16}})
        return fit(cfg, lambda metrics, checkpoint_dir: None, checkpoints=False)[-1]["val/acc"]

    random_init, pretrained = probe(None), probe(str(reporter.latest))
    assert pretrained > random_init + 0.1, (pretrained, random_init)


def _simclr_config(root, **train):
    return from_dict({"experiment": "simclr", "data": {"root": str(root), "image_size": 16, "loader_workers": 0, "val_fraction": 0.25},
                      "model": {"backbone": "resnet18"}, "optim": {"name": "sgd", "lr": 0.05, "scheduler": "cosine", "warmup_epochs": 1},
                      "train": {"epochs": 4, "batch_size": 8, **train}, "pretrain": {"method": "simclr", "projection_dim": 16, "projection_hidden": 32}})


class _Interrupted(Exception):
    pass


def test_an_interrupted_and_resumed_simclr_pretrain_equals_an_unbroken_one(tmp_path):
    """Stop after 2 of 4 epochs, resume from the checkpoint: the same LR, losses, backbone, projection head and
    optimizer state as a run that never stopped (the projection travels in train_state.pt)."""
    from tl_core.simclr import fit_simclr

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=12, size=16)
    cfg = _simclr_config(data, grad_accum=2)
    full = LocalReporter(tmp_path / "full")
    unbroken = fit_simclr(cfg, full)

    first = LocalReporter(tmp_path / "first")

    def stop_after_two(metrics, checkpoint_dir):
        first(metrics, checkpoint_dir)
        if metrics["epoch"] == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        fit_simclr(cfg, stop_after_two)
    second = LocalReporter(tmp_path / "second")
    resumed = fit_simclr(cfg, second, resume_from=first.checkpoints[1])

    assert [h["epoch"] for h in resumed] == [3, 4]
    assert [h["lr"] for h in resumed] == pytest.approx([h["lr"] for h in unbroken[2:]])
    assert [h["train/loss"] for h in resumed] == pytest.approx([h["train/loss"] for h in unbroken[2:]], rel=1e-4)
    a, b = load_checkpoint(full.latest), load_checkpoint(second.latest)
    assert all(torch.allclose(a.model_state[k].float(), b.model_state[k].float(), atol=1e-5) for k in a.model_state)
    assert all(torch.allclose(a.train_state["projection"][k].float(), b.train_state["projection"][k].float(), atol=1e-5)
               for k in a.train_state["projection"])
    assert a.train_state["global_step"] == b.train_state["global_step"] == 4  # 18 images in 2 full batches of 8, accumulated by 2: one step an epoch
    assert not any(k.startswith("projection") for k in a.model_state)  # model.pt holds the backbone only


@pytest.mark.parametrize("key,value", [("train.label_smoothing", 0.1), ("train.class_weights", "balanced"), ("model.strategy", "linear_probe"),
                                       ("model.dropout", 0.2), ("model.head_init", "xavier")])
def test_a_key_simclr_does_not_use_is_refused_not_ignored(tmp_path, key, value):
    from tl_core.config import with_overrides
    from tl_core.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key}: not used by pretrain.method: simclr"):
        with_overrides(_simclr_config(tmp_path), [f"{key}={value}"])


def test_simclr_early_stopping_and_l1_are_used(tmp_path):
    from tl_core.simclr import fit_simclr

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=12, size=16)
    stopping = {"metric": "val/loss", "mode": "min", "patience": 1, "min_delta": 100.0}
    history = fit_simclr(from_dict({**_simclr_config(data).to_dict(), "train": {"epochs": 6, "batch_size": 8, "early_stopping": stopping},
                                    "optim": {"name": "sgd", "lr": 0.05, "l1": 1e-4}}), lambda metrics, checkpoint_dir: None)
    assert len(history) == 2  # no improvement of 100 nats: stopped after the patience of one epoch
