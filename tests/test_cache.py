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
