"""Image datasets: index an ImageFolder, clean it, split it, and build sharded loaders.

Layouts accepted under `data.root`: `train/` (+ optional `val/`) of class folders, or class
folders directly (then a stratified, seeded split makes the validation set).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import random
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from tl_core.config import DataConfig, RunConfig
from tl_core.errors import DataError
from tl_core.files import as_given, node_cache_dir

logger = logging.getLogger("tl_core")

Sample = tuple[str, int]  # (file path, class index)


@dataclass
class DatasetIndex:
    """What the loaders read: cleaned, split samples and the class names they index."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    unreadable: list[str] = field(default_factory=list)  # what was skipped
    duplicates: int = 0
    unit: str = "images"
    skipped_as: str = "unreadable"

    def summary(self) -> str:
        return (
            f"{f'{len(self.classes)} classes' if self.classes else 'unlabelled'}, {len(self.train)} train / {len(self.val)} val {self.unit}; "
            f"skipped {len(self.unreadable)} {self.skipped_as}, dropped {self.duplicates} duplicates{self._unscored()}"
            f"{imbalance(self.classes, self.train_counts, self.unit)}"
        )

    @functools.cached_property
    def train_counts(self) -> list[int]:
        """Training samples of each class, in label order (counted once: the summary, the loss weights and a linear
        probe's features ask)."""
        counts = Counter(label for _, label in self.train)
        return [counts[label] for label in range(len(self.classes))]

    def _unscored(self) -> str:
        """Classes the val split lacks (a class of one image stays in train): trained on, never scored."""
        missing = sorted(set(range(len(self.classes))) - {label for _, label in self.val})
        if not missing:
            return ""
        names = ", ".join(_short(self.classes[i]) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        return f"; no val {self.unit} of {len(missing)} class(es), which are not scored: {names}"


IMBALANCED = 3  # the commonest training class this many times the rarest: said in the data summary


def imbalance(classes: list[str], train_counts: list[int], unit: str) -> str:
    """"; unbalanced: ..." naming the rarest and commonest training classes where they differ IMBALANCED times or
    more (`unbalanced`); "" otherwise."""
    if (pair := unbalanced(train_counts)) is None:
        return ""
    rare, common = pair
    one = unit[:-1] if train_counts[rare] == 1 else unit
    return (f"; unbalanced: {train_counts[rare]} train {one} of {_short(classes[rare])} against {train_counts[common]} of "
            f"{_short(classes[common])}")


def unbalanced(train_counts: list[int]) -> tuple[int, int] | None:
    """The labels of the rarest and commonest training classes (`train_counts` in label order; a class with none is
    not counted) where the commonest has IMBALANCED times the rarest's samples or more; None otherwise."""
    counts = {label: n for label, n in enumerate(train_counts) if n}
    if len(counts) < 2:
        return None
    rare, common = (f(counts, key=lambda label: (counts[label], label)) for f in (min, max))
    return (rare, common) if counts[common] >= IMBALANCED * counts[rare] else None


def split_folders(root: Path) -> tuple[Path, Path | None]:
    """(the folder a run trains on, the one it validates on or None) of a dataset root: `train/` and `val/` where
    there is a `train/`, else the root itself and no validation folder. Nothing beside them is read (a test split)."""
    if (root / "train").is_dir():
        return root / "train", (root / "val") if (root / "val").is_dir() else None
    return root, None


def index_image_folder(cfg: DataConfig, seed: int) -> DatasetIndex:
    """Scan, clean (unreadable skipped, duplicates by content hash dropped) and split `cfg.root`."""
    train_dir, val_dir = split_folders(existing_folder(cfg.root, "data.root"))
    classes = _class_folders(train_dir)
    if len(classes) < 2:
        raise DataError(f"data.root: found {len(classes)} class folder(s) in {train_dir}; need at least 2")

    left_out: list[str] = []
    train_files = _list_files(train_dir, classes, left_out)
    val_files: list[Sample] = []
    if val_dir is not None:
        extra = sorted(set(_class_folders(val_dir)) - set(classes))
        if extra:
            raise DataError(f"data.root: val/ has class folders not in train/: {', '.join(extra)}")
        val_files = _list_files(val_dir, classes, left_out)

    def build() -> DatasetIndex:
        warn_left_out(left_out)
        return clean_and_split(classes, train_files, val_files, _digest_files([path for path, _ in train_files + val_files]),
                               cfg.val_fraction, seed)

    return _cached_index("folder", [path for path, _ in train_files + val_files], (cfg.val_fraction, seed), build)


def existing_folder(path: str, field: str, or_else: str = "") -> Path:
    """`path` as a Path, or the DataError that names `field` when it is no folder: missing, or a file (`or_else`:
    what else it may be)."""
    if Path(path).is_dir():
        return Path(path)
    if Path(path).exists():
        raise DataError(f"{field}: {path} is a file, not a folder; give the folder that holds the data{or_else}")
    raise DataError(f"{field}: directory {path} does not exist")


def _cached_index(kind: str, paths: list[str], settings: tuple, build: Callable[[], DatasetIndex]) -> DatasetIndex:
    """The index of a dataset version, built (every image decoded and hashed) once per node and read back after:
    the version is every file's path, size, mtime and ctime with the split settings, so a changed file builds it again."""
    listing = []
    for path in paths:
        try:
            info = os.stat(path)
            listing.append([path, info.st_size, info.st_mtime_ns, info.st_ctime_ns])  # ctime: a chmod changes it too
        except OSError:
            listing.append([path, -1, -1, -1])
    version = hashlib.sha256(json.dumps([kind, list(settings), listing]).encode()).hexdigest()
    cached = node_cache_dir() / "index" / f"{version}.json"
    try:
        raw = json.loads(cached.read_text())
        return DatasetIndex(raw["classes"], [tuple(s) for s in raw["train"]], [tuple(s) for s in raw["val"]], raw["unreadable"],
                            raw["duplicates"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    index = build()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"classes": index.classes, "train": index.train, "val": index.val,
                                   "unreadable": index.unreadable, "duplicates": index.duplicates}))
        os.replace(tmp, cached)
    except OSError as exc:  # a read-only cache costs time, never the run
        logger.warning("data: cannot cache the dataset index in %s (%s)", cached.parent, exc)
    return index


def is_image_path(path: str) -> bool:
    """Whether a "/"-separated path below a dataset's root names an image the index takes: an image file's name,
    nothing hidden on the way (what `image_files` walks locally)."""
    return path.lower().endswith(IMG_EXTENSIONS) and not is_hidden_path(path)


def is_hidden_path(path: str) -> bool:
    """Whether a "/"-separated path below a dataset's root has a hidden file or folder on the way: no data at all."""
    return any(part.startswith(".") for part in path.split("/"))


def layout_from_paths(paths: list[str], where: str) -> tuple[list[str], list[Sample], list[Sample]]:
    """(classes, train files, val files) of a listing of files relative to a dataset's root `where` (an S3 prefix,
    where folders exist only through the files in them), laid out as `index_image_folder` reads a local folder:
    hidden files are no data, and files of a class not named as images are left out in a warning."""
    shown = sorted(p for p in paths if not is_hidden_path(p))
    images = [p for p in shown if is_image_path(p)]
    has_split = any(p.startswith("train/") for p in images)

    def under(prefix: str, among: list[str]) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {}
        for path in among:
            if path.startswith(prefix) and path.count("/") >= prefix.count("/") + 1:
                by_class.setdefault(path[len(prefix):].split("/", 1)[0], []).append(path)
        return by_class

    train = under("train/" if has_split else "", images)
    if has_split:
        val = under("val/", images)
    else:
        train, val = {c: v for c, v in train.items() if c not in ("train", "val")}, {}
    classes = sorted(train)
    others = [p for p in shown if not is_image_path(p)]
    warn_left_out([f"{where.rstrip('/')}/{path}" for prefix in (("train/", "val/") if has_split else ("",))
                   for files in under(prefix, others).values() for path in files])
    if len(classes) < 2:
        raise DataError(f"data.root: found {len(classes)} class folder(s) in {where}{'/train' if has_split else ''}; need at least 2")
    extra = sorted(set(val) - set(classes))
    if extra:
        raise DataError(f"data.root: val/ has class folders not in train/: {', '.join(extra)}")
    return (classes, [(p, i) for i, c in enumerate(classes) for p in train[c]],
            [(p, classes.index(c)) for c in sorted(val) for p in val[c]])


def clean_and_split(classes: list[str], train_files: list[Sample], val_files: list[Sample], digests: list[str | None],
                    val_fraction: float, seed: int) -> DatasetIndex:
    """The index of an image folder, from its listing and each file's `image_digest` (train files first, then val/'s):
    unreadable files skipped, exact duplicates dropped, every class checked, val/ or a stratified split."""
    kept, unreadable, duplicates, conflicts = drop_unreadable_and_duplicates(train_files + val_files, digests)
    train = [s for s in kept[: len(train_files)] if s is not None]
    val = [s for s in kept[len(train_files):] if s is not None]

    counts = Counter(label for _, label in train + val)
    empty = [c for i, c in enumerate(classes) if counts[i] == 0]
    if empty:
        listed = Counter(label for _, label in train_files + val_files)
        copies = Counter(dropped[1] for _, dropped in conflicts)
        why = [f"{c} ({copies[i]} of {listed[i]} repeat images of other classes)" if copies[i] else c
               for i, c in enumerate(classes) if c in empty]
        raise DataError(f"data.root: class folder(s) with no readable images: {', '.join(why)}")
    warn_conflicts(conflicts, "image", lambda label: classes[label])
    if not val_files:
        train, val = stratified_split(train, val_fraction, seed)
    if not val and val_files:
        broken = digests[len(train_files):].count(None)
        raise nothing_left_to_validate("val/", "train/", len(val_files) - broken, broken, "cannot be read", unit="image")
    if not val:
        raise DataError(f"data.root: too few images for a validation split (val_fraction={val_fraction})")
    index = DatasetIndex(classes, train, val, unreadable, duplicates)
    if unreadable:
        logger.warning("data: skipped %d unreadable image(s), e.g. %s", len(unreadable), as_given(unreadable[0]))
    return index


def nothing_left_to_validate(val: str, train: str, copies: int, unusable: int, unusable_as: str, unit: str) -> DataError:
    """The error for a validation folder or file whose every item was dropped: a copy of a training one (kept once,
    there) or unusable."""
    why = [f"{copies} repeat {train} {unit}s (an exact copy is kept once, in {train})" if copies else "",
           f"{unusable} {unusable_as}" if unusable else ""]
    listed = f"of its {copies + unusable}, {' and '.join(w for w in why if w)}" if copies + unusable else f"it has no {unit}s"
    return DataError(f"data.root: {val} has no {unit} left to validate on: {listed}")


def index_unlabelled(cfg: DataConfig, seed: int) -> DatasetIndex:
    """The images of `cfg.root` a run reads, laid out as `index_image_folder` reads them but with their labels ignored
    (all 0, `classes` empty): `train/` (validated on `val/`, else on a random `val_fraction` of train/'s), and nothing
    beside them (a test split); without `train/`, every image under the root (class folders or a flat folder), split
    at random by `val_fraction`. Cleaned like `index_image_folder`."""
    train_dir, val_dir = split_folders(existing_folder(cfg.root, "data.root"))
    left_out: list[str] = []
    train = image_files(train_dir, left_out)
    val = image_files(val_dir, left_out) if val_dir is not None else []
    files = [(path, 0) for path in train + val]

    def build() -> DatasetIndex:
        warn_left_out(left_out)
        kept, unreadable, duplicates, _ = drop_unreadable_and_duplicates(files, _digest_files([path for path, _ in files]))
        samples, held_out = ([s for s in part if s is not None] for part in (kept[: len(train)], kept[len(train):]))
        if len(samples) + len(held_out) < 4:
            raise DataError(f"data.root: found {len(samples) + len(held_out)} readable image(s) under {cfg.root}; need at least 4")
        if not val:
            random.Random(seed).shuffle(samples)
            n_val = min(max(round(len(samples) * cfg.val_fraction), 2), len(samples) - 2)
            samples, held_out = samples[n_val:], samples[:n_val]
        for part, images in (("train/", samples), ("val/", held_out)):
            if len(images) < 2:  # a view's partner is found among the others
                raise DataError(f"data.root: {cfg.root.rstrip('/')}/{part} has {len(images)} readable image(s) (repeats of "
                                "earlier ones not counted); need at least 2")
        if unreadable:
            logger.warning("data: skipped %d unreadable image(s), e.g. %s", len(unreadable), as_given(unreadable[0]))
        return DatasetIndex([], sorted(samples), sorted(held_out), unreadable, duplicates)

    # len(train): where val/'s images begin. An index cached before val/ was read as validation has the same paths
    # (where no test/ lay beside them) and must not be read back.
    return _cached_index("unlabelled", [path for path, _ in files], (cfg.val_fraction, seed, len(train)), build)


def _class_folders(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _list_files(directory: Path, classes: Sequence[str], left_out: list[str] | None = None) -> list[Sample]:
    return [(path, label) for label, name in enumerate(classes) if (directory / name).is_dir()
            for path in image_files(directory / name, left_out)]


def image_files(directory: Path, left_out: list[str] | None = None) -> list[str]:
    """Every file named like an image under `directory`, in a stable order. Symlinks are followed, but a directory
    reached twice (a link loop, or two links to one place) is walked once. Hidden files and folders (a notebook's
    `.ipynb_checkpoints/`, macOS's `._` files) are not images of the class, as on S3 (`layout_from_paths`)."""
    walked, seen = [], set()
    for dirpath, dirnames, files in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        try:
            info = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        walked.append((dirpath, files))
    images = []
    for dirpath, files in sorted(walked):
        for fname in sorted(f for f in files if not f.startswith(".")):
            if fname.lower().endswith(IMG_EXTENSIONS):
                images.append(os.path.join(dirpath, fname))
            elif left_out is not None:  # files of the data not named as images: said, never silently dropped
                left_out.append(os.path.join(dirpath, fname))
    return images


def warn_left_out(paths: list[str]) -> None:
    """Say which files an index left out because they are not named as images (a class folder of GIFs or HEICs
    would otherwise just be smaller), by suffix."""
    if paths:
        logger.warning("data: left out %s; images are named %s", not_images(paths), ", ".join(IMG_EXTENSIONS))


def not_images(paths: list[str]) -> str:
    """"3 file(s) not named as images (.gif 2, .txt 1), e.g. PATH": what an index left out, by suffix."""
    suffixes = Counter(Path(p).suffix.lower() or "(no suffix)" for p in paths)
    counted = ", ".join(f"{suffix} {n}" for suffix, n in sorted(suffixes.items(), key=lambda item: (-item[1], item[0])))
    return f"{len(paths)} file(s) not named as images ({counted}), e.g. {as_given(paths[0])}"


def image_digest(data: bytes) -> str | None:
    """The SHA-256 of an image file's bytes, or None when they do not decode in full (a truncated file fails here,
    not in the middle of training)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"
        return None
    return hashlib.sha256(data).hexdigest()


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_rgb(data: bytes) -> torch.Tensor:
    """An image file's bytes -> a uint8 RGB tensor C x H x W, the pixels PIL decodes (tested). JPEGs go through
    torchvision's libjpeg-turbo decoder straight into a tensor: with the training crop, 0.63 against 0.88 ms per
    256 px JPEG on one core, because the resize reads a contiguous tensor instead of PIL's interleaved pixels.
    Other formats, and any JPEG that decoder refuses, go through PIL. Either way the image is turned upright by its
    EXIF orientation, as every viewer shows it (a phone stores a portrait photo sideways, tagged with how to turn
    it), as Hugging Face datasets does. Raises on bytes neither decodes."""
    if data[:3] == JPEG_MAGIC:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(data)) as img:
        _turn_upright(img)
        if img.mode.startswith("I;16"):  # 16-bit grey (PNG, TIFF): PIL's convert would clip it at 255, nearly all white
            img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
        return pil_to_tensor(img.convert("RGB"))


def _turn_upright(img: Image.Image) -> None:
    """Turn `img` in place by its EXIF orientation; an EXIF block that cannot be read leaves it as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - a damaged tag is no reason to lose the photo
        pass


def read_file_bytes(path: str | Path) -> bytes | None:
    """A local file's bytes, or None when it cannot be read or is no regular file: a FIFO or a device named like an
    image would block the read forever."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return Path(path).read_bytes()
    except OSError:
        return None


def _digest_files(paths: list[str]) -> list[str | None]:
    def digest(path: str) -> str | None:
        data = read_file_bytes(path)
        return image_digest(data) if data is not None else None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        return list(pool.map(digest, paths))


def drop_unreadable_and_duplicates(samples: list[Sample], digests: list[str | None]
                                   ) -> tuple[list[Sample | None], list[str], int, list[tuple[Sample, Sample]]]:
    """Same order as `samples`, with None where a file is unreadable (no digest) or repeats an earlier file; then the
    unreadable files, the count of repeats, and the repeats under another label than the first's (labelling conflicts,
    for `warn_conflicts`), each as (the sample kept, the one dropped)."""
    first: dict[str, Sample] = {}
    kept: list[Sample | None] = []
    unreadable: list[str] = []
    conflicts: list[tuple[Sample, Sample]] = []
    for sample, digest in zip(samples, digests, strict=True):
        if digest is None:
            unreadable.append(sample[0])
            kept.append(None)
        elif digest in first:
            if first[digest][1] != sample[1]:
                conflicts.append((first[digest], sample))
            kept.append(None)
        else:
            first[digest] = sample
            kept.append(sample)
    return kept, unreadable, len(samples) - len(unreadable) - len(first), conflicts


def warn_conflicts(conflicts: list[tuple[Sample, Sample]], unit: str, label_name: Callable[[Any], str] = str) -> None:
    """Log exact copies found under two labels, which were kept once, under the label they had first."""
    if conflicts:
        (kept, kept_label), (dropped, dropped_label) = conflicts[0]
        logger.warning("data: %d %s(s) repeat one of another class and were kept once, under the first class; e.g. %s "
                       "(%s) repeats %s (%s)", len(conflicts), unit, _short(as_given(dropped)), label_name(dropped_label),
                       _short(as_given(kept)), label_name(kept_label))


def _short(text: str, keep: int = 30) -> str:
    return repr(text if len(text) <= 2 * keep + 3 else f"{text[:keep]}...{text[-keep:]}")


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class, a seeded shuffle then `val_fraction` (at least 1 when a class has 2+ images) to val."""
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = min(max(round(len(items) * val_fraction), 1), len(items) - 1) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def build_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], *, train: bool, augment: bool, hflip: bool) -> v2.Compose:
    """Resize and normalise with the backbone's statistics; random crops (and flips) for training only."""
    return v2.Compose([crop_transform(image_size, train=train, augment=augment, hflip=hflip), Normalize(mean, std)])


def crop_transform(image_size: int, *, train: bool, augment: bool, hflip: bool) -> v2.Compose:
    """A decoded image (decode_rgb's tensor, or a PIL image) -> a uint8 tensor C x H x W of `image_size`: random
    crops (and flips) for training only, a resize and centre crop otherwise."""
    if train and augment:
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True)]
        if hflip:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *geometry])


class Normalize:
    """uint8 images (one C x H x W, or a batch N x C x H x W) -> float32 (x / 255 - mean) / std, the same operations
    as v2.ToDtype then v2.Normalize (bit for bit), in one copy and three in-place passes instead of two copies."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:  # on the GPU: BatchesNormalizedOn, or a stream Ray Data moved there
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.to(torch.float32, copy=True).mul_(1.0 / 255).sub_(self.mean).div_(self.std)


class BatchesNormalizedOn:
    """`loader`'s uint8 image batches (or each of their views) copied to `device` as they are and normalised there:
    a quarter of float32's bytes through the loader workers' shared memory, the pinned copy and the bus, and no float
    work on the CPU. On an H200 with 14 loader workers the loader delivered 1.8x the images/s to ResNet-50 at 224 px,
    and fit trained 1.7x as fast (bench.cuda_paths)."""

    def __init__(self, loader: DataLoader, normalize: Normalize, device: torch.device):
        self.loader, self.normalize, self.device = loader, normalize, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]]:
        for images, labels in self.loader:
            yield self._normalized(images), labels

    def _normalized(self, images: torch.Tensor | tuple | list):
        """A batch, or each of a batch's views (SimCLR's pair), on the device and normalised."""
        if isinstance(images, (tuple, list)):
            return type(images)(self._normalized(view) for view in images)
        return self.normalize(images.to(self.device, non_blocking=True))

    def __len__(self) -> int:
        return len(self.loader)


def is_gpu(device: torch.device | None) -> bool:
    """Whether batches bound for `device` go to a GPU: loaded into pinned memory, and images sent as uint8 and
    normalised there (BatchesNormalizedOn)."""
    return device is not None and device.type == "cuda"


def normalized_on(data: ImageData, normalize: Normalize, device: torch.device) -> ImageData:
    """`data`, whose loaders yield uint8 images, with both loaders' batches normalised on `device`."""
    data.train, data.val = BatchesNormalizedOn(data.train, normalize, device), BatchesNormalizedOn(data.val, normalize, device)
    return data


class ImageListDataset(Dataset):
    """Decoded, transformed images. A key of `(i, seed)` (see `SeededSampler`) draws the random augmentation
    of sample `i` from `seed` alone, so it is the same whichever loader worker (persistent or not) loads it."""

    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        image = decode_rgb(Path(path).read_bytes())
        if seed is None:
            return self.transform(image), label
        # Only the CPU generator, which the transforms draw from: torch.manual_seed also seeds every accelerator
        # and costs ~40x more per call, paid once per image.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            generator.set_state(saved)


class SeededSampler(Sampler[tuple[int, int]]):
    """`sampler`'s indices, each paired with a seed derived from the epoch's augmentation seed and the index."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self.augment_seed = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = self.augment_seed * 1_000_003
        return ((i, (base + i) % 2**63) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, no padding: each sample is evaluated exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class IndexedData:
    """What every `TaskData` over an indexed dataset shares: its index, this rank's loaders, classes and summary."""

    index: DatasetIndex
    train: DataLoader | BatchesNormalizedOn
    val: DataLoader | BatchesNormalizedOn

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def train_counts(self) -> list[int]:
        return self.index.train_counts

    def summary(self) -> str:
        return self.index.summary()


@dataclass
class ImageData(IndexedData):
    """`TaskData` over an indexed image folder: sharded loaders of (image tensor, label) batches."""

    train_sampler: SeededSampler

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Shuffle for `epoch` (the same order on every rank) and seed its augmentation."""
        self.train_sampler.sampler.set_epoch(epoch)
        self.train_sampler.augment_seed = seed


def image_transforms(data: DataConfig, normalize: Normalize) -> tuple[v2.Compose, v2.Compose]:
    """(train, val) transforms: the crops of `data`'s image size and augmentation (image_crops), then `normalize`
    (image_normalization: the backbone's statistics)."""
    return tuple(v2.Compose([crop, normalize]) for crop in image_crops(data))


def image_crops(data: DataConfig) -> tuple[v2.Compose, v2.Compose]:
    """(train, val) transforms up to the uint8 crop: what a packed stream decodes to, a quarter of the bytes of a
    float image through Ray's object store; the worker normalises each batch (image_normalization)."""
    return (crop_transform(data.image_size, train=True, augment=data.augment, hflip=data.hflip),
            crop_transform(data.image_size, train=False, augment=False, hflip=False))


def image_normalization(cfg: RunConfig) -> Normalize:
    """uint8 images -> float32 normalised with the run's backbone statistics."""
    from tl_core.models import normalization

    return Normalize(*normalization(cfg.model.backbone))


def image_data(cfg: RunConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> ImageData:
    """The labelled image folder at `cfg.data.root`, indexed and cleaned, as this rank's loaders, normalised with
    the backbone's own statistics: by the loader workers, or on `device` when it is a GPU (BatchesNormalizedOn)."""
    index = index_image_folder(cfg.data, seed=cfg.train.seed)
    normalize = image_normalization(cfg)
    on_gpu = is_gpu(device)
    transforms = image_crops(cfg.data) if on_gpu else image_transforms(cfg.data, normalize)
    data = loaders_for(index, cfg.data, *transforms, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                       rank=rank, world_size=world_size, pin_memory=on_gpu)
    return normalized_on(data, normalize, device) if on_gpu else data


def build_loaders(index: DatasetIndex, cfg: DataConfig, *, batch_size: int, mean, std, seed: int,
                  rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> ImageData:
    """Train loader sharded like DistributedSampler (padded, shuffled, augmented); val loader sharded without
    padding, resized and centre-cropped."""
    return loaders_for(index, cfg, *image_transforms(cfg, Normalize(mean, std)), batch_size=batch_size, seed=seed,
                       rank=rank, world_size=world_size, pin_memory=pin_memory)


def loaders_for(index: DatasetIndex, cfg: DataConfig, train_transform, val_transform, *, batch_size: int, seed: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False, equal_batches: bool = False) -> ImageData:
    """Loaders over `index` with the given transforms.

    `equal_batches`: every batch full and the same size on every rank, validation included, whose random
    augmentation is then drawn from a fixed seed (SimCLR: its loss needs equal local batches, and its
    validation views are random but must be comparable across epochs).

    Loader workers persist across epochs (no re-spawn, no re-import per epoch), which the per-sample seeds
    allow: augmentation never depends on a worker's own random state.
    """
    common = dict(num_workers=cfg.loader_workers, pin_memory=pin_memory, persistent_workers=cfg.loader_workers > 0)
    train_set = ImageListDataset(index.train, train_transform)
    sampler = SeededSampler(DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed))
    if equal_batches:
        batch_size = min(batch_size, len(sampler))
        drop_last = True
    else:  # a final batch of one image breaks BatchNorm in training mode; drop it only in that case
        drop_last = len(sampler) % batch_size == 1 and len(sampler) > 1
    train = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)
    val_set = ImageListDataset(index.val, val_transform)
    if equal_batches:
        val_sampler = SeededSampler(ShardSampler(len(val_set) // world_size * world_size, rank, world_size))
        val_sampler.augment_seed = seed + 1
        val = DataLoader(val_set, batch_size=min(2 * batch_size, max(len(val_sampler), 2)), sampler=val_sampler, drop_last=True, **common)
    else:  # no activations are kept for a backward pass in evaluation, so twice the training batch fits
        val = DataLoader(val_set, batch_size=max(2 * batch_size, 32), sampler=ShardSampler(len(val_set), rank, world_size), **common)
    return ImageData(index, train, val, sampler)
