"""cluster.cache: an S3 prefix mirrored once per node, re-synced when it changes, safe under concurrency."""

import multiprocessing

import pytest

from cluster import storage
from cluster.storage import cache
from tl_core.errors import ConfigError, StorageError


def put(s3, key, body):
    s3.client().put_object(Bucket="tl-test", Key=key, Body=body)


def test_sync_downloads_once_and_follows_changes(s3):
    for name in ("a/1.bin", "a/2.bin", "b/3.bin"):
        put(s3, f"cache-test/ds/{name}", name.encode() * 100)
    location = storage.parse("s3://tl-test/cache-test/ds")
    local = cache.sync_prefix(location, "data.root")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.bin"))
    assert files == ["a/1.bin", "a/2.bin", "b/3.bin"]
    assert (local / "b" / "3.bin").read_bytes() == b"b/3.bin" * 100
    stamp = (local / "a" / "1.bin").stat().st_mtime_ns

    assert cache.sync_prefix(location, "data.root") == local  # unchanged prefix: nothing downloaded again
    assert (local / "a" / "1.bin").stat().st_mtime_ns == stamp

    put(s3, "cache-test/ds/a/2.bin", b"changed")  # modified, added, deleted
    put(s3, "cache-test/ds/c/4.bin", b"new")
    s3.client().delete_object(Bucket="tl-test", Key="cache-test/ds/b/3.bin")
    cache.sync_prefix(location, "data.root")
    assert (local / "a" / "2.bin").read_bytes() == b"changed"
    assert (local / "c" / "4.bin").read_bytes() == b"new"
    assert not (local / "b" / "3.bin").exists()
    assert (local / "a" / "1.bin").stat().st_mtime_ns == stamp  # untouched objects are not fetched again


def _sync(uri: str, queue) -> None:
    local = cache.sync_prefix(storage.parse(uri), "data.root")
    queue.put(sorted((p.relative_to(local).as_posix(), p.read_bytes()) for p in local.rglob("*.bin")))


def test_workers_starting_together_get_one_complete_copy(s3):
    expected = sorted((f"x/{i}.bin", bytes([i]) * 50_000) for i in range(20))
    for name, body in expected:
        put(s3, f"cache-test/together/{name}", body)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync, args=("s3://tl-test/cache-test/together", queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(r == expected for r in results)


def test_empty_prefix_and_single_objects(s3):
    with pytest.raises(StorageError, match="data.root: there are no objects under s3://tl-test/cache-test/nothing"):
        cache.sync_prefix(storage.parse("s3://tl-test/cache-test/nothing"), "data.root")
    put(s3, "cache-test/w/model.pt", b"weights")
    location = storage.parse("s3://tl-test/cache-test/w/model.pt")
    assert storage.is_object(location) and not storage.is_object(storage.parse("s3://tl-test/cache-test/w"))
    path = cache.fetch_object(location, "model.weights")
    assert path.read_bytes() == b"weights"
    put(s3, "cache-test/w/model.pt", b"weights v2")
    assert cache.fetch_object(location, "model.weights").read_bytes() == b"weights v2"


def test_weights_read_from_a_nodes_copy_are_named_by_their_s3_uri(caplog, monkeypatch, tmp_path):
    """The demo on S3 logged `loaded backbone from /root/.cache/tl-finetune/s3/...`: the node's copy, not what the
    config named. Log lines and errors about the copy name its s3:// URI; other paths stay as they are."""
    import torch

    from tl_core.config import ModelConfig
    from tl_core.files import as_given
    from tl_core.models import build_model

    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    source = build_model(ModelConfig(backbone="resnet18"), ["a", "b"], 32)
    location = storage.parse("s3://tl-test/cache-test/weights/src.pt")
    local = cache.local_path(location)
    local.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), local)
    assert as_given(local) == "s3://tl-test/cache-test/weights/src.pt" and as_given("/data/src.pt") == "/data/src.pt"
    caplog.set_level("INFO", logger="tl_core")
    build_model(ModelConfig(backbone="resnet18", weights=str(local)), ["a", "b"], 32)
    assert "weights: loaded backbone and head from s3://tl-test/cache-test/weights/src.pt" in caplog.text
    torch.save({"conv1.weight": torch.zeros(1)}, local)
    with pytest.raises(ConfigError, match="model.weights: s3://tl-test/cache-test/weights/src.pt does not match"):
        build_model(ModelConfig(backbone="resnet18", weights=str(local)), ["a", "b"], 32)


def test_a_text_encoder_read_from_a_nodes_copy_is_named_by_its_s3_uri(caplog, monkeypatch, tmp_path):
    """`model.backbone: hf:s3://...` runs from the node's copy of the folder; the log line names the s3:// URI."""
    import shutil

    from tl_core.config import ModelConfig
    from tl_core.files import node_copy_path
    from tl_core.text_models import build_text_model, model_dir

    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    copy = node_copy_path("bucket", "models/minilm")
    shutil.copytree(model_dir("hf:all-MiniLM-L6-v2"), copy)
    caplog.set_level("INFO", logger="tl_core")
    build_text_model(ModelConfig(backbone=f"hf:{copy}", weights="pretrained"), ["a", "b"])
    assert "weights: loaded hf:s3://bucket/models/minilm's pretrained encoder from s3://bucket/models/minilm" in caplog.text


def test_a_split_dataset_on_s3_is_synced_without_what_no_run_reads_and_the_run_names_it(s3, tmp_path, caplog):
    """Every object under data.root was copied to every node, a test/ split (or test.csv) included, which no run
    reads; they stay on S3 now, and the run names them with the command that scores a finished run on them."""
    import logging

    from helpers import make_image_folder, write_config

    from jobs.preflight import check_run
    from tl_core.config_file import load_config

    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=8, layout="split")
    storage.upload_dir(images, storage.parse("s3://tl-test/split-ds"))
    storage.upload_dir(images / "val", storage.parse("s3://tl-test/split-ds/test"))
    put(s3, "split-ds/README.md", b"how the images were taken")
    location = storage.parse("s3://tl-test/split-ds")
    assert storage.top_level_names(location) == ["README.md", "test/", "train/", "val/"]
    assert storage.top_level_names(storage.parse(str(images))) == ["train/", "val/"]

    with caplog.at_level(logging.WARNING, logger="jobs"):
        cfg = check_run(load_config(write_config(tmp_path, "s3://tl-test/split-ds")), resume=False)
    local = cache.local_path(location)
    assert sorted(p.relative_to(local).parts[0] for p in local.rglob("*.png")) == ["train"] * 12 + ["val"] * 4
    assert (local / "README.md").is_file() and not (local / "test").exists()
    assert cfg.data.root == "s3://tl-test/split-ds"
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("data:")] == [
        "data: a run trains on train and validates on val, and does not read test/ beside them; to score a finished run on "
        "held-out data: python -m jobs.predict --run RUN --data s3://tl-test/split-ds/test --out DEST"]


def test_what_a_run_leaves_unread_at_its_data_root_follows_how_the_indexes_read_it():
    from tl_core.modality import unread_beside

    assert unread_beside(["train/", "val/", "test/", ".cache/", "labels.csv.bak", "notes.txt"]) == ["test/"]
    assert unread_beside(["cats/", "dogs/", "test/"]) == []  # class folders: every folder is a class
    assert unread_beside(["train.csv", "val.jsonl", "test.CSV", "raw/", ".git/", "README.md"]) == ["raw/", "test.CSV"]
    assert unread_beside(["Train.Parquet", "extra.tsv"]) == ["extra.tsv"]
    assert unread_beside(["reviews.csv"]) == []  # one table: it is the data
    assert storage.top_level_of(["a/b/c.png", "a/d.png", "e.csv"]) == {"a/", "e.csv"}
