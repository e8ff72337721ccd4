import logging
import shutil
from collections import Counter

import pytest
import torch
from helpers import make_image_folder

from tl_core.config import DataConfig
from tl_core.data import ShardSampler, build_loaders, build_transforms, index_image_folder, stratified_split
from tl_core.errors import DataError
from tl_core.models import IMAGENET_MEAN, IMAGENET_STD


def cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), image_size=16, **{"loader_workers": 0, **kw})


def test_class_folders_get_a_stratified_seeded_split(image_folder):
    index = index_image_folder(cfg(image_folder, val_fraction=0.25), seed=0)
    assert index.classes == ["class_0", "class_1", "class_2"]
    assert Counter(label for _, label in index.val) == {0: 3, 1: 3, 2: 3}
    assert Counter(label for _, label in index.train) == {0: 9, 1: 9, 2: 9}
    assert not set(index.train) & set(index.val)
    again = index_image_folder(cfg(image_folder, val_fraction=0.25), seed=0)
    other = index_image_folder(cfg(image_folder, val_fraction=0.25), seed=1)
    assert again.val == index.val and other.val != index.val


def test_a_nodes_copy_of_s3_data_is_named_by_its_s3_uri_in_warnings(tmp_path, monkeypatch, caplog):
    """Images read from the node's copy of s3://BUCKET/KEY: an unreadable one is named s3://..., not ~/.cache/..."""
    from tl_core.files import node_copy_path

    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    root = make_image_folder(node_copy_path("bucket", "sets/ds"), n_classes=2, per_class=6)
    (root / "class_0" / "broken.png").write_bytes(b"not an image at all")
    index_image_folder(cfg(root), seed=0)
    assert "skipped 1 unreadable image(s), e.g. s3://bucket/sets/ds/class_0/broken.png" in caplog.text


def test_train_and_val_folders_are_used_as_given(tmp_path):
    root = make_image_folder(tmp_path / "d", n_classes=2, per_class=8, layout="split")
    index = index_image_folder(cfg(root), seed=0)
    assert len(index.val) == 4 and len(index.train) == 12
    assert all("/val/" in path for path, _ in index.val)


def test_unreadable_images_are_skipped_and_counted(image_folder, caplog):
    (image_folder / "class_0" / "broken.png").write_bytes(b"not an image at all")
    good = (image_folder / "class_1" / "000.png").read_bytes()
    (image_folder / "class_1" / "truncated.png").write_bytes(good[: len(good) // 2])
    index = index_image_folder(cfg(image_folder), seed=0)
    assert sorted(p.rsplit("/", 1)[1] for p in index.unreadable) == ["broken.png", "truncated.png"]
    assert len(index.train) + len(index.val) == 36
    assert "skipped 2 unreadable" in caplog.text


def test_files_not_named_as_images_are_left_out_in_a_warning_that_says_so(image_folder, tmp_path, caplog):
    """A class folder's GIFs (torchvision's IMG_EXTENSIONS has no .gif) and notes were left out without a word: a
    class could silently shrink. Hidden files are still no data at all."""
    from PIL import Image

    from tl_core.data import index_unlabelled

    for i in range(2):
        Image.new("RGB", (16, 16), "white").save(image_folder / "class_0" / f"anim{i}.gif")
    (image_folder / "class_2" / "labels.txt").write_text("class_2\n")
    (image_folder / "class_2" / ".DS_Store").write_bytes(b"\x00")
    with caplog.at_level(logging.WARNING, logger="tl_core"):
        index = index_image_folder(cfg(image_folder), seed=0)
    assert len(index.train) + len(index.val) == 36
    assert (f"data: left out 3 file(s) not named as images (.gif 2, .txt 1), e.g. {image_folder}/class_0/anim0.gif; images are "
            "named .jpg, .jpeg, .png,") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tl_core"):
        index_unlabelled(cfg(image_folder), seed=0)
    assert "data: left out 3 file(s) not named as images (.gif 2, .txt 1)" in caplog.text


def test_hidden_files_and_folders_in_a_class_are_not_its_images(image_folder):
    """A notebook's .ipynb_checkpoints/ beside the images (a stale edit of one) and macOS's ._ files: the S3 listing
    never took them; the local walk took them as images of the class (and the ._ files as unreadable)."""
    from PIL import Image

    (image_folder / "class_0" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (16, 16), "white").save(image_folder / "class_0" / ".ipynb_checkpoints" / "000-checkpoint.png")
    (image_folder / "class_1" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    index = index_image_folder(cfg(image_folder), seed=0)
    assert len(index.train) + len(index.val) == 36 and not index.unreadable
    assert not any("/." in path for path, _ in index.train + index.val)


def test_exact_duplicates_are_dropped_even_across_classes_and_a_copy_under_another_class_is_named(image_folder, caplog):
    shutil.copy(image_folder / "class_0" / "000.png", image_folder / "class_0" / "copy.png")
    shutil.copy(image_folder / "class_0" / "001.png", image_folder / "class_2" / "mislabelled_copy.png")
    with caplog.at_level(logging.WARNING, logger="tl_core"):
        index = index_image_folder(cfg(image_folder), seed=0)
    assert index.duplicates == 2
    assert len(index.train) + len(index.val) == 36
    assert "dropped 2 duplicates" in index.summary()
    warnings = [r.getMessage() for r in caplog.records if "another class" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("data: 1 image(s) repeat one of another class"), warnings
    assert "mislabelled_copy.png' (class_2) repeats" in warnings[0] and "001.png' (class_0)" in warnings[0]


def test_a_class_whose_images_all_repeat_another_class_says_so(image_folder):
    for i, path in enumerate(sorted((image_folder / "class_1").iterdir())):
        shutil.copy(image_folder / "class_0" / f"{i:03d}.png", path)
    with pytest.raises(DataError, match=r"no readable images: class_1 \(12 of 12 repeat images of other classes\)$"):
        index_image_folder(cfg(image_folder), seed=0)


@pytest.mark.parametrize("setup,message", [
    (lambda root: shutil.rmtree(root), "data.root: directory .* does not exist"),
    (lambda root: [shutil.rmtree(root / "class_1"), shutil.rmtree(root / "class_2")], "found 1 class folder"),
    (lambda root: [p.unlink() for p in (root / "class_2").iterdir()], "no readable images: class_2"),
    (lambda root: [p.write_bytes(b"junk") for p in (root / "class_1").iterdir()], "no readable images: class_1"),
])
def test_unusable_datasets_are_user_errors(image_folder, setup, message):
    setup(image_folder)
    with pytest.raises(DataError, match=message):
        index_image_folder(cfg(image_folder), seed=0)


def test_val_classes_must_exist_in_train(tmp_path):
    root = make_image_folder(tmp_path / "d", n_classes=2, per_class=8, layout="split")
    shutil.copytree(root / "val" / "class_0", root / "val" / "class_9")
    with pytest.raises(DataError, match="val/ has class folders not in train/: class_9"):
        index_image_folder(cfg(root), seed=0)


def test_a_val_folder_left_with_no_image_says_why(tmp_path):
    """val/ images that all repeat train/ images (dropped: a copy is kept once, in train/) or cannot be read: the
    message was "too few images for a validation split (val_fraction=0.2)", a fraction that a val/ folder overrides."""
    root = make_image_folder(tmp_path / "d", n_classes=2, per_class=4, layout="split")
    for n, image in enumerate(sorted((root / "val").rglob("*.png"))):
        image.write_bytes(b"not an image" if n == 0 else next((root / "train" / image.parent.name).glob("*.png")).read_bytes())
    with pytest.raises(DataError, match=r"^data.root: val/ has no image left to validate on: of its 2, 1 repeat train/ images "
                                        r"\(an exact copy is kept once, in train/\) and 1 cannot be read$"):
        index_image_folder(cfg(root), seed=0)


def test_a_class_the_val_split_lacks_is_named_in_the_summary(image_folder):
    """A class of one image stays in train: it is trained on and never scored, and the data line says so."""
    assert index_image_folder(cfg(image_folder), seed=0).summary().endswith("dropped 0 duplicates")
    for path in sorted((image_folder / "class_1").iterdir())[1:]:
        path.unlink()
    index = index_image_folder(cfg(image_folder, val_fraction=0.25), seed=0)
    assert index.summary().endswith("dropped 0 duplicates; no val images of 1 class(es), which are not scored: 'class_1'; "
                                    "unbalanced: 1 train image of 'class_1' against 9 of 'class_2'")


def test_split_keeps_one_of_each_class_for_training():
    samples = [("a0", 0), ("a1", 0), ("b0", 1)]
    train, val = stratified_split(samples, 0.9, seed=0)
    assert Counter(label for _, label in train) == {0: 1, 1: 1} and val in ([("a0", 0)], [("a1", 0)])


def test_normalize_computes_what_torchvision_does_for_an_image_and_a_batch_and_leaves_its_input():
    from torchvision.transforms import v2

    from tl_core.data import Normalize

    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    for images in (torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8), torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)):
        before = images.clone()
        out = Normalize(IMAGENET_MEAN, IMAGENET_STD)(images)
        assert out.dtype == torch.float32 and out.shape == images.shape
        assert torch.equal(out, reference(images)) and torch.equal(images, before)


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "GIF")])
def test_decode_rgb_gives_the_pixels_pil_decodes_for_every_format(mode, fmt):
    import io

    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    from tl_core.data import decode_rgb

    pixels = np.random.default_rng(0).integers(0, 256, (21, 34, 4 if mode == "CMYK" else 3), dtype=np.uint8)
    image = Image.fromarray(pixels[..., :3]).convert(mode) if mode != "CMYK" else Image.fromarray(pixels, "CMYK")
    buf = io.BytesIO()
    image.save(buf, fmt, quality=90)  # PNG and GIF ignore quality
    data = buf.getvalue()
    decoded = decode_rgb(data)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 21, 34)
    assert torch.equal(decoded, pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_grey_image_keeps_its_contrast(fmt):
    """PIL opens 16-bit grey PNG and TIFF as mode I;16, and its convert("RGB") clips every sample above 255: a
    microscope scan came out nearly all white. Each sample keeps its top 8 bits."""
    import io

    import numpy as np
    from PIL import Image

    from tl_core.data import decode_rgb

    samples = np.random.default_rng(0).integers(0, 65536, (12, 20), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(samples).save(buf, fmt)
    decoded = decode_rgb(buf.getvalue())
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 12, 20)
    expected = torch.from_numpy((samples >> 8).astype(np.uint8))
    assert all(torch.equal(decoded[c], expected) for c in range(3))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_rgb_turns_a_photo_upright_by_its_exif_orientation(fmt, orientation):
    """A phone stores a portrait photo sideways and tags it with how to turn it (EXIF orientation 6); every viewer
    shows it upright, and so do training, packing and predict: they all decode through decode_rgb."""
    import io

    import numpy as np
    from PIL import Image, ImageOps
    from torchvision.transforms.v2.functional import pil_to_tensor

    from tl_core.data import decode_rgb

    pixels = np.random.default_rng(orientation).integers(0, 256, (16, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.getexif().get(0x0112) == orientation
        expected = pil_to_tensor(ImageOps.exif_transpose(stored).convert("RGB"))
    decoded = decode_rgb(data)
    assert decoded.shape == ((3, 16, 40) if orientation <= 4 else (3, 40, 16))
    assert torch.equal(decoded, expected)


def test_decode_rgb_keeps_a_photo_whose_exif_cannot_be_read_as_stored():
    """A damaged EXIF block (a bad byte order, an orientation out of range) leaves the pixels as stored, not an
    unreadable image: the photo still decodes."""
    import io

    import numpy as np
    from PIL import Image

    from tl_core.data import decode_rgb

    pixels = np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8)
    bad_order = b"Exif\x00\x00ZZ*\x00" + bytes(20)
    out_of_range = Image.Exif()
    out_of_range[0x0112] = 77
    for fmt in ("JPEG", "PNG"):
        for exif in (bad_order, out_of_range.tobytes()):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, fmt, exif=exif)
            decoded = decode_rgb(buf.getvalue())
            assert decoded.shape == (3, 16, 40)


def test_decode_rgb_refuses_a_truncated_jpeg_and_bytes_that_are_no_image():
    import io

    from PIL import Image

    from tl_core.data import decode_rgb

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    for data in (buf.getvalue()[: len(buf.getvalue()) // 2], b"\xff\xd8\xff not a jpeg", b"plain text"):
        with pytest.raises(Exception):  # noqa: B017 - any decoder error; the callers count the image as unreadable
            decode_rgb(data)


def test_transforms_normalise_and_augment_only_for_training(image_folder):
    from PIL import Image

    img = Image.open(image_folder / "class_0" / "000.png").convert("RGB")
    evaluate = build_transforms(24, IMAGENET_MEAN, IMAGENET_STD, train=False, augment=True, hflip=True)
    train = build_transforms(24, IMAGENET_MEAN, IMAGENET_STD, train=True, augment=True, hflip=True)
    a, b = evaluate(img), evaluate(img)
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.min() < 0  # normalised, not in [0, 1]
    torch.manual_seed(0)
    assert any(not torch.equal(train(img), a) for _ in range(5))


def test_loaders_shard_validation_exactly_once(image_folder):
    index = index_image_folder(cfg(image_folder, val_fraction=0.3), seed=0)
    seen = []
    for rank in range(2):
        loaders = build_loaders(index, cfg(image_folder), batch_size=4, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=0,
                                rank=rank, world_size=2)
        seen += list(loaders.val.sampler)
        images, labels = next(iter(loaders.train))
        assert images.shape[1:] == (3, 16, 16)
    assert sorted(seen) == list(range(len(index.val)))


def test_shard_sampler_is_uneven_without_padding():
    assert [list(ShardSampler(5, r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]


def _epoch_batches(index, root, workers: int, epochs=(0, 1, 0)) -> list[torch.Tensor]:
    loaders = build_loaders(index, cfg(root, loader_workers=workers), batch_size=4, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, seed=0)
    batches = []
    for epoch in epochs:
        loaders.set_epoch(epoch, seed=100 + epoch)
        batches.append(torch.cat([images for images, _ in loaders.train]))
    return batches


def test_augmentation_is_a_function_of_the_epoch_seed_not_of_loader_workers(image_folder):
    """Persistent loader workers keep their own random state across epochs; each sample's augmentation is
    drawn from the epoch's seed instead, so 0 or 2 workers, first pass or repeat, give the same pixels."""
    index = index_image_folder(cfg(image_folder), seed=0)
    in_process = _epoch_batches(index, image_folder, workers=0)
    persistent = _epoch_batches(index, image_folder, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, persistent, strict=True))
    assert not torch.equal(in_process[0], in_process[1])  # a new epoch augments (and shuffles) anew
    assert torch.equal(in_process[0], in_process[2])  # the same epoch again (a resumed run) is identical
    loaders = build_loaders(index, cfg(image_folder, loader_workers=2), batch_size=4, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, seed=0)
    assert loaders.train.persistent_workers and loaders.val.persistent_workers


def test_the_index_is_built_once_per_dataset_version_and_read_back(image_folder, tmp_path, monkeypatch):
    """Workers (and the driver before them) on one node decode and hash every image once per dataset version."""
    import tl_core.data as data

    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    first = index_image_folder(cfg(image_folder), seed=0)
    monkeypatch.setattr(data, "image_digest", lambda _: pytest.fail("decoded again"))
    assert index_image_folder(cfg(image_folder), seed=0) == first
    monkeypatch.undo()
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    (image_folder / "class_0" / "000.png").write_bytes(b"junk")  # a new version of the dataset
    again = index_image_folder(cfg(image_folder), seed=0)
    assert len(again.unreadable) == 1 and len(again.train) + len(again.val) == len(first.train) + len(first.val) - 1
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 2


def test_batches_normalized_on_the_device_equal_those_normalized_by_the_workers(image_folder):
    """On a GPU the loaders ship uint8 crops and normalise each batch on the device (BatchesNormalizedOn): the same
    pixels, bit for bit, as float32 images normalised one by one in the loader workers."""
    from tl_core.data import BatchesNormalizedOn, Normalize, image_crops, image_transforms, loaders_for

    data_cfg = cfg(image_folder, loader_workers=2)
    index = index_image_folder(data_cfg, seed=0)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    in_workers = loaders_for(index, data_cfg, *image_transforms(data_cfg, normalize), batch_size=4, seed=0)
    uint8 = loaders_for(index, data_cfg, *image_crops(data_cfg), batch_size=4, seed=0)
    on_device = BatchesNormalizedOn(uint8.train, normalize, torch.device("cpu"))
    assert len(on_device) == len(in_workers.train)
    for data in (in_workers, uint8):
        data.set_epoch(1, seed=7)
    expected = [(images, labels) for images, labels in in_workers.train]
    got = list(on_device)
    assert next(iter(uint8.train))[0].dtype == torch.uint8
    assert len(got) == len(expected)
    for (a, la), (b, lb) in zip(expected, got, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(la, lb)


def test_each_view_of_a_batch_is_normalized_on_the_device():
    """SimCLR's batches hold two views of each image; on a GPU both travel as uint8 and are normalised there."""
    from tl_core.data import BatchesNormalizedOn, Normalize

    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    views = (torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8), torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))
    labels = torch.tensor([0, 1])
    (got, got_labels), = list(BatchesNormalizedOn([(views, labels)], normalize, torch.device("cpu")))
    assert isinstance(got, tuple) and len(got) == 2 and torch.equal(got_labels, labels)
    for view, normalized in zip(views, got, strict=True):
        assert torch.equal(normalized, normalize(view))


def test_the_data_summary_says_when_classes_are_unbalanced():
    from tl_core.data import DatasetIndex
    from tl_core.packed import Manifest

    def index(counts):
        return DatasetIndex(["cat", "dog", "eel"], [(f"{c}{i}", c) for c, n in enumerate(counts) for i in range(n)],
                            [("v0", 0), ("v1", 1), ("v2", 2)])

    assert index([12, 9, 5]).summary() == "3 classes, 26 train / 3 val images; skipped 0 unreadable, dropped 0 duplicates"
    assert index([12, 40, 5]).summary().endswith("dropped 0 duplicates; unbalanced: 5 train images of 'eel' against 40 of 'dog'")
    assert index([12, 0, 4]).summary().endswith("unbalanced: 4 train images of 'eel' against 12 of 'cat'")  # a class with none is not counted
    manifest = Manifest(classes=["cat", "dog", "eel"], shards={"train": [{"path": "t", "rows": 56}], "val": [{"path": "v", "rows": 3}]},
                        source="s", fingerprint="f", val_fraction=0.2, seed=0,
                        per_class={"train": {"cat": 12, "dog": 40, "eel": 4}, "val": {"cat": 1, "dog": 1, "eel": 1}})
    assert manifest.summary().endswith("unbalanced: 4 train images of 'eel' against 40 of 'dog'")
