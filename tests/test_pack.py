"""jobs.pack_data: an image folder cleaned, split and packed once into Parquet shards, locally and on S3."""

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_image_folder
from test_hostile import one_line_exit_2

from cluster import storage
from jobs import pack_data
from tl_core.data import DataConfig, index_image_folder
from tl_core.packed import MANIFEST_FILE, Manifest


def shard_rows(dest, manifest, split):
    rows = []
    for shard in manifest.shards[split]:
        table = pq.read_table(f"{dest}/{shard['path']}")
        assert table.num_rows == shard["rows"]
        rows += list(zip(table.column("path").to_pylist(), table.column("label").to_pylist(), table.column("image").to_pylist(),
                         strict=True))
    return rows


def dirty_folder(root, layout="flat"):
    """3 classes x 12 images, plus a file that does not decode, a FIFO named like an image (a read would wait for
    a writer forever) and an exact duplicate."""
    data = make_image_folder(root, n_classes=3, per_class=12, size=16, layout=layout)
    first = sorted((data / "train" if layout == "split" else data).glob("class_0/*.png"))[0]
    (first.parent / "broken.png").write_bytes(first.read_bytes()[:40])
    os.mkfifo(first.parent / "fifo.png")
    shutil.copy(first, first.parent / "copy.png")
    return data


@pytest.mark.integration
def test_pack_cleans_and_splits_once_like_a_run_would_and_does_nothing_twice(ray_cluster, tmp_path, capsys):
    data = dirty_folder(tmp_path / "data")
    dest = tmp_path / "packed"
    argv = [str(data), str(dest), "--val-fraction", "0.25", "--seed", "3", "--shard-mb", "0.004"]  # a few images a shard
    assert pack_data.main(argv) == 0
    manifest = Manifest.from_json((dest / MANIFEST_FILE).read_text(), "test")
    index = index_image_folder(DataConfig(root=str(data), val_fraction=0.25), seed=3)  # what a run indexes
    assert manifest.classes == index.classes
    assert manifest.counts == {"train": len(index.train), "val": len(index.val), "unreadable": 2, "duplicates": 1}
    train, val = shard_rows(dest, manifest, "train"), shard_rows(dest, manifest, "val")
    assert len(manifest.shards["train"]) > 3  # cut by --shard-mb
    def relative(samples):
        return sorted((Path(p).relative_to(data).as_posix(), label) for p, label in samples)

    assert sorted((p, label) for p, label, _ in train) == relative(index.train)
    assert sorted((p, label) for p, label, _ in val) == relative(index.val)
    assert all(image == (data / p).read_bytes() for p, _, image in train + val)  # the encoded bytes as they were
    biggest = max(manifest.shards["train"], key=lambda s: s["rows"])
    assert len(set(pq.read_table(dest / biggest["path"]).column("label").to_pylist())) > 1  # shuffled: shards mix classes
    assert not (dest / "_staging").exists()

    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*.parquet")}
    assert pack_data.main(argv) == 0  # unchanged source: nothing is written again
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.parquet")} == stamps
    assert "up to date" in capsys.readouterr().err

    # Cut short after the shards of the first group: the rerun writes the rest, and never a shard twice.
    (dest / MANIFEST_FILE).unlink()
    lost = dest / manifest.shards["train"][-1]["path"]
    lost.unlink()
    assert pack_data.main(argv) == 0
    assert lost.exists() and {p: p.stat().st_mtime_ns for p in stamps if p != lost} == {p: s for p, s in stamps.items() if p != lost}

    # A changed source is a new version.
    (data / "class_1" / "new.png").write_bytes((data / "class_1" / "000.png").read_bytes()[:-1] + b"\x00")
    assert pack_data.main(argv) == 0
    again = Manifest.from_json((dest / MANIFEST_FILE).read_text(), "test")
    assert again.fingerprint != manifest.fingerprint and again.counts["train"] + again.counts["val"] >= len(train) + len(val)


@pytest.mark.integration
def test_pack_from_s3_to_s3_keeps_val_and_reads_back_with_pyarrow(ray_cluster, s3, tmp_path, caplog):
    data = dirty_folder(tmp_path / "data", layout="split")
    storage.upload_dir(data, storage.parse("s3://tl-test/raw/split"))
    storage.upload_dir(data / "val", storage.parse("s3://tl-test/raw/split/test"))  # a test split: no run reads it
    # caplog without at_level: main() sets the jobs logger up, and at_level would then reset its level on exit,
    # silencing the INFO lines of every later main() in the session ("up to date")
    assert pack_data.main(["s3://tl-test/raw/split", "s3://tl-test/packed/split"]) == 0
    assert "pack: test/ beside train and val in s3://tl-test/raw/split is not packed (a run reads train and val only)" in caplog.text
    body = s3.client().get_object(Bucket="tl-test", Key="packed/split/manifest.json")["Body"].read().decode()
    manifest = Manifest.from_json(body, "s3")
    assert manifest.source == "s3://tl-test/raw/split" and manifest.counts["val"] == 9  # val/ kept as given
    assert manifest.counts["train"] == 36 - 9 and manifest.counts["unreadable"] == 1 and manifest.counts["duplicates"] == 1
    filesystem = storage.filesystem(storage.parse("s3://tl-test/packed/split"))
    rows = sum(pq.read_metadata(f"tl-test/packed/split/{s['path']}", filesystem=filesystem).num_rows
               for split in manifest.shards.values() for s in split)
    assert rows == 36
    assert not [o for o in storage.list_objects(storage.parse("s3://tl-test/packed/split")) if o["Key"].startswith("_staging")]
    # the test split is no part of the version either: a file added to it repacks nothing
    s3.client().put_object(Bucket="tl-test", Key="raw/split/test/class_0/late.png", Body=next((data / "val" / "class_0").glob("*.png")).read_bytes())
    caplog.clear()
    assert pack_data.main(["s3://tl-test/raw/split", "s3://tl-test/packed/split"]) == 0
    assert "pack: s3://tl-test/packed/split is up to date with s3://tl-test/raw/split" in caplog.text


@pytest.mark.integration
def test_a_class_with_no_readable_image_is_one_line_and_leaves_nothing(ray_cluster, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=4)
    for path in (data / "class_1").iterdir():
        path.write_bytes(b"junk")
    assert pack_data.main([str(data), str(tmp_path / "packed")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines while reading, then the mistake in one line
    assert err[-1].startswith("error: SOURCE: class folder(s) with no readable images: class_1"), err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "packed").exists()


@pytest.mark.integration
def test_the_cleanings_mistakes_name_this_commands_arguments(ray_cluster, tmp_path, capsys):
    """The cleaning a run does (tl_core.data.clean_and_split) named the run's config keys: "data.root: val/ has ...",
    "too few images for a validation split (val_fraction=0.2)"; pack_data has SOURCE and --val-fraction."""
    copies = make_image_folder(tmp_path / "copies", n_classes=2, per_class=4, layout="split")
    for image in (copies / "val").rglob("*.png"):
        image.write_bytes(next((copies / "train" / image.parent.name).glob("*.png")).read_bytes())
    few = make_image_folder(tmp_path / "few", n_classes=2, per_class=1)  # a class of one image stays in train
    for source, extra, message in ((copies, [], "SOURCE: val/ has no image left to validate on: of its 2, 2 repeat train/ images"),
                                   (few, ["--val-fraction", "0.3"], "SOURCE: too few images for a validation split (--val-fraction 0.3)")):
        assert pack_data.main([str(source), str(tmp_path / "packed"), *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
        assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("case,message", [
    ("missing", "SOURCE: directory"),
    ("a_file", "SOURCE: {source} is a file, not a folder; give the folder that holds the data, or one table of texts "
               "(.csv, .tsv, .jsonl or .parquet)"),
    ("empty", "holds no files"),
    ("one_class", "SOURCE: found 1 class folder(s)"),  # was data.root's, a run's key
    ("dest_inside", "is inside SOURCE"),
    ("dest_not_packed", "holds files and no packed dataset"),
    ("bad_manifest", "is not a packed dataset's manifest"),
    ("val_fraction", "argument --val-fraction: 1.5 must be between 0 and 1 (both excluded) (usage: python -m jobs.pack_data"),
    ("text_one_class", "--label-column: train.csv has 1 class(es) in column 'label'; need at least 2"),
    ("text_one_table_file", "--label-column: reviews.csv has 1 class(es) in column 'label'; need at least 2"),
    ("text_no_column", "--text-column: train.csv has no column 'text'; its columns: review, label"),
    # a traceback from the schema once; and the texts as their own labels, each its own class
    ("text_empty_column", "argument --text-column: must name a column of the table, not be empty (usage: python -m jobs.pack_data"),
    ("text_same_columns", "--label-column: 'text' is --text-column too; the labels must be in a column of their own"),
])
def test_pack_mistakes_are_one_line_exit_2_and_write_nothing(case, message, tmp_path, capsys):
    source, dest = tmp_path / "data", tmp_path / "runs" / "packed"
    extra = []
    if case == "empty":
        source.mkdir()
    elif case == "one_class":
        make_image_folder(source, n_classes=1, per_class=3)
    elif case.startswith("text"):
        from test_text import sentiment_rows, write_csv

        rows = sentiment_rows(8)
        if case == "text_one_class":
            write_csv(source / "train.csv", [{**r, "label": "pos"} for r in rows])
        elif case == "text_one_table_file":  # SOURCE names the table itself: read as one
            source = write_csv(source / "reviews.csv", [{**r, "label": "pos"} for r in rows])
        elif case in ("text_empty_column", "text_same_columns"):
            write_csv(source / "train.csv", rows)
        else:
            write_csv(source / "train.csv", [{"review": r["text"], "label": r["label"]} for r in rows], columns=("review", "label"))
    elif case == "a_file":
        source = make_image_folder(source, n_classes=2, per_class=3) / "class_0" / "000.png"
    elif case != "missing":
        make_image_folder(source, n_classes=2, per_class=3)
    if case == "dest_inside":
        dest = source / "packed"
    if case in ("dest_not_packed", "bad_manifest"):
        dest.mkdir(parents=True)
        (dest / ("notes.txt" if case == "dest_not_packed" else MANIFEST_FILE)).write_text(json.dumps({"format": "other"}))
    if case == "val_fraction":
        extra = ["--val-fraction", "1.5"]
    extra += {"text_empty_column": ["--text-column="], "text_same_columns": ["--label-column", "text"]}.get(case, [])
    written = ["packed"] if case in ("dest_not_packed", "bad_manifest") else []
    one_line_exit_2(pack_data.main, [str(source), str(dest), *extra], capsys, tmp_path, message.format(source=source), written=written)
    if written:
        assert len(list(dest.iterdir())) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_a_text_table_on_s3_is_packed_once_and_streams_to_a_text_run(ray_cluster, s3, tmp_path, capsys):
    """Text tables (train.csv with empty, unlabelled and duplicate rows; val.csv) packed from S3 to S3, cleaned as a
    text run cleans them; a MiniLM run streams the shards (tokenised per batch by the worker), learns, and evaluates
    every validation text once."""
    from helpers import write_config
    from test_text import MINILM, sentiment_rows, write_csv

    from jobs import finetune
    from tl_core.text import index_text_table

    source = tmp_path / "text"
    rows = sentiment_rows(48)
    write_csv(source / "train.csv", rows[:36] + [{"text": "", "label": "pos"}, {"text": "no label here", "label": None}, rows[0]])
    write_csv(source / "val.csv", rows[36:])
    storage.upload_dir(source, storage.parse("s3://tl-test/raw/text"))
    argv = ["s3://tl-test/raw/text", "s3://tl-test/packed/text", "--shard-mb", "0.001"]
    assert pack_data.main(argv) == 0
    manifest = Manifest.from_json(s3.client().get_object(Bucket="tl-test", Key="packed/text/manifest.json")["Body"].read(), "s3")
    index = index_text_table(DataConfig(root=str(source)), seed=0)  # what a text run reads
    assert manifest.modality == "text" and manifest.classes == index.classes == ["neg", "pos"]
    assert manifest.counts == {"train": 36, "val": 12, "unreadable": 2, "duplicates": 1}
    filesystem = storage.filesystem(storage.parse("s3://tl-test/packed/text"))
    stored = {split: sorted(row for shard in manifest.shards[split] for row in zip(
        *pq.read_table(f"tl-test/packed/text/{shard['path']}", filesystem=filesystem).to_pydict().values(), strict=True))
        for split in ("train", "val")}
    assert stored == {"train": sorted(index.train), "val": sorted(index.val)} and len(manifest.shards["train"]) > 1
    assert pack_data.main(argv) == 0 and "up to date" in capsys.readouterr().err
    # SOURCE may name one table object: packed as a folder holding only it would be
    assert pack_data.main(["s3://tl-test/raw/text/train.csv", "s3://tl-test/packed/one-table"]) == 0
    one = Manifest.from_json(s3.client().get_object(Bucket="tl-test", Key="packed/one-table/manifest.json")["Body"].read(), "s3")
    alone = index_text_table(DataConfig(root=str(source / "train.csv")), seed=0)
    assert one.source == "s3://tl-test/raw/text/train.csv" and one.classes == alone.classes
    assert one.counts == {"train": len(alone.train), "val": len(alone.val), "unreadable": 2, "duplicates": 1}

    config = write_config(tmp_path, "s3://tl-test/packed/text", experiment="streamed-text",
                          train={"epochs": 2, "batch_size": 8, "class_weights": "balanced"},  # from the manifest's counts
                          data={"max_length": 32, "decode_cpus": 0.5}, storage={"root": "s3://tl-test/runs"},
                          model={"backbone": MINILM, "weights": "pretrained", "strategy": "linear_probe"},
                          optim={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "scheduler": "cosine"},
                          scaling={"num_workers": 1, "resources_per_worker": {"CPU": 1}})
    assert finetune.main(["--config", str(config)]) == 0
    result = json.loads(s3.client().get_object(Bucket="tl-test", Key="runs/streamed-text/result.json")["Body"].read())
    assert result["epochs_completed"] == 2 and result["classes"] == ["neg", "pos"]
    assert result["best_metric"]["val/acc"] >= 0.8
    meta = json.loads(s3.client().get_object(Bucket="tl-test", Key="runs/streamed-text/checkpoint_epoch_0002/meta.json")["Body"].read())
    assert sum(map(sum, meta["confusion_matrix"])) == 12  # every validation text once


# ---------------------------------------------------------------- streaming a packed dataset to training

def test_a_row_that_does_not_decode_is_dropped_not_fatal():
    import io

    import numpy as np
    from PIL import Image

    from tl_core.data import crop_transform
    from tl_core.packed import decode_batch

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buffer, format="JPEG")
    batch = {"image": np.array([buffer.getvalue(), b"not an image", buffer.getvalue()], dtype=object),
             "label": np.array([0, 1, 2]), "path": np.array(["a.jpg", "b.jpg", "c.jpg"], dtype=object)}
    out = decode_batch(batch, crop_transform(16, train=False, augment=False, hflip=False))
    assert out["image"].shape == (2, 3, 16, 16) and out["image"].dtype == np.uint8 and out["label"].tolist() == [0, 2]


def test_a_decode_task_holds_torch_to_its_cpus_and_decodes_as_decode_batch_does(monkeypatch):
    import io

    import numpy as np
    import torch
    from PIL import Image

    from jobs.streaming import decode_with_threads
    from tl_core.data import crop_transform
    from tl_core.packed import decode_batch

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buffer, format="JPEG")
    batch = {"image": np.array([buffer.getvalue()] * 2, dtype=object), "label": np.array([3, 4]),
             "path": np.array(["a.jpg", "b.jpg"], dtype=object)}
    transform = crop_transform(16, train=False, augment=False, hflip=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # a worker whose torch started with a thread per core
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray sets it for a task of 0.5 or 1 CPU
        out = decode_with_threads(batch, transform)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    expected = decode_batch(batch, transform)
    assert np.array_equal(out["image"], expected["image"]) and out["label"].tolist() == [3, 4]


def test_parquet_read_units_are_set_while_planning_and_a_users_setting_wins(monkeypatch):
    import os

    from jobs.streaming import read_units

    key = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
    monkeypatch.delenv(key, raising=False)
    with read_units(1234):
        assert os.environ[key] == "1234"
    assert key not in os.environ
    monkeypatch.setenv(key, "99")
    with read_units(1234):
        assert os.environ[key] == "99"
    assert os.environ[key] == "99"


@pytest.mark.integration
def test_read_and_decode_tasks_ask_for_the_cpus_the_room_check_counts(ray_cluster, tmp_path):
    """The plan's read tasks hold streaming.READ_TASK_CPUS and its decode tasks data.decode_cpus: what
    check_decode_room counts, so the check and the plan cannot drift apart."""
    from jobs import streaming
    from tl_core.config import from_dict

    data, dest = make_image_folder(tmp_path / "data", n_classes=2, per_class=4, size=16), tmp_path / "packed"
    assert pack_data.main([str(data), str(dest)]) == 0
    cfg = from_dict({"experiment": "plan", "data": {"root": str(dest), "image_size": 16, "decode_cpus": 0.25}})
    manifest = Manifest.from_json((dest / MANIFEST_FILE).read_text(), "test")
    asked, op = {}, streaming.datasets(cfg, manifest)["train"]._logical_plan.dag
    while op is not None:
        if getattr(op, "ray_remote_args", None):
            asked[op.name] = op.ray_remote_args.get("num_cpus")
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert sorted(asked.values()) == [0.25, streaming.READ_TASK_CPUS], asked


def test_a_run_that_leaves_no_room_for_read_or_decode_tasks_is_refused_not_left_waiting():
    from jobs.preflight import check_decode_room
    from tl_core.config import from_dict
    from tl_core.errors import ConfigError

    cfg = from_dict({"experiment": "room", "data": {"root": "unused"}})
    check_decode_room(cfg, held=1.0, cpus=2.0, modality="image")  # one CPU left: a read task (1 CPU), or two decode tasks
    with pytest.raises(ConfigError, match=r"data.decode_cpus: .* read by Ray Data tasks of 1 CPU .* hold 1.5 of the cluster's 2 CPUs"):
        check_decode_room(cfg, held=1.5, cpus=2.0, modality="image")  # room for a decode task, but never for a read
    wide = from_dict({"experiment": "room", "data": {"root": "unused", "decode_cpus": 4}})
    with pytest.raises(ConfigError, match="decoded by tasks of 4 CPU"):
        check_decode_room(wide, held=1.0, cpus=4.0, modality="image")
    check_decode_room(wide, held=1.0, cpus=4.0, modality="text")  # texts are read as stored: no decode task to fit
    with pytest.raises(ConfigError, match=r"scaling.resources_per_worker: a packed text dataset is read by Ray Data tasks of 1 CPU"):
        check_decode_room(wide, held=3.5, cpus=4.0, modality="text")


@pytest.mark.parametrize("case,message", [
    ("missing_shard", "data.root: {dest}'s manifest names shard v1/val-00000.parquet, which is gone; pack it again"),
    ("cut_shard", "data.root: shard v1/train-00000.parquet of {dest} has 100 bytes where its manifest recorded "),
    ("simclr", "is a packed dataset, which supervised runs stream"),
])
def test_a_packed_dataset_that_cannot_stream_is_one_line_exit_2(case, message, tmp_path, capsys):
    """A shard cut short (or replaced) was a Parquet footer traceback from Ray Data's planning."""
    from helpers import write_config

    from jobs import finetune, pretrain

    dest = tmp_path / "packed"
    (dest / "v1").mkdir(parents=True)
    shards = {}
    for split, label in (("train", 0), ("val", 1)):
        path = dest / "v1" / f"{split}-00000.parquet"
        pq.write_table(pa.table({"image": [b"x"], "label": [label], "path": [f"{split}/1.png"]}), path)
        shards[split] = [{"path": f"v1/{path.name}", "rows": 1, "bytes": path.stat().st_size}]
    if case == "missing_shard":
        (dest / "v1" / "val-00000.parquet").unlink()
    elif case == "cut_shard":
        train = dest / "v1" / "train-00000.parquet"
        train.write_bytes(train.read_bytes()[:100])
    manifest = Manifest(classes=["a", "b"], shards=shards, source="x", fingerprint="f", val_fraction=0.2, seed=0,
                        per_class={"train": {"a": 1, "b": 0}, "val": {"a": 0, "b": 1}})
    (dest / MANIFEST_FILE).write_text(manifest.to_json())
    message = message.format(dest=dest)
    config = write_config(tmp_path, dest, **({"pretrain": {"method": "simclr"}} if case == "simclr" else {}))
    one_line_exit_2((pretrain if case == "simclr" else finetune).main, ["--config", str(config)], capsys, tmp_path, message)


@pytest.mark.integration
@pytest.mark.slow
def test_a_packed_dataset_on_s3_streams_to_two_ddp_workers_and_survives_a_killed_worker(ray_cluster, s3, tmp_path):
    """Packed once from S3 to S3, then streamed with Ray Data to 2 DDP workers (decoded in map_batches tasks beside
    them), never copied to the node cache; a worker killed after the first checkpoint is replaced and the run goes
    on from it; every validation image is evaluated exactly once per epoch across the ranks."""

    from helpers import write_config
    from test_s3_jobs import WorkerKiller, last_modified

    from cluster.storage import cache
    from jobs import finetune
    from tl_core.checkpoint import META_FILE

    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=16, size=16)
    storage.upload_dir(data, storage.parse("s3://tl-test/raw/stream"))
    assert pack_data.main(["s3://tl-test/raw/stream", "s3://tl-test/packed/stream", "--shard-mb", "0.01"]) == 0
    manifest = Manifest.from_json(s3.client().get_object(Bucket="tl-test", Key="packed/stream/manifest.json")["Body"].read(), "s3")
    config = write_config(tmp_path, "s3://tl-test/packed/stream", experiment="streamed", train={"epochs": 3, "batch_size": 8},
                          data={"decode_cpus": 0.5, "image_size": 16}, storage={"root": "s3://tl-test/runs"}, checkpoint={"keep": None},
                          scaling={"num_workers": 2, "max_failures": 1, "resources_per_worker": {"CPU": 0.5}})
    first = f"runs/streamed/checkpoint_epoch_0001/{META_FILE}"
    killer = WorkerKiller(s3, first)
    assert finetune.main(["--config", str(config)]) == 0
    killed = killer.join()
    assert len(killed) == 2 and last_modified(s3, first) == killed[0]
    result = json.loads(s3.client().get_object(Bucket="tl-test", Key="runs/streamed/result.json")["Body"].read())
    assert result["epochs_completed"] == 3 and result["classes"] == manifest.classes
    assert result["best_metric"]["val/acc"] >= 0.6  # it learns (9 validation images: the last epoch's value is noisy)
    meta = json.loads(s3.client().get_object(Bucket="tl-test", Key="runs/streamed/checkpoint_epoch_0003/meta.json")["Body"].read())
    assert sum(map(sum, meta["confusion_matrix"])) == manifest.rows("val")  # every validation image once
    assert not cache.local_path(storage.parse("s3://tl-test/packed/stream")).exists()  # streamed, never copied


def test_what_a_packed_dataset_fixed_when_packed_is_named_when_a_run_changes_it():
    """Its split and a text pack's columns were fixed by jobs.pack_data, and it streams without the folder loader's
    workers: a run that sets them is told they are not read; a folder run is told so of data.decode_cpus."""
    from tl_core.config import from_dict
    from tl_core.modality import unread_settings

    cfg = from_dict({"experiment": "x", "data": {"root": "/packed", "val_fraction": 0.5, "decode_cpus": 1.0,
                                                 "label_column": "y", "image_size": 64}})
    assert unread_settings(cfg, "image", packed=True) == ["data.label_column: y", "data.val_fraction: 0.5"]
    assert unread_settings(cfg, "image", packed=False) == ["data.label_column: y", "data.decode_cpus: 1.0"]
    assert unread_settings(cfg, "text", packed=True) == ["data.image_size: 64", "data.val_fraction: 0.5",
                                                         "data.label_column: y"]


def test_a_manifest_without_per_class_counts_is_not_ours():
    """Class weights (train.class_weights) read the training split's per-class counts from the manifest."""
    from tl_core.errors import DataError

    manifest = Manifest(classes=["a", "b"], shards={"train": [{"path": "v1/t.parquet", "rows": 2}], "val": [{"path": "v1/v.parquet", "rows": 1}]},
                        source="x", fingerprint="f", val_fraction=0.2, seed=0,
                        per_class={"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 0}})
    assert Manifest.from_json(manifest.to_json(), "here").per_class["train"] == {"a": 1, "b": 1}
    for per_class in ({}, {"train": {"a": 1, "b": 1}}, {"train": {"a": 2}, "val": {"a": 1, "b": 0}}):
        with pytest.raises(DataError, match=r"data.root: there is not a packed dataset's manifest \(per-class counts missing\)"):
            Manifest.from_json(json.dumps({**json.loads(manifest.to_json()), "per_class": per_class}), "there")


def test_files_of_a_class_not_named_as_images_are_named_in_a_warning_and_change_no_version(tmp_path, caplog):
    """As a run's index does: a class folder's GIF or note is left out in a warning (it once vanished silently), what
    lies beside the classes (a README) is no data and is not named, and a changed note repacks nothing."""
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=3, size=8)
    (data / "README.md").write_text("about")
    (data / "class_0" / "anim.gif").write_bytes(b"GIF89a")
    (data / "class_1" / "notes.txt").write_text("one")
    source = storage.parse(str(data), field="SOURCE")
    files = pack_data.list_source(source)
    classes, train, _ = pack_data.layout_from_paths([f.path for f in files], source.uri)
    assert classes == ["class_0", "class_1"] and len(train) == 6
    assert (f"data: left out 2 file(s) not named as images (.gif 1, .txt 1), e.g. {data}/class_0/anim.gif; images are "
            in caplog.text)
    assert "README" not in caplog.text
    version = pack_data.fingerprint([f for f in files if pack_data.is_image_path(f.path)], 0.2, 0)
    (data / "class_1" / "notes.txt").write_text("two, longer")
    again = pack_data.list_source(source)
    assert pack_data.fingerprint([f for f in again if pack_data.is_image_path(f.path)], 0.2, 0) == version


def test_an_s3_listing_leaves_out_what_is_not_an_image_as_a_local_folder_does(caplog):
    listing = ["README.md", "train/a/1.png", "train/a/2.gif", "train/b/1.png", "train/b/.ipynb_checkpoints/x.txt",
               "val/a/3.png", "val/b/notes.txt", "test/a/9.txt"]
    classes, train, val = pack_data.layout_from_paths(listing, "s3://b/raw")
    assert (classes, train, val) == (["a", "b"], [("train/a/1.png", 0), ("train/b/1.png", 1)], [("val/a/3.png", 0)])
    assert "data: left out 2 file(s) not named as images (.gif 1, .txt 1), e.g. s3://b/raw/train/a/2.gif;" in caplog.text


def test_a_streamed_runs_data_config_sets_no_deprecated_ray_option():
    """Ray Train's default ingest options set `exclude_resources`, so every streamed run printed Ray Data's
    RayDeprecationWarning about it from its DatasetManager."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from jobs import streaming

    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        options = streaming.data_config()._resolve_execution_options("train")  # what its configure applies
    assert options.preserve_order is False
