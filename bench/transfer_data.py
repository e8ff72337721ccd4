"""The transfer study's targets, written with the splits that keep the study fair.

Each target class has `val` reported validation samples (fixed, never seen while tuning), `tune` tuning-validation
samples (what the ASHA sweeps score), and a pool of at least POOL_PER_CLASS training samples from which each seed
draws its 1, 3, 10 or 50 labels (`SPLITS`). Image targets are written as ImageFolders, the text one as CSV tables.

- `digits`: scikit-learn's bundled UCI digits 5-9 (8x8 greyscale scans; no download). The source models are
  pretrained on digits 0-4, so this is near transfer, and a strong scratch baseline: the task is easy.
- `shapes`: generated photographs-in-miniature: one of five objects (disc, square, triangle, star, cross) filled with
  a random texture (stripes at any angle, checks, dots, noise) in random colours, at a random size, rotation and
  place, on a cluttered background of textured blobs and line segments in other colours. Colour and texture carry no
  label; only the outline does, under clutter. This is far transfer from digits, and the kind of task where features
  learnt on natural images (edges, textures, figure/ground) should matter.
- `docstrings` (text): the docstrings of eight standard-library packages, labelled by package, each package's own
  name masked (tl_core.demo_text, the text demo's data). Topic classification where knowing what "a MIME part" or
  "an event loop" is about should matter; urllib's 94 distinct docstrings bound the split sizes.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tl_core.demo_text import PACKAGES

POOL_PER_CLASS = 50
SHAPES = ("disc", "square", "triangle", "star", "cross")


@dataclass(frozen=True)
class Split:
    val: int  # reported validation samples per class
    tune: int  # tuning-validation samples per class
    classes: int


SPLITS = {"digits": Split(100, 24, 5), "shapes": Split(100, 24, len(SHAPES)), "docstrings": Split(30, 12, len(PACKAGES))}
TEXT_TARGETS = ("docstrings",)
SHAPE_SIZE = 64  # rendered at 2x and downsampled (anti-aliased)


def write_target(root: Path, target: str) -> dict[str, list]:
    """Every sample of `target`, once; returns class -> its samples in a fixed order [val..., tune..., pool...]: image
    paths under ROOT/all/<class>/, or texts."""
    if target in TEXT_TARGETS:
        return _docstrings(SPLITS[target])
    images = _digits(SPLITS[target]) if target == "digits" else _shapes(SPLITS[target])
    split = {}
    for label, items in images.items():
        folder = root / "all" / label
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(items):
            path = folder / f"{i:04d}.png"
            if not path.exists():
                image.save(path)
            paths.append(path)
        split[label] = paths
    return split


def parts(items: list, sizes: Split) -> tuple[list, list, list]:
    """One class's samples, in write_target's order, as (reported validation, tuning validation, training pool)."""
    return items[:sizes.val], items[sizes.val:sizes.val + sizes.tune], items[sizes.val + sizes.tune:]


def write_split(target: str, split: dict[str, list], out: Path, labels_per_class: int, seed: int, tuning: bool) -> Path:
    """OUT as a data root: `labels_per_class` pool samples drawn by `seed` for training, and the reported validation
    samples (or, with `tuning`, the tuning-validation ones); {train,val}/<class>/ links for images, {train,val}.csv
    for text."""
    sizes = SPLITS[target]
    chosen: dict[str, dict[str, list]] = {"train": {}, "val": {}}
    for label, items in split.items():
        val, tune, pool = parts(items, sizes)
        drawn = pool[:]
        random.Random(seed * 1000 + sum(map(ord, label))).shuffle(drawn)
        chosen["train"][label], chosen["val"][label] = drawn[:labels_per_class], tune if tuning else val
    for kind, by_label in chosen.items():
        if target in TEXT_TARGETS:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"{kind}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows((text, label) for label, texts in by_label.items() for text in texts)
            continue
        for label, paths in by_label.items():
            folder = out / kind / label
            folder.mkdir(parents=True, exist_ok=True)
            for path in paths:
                link = folder / path.name
                if not link.exists():
                    link.symlink_to(path)
    return out


def _docstrings(sizes: Split) -> dict[str, list[str]]:
    from collections import Counter

    from tl_core.demo_text import docstrings

    found = {package: docstrings(package) for package in PACKAGES}
    seen = Counter(text for texts in found.values() for text in texts)
    out = {}
    for package in PACKAGES:
        texts = [text for text in found[package] if seen[text] == 1]  # a docstring in two packages has no one label
        random.Random(1000 + PACKAGES.index(package)).shuffle(texts)  # the split never depends on a seed
        needed = sizes.val + sizes.tune + POOL_PER_CLASS
        assert len(texts) >= needed, f"{package}: {len(texts)} docstrings, the splits need {needed}"
        out[package] = texts
    return out


def _digits(sizes: Split) -> dict[str, list[Image.Image]]:
    from tl_core.demo_data import load_digits_by_class

    digits, by_digit = load_digits_by_class()
    out = {}
    for digit in range(5, 10):
        indices = by_digit[digit][:]
        random.Random(1000 + digit).shuffle(indices)  # the split never depends on a seed
        needed = sizes.val + sizes.tune + POOL_PER_CLASS
        assert len(indices) >= needed, f"digit {digit}: {len(indices)} images, the splits need {needed}"
        out[str(digit)] = [Image.fromarray((digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
                           for i in indices]
    return out


def _shapes(sizes: Split) -> dict[str, list[Image.Image]]:
    per_class = sizes.val + sizes.tune + POOL_PER_CLASS + 26  # 200 per class
    rng = random.Random(20261124)
    return {shape: [render_shape(shape, rng) for _ in range(per_class)] for shape in SHAPES}


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def _texture(size: int, rng: random.Random) -> Image.Image:
    """A random texture in two random colours: stripes at any angle, checks, dots or smoothed noise."""
    a, b = np.array(_colour(rng), dtype=np.float32), np.array(_colour(rng), dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    kind, period = rng.randrange(4), rng.uniform(4, 14)
    if kind == 0:
        angle = rng.uniform(0, math.pi)
        mask = (np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == 1:
        mask = ((x // period + y // period) % 2).astype(np.float32)
    elif kind == 2:
        mask = ((np.hypot(x % period - period / 2, y % period - period / 2)) < period / 4).astype(np.float32)
    else:
        noise = np.asarray(Image.fromarray((np.random.default_rng(rng.randrange(2**32)).random((size // 8, size // 8)) * 255)
                                           .astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        mask = noise
    pixels = a * mask[..., None] + b * (1 - mask[..., None])
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def polygon(points):
        return [(cx + px * math.cos(angle) - py * math.sin(angle), cy + px * math.sin(angle) + py * math.cos(angle)) for px, py in points]

    if shape == "disc":
        return None
    if shape == "square":
        s = r * 0.85
        return polygon([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return polygon([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        return polygon([((r if k % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                         (r if k % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)])
    w = r * 0.33  # cross
    return polygon([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)])


def render_shape(shape: str, rng: random.Random) -> Image.Image:
    size = SHAPE_SIZE * 2
    image = _texture(size, rng)  # the background: a texture, then clutter
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(2, 5)):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(5, 14)
        draw.ellipse((x - r, y - r * rng.uniform(0.4, 1), x + r, y + r * rng.uniform(0.4, 1)), fill=_colour(rng))
    for _ in range(rng.randrange(1, 4)):
        draw.line([(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)], fill=_colour(rng), width=rng.randrange(2, 6))
    r = rng.uniform(0.28, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    mask = Image.new("L", (size, size), 0)
    outline = _outline(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
    mask_draw = ImageDraw.Draw(mask)
    if outline is None:
        mask_draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        mask_draw.polygon(outline, fill=255)
    image.paste(_texture(size, rng), (0, 0), mask)
    return image.filter(ImageFilter.GaussianBlur(0.6)).resize((SHAPE_SIZE, SHAPE_SIZE), Image.LANCZOS)
