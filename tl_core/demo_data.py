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
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    root = Path(root)
    source, target = root / "source", root / f"target-{labels_per_class}shot-seed{seed}"
    rng = random.Random(seed)
    by_digit: dict[int, list[int]] = {}
    for i, label in enumerate(digits.target):
        by_digit.setdefault(int(label), []).append(i)
    for digit, indices in sorted(by_digit.items()):
        if digit < 5:
            placements = [(source / str(digit), i) for i in indices]
        else:
            shuffled = indices[:]
            rng.shuffle(shuffled)
            placements = [(target / ("train" if k < labels_per_class else "val") / str(digit), i)
                          for k, i in enumerate(shuffled)]
        for folder, i in placements:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:04d}.png"
            if not path.exists():
                pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(path)
    return source, target
