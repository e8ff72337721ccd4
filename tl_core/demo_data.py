"""The demo's real data, with nothing downloaded: scikit-learn's bundled UCI handwritten digits
(1,797 8x8 greyscale images), written out as ImageFolders so the demo reads them like a user's data.

Source task: digits 0-4, every image. Target task: digits 5-9 with a few labels per class in train/
and every other image of those digits in val/.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: str | Path, *, labels_per_class: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """Write ROOT/source/<digit>/ and ROOT/target/{train,val}/<digit>/; returns (source, target)."""
    digits, by_digit = load_digits_by_class()
    root = Path(root)
    source, target = root / "source", root / f"target-{labels_per_class}shot-seed{seed}"
    rng = random.Random(seed)
    for digit, indices in sorted(by_digit.items()):
        if digit < 5:
            placements = [(source / str(digit), i) for i in indices]
        else:
            shuffled = indices[:]
            rng.shuffle(shuffled)
            placements = [(target / ("train" if k < labels_per_class else "val") / str(digit), i)
                          for k, i in enumerate(shuffled)]
        for folder, i in placements:
            save_digit(digits, i, folder)
    return source, target


def load_digits_by_class():
    """scikit-learn's bundled digits (no download) and, per digit, the indices of its images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_digit: dict[int, list[int]] = {}
    for i, label in enumerate(digits.target):
        by_digit.setdefault(int(label), []).append(i)
    return digits, by_digit


def save_digit(digits, i: int, folder: Path) -> None:
    """Image `i` as FOLDER/<i>.png (8-bit greyscale), unless it is already there."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{i:04d}.png"
    if not path.exists():
        Image.fromarray((digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8), mode="L").save(path)
