"""Tiny, learnable image datasets made on the spot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

COLORS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 200)]


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 12, size: int = 16, seed: int = 0,
                      layout: str = "flat") -> Path:
    """Class i is an image tinted COLORS[i] with a bright bar at a class-specific row, plus noise.

    layout "flat": ROOT/class_x/*.png; "split": ROOT/train/class_x and ROOT/val/class_x (a quarter each).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(n_classes):
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3)).astype(np.int16)
            img += np.array(COLORS[c % len(COLORS)], dtype=np.int16) // 2
            row = (c * size) // n_classes
            img[row:row + max(1, size // 8), :, :] = 255
            split = ("val" if i % 4 == 0 else "train") if layout == "split" else None
            folder = root / split / f"class_{c}" if split else root / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def write_config(tmp_path, data_root, name="run.yaml", **sections) -> Path:
    cfg = {
        "experiment": "tiny",
        "data": {"root": str(data_root), "image_size": 16, "loader_workers": 0, "val_fraction": 0.25},
        "model": {"backbone": "resnet18"},
        "optim": {"name": "adam", "lr": 1e-3, "scheduler": "constant"},
        "train": {"epochs": 2, "batch_size": 8},
        "scaling": {"num_workers": 2},
        "checkpoint": {"keep": 2, "metric": "val/acc", "mode": "max"},
        "storage": {"root": str(tmp_path / "runs")},
    }
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path
