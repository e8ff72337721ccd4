"""The CUDA paths on one GPU: bf16 and channels_last training steps, the image loader against the GPU, DDP over NCCL.

Needs a machine with a GPU (CI has none). Every rate is measured in the same run as the baseline it is divided by:

- step: images/s of tl_core's training step (TrainingState.train_epoch: forward, backward, fused AdamW) on batches
  already on the GPU, per backbone at 224 px, in fp32 contiguous (the baseline), bf16 contiguous and bf16
  channels_last (what the product picks on CUDA: train.amp auto, memory_format_for); and a minimal hand-written
  step in the product's precision and layout, against which the core's overhead is a ratio.
- loader: images/s tl_core's image loader delivers to the GPU (JPEG decode, random resized crop, normalise, pinned
  copy) per number of loader workers, as a ratio to the GPU's step rate: below 1 the GPU waits for data.
- fit: tl_core.loop.fit end to end on that JPEG folder (train images/s per epoch, validation accuracy), then again
  as a DDP rank over NCCL. NCCL refuses two ranks on one GPU, so this is one rank with DDP forced on: it runs the
  NCCL communicator, DDP's gradient all-reduce and the metric all-reduces, not multi-GPU scaling.
- recipes: every recipe and strategy path once on that folder (RECIPE_RUNS: a linear probe on features computed
  once, LP-FT from the offline ImageNet EfficientNet-Lite0, gradual unfreezing of a ViT, SimCLR's views normalised
  on the GPU), each epoch's loss finite: train images/s and the last validation metric (SimCLR's beside its chance
  level, 1 in 2 x batch - 1).

cuDNN's autotuning (torch.backends.cudnn.benchmark) stays off, as tl_core leaves it: on an H200 it made LP-FT of
EfficientNet-Lite0 spend 25 s and 53 s searching algorithms in its first two epochs (the probe's, then the first
fine-tune's) and train no faster once done (1.5 s an epoch, 1.3-1.6 s without it).

    python -m bench.cuda_paths [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from bench.common import argument_parser, write_result
from tl_core import distributed
from tl_core.batches import move_to
from tl_core.config import from_dict
from tl_core.data import image_data, image_normalization, image_transforms, index_image_folder, loaders_for
from tl_core.loop import classification_step, fit
from tl_core.models import build_model, set_train_mode
from tl_core.state import TrainingState

SIZE = 224
DEVICE = "cuda"  # a smoke run of the logic on a CPU sets "cpu"
CLASSES = 5
#: (backbone, batch size): a ResNet, an EfficientNet (depthwise convolutions) and a ViT (no convolutions to re-lay)
BACKBONES = [("resnet50", 256), ("timm:tf_efficientnet_lite0", 256), ("timm:vit_small_patch16_224", 256)]


def run_config(root: str, backbone: str, batch_size: int, **overrides) -> object:
    raw = {"experiment": "cuda-paths", "data": {"root": root, "image_size": SIZE, "loader_workers": 0},
           "model": {"backbone": backbone}, "optim": {"name": "adamw", "lr": 1e-3, "scheduler": "cosine"},
           "train": {"batch_size": batch_size, "epochs": 3}, "checkpoint": {}, "scaling": {"num_workers": 1, "use_gpu": True}}
    for key, value in overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return from_dict(raw)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, the GPU drained before and after each."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_rates(backbone: str, batch: int, steps: int, repeats: int) -> dict:
    """Images/s of the core's step in each precision and layout, and of a minimal step in the product's."""
    device = torch.device(DEVICE)
    images = torch.randn(batch, 3, SIZE, SIZE, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    batches = [(images, labels)] * steps
    out = {}
    for name, amp, layout in (("fp32", "off", torch.contiguous_format), ("bf16", "bf16", torch.contiguous_format),
                              ("bf16_channels_last", "bf16", torch.channels_last), ("product", "auto", None)):
        torch.manual_seed(0)
        cfg = run_config("unused", backbone, batch, train__amp=amp)
        model = build_model(cfg.model, [str(i) for i in range(CLASSES)], SIZE)
        state = TrainingState.create(cfg, model, device, steps_per_epoch=steps)
        if layout is not None:
            state.memory_format = layout
            model.to(memory_format=layout)
        set_train_mode(model)
        step = classification_step(nn.CrossEntropyLoss())
        state.train_epoch(model, batches[:3], step)  # warm-up: cuDNN's algorithm search, the allocator
        out[name] = batch * steps / timed(partial(state.train_epoch, model, batches, step), repeats)
        if name == "product":
            out["product_amp"], out["product_layout"] = str(state.amp_dtype), str(state.memory_format)
            out["minimal"] = minimal_rate(model, state, images, labels, steps, repeats)
        del model, state
        torch.cuda.empty_cache()
    out["ratio_bf16_vs_fp32"] = out["bf16"] / out["fp32"]
    out["ratio_channels_last_vs_contiguous_bf16"] = out["bf16_channels_last"] / out["bf16"]
    out["ratio_core_vs_minimal"] = out["product"] / out["minimal"]
    return out


def minimal_rate(model: nn.Module, state: TrainingState, images, labels, steps: int, repeats: int) -> float:
    """A hand-written step in the same precision and layout, no per-step sync: the core's overhead baseline."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def run():
        for _ in range(steps):
            with torch.autocast(DEVICE, dtype=state.amp_dtype or torch.float32, enabled=state.amp_dtype is not None):
                loss = nn.functional.cross_entropy(model(images.contiguous(memory_format=state.memory_format)).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run()
    return len(labels) * steps / timed(run, repeats)


def _write_image(job: tuple[str, int, int]) -> None:
    """A 320 x 320 JPEG of class `label`: smooth noise tinted by the class, so that a model can learn the classes."""
    path, label, seed = job
    rng = np.random.default_rng(seed)
    coarse = rng.random((10, 10, 3))
    image = np.kron(coarse, np.ones((32, 32, 1))) * 0.6 + rng.random((320, 320, 3)) * 0.2
    image[..., label % 3] += 0.2 * (1 + label // 3)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)


def write_jpeg_folder(root: Path, per_class: int) -> Path:
    jobs = []
    for label in range(CLASSES):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        jobs += [(str(root / f"class{label}" / f"{i:05d}.jpg"), label, label * 100_000 + i) for i in range(per_class)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_image, jobs, chunksize=64)
    return root


def loader_rates(root: str, batch: int, workers: list[int], gpu_rate: float) -> list[dict]:
    """Images/s the image loader delivers to the GPU per number of loader workers (the second epoch: the first
    starts the persistent workers): the product's (uint8 batches normalised on the GPU) and, as the baseline,
    float32 batches normalised by the workers (the product's CPU path, and its GPU path before BatchesNormalizedOn)."""
    device = torch.device(DEVICE)
    rows = []
    for n in workers:
        cfg = run_config(root, "resnet50", batch, data__loader_workers=n)
        index = index_image_folder(cfg.data, seed=cfg.train.seed)
        in_workers = loaders_for(index, cfg.data, *image_transforms(cfg.data, image_normalization(cfg)), batch_size=batch,
                                 seed=0, pin_memory=True)
        rates = {"float32_in_workers": epoch_rate(in_workers, device), "uint8_to_gpu": epoch_rate(image_data(cfg, device=device), device)}
        rows.append({"loader_workers": n, **rates, "ratio_uint8_vs_float32": rates["uint8_to_gpu"] / rates["float32_in_workers"],
                     "ratio_vs_gpu_step": rates["uint8_to_gpu"] / gpu_rate})
    return rows


def epoch_rate(data, device: torch.device) -> float:
    """Images/s of `data`'s second training epoch, each batch on `device` in channels_last."""
    rate = 0.0
    for epoch in range(2):
        data.set_epoch(epoch, epoch)
        torch.cuda.synchronize()
        started = time.perf_counter()
        seen = 0
        for images, labels in data.train:
            images = move_to(images, device, torch.channels_last)
            seen += len(labels)
        torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - started)
    return rate


def fit_rates(root: str, batch: int, workers: int, epochs: int, backbone: str = "resnet50") -> dict:
    """tl_core.loop.fit on the JPEG folder: train images/s of the epochs after the first, the last val/acc."""
    cfg = run_config(root, backbone, batch, data__loader_workers=workers, train__epochs=epochs, train__val_every=epochs,
                     checkpoint__every=epochs)
    reports = []
    history = fit(cfg, lambda metrics, _: reports.append(metrics), checkpoints=False)
    n_train = len(index_image_folder(cfg.data, seed=cfg.train.seed).train)
    times = [h["epoch_time_s"] for h in history[1:-1]] or [history[-1]["epoch_time_s"]]
    return {"train_images": n_train, "images_per_s": n_train / statistics.median(times), "val_acc": history[-1]["val/acc"],
            "epochs": len(history), "reports": len(reports)}


def nccl_checks(root: str, batch: int, workers: int) -> dict:
    """One NCCL rank: a CPU tensor's raw all-reduce (refused, as on Ray Train's GPU workers), the core's
    all_reduce_sum of it, and fit with DDP forced on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29_500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    out = {"backend": dist.get_backend()}
    try:
        dist.all_reduce(torch.ones(2, dtype=torch.float64))
        out["raw_cpu_all_reduce"] = "accepted"
    except Exception as exc:  # what a CPU metric tensor met under NCCL before all_reduce_sum moved it
        out["raw_cpu_all_reduce"] = f"refused: {str(exc).splitlines()[0][:160]}"
    real = distributed.is_distributed
    distributed.is_distributed = lambda: True  # one rank, DDP and the collectives on anyway
    try:
        summed = distributed.all_reduce_sum(torch.tensor([3, 4], dtype=torch.int64))
        out["core_all_reduce_sum"] = summed.tolist()
        out["ddp_fit"] = fit_rates(root, batch, workers, epochs=3)
    finally:
        distributed.is_distributed = real
        dist.destroy_process_group()
    return out


#: (name, backbone, model overrides, pretrain section): the recipe and strategy paths a GPU run takes besides `fit`
RECIPE_RUNS = [
    ("linear_probe", "resnet50", {"strategy": "linear_probe"}, None),
    ("lp_ft, ImageNet weights", "timm:tf_efficientnet_lite0", {"strategy": "lp_ft", "lp_epochs": 1, "weights": "efficientnet_lite0_imagenet"}, None),
    ("gradual_unfreeze", "timm:vit_small_patch16_224", {"strategy": "gradual_unfreeze", "unfreeze_every": 1}, None),
    ("simclr", "resnet50", {}, {"method": "simclr"}),
]


def recipe_checks(root: str, batch: int, workers: int, epochs: int) -> list[dict]:
    """Each of RECIPE_RUNS for `epochs` epochs on the JPEG folder: train images/s after the first epoch, every
    epoch's train/loss finite, the last val/acc (SimCLR's: finding each view's partner)."""
    from tl_core.recipes import RECIPES

    rows = []
    for name, backbone, model, pretrain in RECIPE_RUNS:
        cfg = run_config(root, backbone, batch, data__loader_workers=workers, train__epochs=epochs, train__val_every=epochs,
                         checkpoint__every=epochs, **{f"model__{k}": v for k, v in model.items()},
                         **{f"pretrain__{k}": v for k, v in (pretrain or {}).items()})
        try:
            history = RECIPES[cfg.pretrain.method].fit(cfg, lambda metrics, _: None, checkpoints=False)
        except Exception as exc:  # recorded, and the other paths still measured
            rows.append({"run": name, "backbone": backbone, "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        n_images = len(RECIPES[cfg.pretrain.method].index(cfg.data, cfg.train.seed).train)
        times = [h["epoch_time_s"] for h in history[1:]] or [history[-1]["epoch_time_s"]]
        rows.append({"run": name, "backbone": backbone, "epochs": len(history), "images_per_s": n_images / statistics.median(times),
                     "epoch_times_s": [h["epoch_time_s"] for h in history],
                     "losses_finite": all(math.isfinite(h["train/loss"]) for h in history), "val_acc": history[-1]["val/acc"]})
        if cfg.pretrain.method == "simclr":  # finding a view's partner among the batch's other 2 x batch - 1 views
            rows[-1]["val_acc_chance"] = 1 / (2 * cfg.train.batch_size - 1)
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and images (a smoke run)")
    parser.add_argument("--out", help="also write the JSON here (a folder)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.cuda_paths needs a CUDA GPU; none is visible")
        return 2
    steps, repeats, per_class = (4, 2, 100) if args.quick else (12, 3, 600)
    result = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "image_size": SIZE,
              "cudnn_benchmark": torch.backends.cudnn.benchmark}

    started = time.perf_counter()
    result["step"] = {backbone: step_rates(backbone, batch, steps, repeats) for backbone, batch in BACKBONES}
    print(json.dumps(result["step"], indent=1), flush=True)
    gpu_rate = result["step"]["resnet50"]["product"]
    workers = sorted({0, 4, 8, max(os.cpu_count() - 2, 1)})
    with tempfile.TemporaryDirectory() as tmp:
        root = str(write_jpeg_folder(Path(tmp) / "jpegs", per_class))
        result["loader"] = {"backbone_step_rate": gpu_rate, "rows": loader_rates(root, 256, workers, gpu_rate)}
        print(json.dumps(result["loader"], indent=1), flush=True)
        best_workers = max(result["loader"]["rows"], key=lambda row: row["uint8_to_gpu"])["loader_workers"]
        result["fit"] = {"loader_workers": best_workers, **fit_rates(root, 256, best_workers, epochs=4 if not args.quick else 3)}
        result["fit"]["ratio_vs_gpu_step"] = result["fit"]["images_per_s"] / gpu_rate
        result["nccl"] = nccl_checks(root, 256, best_workers)
        result["recipes"] = recipe_checks(root, 128, best_workers, epochs=3)
    result["wall_s"] = time.perf_counter() - started
    path = write_result("cuda_paths", result)
    table = path.with_suffix(".md")
    table.write_text(markdown(result))
    if args.out:
        for written in (path, table):
            Path(args.out, written.name).write_text(written.read_text())
    return 0


def markdown(result: dict) -> str:
    """The measurements as the tables bench/results/cuda_paths.md keeps."""
    autotuning = {True: ", cuDNN autotuning on", False: ", cuDNN autotuning off (as in the product)"}.get(result.get("cudnn_benchmark"), "")
    lines = [f"# CUDA paths on one {result['gpu']} (CUDA {result['cuda']}), {result['image_size']} px, batch 256{autotuning}",
             "", "Training step, images/s (batches already on the GPU):", "",
             "| backbone | fp32 | bf16 | bf16 + channels_last | product (auto) | product / minimal loop |", "|---|---|---|---|---|---|"]
    for backbone, row in result["step"].items():
        lines.append(f"| {backbone} | {row['fp32']:.0f} | {row['bf16']:.0f} | {row['bf16_channels_last']:.0f} | "
                     f"{row['product']:.0f} ({row['product_amp'].removeprefix('torch.')}, {row['product_layout'].removeprefix('torch.')}) "
                     f"| {row['ratio_core_vs_minimal']:.2f} |")
    loader = result["loader"]
    lines += ["", f"Image loader to the GPU (320 px JPEGs, random resized crop), images/s; the GPU's ResNet-50 step takes "
              f"{loader['backbone_step_rate']:.0f}:", "",
              "| loader workers | float32 normalised in the workers | uint8, normalised on the GPU (product) | ratio | product / GPU step |",
              "|---|---|---|---|---|"]
    for row in loader["rows"]:
        lines.append(f"| {row['loader_workers']} | {row['float32_in_workers']:.0f} | {row['uint8_to_gpu']:.0f} | "
                     f"{row['ratio_uint8_vs_float32']:.2f} | {row['ratio_vs_gpu_step']:.2f} |")
    fitted, nccl = result["fit"], result["nccl"]
    lines += ["", f"tl_core.loop.fit, ResNet-50, {fitted['loader_workers']} loader workers: {fitted['images_per_s']:.0f} train "
              f"images/s ({fitted['ratio_vs_gpu_step']:.2f} of the GPU step), val/acc {fitted['val_acc']:.3f}.", "",
              f"DDP over {nccl['backend']}, one rank: a raw all-reduce of a CPU tensor {nccl['raw_cpu_all_reduce']}; "
              f"tl_core's all_reduce_sum gave {nccl['core_all_reduce_sum']}; fit under DDP {nccl['ddp_fit']['images_per_s']:.0f} "
              f"train images/s, val/acc {nccl['ddp_fit']['val_acc']:.3f}.", ""]
    lines += ["Every recipe path, 3 epochs at batch 128 on the same folder (product precision and layout):", "",
              "| run | backbone | train images/s | every loss finite | last val/acc |", "|---|---|---|---|---|"]
    for row in result.get("recipes", []):
        if "error" in row:
            lines.append(f"| {row['run']} | {row['backbone']} | **failed**: {row['error']} | | |")
            continue
        chance = f" (chance {row['val_acc_chance']:.3f})" if "val_acc_chance" in row else ""
        lines.append(f"| {row['run']} | {row['backbone']} | {row['images_per_s']:.0f} | {'yes' if row['losses_finite'] else '**no**'} | "
                     f"{row['val_acc']:.3f}{chance} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
