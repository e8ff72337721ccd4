"""jobs.predict: a finished run's best model over new images with Ray Data, predictions as Parquet."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset
import pytest
from helpers import make_image_folder
from test_hostile import one_line_exit_2

from cluster import storage
from jobs import predict
from tl_core.checkpoint import LocalReporter, load_model_state
from tl_core.config import from_dict
from tl_core.loop import fit


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_image_folder(root / "data", n_classes=3, per_class=16, size=20, layout="split")
    cfg = from_dict({"experiment": "p", "data": {"root": str(data), "image_size": 16, "loader_workers": 0},
                     "train": {"epochs": 2, "batch_size": 8}, "optim": {"name": "adam", "lr": 1e-3}})
    reporter = LocalReporter(root / "run")
    fit(cfg, reporter)
    (root / "run" / "result.json").write_text(json.dumps({"best_checkpoint": str(reporter.latest)}))
    return root / "run", data


@pytest.mark.integration
def test_predictions_on_the_validation_images_agree_with_the_runs_val_acc(ray_cluster, s3, finished_run, tmp_path):
    run, data = finished_run
    new = tmp_path / "new"
    shutil.copytree(data / "val", new)
    (new / "class_0" / "broken.png").write_bytes(b"not an image")
    (new / "class_1" / ".ipynb_checkpoints").mkdir()  # hidden: not predicted, as a run's index leaves it out
    shutil.copy(next((new / "class_1").glob("*.png")), new / "class_1" / ".ipynb_checkpoints" / "copy-checkpoint.png")
    os.mkfifo(new / "class_1" / "fifo.png")  # neither is read: a FIFO would block Ray Data's read forever
    (new / "class_1" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert predict.main(["--run", str(run), "--data", str(new), "--out", "s3://tl-test/predictions/p", "--top-k", "2",
                         "--batch-size", "4"]) == 0

    location = storage.parse("s3://tl-test/predictions/p")
    files = pyarrow.dataset.dataset(location.path, filesystem=storage.filesystem(location), format="parquet")
    assert len(files.files) > 1  # batches whose rows all read (no error strings) beside the one that holds broken.png
    table = files.to_table()  # one schema across them, as a user reads it
    rows = table.to_pylist()
    assert len(rows) == len([p for p in new.rglob("*.png") if p.is_file() and "/." not in str(p)])
    assert not any("/." in r["path"] or r["path"].endswith(("fifo.png", "dangling.png")) for r in rows)
    (broken,) = [r for r in rows if r["error"] is not None]
    assert broken["path"].endswith("class_0/broken.png") and broken["predicted"] is None
    readable = [r for r in rows if r["error"] is None]
    assert all(r["label"] == r["path"].split("/")[-2] for r in rows)  # each image's class folder under --data
    correct = sum(r["predicted"] == r["label"] for r in readable)
    _, meta = load_model_state(json.loads((run / "result.json").read_text())["best_checkpoint"])
    assert correct / len(readable) == pytest.approx(meta["metrics"]["val/acc"])  # the run's own number, recomputed
    # and scored by predict itself, as the run scored its validation (the unreadable image is not scored)
    scores = json.loads(s3.client().get_object(Bucket="tl-test", Key="predictions/p/_metrics.json")["Body"].read())
    assert scores["confusion_matrix"] == meta["confusion_matrix"] and scores["count"] == len(readable)
    assert (scores["acc"], scores["f1"]) == (pytest.approx(meta["metrics"]["val/acc"]), pytest.approx(meta["metrics"]["val/f1"]))
    assert scores["classes"] == meta["classes"] and scores["unknown_labels"] == {}
    assert len(files.to_table()) == len(rows)  # the metrics file beside the Parquet files is not read as one
    assert all(len(r["top_k"]) == 2 and r["top_k"][0] == r["predicted"] and r["top_k_probability"][0] == r["probability"]
               for r in readable)

    one = next(r for r in readable if r["path"].endswith(".png"))  # --data one image file: its one row, the same
    (tmp_path / "one").mkdir()  # --out an empty folder: taken
    assert predict.main(["--run", str(run), "--data", one["path"], "--out", str(tmp_path / "one"), "--top-k", "2"]) == 0
    (row,) = pyarrow.dataset.dataset(str(tmp_path / "one"), format="parquet").to_table().to_pylist()
    assert row["path"] == one["path"] and row["predicted"] == one["predicted"]
    assert row["label"] is None and not (tmp_path / "one" / "_metrics.json").exists()  # one file has no class folder

    storage.upload_dir(data / "val", storage.parse("s3://tl-test/test-images"))  # class folders under an S3 prefix
    extra = next((data / "val" / "class_0").glob("*.png")).read_bytes()  # in a folder of a class the run lacks: counted apart
    s3.client().put_object(Bucket="tl-test", Key="test-images/class_9/x.png", Body=extra)
    assert predict.main(["--run", str(run), "--data", "s3://tl-test/test-images/", "--out", str(tmp_path / "from-s3")]) == 0
    from_s3 = json.loads((tmp_path / "from-s3" / "_metrics.json").read_text())
    assert from_s3["confusion_matrix"] == meta["confusion_matrix"] and from_s3["unknown_labels"] == {"class_9": 1}
    assert row["probability"] == pytest.approx(one["probability"], abs=1e-6)


@pytest.mark.parametrize("case,message", [
    ("no_checkpoint", "--run: "),
    ("no_images", "holds no images (files named .jpg, .jpeg, .png, .ppm, ...); it holds 1 file(s) not named as images (.txt 1), e.g. "),
    ("out_exists", "already exists"),
    ("not_an_image", "notes.txt is a file not named like an image"),
    ("text_column", "--text-column: resnet18 is an image model; --text-column is for text models"),
    ("label_column", "--label-column: resnet18 is an image model; --label-column is for text models (images are labelled by their class folders)"),
])
def test_predict_mistakes_are_one_line_exit_2_and_write_nothing(case, message, finished_run, tmp_path, capsys):
    run, data = finished_run
    images, out = data / "val", tmp_path / "runs" / "predictions"
    if case == "no_checkpoint":
        run = tmp_path / "nowhere"
    elif case == "no_images":
        images = tmp_path / "empty"
        images.mkdir()
        (images / "notes.txt").write_text("no images here")
    elif case == "not_an_image":
        images = tmp_path / "notes.txt"
        images.write_text("no image")
    elif case == "out_exists":  # an empty folder is no obstacle (a stop before anything was written leaves one); one file in it is
        out.mkdir(parents=True)
        (out / "part-0.parquet").write_bytes(b"")
    written = ["predictions"] if case == "out_exists" else []
    extra = {"text_column": ["--text-column", "review"], "label_column": ["--label-column", "stars"]}.get(case, [])
    one_line_exit_2(predict.main, ["--run", str(run), "--data", str(images), "--out", str(out), *extra], capsys, tmp_path,
                    message, written)


@pytest.mark.integration
def test_a_text_run_predicts_a_table_of_texts(ray_cluster, tmp_path, capsys):
    from test_text import sentiment_rows, text_config, write_csv

    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(16, seed=1))
    reporter = LocalReporter(tmp_path / "run")
    fit(from_dict(text_config(tmp_path / "data", train={"epochs": 4})), reporter)
    rows = sentiment_rows(10, seed=7)  # new texts under another column name than the run's (text), with --text-column
    write_csv(tmp_path / "new.csv", [{"review": r["text"]} for r in rows] + [{"review": ""}], columns=("review",))
    assert predict.main(["--run", str(reporter.latest), "--data", str(tmp_path / "new.csv"), "--out", str(tmp_path / "out"),
                         "--text-column", "review"]) == 0
    # the summary said "11 texts predicted ...; 1 could not be read: 10", counting the empty text as predicted
    assert capsys.readouterr().out.strip().endswith(f"10 of 11 texts predicted with {reporter.latest}; 1 could not be read "
                                                    "(their error column says why): row 10")
    table = pyarrow.dataset.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    by_row = {int(r["path"]): r for r in table}
    assert len(by_row) == 11 and by_row[10]["error"] is not None and by_row[10]["predicted"] is None
    assert sum(by_row[i]["predicted"] == rows[i]["label"] for i in range(10)) >= 8
    assert all(r["label"] is None for r in table) and not (tmp_path / "out" / "_metrics.json").exists()  # no labels given

    # a held-out test table with the run's label column: scored; a label the run never saw is counted apart
    labelled = [{"review": r["text"], "label": r["label"]} for r in rows] + [{"review": "", "label": "pos"},
                                                                             {"review": rows[0]["text"], "label": "meh"}]
    write_csv(tmp_path / "test.csv", labelled, columns=("review", "label"))
    assert predict.main(["--run", str(reporter.latest), "--data", str(tmp_path / "test.csv"), "--out", str(tmp_path / "scored"),
                         "--text-column", "review"]) == 0
    table = pyarrow.dataset.dataset(str(tmp_path / "scored"), format="parquet").to_table().to_pylist()
    assert sorted((int(r["path"]), r["label"]) for r in table) == [(i, r["label"]) for i, r in enumerate(labelled)]
    correct = sum(r["predicted"] == r["label"] for r in table if int(r["path"]) < 10)
    scores = json.loads((tmp_path / "scored" / "_metrics.json").read_text())
    assert scores["count"] == 10 and scores["acc"] == correct / 10 and scores["unknown_labels"] == {"meh": 1}
    assert scores["classes"] == ["neg", "pos"] and sum(map(sum, scores["confusion_matrix"])) == 10
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"scored against their labels: accuracy {correct / 10:.3f}, macro F1 {scores['f1']:.3f} over 10 texts; every metric in "
        f"{tmp_path / 'scored' / '_metrics.json'}; 1 labelled with no class of the run, not scored: 'meh'")


@pytest.mark.integration
def test_the_command_line_predicts_through_the_cluster(ray_cluster, finished_run, tmp_path):
    """`python -m jobs.predict`, as a user (or `ray job submit`) runs it: its Ray Data actor class must reach the
    workers from the importable module; defined in `__main__`, Ray pickled it by value and failed ("cannot pickle
    '_Classes' object") where in-process calls of main() passed. Its standard output ends with the summary line."""
    run, data = finished_run
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "jobs.predict", "--run", str(run), "--data", str(data / "val"), "--out",
                           str(tmp_path / "out")], cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_images = len(list((data / "val").rglob("*.png")))
    best = json.loads((run / 'result.json').read_text())['best_checkpoint']
    summary, scored = proc.stdout.strip().splitlines()[-2:]
    assert summary.endswith(f"{n_images} of {n_images} images predicted with {best}")
    _, meta = load_model_state(best)
    assert scored == (f"scored against their labels: accuracy {meta['metrics']['val/acc']:.3f}, macro F1 "
                      f"{meta['metrics']['val/f1']:.3f} over {n_images} images; every metric in {tmp_path / 'out' / '_metrics.json'}")
    assert len(pyarrow.dataset.dataset(str(tmp_path / "out"), format="parquet").to_table()) == n_images


def test_images_in_class_folders_are_labelled_by_them_and_a_folder_naming_no_class_is_counted_apart():
    """A test set's folder of a class the run lacks was labelled None, and its images silently left unscored."""
    import pyarrow as pa

    classes = ["cat", "dog"]
    paths = ["bucket/sets/test/cat/1.jpg", "bucket/sets/test/dog/2024/05/1.jpg", "bucket/sets/test/bird/1.jpg", "bucket/sets/test/2.jpg"]
    root = predict.class_folders_root(paths, "bucket/sets/test/", classes)  # an S3 prefix of class folders
    assert [predict.first_folder(p, root) for p in paths] == ["cat", "dog", "bird", None]  # nested below its class; no folder
    assert predict.first_folder("/d/testing/cat/1.jpg", "/d/test") is None  # not under DATA
    # new images in folders that name no class (by date): unlabelled, nothing to score, nothing said
    assert predict.class_folders_root(["/d/new/2024/1.jpg", "/d/new/2.jpg"], "/d/new", classes) is None
    assert predict.class_folders_root(["/d/test/cat/1.jpg"], "/d/test/cat/1.jpg", classes) is None  # DATA was one file
    table = pa.table({"label": ["cat", "dog", "bird", None], "predicted": ["cat", "cat", "dog", "dog"], "error": [None] * 4})
    scores = predict.score(table, classes, "ckpt")
    assert scores["count"] == 2 and scores["acc"] == 0.5 and scores["unknown_labels"] == {"bird": 1}
    assert predict.scored(storage.parse("/tmp/nowhere-out"), scores, "images") == (
        "scored against their labels: accuracy 0.500, macro F1 0.333 over 2 images; every metric in /tmp/nowhere-out/_metrics.json; "
        "1 labelled with no class of the run, not scored: 'bird'")


def test_a_dataset_root_given_as_data_names_its_splits_of_class_folders():
    """--data ROOT (train/, val/, test/ of class folders) predicted every image and scored none, without a word."""
    paths = ["/d/train/cat/1.jpg", "/d/train/dog/2.jpg", "/d/test/cat/3.jpg", "/d/test/bird/4.jpg", "/d/notes/a/5.jpg", "/d/6.jpg"]
    assert predict.class_folders_root(paths, "/d", ["cat", "dog"]) is None
    assert predict.split_folders(paths, "/d/", ["cat", "dog"]) == ["test", "train"]
    assert predict.split_folders(["/d/2024/05/1.jpg"], "/d", ["cat", "dog"]) == []  # folders by date: new images


def test_predict_warns_before_it_starts_when_data_is_a_dataset_root(finished_run, tmp_path, capsys, monkeypatch):
    import jobs.runner

    class Started(Exception):
        pass

    def started():
        raise Started

    run, data = finished_run  # data: train/ and val/ of class folders
    monkeypatch.setattr(jobs.runner, "connect_ray", started)  # the warning comes before Ray starts; stop there
    with pytest.raises(Started):
        predict.main(["--run", str(run), "--data", str(data), "--out", str(tmp_path / "out")])
    assert (f"--data: the images under train/, val/ are in class folders one level down, so they are predicted but not "
            f"scored; to score one split: --data {data}/val") in capsys.readouterr().err


def test_files_under_data_not_named_as_images_are_said_to_be_left_out(tmp_path, s3, caplog):
    """--data's GIFs and notes were skipped without a word, locally and on S3; hidden files are no data at all."""
    import logging

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=2)
    (data / "class_0" / "anim.gif").write_bytes(b"GIF89a")
    (data / "notes.txt").write_text("taken in May\n")
    (data / ".DS_Store").write_bytes(b"\x00")
    storage.upload_dir(data, storage.parse("s3://tl-test/predict-left-out"))
    for where, first in ((str(data), f"{data}/notes.txt"), ("s3://tl-test/predict-left-out", "s3://tl-test/predict-left-out/class_0/anim.gif")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tl_core"):
            assert len(predict.image_paths(storage.parse(where))) == 4
        assert f"data: left out 2 file(s) not named as images (.gif 1, .txt 1), e.g. {first};" in caplog.text, where
    one = next((data / "class_1").glob("*.png"))  # one image file: nothing beside it is looked at
    assert predict.image_paths(storage.parse(str(one))) == [str(one)]


def test_labels_that_name_no_class_of_the_run_are_said_not_scored_as_zero():
    """A test table labelled 1-5 stars for a run on neg/pos read "accuracy 0.000, macro F1 0.000 over 0 texts"."""
    import pyarrow as pa

    table = pa.table({"label": ["5", "1", None], "predicted": ["pos", "neg", "pos"], "error": [None, None, None]})
    scores = predict.score(table, ["neg", "pos"], "ckpt")
    assert scores["count"] == 0 and scores["unknown_labels"] == {"5": 1, "1": 1}
    out = storage.parse("/tmp/nowhere-out")
    assert predict.scored(out, scores, "texts") == "not scored: no label names a class of the run ('neg', 'pos'); 2 texts are labelled '5', '1'"
