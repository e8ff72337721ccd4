"""Text classification through the same core: text tables, the offline MiniLM encoder, strategies on a transformer,
and the text mistakes a user can make (one line, exit 2, nothing written)."""

import json
import logging
import random

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch
from helpers import make_image_folder, write_config
from test_hostile import one_line_exit_2

from jobs import finetune
from tl_core.config import DataConfig, ModelConfig, from_dict
from tl_core.errors import ConfigError, DataError
from tl_core.loop import fit
from tl_core.models import apply_strategy, backbone_blocks, build_model, set_train_mode
from tl_core.text import index_text_table, text_data

MINILM = "hf:all-MiniLM-L6-v2"
GOOD = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "brilliant", "fantastic"]
BAD = ["terrible", "awful", "dreadful", "horrible", "boring", "painful", "dismal", "lousy"]
THINGS = ["film", "meal", "concert", "book", "hotel", "game", "trip", "show", "lecture", "album"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("pos", "neg")[i % 2]
        word = rng.choice(GOOD if label == "pos" else BAD)
        rows.append({"text": f"The {rng.choice(THINGS)} was {word}, {rng.choice(['really', 'truly', 'quite'])} {word} ({i}).",
                     "label": label})
    return rows


def write_csv(path, rows, columns=("text", "label")):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pa.csv.write_csv(table, path) if path.suffix == ".csv" else pyarrow.parquet.write_table(table, path)
    return path


def text_config(root, **sections) -> dict:
    cfg = {"experiment": "text", "data": {"root": str(root), "loader_workers": 0, "max_length": 32},
           "model": {"backbone": MINILM, "weights": "pretrained", "strategy": "linear_probe"},
           "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "scheduler": "cosine"},
           "train": {"epochs": 3, "batch_size": 8}}
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values}
    return cfg


def test_the_offline_minilm_is_really_pretrained():
    """Mean-pooled embeddings put a paraphrase closer than an unrelated sentence; the same architecture with random
    weights does not tell them apart as clearly."""
    from tl_core.text_models import load_tokenizer

    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    batch = dict(load_tokenizer(MINILM, 64)(sentences, padding=True, return_tensors="pt"))
    sims = {}
    for weights in ("pretrained", None):
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=MINILM, weights=weights), ["a", "b"], 32).eval()
        with torch.no_grad():
            e = torch.nn.functional.normalize(model.embed(batch), dim=-1)
        sims[weights] = (float(e[0] @ e[1]), float(e[0] @ e[2]))
    paraphrase, unrelated = sims["pretrained"]
    assert paraphrase > 0.7 and unrelated < 0.2
    assert paraphrase - unrelated > 2 * (sims[None][0] - sims[None][1])


def test_text_tables_are_read_cleaned_and_split(tmp_path, caplog):
    rows = sentiment_rows(20) + [{"text": "", "label": "pos"}, {"text": "no label here", "label": None},
                                 {"text": None, "label": "neg"}, dict(sentiment_rows(1)[0])]  # empty, unlabelled, null, duplicate
    write_csv(tmp_path / "one" / "reviews.csv", rows)
    index = index_text_table(DataConfig(root=str(tmp_path / "one"), val_fraction=0.25), seed=0)
    assert index.classes == ["neg", "pos"]
    assert len(index.train) + len(index.val) == 20 and len(index.val) == 4  # stratified: a quarter of each class
    assert len(index.unreadable) == 3 and index.duplicates == 1
    assert index.summary() == "2 classes, 16 train / 4 val texts; skipped 3 empty or unlabelled, dropped 1 duplicates"
    # the same text under another label is kept once, under its first label, and named in a warning
    first = sentiment_rows(1)[0]
    write_csv(tmp_path / "conflict" / "reviews.csv", sentiment_rows(20) + [{"text": first["text"], "label": "neg" if first["label"] == "pos" else "pos"}])
    with caplog.at_level(logging.WARNING, logger="tl_core"):
        index = index_text_table(DataConfig(root=str(tmp_path / "conflict"), val_fraction=0.25), seed=0)
    assert index.duplicates == 1 and (first["text"], index.classes.index(first["label"])) in index.train + index.val
    assert [r.getMessage() for r in caplog.records if "another class" in r.getMessage()] == [
        f"data: 1 text(s) repeat one of another class and were kept once, under the first class; e.g. {first['text']!r} "
        f"({'neg' if first['label'] == 'pos' else 'pos'}) repeats {first['text']!r} ({first['label']})"]
    # train + val files, JSON lines and Parquet; integer labels sort as numbers
    numbered = [{"text": r["text"], "label": 10 if r["label"] == "pos" else 2} for r in sentiment_rows(12)]
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.jsonl").write_text("\n".join(json.dumps(r) for r in numbered[:8]))
    write_csv(split / "val.parquet", numbered[8:])
    index = index_text_table(DataConfig(root=str(split)), seed=0)
    assert index.classes == ["2", "10"] and len(index.train) == 8 and len(index.val) == 4
    # a table in two formats, or val.* alone: which file trains cannot be guessed (the last one listed silently did)
    write_csv(split / "train.csv", numbered[:4])
    with pytest.raises(DataError, match=r"holds one table in 2 files \(train.csv, train.jsonl\); keep one"):
        index_text_table(DataConfig(root=str(split)), seed=0)
    for name in ("train.csv", "train.jsonl"):
        (split / name).unlink()
    with pytest.raises(DataError, match="holds val.parquet but no train.csv, train.tsv, train.jsonl or train.parquet"):
        index_text_table(DataConfig(root=str(split)), seed=0)


def test_data_root_may_name_one_table_file_locally_and_on_s3(tmp_path, s3, capsys, caplog):
    """`data.root: reviews.csv` (the table, not its folder) was refused as "a file, not a folder", and an s3:// object
    as "no objects under" it; both are now read as a folder holding only that table. A file that is no table still
    gets one line, which says that a table may be named."""
    from jobs.preflight import check_run
    from jobs.staging import localize
    from tl_core.config_file import load_config

    table = write_csv(tmp_path / "data" / "reviews.csv", sentiment_rows(20))
    as_folder = index_text_table(DataConfig(root=str(table.parent), val_fraction=0.25), seed=0)
    as_file = index_text_table(DataConfig(root=str(table), val_fraction=0.25), seed=0)
    assert (as_file.classes, as_file.train, as_file.val) == (as_folder.classes, as_folder.train, as_folder.val)
    assert len(as_file.val) == 4  # a quarter of each class

    s3.client().put_object(Bucket="tl-test", Key="one-table/reviews.csv", Body=table.read_bytes())
    for root in (table, "s3://tl-test/one-table/reviews.csv"):
        cfg = check_run(load_config(write_config(tmp_path, root, **text_config(root))), resume=False)
        local = localize(cfg)
        index = index_text_table(local.data, seed=0)
        assert (index.classes, index.train, index.val) == (as_file.classes, as_file.train, as_file.val), root

    # train.csv named alone is split, as named; the val.csv beside it is not read, which a warning says
    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(20))
    write_csv(tmp_path / "data" / "val.csv", sentiment_rows(4, seed=3))
    with caplog.at_level(logging.WARNING, logger="tl_core"):
        index = index_text_table(DataConfig(root=str(tmp_path / "data" / "train.csv"), val_fraction=0.25), seed=0)
    assert len(index.val) == 4 and [r.getMessage() for r in caplog.records if "beside" in r.getMessage()] == [
        "data: train.csv is split by data.val_fraction, and val.csv beside it is not read; to validate on it, give their "
        "folder as data.root"]

    (tmp_path / "notes.txt").write_text("not a table")
    capsys.readouterr()  # the log lines of the runs checked above
    config = write_config(tmp_path, tmp_path / "notes.txt", **text_config(tmp_path / "notes.txt"))
    one_line_exit_2(finetune.main, ["--config", str(config)], capsys, tmp_path,
                    "notes.txt is a file, not a folder; give the folder that holds the data, or one table of texts "
                    "(.csv, .tsv, .jsonl or .parquet)")


def test_a_tsv_table_is_read_without_quoting_as_glue_writes_it(tmp_path):
    """TSV (GLUE's SST-2 and others) was refused as no table. A tab-separated field has no quoting: a quote inside a
    text is part of it, where a CSV reader would join lines until the quote closed."""
    rows = [(r["text"], r["label"]) for r in sentiment_rows(12)]
    rows[0] = ('" it \'s a charming and often affecting journey .', "pos")  # opens a quote that never closes
    lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    index = index_text_table(DataConfig(root=str(tmp_path / "train.tsv"), text_column="sentence", val_fraction=0.25), seed=0)
    assert index.classes == ["neg", "pos"] and len(index.train) + len(index.val) == 12
    assert sorted(index.train + index.val) == sorted((text, index.classes.index(label)) for text, label in rows)


def test_a_val_file_left_with_no_row_says_why(tmp_path):
    """val.csv rows that all repeat train.csv's texts (kept once, in train.csv) or are empty: the message was "too few
    texts for a validation split (val_fraction=0.2)", a fraction that a val file overrides."""
    rows = sentiment_rows(12)
    write_csv(tmp_path / "train.csv", rows)
    write_csv(tmp_path / "val.csv", rows[:2] + [{"text": "", "label": "pos"}])
    with pytest.raises(DataError, match=r"^data.root: val.csv has no text left to validate on: of its 3, 2 repeat train.csv "
                                        r"texts \(an exact copy is kept once, in train.csv\) and 1 are empty or unlabelled$"):
        index_text_table(DataConfig(root=str(tmp_path)), seed=0)


def test_a_csv_keeps_its_texts_and_labels_as_written(tmp_path):
    """pyarrow infers number columns: label codes "01" and "1" became one class 1, and a text of digits became no
    text (skipped). Read as strings, both stay as written; NA markers are missing values, as in pandas."""
    rows = ["text,label"] + [f"0012{i},01" for i in range(6)] + [f"word {i},1" for i in range(6)] + ["an NA label,NA"]
    (tmp_path / "codes.csv").write_text("\n".join(rows) + "\n")
    index = index_text_table(DataConfig(root=str(tmp_path), val_fraction=0.5), seed=0)
    assert index.classes == ["01", "1"] and len(index.unreadable) == 1
    assert {text for text, label in index.train + index.val if label == 0} == {f"0012{i}" for i in range(6)}


def test_predict_refuses_a_table_format_the_reader_does_not_know_and_a_table_with_no_row(tmp_path):
    """jobs.predict offered .json, which no reader takes (a KeyError traceback); it now lists the text reader's own."""
    from jobs import predict

    (tmp_path / "texts.json").write_text('[{"text": "a"}]')
    description = {"config": {"experiment": "t", "data": {"root": str(tmp_path)}}}
    with pytest.raises(DataError, match=r"--data: a text model reads a table file \(\.csv, \.tsv, \.jsonl, \.parquet\), local or s3://"):
        predict.text_rows(str(tmp_path / "texts.json"), description)
    (tmp_path / "header_only.csv").write_text("text\n\n")  # Ray Data wrote nothing, and reading the output failed
    with pytest.raises(DataError, match=r"--data: .*header_only.csv has no rows under its header"):
        predict.text_rows(str(tmp_path / "header_only.csv"), description)


def test_predict_reads_a_table_of_texts_from_s3_and_any_column_named(tmp_path, s3):
    """A text table on S3 was refused ("a text model reads a local table file"), and the texts had to be in a column
    named as the run's training table had it; --text-column names another."""
    from jobs import predict

    rows = sentiment_rows(6)
    table = write_csv(tmp_path / "new.csv", [{"review": r["text"]} for r in rows], columns=("review",))
    s3.client().put_object(Bucket="tl-test", Key="predict-text/new.csv", Body=table.read_bytes())
    description = {"config": {"experiment": "t", "data": {"root": str(tmp_path), "text_column": "review"}}}
    expected = [{"path": str(i), "text": r["text"], "label": None} for i, r in enumerate(rows)]  # no label column
    assert predict.text_rows("s3://tl-test/predict-text/new.csv", description) == expected
    other = {"config": {"experiment": "t", "data": {"root": str(tmp_path)}}}  # trained on column "text"
    assert predict.text_rows(str(table), other, text_column="review") == expected
    with pytest.raises(DataError, match=r"^--data: new.csv has no column 'text'; its columns: review$"):
        predict.text_rows(str(table), other)
    with pytest.raises(DataError, match=r"^--text-column: new.csv has no column 'body'; its columns: review$"):
        predict.text_rows(str(table), other, text_column="body")
    with pytest.raises(DataError, match=r"^--data: there is no object s3://tl-test/predict-text/old.csv$"):
        predict.text_rows("s3://tl-test/predict-text/old.csv", description)
    # the run's label column, where the table has it, labels each row as training named its classes ("007" stays text)
    codes = write_csv(tmp_path / "codes.csv", [{"review": "a", "label": "007"}, {"review": "b", "label": None}], columns=("review", "label"))
    assert [r["label"] for r in predict.text_rows(str(codes), description)] == ["007", None]
    # --label-column names another column of labels, which the table must then have
    stars = write_csv(tmp_path / "stars.csv", [{"review": "a", "stars": "5"}, {"review": "b", "stars": "1"}], columns=("review", "stars"))
    assert [r["label"] for r in predict.text_rows(str(stars), description)] == [None, None]
    assert [r["label"] for r in predict.text_rows(str(stars), description, label_column="stars")] == ["5", "1"]
    with pytest.raises(DataError, match=r"^--label-column: stars.csv has no column 'rating'; its columns: review, stars$"):
        predict.text_rows(str(stars), description, label_column="rating")
    # the column of texts named as the labels too would score each text as its own class: refused, not left unscored
    with pytest.raises(DataError, match=r"^--label-column: 'review' is the column of texts too; the labels must be in a column of their own$"):
        predict.text_rows(str(stars), description, label_column="review")


def test_batches_are_padded_to_their_longest_text_not_to_max_length(tmp_path):
    rows = sentiment_rows(16)
    rows[0]["text"] = "Short."
    write_csv(tmp_path / "data" / "train.csv", rows)
    cfg = from_dict(text_config(tmp_path / "data", data={"max_length": 128, "val_fraction": 0.25}))
    data = text_data(cfg)
    widths = [inputs["input_ids"].shape[1] for inputs, _ in data.train]
    longest = max(len(ids) for ids in data.train.dataset.encodings["input_ids"])
    assert max(widths) == longest < 128 and set(data.val.dataset.encodings) >= {"input_ids", "attention_mask"}


@pytest.mark.parametrize("strategy,trainable", [("linear_probe", 0), ("full", 7), ("gradual_unfreeze", 1), ("lp_ft", 7)])
def test_strategies_on_a_transformer_open_its_layers_from_the_top(strategy, trainable):
    cfg = ModelConfig(backbone=MINILM, strategy=strategy, unfreeze_every=1, lp_epochs=1)
    model = build_model(cfg, ["a", "b"], 32)
    blocks = backbone_blocks(model)
    assert len(blocks) == 7  # embeddings, then MiniLM's 6 layers
    assert apply_strategy(model, cfg, epoch=1) == trainable
    frozen = [not any(p.requires_grad for p in block) for block in blocks]
    assert frozen == [i < 7 - trainable for i in range(7)]


def test_a_linear_probe_on_minilm_learns_sentiment_from_few_labels_encoding_each_text_once(tmp_path, monkeypatch):
    """The frozen encoder computes as in evaluation (no dropout), so its features are computed once: 4 epochs run the
    encoder over the 12 + 40 texts once, not 4 times."""
    from tl_core import loop

    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(12, seed=1))
    write_csv(tmp_path / "data" / "val.csv", sentiment_rows(40, seed=2))
    encoded: list[int] = []

    def counted(*args, **kwargs):
        model = build_model(*args, **kwargs)
        embeddings = next(m for m in model.modules() if type(m).__name__.endswith("Embeddings"))
        embeddings.register_forward_hook(lambda module, inputs, output: encoded.append(len(output)))
        return model

    monkeypatch.setattr(loop, "build_model", counted)
    history = fit(from_dict(text_config(tmp_path / "data", train={"epochs": 4})), lambda m, c: None, checkpoints=False)
    assert history[-1]["val/acc"] >= 0.9
    assert sum(encoded) == 12 + 40


def test_a_frozen_layer_computes_as_in_evaluation_and_an_unfrozen_one_trains_with_dropout():
    cfg = ModelConfig(backbone=MINILM, strategy="gradual_unfreeze", unfreeze_every=1)
    model = build_model(cfg, ["a", "b"], 32)
    apply_strategy(model, cfg, epoch=1)  # the top layer unfrozen, the embeddings and 5 layers below it frozen
    set_train_mode(model)
    layers = [m for m in model.modules() if type(m).__name__ == "BertLayer"]
    dropout_training = [[d.training for d in layer.modules() if isinstance(d, torch.nn.Dropout)] for layer in layers]
    assert len(layers) == 6 and all(dropout_training[-1]) and not any(any(flags) for flags in dropout_training[:-1])


@pytest.mark.parametrize("case,message", [
    ("no_text_column", "data.text_column: train.csv has no column 'text'; its columns: review, label"),
    ("one_class", "data.label_column: train.csv has 1 class(es) in column 'label'; need at least 2"),
    ("unknown_val_label", "data.root: val.csv has label(s) that train.csv lacks: meh"),
    ("max_length", "data.max_length: 4096 is more than hf:all-MiniLM-L6-v2 can take (512 positions)"),
    ("image_backbone", "model.backbone: resnet18 is an image model, but data.root"),
    ("text_backbone_on_images", "model.backbone: hf:all-MiniLM-L6-v2 is a text model, but data.root"),
    ("hf_dir_without_tokenizer", "is not a Hugging Face model directory"),
    ("no_data", "data.root: directory "),  # before: "... is a text model, but data.root ... holds images"
    ("two_text_columns", "data.text_column: train.csv has 2 columns named 'text'; which one is meant cannot be told"),  # a KeyError
    ("no_usable_row", "data.root: train.jsonl has no row with text in column 'text' and a label in column 'label' (16 row(s), each"),
    # Windows-1252 ("café"), as Excel saves a CSV: pyarrow's reason was "CSV conversion error to string: invalid UTF8
    # data"; its JSON reader kept the bytes and the run failed with a UnicodeDecodeError traceback.
    ("cp1252_csv", "data.root: train.csv is not UTF-8 text (line 4 is not); tables are read as UTF-8: save it as UTF-8 "
                   "(in Excel: CSV UTF-8)"),
    ("cp1252_jsonl", "data.root: train.jsonl is not UTF-8 text (line 3 is not); tables are read as UTF-8: save it as UTF-8"),
])
def test_text_mistakes_are_one_line_exit_2_and_write_nothing(case, message, tmp_path, capsys):
    data = tmp_path / "data"
    rows = sentiment_rows(16)
    sections = {"data": {"max_length": 32}, "model": {"backbone": MINILM, "weights": "pretrained"}}
    if case == "no_text_column":
        write_csv(data / "train.csv", [{"review": r["text"], "label": r["label"]} for r in rows], columns=("review", "label"))
    elif case == "one_class":
        write_csv(data / "train.csv", [{**r, "label": "pos"} for r in rows])
    elif case == "unknown_val_label":
        write_csv(data / "train.csv", rows)
        write_csv(data / "val.csv", [{"text": "so-so", "label": "meh"}])
    elif case == "text_backbone_on_images":
        make_image_folder(data, n_classes=2, per_class=6)
    elif case == "no_data":
        pass
    elif case == "two_text_columns":
        data.mkdir()
        (data / "train.csv").write_text("text,text,label\n" + "".join(f"a {i},b {i},{'pos' if i % 2 else 'neg'}\n" for i in range(16)))
    elif case == "no_usable_row":  # labels that are JSON objects: each one's text was a class, and the run trained
        data.mkdir()
        (data / "train.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": {"is": r["label"]}}) + "\n" for r in rows))
    elif case.startswith("cp1252"):
        data.mkdir()
        texts = [{**r, "text": r["text"] + (" at the café" if i == 2 else "")} for i, r in enumerate(rows)]
        table = ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in texts) if case.endswith("csv") else
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in texts))
        (data / f"train.{case.split('_')[1]}").write_bytes(table.encode("cp1252"))
    else:
        write_csv(data / "train.csv", rows)
    if case == "max_length":
        sections["data"]["max_length"] = 4096
    if case == "image_backbone":
        sections["model"] = {"backbone": "resnet18"}
    if case == "hf_dir_without_tokenizer":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{}")
        sections["model"]["backbone"] = f"hf:{tmp_path / 'model'}"
    config = write_config(tmp_path, data, **sections)
    one_line_exit_2(finetune.main, ["--config", str(config)], capsys, tmp_path, message)


def test_settings_the_other_kind_of_data_reads_are_named_not_silently_ignored(tmp_path, caplog):
    from jobs.preflight import check_run
    from tl_core.config_file import load_config

    text = tmp_path / "text"
    write_csv(text / "train.csv", sentiment_rows(16))
    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=6)
    runs = [(text, {"data": {"image_size": 64, "hflip": False, "augment": True, "max_length": 32},
                    "model": {"backbone": MINILM, "weights": "pretrained"}},
             "config: a run on text data does not read data.image_size: 64; data.hflip: false"),
            (images, {"data": {"max_length": 32, "image_size": 224}, "model": {"backbone": "resnet18", "pooling": "cls"}},
             "config: a run on image data does not read data.max_length: 32; model.pooling: cls"),
            (text, {"data": {"max_length": 32, "image_size": 224}, "model": {"backbone": MINILM, "weights": "pretrained"}},
             None)]
    for i, (data, sections, message) in enumerate(runs):
        caplog.clear()
        (tmp_path / str(i)).mkdir()
        with caplog.at_level(logging.WARNING, logger="jobs"):
            check_run(load_config(write_config(tmp_path / str(i), data, **sections)), resume=False)
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("config:")] == ([message] if message else [])


def test_an_unknown_hf_model_is_refused_without_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="nowhere/such-model is neither a local model directory nor in the Hugging Face cache"):
        build_model(ModelConfig(backbone="hf:nowhere/such-model", weights="pretrained"), ["a", "b"], 32)
    with pytest.raises(DataError):
        index_text_table(DataConfig(root=str(tmp_path / "missing")), seed=0)


def test_a_text_checkpoint_carries_its_tokenizer_and_is_a_complete_source(tmp_path):
    """hf/ in every checkpoint holds the encoder's config and tokenizer, checksummed; `hf:<checkpoint>` builds the
    same encoder (its trained weights) without the original model directory."""
    from tl_core.checkpoint import LocalReporter, load_model_state, verify_checkpoint
    from tl_core.errors import CheckpointError
    from tl_core.text_models import load_tokenizer

    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(12, seed=1))
    cfg = from_dict(text_config(tmp_path / "data", train={"epochs": 1}, model={"strategy": "full"}))
    reporter = LocalReporter(tmp_path / "run")
    fit(cfg, reporter)
    ckpt = reporter.latest
    assert {p.name for p in (ckpt / "hf").iterdir()} == {"config.json", "tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json", "vocab.txt"}
    assert "hf/vocab.txt" in verify_checkpoint(ckpt)["sha256"]
    trained, _ = load_model_state(ckpt)
    (tmp_path / "run" / "result.json").write_text(json.dumps({"best_checkpoint": str(ckpt)}))
    for source in (ckpt, tmp_path / "run"):  # the checkpoint, or the finished run that names it
        again = build_model(ModelConfig(backbone=f"hf:{source}", weights="pretrained"), ["neg", "pos"], 32)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in trained.items())
    tokenizer = load_tokenizer(f"hf:{ckpt}", 32)
    assert tokenizer("a fine film")["input_ids"] == load_tokenizer(MINILM, 32)("a fine film")["input_ids"]
    (ckpt / "hf" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(CheckpointError, match="hf/vocab.txt fails its sha256 check"):
        verify_checkpoint(ckpt)


def test_a_hub_text_model_is_downloaded_once_by_the_driver_and_staged_for_workers(tmp_path):
    """`hf:ORG/NAME` not in the cache: the driver downloads it (HF_ENDPOINT honoured) into the Hugging Face cache
    once and stages it under STORAGE_ROOT/_weights/; a worker with an empty cache and no network reads the staged copy."""
    import subprocess
    import sys

    from hub_server import HubServer, closed_port_url
    from test_pretrained import hub_env

    from tl_core.text_models import model_dir

    served = model_dir(MINILM)
    files = {f"/acme/minilm/resolve/main/{p.name}": p for p in served.iterdir() if p.is_file()}
    server = HubServer(files)
    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(12, seed=1))
    config = text_config(tmp_path / "data", model={"backbone": "hf:acme/minilm"}, storage={"root": str(tmp_path / "runs")})
    script = ("import sys, json; from tl_core.config import from_dict; from jobs import staging; from tl_core.models import build_model; "
              "from tl_core.text_models import model_dir; cfg = from_dict(json.loads(sys.argv[1])); "
              "sys.argv[2] == 'driver' and (staging.fetch_hub_weights(cfg), staging.stage_hub_weights(cfg)); "
              "local = staging.localize(cfg); print(model_dir(local.model.backbone)); build_model(local.model, ['neg', 'pos'], 32)")

    def run(role, home, endpoint):
        env = {**hub_env(tmp_path, endpoint), "HF_HOME": str(tmp_path / home)}
        done = subprocess.run([sys.executable, "-c", script, json.dumps(config), role], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    try:
        for _ in range(2):
            assert run("driver", "driver-hf", server.url).startswith(str(tmp_path / "driver-hf" / "hub" / "models--acme--minilm"))
        assert server.gets["/acme/minilm/resolve/main/model.safetensors"] == 1
        assert server.gets["/acme/minilm/resolve/main/vocab.txt"] == 1
        assert "/acme/minilm/resolve/main/README.md" not in server.gets  # only the config, tokenizer and weights
        staged = tmp_path / "runs" / "_weights" / "huggingface-models" / "acme" / "minilm"
        assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in staged.iterdir()}
        assert run("worker", "worker-hf", closed_port_url()) == str(staged)
    finally:
        server.stop()


def test_a_hub_text_model_without_network_is_one_line_exit_2_naming_the_cache(tmp_path):
    import subprocess
    import sys

    from hub_server import closed_port_url
    from test_pretrained import hub_env

    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(12, seed=1))
    config = write_config(tmp_path, tmp_path / "data", data={"max_length": 32}, model={"backbone": "hf:acme/minilm", "weights": "pretrained"})
    run = subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", str(config)], env=hub_env(tmp_path, closed_port_url()),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.backbone: cannot download acme/minilm from the Hugging Face hub (" in lines[0], run.stderr
    assert f"fill the hub cache {tmp_path / 'hf' / 'hub'} with it (hf download acme/minilm, where there is network)" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_layer_wise_lr_decay_gives_each_layer_a_fraction_of_the_one_above():
    from tl_core.optim import param_groups

    model = build_model(ModelConfig(backbone=MINILM), ["a", "b"], 32)
    groups = param_groups(model, lr=1.0, weight_decay=0.01, backbone_lr_mult=0.5, layer_decay=0.8)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head/decay"] == 1.0 and lrs["backbone.000/decay"] == 0.5  # the top layer: backbone_lr_mult
    assert lrs["backbone.001/decay"] == pytest.approx(0.5 * 0.8) and lrs["backbone.006/decay"] == pytest.approx(0.5 * 0.8 ** 6)
    assert [g["name"] for g in groups][0] == "backbone.006/decay"  # embeddings first, head last
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = [g["name"] for g in param_groups(model, lr=1.0, weight_decay=0.01, backbone_lr_mult=0.5)]
    assert plain == ["backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"]  # unchanged without decay


# ---------------------------------------------------------------- through Ray: DDP, S3, resume, a sweep and its report

@pytest.mark.integration
@pytest.mark.slow
def test_text_on_s3_with_two_ddp_workers_and_a_killed_worker(ray_cluster, s3, mlflow_server, tmp_path):
    """A text dataset and the encoder itself (`hf:s3://...`) read from the S3 server, MiniLM fine-tuned (top layer
    open) by 2 DDP workers; a worker killed after the first checkpoint is replaced and the run goes on from it.
    Checkpoints carry the tokenizer, so the run is a complete source for the next stage."""
    from test_s3_jobs import WorkerKiller, keys, last_modified

    from cluster import storage
    from tl_core.checkpoint import META_FILE
    from tl_core.text_models import model_dir

    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(24, seed=3))
    write_csv(tmp_path / "data" / "val.csv", sentiment_rows(16, seed=4))
    storage.upload_dir(tmp_path / "data", storage.parse("s3://tl-test/text/sentiment"))
    storage.upload_dir(model_dir(MINILM), storage.parse("s3://tl-test/models/minilm"))
    config = write_config(tmp_path, "s3://tl-test/text/sentiment", experiment="text-ddp", train={"epochs": 4, "batch_size": 8},
                          data={"max_length": 32}, model={"backbone": "hf:s3://tl-test/models/minilm", "weights": "pretrained",
                                                          "strategy": "gradual_unfreeze", "unfreeze_every": 3},
                          optim={"name": "adamw", "lr": 3e-3, "scheduler": "constant"}, storage={"root": "s3://tl-test/runs"},
                          checkpoint={"keep": None}, scaling={"num_workers": 2, "max_failures": 1},
                          tracking={"mlflow": {"uri": mlflow_server, "experiment": "text-ddp"}})
    first = f"runs/text-ddp/checkpoint_epoch_0001/{META_FILE}"
    killer = WorkerKiller(s3, first)
    assert finetune.main(["--config", str(config)]) == 0
    killed = killer.join()
    assert len(killed) == 2
    result = json.loads(s3.client().get_object(Bucket="tl-test", Key="runs/text-ddp/result.json")["Body"].read())
    assert result["epochs_completed"] == 4 and result["classes"] == ["neg", "pos"]
    assert result["final_metrics"]["val/acc"] >= 0.75
    assert result["config"]["model"]["backbone"] == "hf:s3://tl-test/models/minilm"
    assert last_modified(s3, first) == killed[0]  # epoch 1 was not trained again
    stored = set(keys(s3, "runs/text-ddp/checkpoint_epoch_0004/"))
    assert {f"runs/text-ddp/checkpoint_epoch_0004/hf/{f}" for f in ("config.json", "tokenizer.json", "vocab.txt")} <= stored
    assert [k for k in keys(s3, "runs/text-ddp/tensorboard/") if "tfevents" in k]  # TensorBoard beside the results, on S3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("text-ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.backbone"] == "hf:s3://tl-test/models/minilm"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val/acc")} == {1, 2, 3, 4}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"result.json", "config.yaml"}


@pytest.mark.integration
@pytest.mark.slow
def test_a_text_sweep_with_asha_and_its_report(ray_cluster, mlflow_server, tmp_path, capsys):
    from test_sweep import write_sweep

    from jobs import analyze, sweep

    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(16, seed=5))
    write_csv(tmp_path / "data" / "val.csv", sentiment_rows(12, seed=6))
    path = write_sweep(tmp_path, tmp_path / "data", experiment="text-sweep", num_samples=3,
                       scheduler={"name": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2},
                       space={"optim.lr": {"loguniform": [1e-3, 3e-2]}, "model.dropout": {"choice": [0.0, 0.2]},
                              "optim.weight_decay": {"choice": [0.0, 0.01]}})
    cfg = yaml_load(path)
    cfg["data"] = {"root": str(tmp_path / "data"), "max_length": 32, "loader_workers": 0}
    cfg["model"] = {"backbone": MINILM, "weights": "pretrained", "strategy": "linear_probe"}
    cfg["optim"] = {"name": "adamw", "lr": 1e-2, "scheduler": "constant"}
    cfg["tracking"] = {"mlflow": {"uri": mlflow_server, "experiment": "text-sweep"}}
    path.write_text(yaml_dump(cfg))
    assert sweep.main(["--config", str(path)]) == 0
    assert analyze.main([str(tmp_path / "runs" / "text-sweep")]) == 0
    report = tmp_path / "runs" / "text-sweep" / "report"
    assert {p.name for p in report.iterdir()} >= {"report.html", "best.yaml", "per_class.json"}
    assert json.loads((report / "per_class.json").read_text())["classes"] == ["neg", "pos"]
    trials = [p for p in (tmp_path / "runs" / "text-sweep").iterdir() if p.is_dir() and p.name.startswith("trial")]
    assert len(trials) == 3 and all(list((t / "tensorboard").glob("events.out.tfevents.*")) for t in trials)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("text-sweep").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and parent.info.status == "FINISHED" and "best/val/acc" in parent.data.metrics
    assert all(c.info.status in ("FINISHED", "KILLED") and "trial.optim.lr" in c.data.params for c in children)
    assert all(client.get_metric_history(c.info.run_id, "val/acc") for c in children)
    best = yaml_load(report / "best.yaml")
    assert best["model"]["backbone"] == MINILM and best["data"]["max_length"] == 32


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def yaml_dump(data) -> str:
    import yaml

    return yaml.safe_dump(data)
