"""jobs.export: a run's best model as safetensors, TorchScript or ONNX, with the description of its input."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import make_image_folder
from PIL import Image
from test_hostile import one_line_exit_2

from jobs import export
from tl_core.checkpoint import LocalReporter, load_model_state
from tl_core.config import ModelConfig, from_dict
from tl_core.errors import ConfigError
from tl_core.loop import fit
from tl_core.models import build_model


def finished_run(root, backbone: str, image_size: int, per_class: int):
    """A finished one-epoch run of `backbone` on 3 classes of images a little larger than `image_size`: its
    directory (result.json naming its checkpoint), and its images."""
    data = make_image_folder(root / "data", n_classes=3, per_class=per_class, size=image_size + image_size // 4)
    cfg = from_dict({"experiment": "exp", "data": {"root": str(data), "image_size": image_size, "loader_workers": 0},
                     "model": {"backbone": backbone}, "train": {"epochs": 1, "batch_size": 8}, "optim": {"name": "adam", "lr": 1e-3},
                     "checkpoint": {"metric": "val/f1", "mode": "max"}})
    reporter = LocalReporter(root / "run")
    fit(cfg, reporter)
    (root / "run" / "result.json").write_text(json.dumps({"best_checkpoint": str(reporter.latest)}))
    return root / "run", sorted(data.rglob("*.png"))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A finished one-epoch ResNet-18 run on 16 px images: its checkpoint directory, and its images."""
    return finished_run(tmp_path_factory.mktemp("export"), "resnet18", 16, per_class=8)


def preprocess(paths, description):
    """What PATH.json tells a user to do with an image, in plain numpy."""
    size, mean, std = description["input"]["size"], np.array(description["input"]["mean"]), np.array(description["input"]["std"])
    batch = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        batch.append(((pixels - mean) / std).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def traced_logits(fmt: str, path, images: np.ndarray) -> torch.Tensor:
    """The logits of an exported TorchScript or ONNX (through onnxruntime) model on `images`."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))(torch.from_numpy(images)).detach()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images})[0])


def reference(run, images, description, backbone="resnet18"):
    state, meta = load_model_state(json.loads((run / "result.json").read_text())["best_checkpoint"])
    model = build_model(ModelConfig(backbone=backbone), meta["classes"], description["input"]["size"])
    model.load_state_dict(state)
    return model.eval()(torch.from_numpy(images)).detach()


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_an_exported_image_model_gives_the_checkpoints_logits_on_real_images(fmt, image_run, tmp_path):
    run, paths = image_run
    out = tmp_path / "out" / f"model.{fmt}"
    assert export.main([str(run), "--format", fmt, "--out", str(out)]) == 0
    description = json.loads(out.with_name(out.name + ".json").read_text())
    assert description["classes"] == ["class_0", "class_1", "class_2"] and description["input"]["size"] == 16
    images = preprocess(paths[:5], description)  # a batch size the export never saw
    expected = reference(run, images, description)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        model = build_model(ModelConfig(), description["classes"], 16)
        model.load_state_dict(load_file(str(out)))
        got = model.eval()(torch.from_numpy(images)).detach()
        assert torch.equal(got, expected)
        return
    assert (traced_logits(fmt, out, images) - expected).abs().max().item() <= 1e-4


@pytest.fixture(scope="module", params=["timm:tf_efficientnet_lite0", "timm:vit_tiny_patch16_224"])
def timm_run(request, tmp_path_factory):
    """A finished one-epoch run of a timm backbone at 32 px: its backbone, checkpoint directory and images."""
    return request.param, *finished_run(tmp_path_factory.mktemp("export-timm"), request.param, 32, per_class=6)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_exported_timm_model_gives_the_checkpoints_logits(fmt, timm_run, tmp_path):
    """timm models trace too: EfficientNet-Lite0's TF "same" padding (computed from the input in forward) and a
    ViT's attention give the checkpoint's logits, at a batch size the export never saw, with timm's own
    normalisation (Lite0's mean = std = 0.5) in the description."""
    backbone, run, paths = timm_run
    out = tmp_path / f"model.{fmt}"
    assert export.main([str(run), "--format", fmt, "--out", str(out)]) == 0
    description = json.loads(out.with_name(out.name + ".json").read_text())
    assert description["input"]["size"] == 32
    if backbone == "timm:tf_efficientnet_lite0":
        assert description["input"]["mean"] == [0.5] * 3 and description["input"]["std"] == [0.5] * 3
    images = preprocess(paths[:5], description)
    expected = reference(run, images, description, backbone)
    assert (traced_logits(fmt, out, images) - expected).abs().max().item() <= 1e-4


def test_an_exported_text_model_runs_in_onnxruntime_with_its_own_tokenizer(tmp_path):
    from test_text import sentiment_rows, text_config, write_csv
    from transformers import AutoTokenizer

    write_csv(tmp_path / "data" / "train.csv", sentiment_rows(12, seed=1))
    reporter = LocalReporter(tmp_path / "run")
    fit(from_dict(text_config(tmp_path / "data", train={"epochs": 1})), reporter)
    out = tmp_path / "out" / "model.onnx"
    assert export.main([str(reporter.latest), "--format", "onnx", "--out", str(out)]) == 0
    described = json.loads((tmp_path / "out" / "model.onnx.json").read_text())["input"]["tokenizer"]
    assert described == "model.onnx.tokenizer/"  # beside the description (it said "OUT.tokenizer/")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out" / described))
    batch = tokenizer(["The film was wonderful, truly wonderful.", "An awful, dreadful meal and a boring show tonight."],
                      padding=True, return_tensors="np")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
    model, _ = export.load_model(reporter.latest)
    expected = model({k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items() if k != "token_type_ids"}).detach()
    assert np.abs(got - expected.numpy()).max() <= 1e-4


def test_export_to_s3(image_run, s3, tmp_path, capsys):
    run, _ = image_run
    assert export.main([str(run), "--format", "onnx", "--out", "s3://tl-test/exports/model.onnx"]) == 0
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="tl-test", Prefix="exports/")["Contents"]}
    assert keys == {"exports/model.onnx", "exports/model.onnx.json"}
    # from a checkpoint on S3: the description and the summary name it by its URI, not by this node's copy of it
    from cluster import storage

    best = json.loads((run / "result.json").read_text())["best_checkpoint"]
    storage.upload_dir(best, storage.parse("s3://tl-test/export-source/checkpoint_epoch_0001"))
    capsys.readouterr()
    assert export.main(["s3://tl-test/export-source/checkpoint_epoch_0001", "--format", "safetensors",
                        "--out", str(tmp_path / "model.safetensors")]) == 0
    source = json.loads((tmp_path / "model.safetensors.json").read_text())["source"]["checkpoint"]
    assert source == "s3://tl-test/export-source/checkpoint_epoch_0001"
    f1 = load_model_state(best)[1]["metrics"]["val/f1"]
    assert f"safetensors of {source} ({f1:.4f} val/f1), described in" in capsys.readouterr().out  # the metric it was kept by


def test_an_s3_run_that_is_no_run_is_refused_before_anything_is_copied(s3, tmp_path, capsys, monkeypatch):
    """A storage root given as RUN was copied whole into the node cache before its missing meta.json failed the load."""
    from cluster.storage import cache

    s3.client().put_object(Bucket="tl-test", Key="not-a-run/notes.txt", Body=b"notes")
    monkeypatch.setattr(cache, "sync_prefix", lambda *a: pytest.fail("copied a prefix that holds no checkpoint"))
    one_line_exit_2(export.main, ["s3://tl-test/not-a-run", "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys, tmp_path,
                    "RUN: s3://tl-test/not-a-run is neither a state-dict object, a finished run (result.json) nor a complete "
                    "checkpoint (meta.json)")
    s3.client().put_object(Bucket="tl-test", Key="a-sweep/sweep.yaml", Body=b"experiment: a-sweep\n")
    one_line_exit_2(export.main, ["s3://tl-test/a-sweep", "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys, tmp_path,
                    "RUN: s3://tl-test/a-sweep is a sweep, not a run; give one of its trials' checkpoints")
    s3.client().put_object(Bucket="tl-test", Key="a-sweep/trial-0/result.json", Body=b'{"epoch": 1, "trial_id": "a0_00000"}\n')
    one_line_exit_2(export.main, ["s3://tl-test/a-sweep/trial-0", "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys,
                    tmp_path, "RUN: s3://tl-test/a-sweep/trial-0 is a trial of a sweep, not a run; give one of its checkpoints")


def test_the_logit_check_is_absolute_near_zero_and_relative_for_large_logits():
    expected = torch.tensor([[0.5, -2.0], [3.0e4, -1.0e16]])
    export.check(expected + torch.tensor([[5e-5, -5e-5], [2.0, 5.0e11]]), expected, "onnx")  # float32 noise at each scale
    for wrong in ([[0.5 + 3e-4, -2.0], [3.0e4, -1.0e16]], [[0.5, -2.0], [3.0e4 + 10.0, -1.0e16]], [[float("nan"), -2.0], [3.0e4, -1.0e16]]):
        with pytest.raises(ConfigError, match="--format onnx: the exported model's logits differ from the checkpoint's by up to"):
            export.check(torch.tensor(wrong), expected, "onnx")


@pytest.mark.parametrize("case,message", [
    ("missing", "RUN: "),
    ("unfinished", "/unfinished holds checkpoints but no result.json, so the run did not finish; resume it, or give one of "
                   "its checkpoints (e.g. "),
    ("not_a_run", "/notes is neither a finished run (result.json) nor a checkpoint directory (meta.json)"),
    ("a_sweep", "/sweep is a sweep, not a run; give one of its trials' checkpoints, or retrain its winner (python -m "
                "jobs.analyze "),
    ("a_trial", "/sweep/trial-0 is a trial of a sweep, not a run; give one of its checkpoints (checkpoint_NNNNNN inside "
                "it), or retrain the sweep's winner (python -m jobs.analyze "),
    ("simclr", "pretraining checkpoint, which has no classifier"),
    ("unexportable", "--format onnx: resnet18 cannot be exported as onnx (an operator"),
    ("earlier_export", "model.onnx.json already exists; an export goes to a new path"),
    ("a_folder", "model.onnx already exists; an export goes to a new path"),
    ("misnamed", "--out: model.onnx ends in .onnx, the suffix of onnx files, but --format is safetensors; give --format onnx, "
                 "or an --out named for safetensors"),
])
def test_export_mistakes_are_one_line_exit_2_and_write_nothing(case, message, image_run, tmp_path, capsys, monkeypatch):
    run, _ = image_run
    if case == "missing":
        run = tmp_path / "nowhere"
    elif case == "unfinished":  # a run cut short: its checkpoints, no result.json
        run = shutil.copytree(run, tmp_path / "unfinished", ignore=shutil.ignore_patterns("result.json"))
    elif case == "not_a_run":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("not a run")
        run = tmp_path / "notes"
    elif case == "a_sweep":
        (tmp_path / "sweep" / "trial-0").mkdir(parents=True)
        (tmp_path / "sweep" / "sweep.yaml").write_text("experiment: sweep\n")
        run = tmp_path / "sweep"
    elif case == "a_trial":  # Ray Tune's result.json: one row per report (it read as a run naming no best_checkpoint)
        (tmp_path / "sweep" / "trial-0" / "checkpoint_000000").mkdir(parents=True)
        (tmp_path / "sweep" / "trial-0" / "result.json").write_text('{"epoch": 1, "val/acc": 0.5, "trial_id": "a0_00000"}\n'
                                                                    '{"epoch": 2, "val/acc": 0.6, "trial_id": "a0_00000"}\n')
        run = tmp_path / "sweep" / "trial-0"
    elif case == "simclr":
        from tl_core.simclr import fit_simclr

        data = make_image_folder(tmp_path / "data", n_classes=2, per_class=6, size=16)
        reporter = LocalReporter(tmp_path / "simclr")
        fit_simclr(from_dict({"experiment": "s", "data": {"root": str(data), "image_size": 16, "loader_workers": 0},
                              "train": {"epochs": 1, "batch_size": 4}, "pretrain": {"method": "simclr"}}), reporter)
        run = reporter.latest
        capsys.readouterr()  # the pretraining's own log lines
    elif case == "unexportable":  # what torch.onnx says of an operator ONNX has no counterpart for
        def refuse(*args, **kwargs):
            raise RuntimeError("an operator ONNX lacks: aten::unsupported_op")
        monkeypatch.setattr(torch.onnx, "export", refuse)
    elif case == "earlier_export":
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "model.onnx.json").write_text("kept")
    elif case == "a_folder":
        (tmp_path / "runs" / "model.onnx").mkdir(parents=True)
    written = {"earlier_export": ["model.onnx.json"], "a_folder": ["model.onnx"]}.get(case, [])
    fmt = "safetensors" if case == "misnamed" else "onnx"
    one_line_exit_2(export.main, [str(run), "--format", fmt, "--out", str(tmp_path / "runs" / "model.onnx")], capsys, tmp_path,
                    message, written=written)
    if case == "earlier_export":
        assert (tmp_path / "runs" / "model.onnx.json").read_text() == "kept"
