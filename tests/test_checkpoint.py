import json
import os
import pickle

import pytest
import torch

from tl_core.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    LocalReporter,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
    verify_checkpoint,
)
from tl_core.errors import CheckpointError


def write(tmp_path):
    return save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(3)}, {"epoch": 2, "optimizer": {"state": {}}},
                           {"config": {"experiment": "x"}, "classes": ["a", "b"], "epoch": 2})


def test_directory_format_and_round_trip(tmp_path):
    path = write(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == sorted([MODEL_FILE, STATE_FILE, META_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    meta = json.loads((path / META_FILE).read_text())
    assert set(meta["sha256"]) == {MODEL_FILE, STATE_FILE} and meta["versions"]["torch"] == torch.__version__
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.model_state["w"], torch.ones(3)) and ckpt.train_state["epoch"] == 2
    assert ckpt.meta["classes"] == ["a", "b"]


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / MODEL_FILE).write_bytes(b"xx"), "model.pt fails its sha256 check"),
    (lambda p: (p / STATE_FILE).unlink(), "train_state.pt is missing"),
    (lambda p: (p / META_FILE).unlink(), "meta.json is missing"),
    (lambda p: (p / META_FILE).write_text("{"), "meta.json is unreadable"),
])
def test_damaged_checkpoints_are_rejected(tmp_path, damage, message):
    path = write(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


class Boom:  # unpickling this would call print("code ran")
    def __reduce__(self):
        return (print, ("code ran",))


def test_loading_never_runs_pickled_code(tmp_path, capsys):
    path = write(tmp_path)
    (path / MODEL_FILE).write_bytes(pickle.dumps(Boom()))
    meta = json.loads((path / META_FILE).read_text())
    from tl_core.checkpoint import sha256
    meta["sha256"][MODEL_FILE] = sha256(path / MODEL_FILE)
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model.pt cannot be loaded \(UnpicklingError\)"):
        load_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_local_reporter_keeps_history_and_copies(tmp_path):
    src = write(tmp_path)
    reporter = LocalReporter(tmp_path / "run")
    reporter({"epoch": 1, "val/acc": 0.5}, str(src))
    reporter({"epoch": 2, "val/acc": 0.6}, None)
    assert [h["epoch"] for h in reporter.history] == [1, 2]
    assert reporter.latest.name == "checkpoint_000001" and verify_checkpoint(reporter.latest)


def test_local_reporter_keeps_the_newest_checkpoints(tmp_path):
    src = write(tmp_path)
    reporter = LocalReporter(tmp_path / "run", keep=2)
    for epoch in (1, 2, 3):
        reporter({"epoch": epoch}, str(src))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_000002", "checkpoint_000003"]


def test_staging_removes_what_a_killed_process_left_and_nothing_of_a_live_one(tmp_path, monkeypatch):
    import subprocess
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f"tl-ckpt-{dead.pid}-abc"
    live = tmp_path / "tl-ckpt-1-xyz"  # PID 1 always runs
    other = tmp_path / "tl-ckpt-notapid"
    for path in (left, live, other):
        (path / "checkpoint").mkdir(parents=True)
    with staging_dir() as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f"tl-ckpt-{os.getpid()}-")
    assert not left.exists() and live.exists() and other.exists() and not tmp.exists()


def _rewrite_meta(path, change):
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps(change(meta)))


def _replace_with_matching_checksum(path, name, obj):
    """Content the checksum in meta.json agrees with, but of the wrong kind."""
    from tl_core.checkpoint import sha256

    torch.save(obj, path / name)
    _rewrite_meta(path, lambda meta: {**meta, "sha256": {**meta["sha256"], name: sha256(path / name)}})


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / META_FILE).write_text("[1, 2]"), "is not a checkpoint's"),
    (lambda p: _rewrite_meta(p, lambda m: {k: v for k, v in m.items() if k != "epoch"}), "is not a checkpoint's"),
    (lambda p: _rewrite_meta(p, lambda m: {k: v for k, v in m.items() if k != "sha256"}), "is not a checkpoint's"),
    (lambda p: _rewrite_meta(p, lambda m: {**m, "sha256": "abc"}), "is not a checkpoint's"),
    (lambda p: (p / META_FILE).write_bytes(b"\xff\xfe"), "is unreadable"),
    (lambda p: _replace_with_matching_checksum(p, MODEL_FILE, [1, 2, 3]), "model.pt is not a state dict of tensors"),
    (lambda p: _replace_with_matching_checksum(p, MODEL_FILE, {"w": 3}), "model.pt is not a state dict of tensors"),
    (lambda p: _replace_with_matching_checksum(p, STATE_FILE, {"optimizer": {}}), "train_state.pt holds no epoch"),
])
def test_damage_of_any_shape_is_a_checkpoint_error(tmp_path, damage, message):
    path = write(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    """A link to another experiment's checkpoint verifies, but it is not this run's: resume skips it."""
    import pyarrow.fs

    from jobs.runner import latest_valid_checkpoint

    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    save_checkpoint(run / "checkpoint_epoch_0001", {"w": torch.ones(1)}, {"epoch": 1}, {"config": {"experiment": "mine"}, "epoch": 1})
    other = save_checkpoint(tmp_path / "runs" / "theirs" / "checkpoint_epoch_0005", {"w": torch.zeros(1)}, {"epoch": 5},
                            {"config": {"experiment": "theirs"}, "epoch": 5})
    (run / "checkpoint_epoch_0005").symlink_to(other)
    path, found = latest_valid_checkpoint(pyarrow.fs.LocalFileSystem(), str(run), "mine")
    assert found.meta["epoch"] == 1 and path == str(run / "checkpoint_epoch_0001")


@pytest.mark.parametrize("registered", ["none", "older", "newest", "damaged"])
def test_a_resumed_run_reports_again_the_epoch_ray_never_took(registered, tmp_path, monkeypatch, image_folder):
    """A checkpoint stored after Ray last registered one: its epoch never reached Ray (a sweep's driver was killed in
    between). The resumed trial went on from it without reporting it, so the trial's results lacked that epoch and
    ASHA judged its rung by the epoch after; it is reported again first. One Ray handed back is not."""
    import dataclasses
    from types import SimpleNamespace

    import pyarrow.fs
    from helpers import write_config

    from jobs.runner import WorkerSession, run_recipe
    from tl_core.config_file import load_config
    from tl_core.recipes import RECIPES

    cfg = load_config(write_config(tmp_path, image_folder))
    run = tmp_path / "trial"
    for epoch in (1, 2):
        save_checkpoint(run / f"checkpoint_00000{epoch}", {"w": torch.ones(1)}, {"epoch": epoch},
                        {"config": {"experiment": cfg.experiment}, "epoch": epoch, "metrics": {"epoch": epoch, "val/acc": epoch / 4}})
    resumed = []
    monkeypatch.setitem(RECIPES, "supervised", dataclasses.replace(
        RECIPES["supervised"], fit=lambda cfg, report, resume_from, **_: resumed.append(resume_from.meta["epoch"]) or [{"epoch": 3}]))
    reports = []
    handed = {"none": None, "older": SimpleNamespace(path=str(run / "checkpoint_000001")),
              "newest": SimpleNamespace(path=str(run / "checkpoint_000002")),
              "damaged": SimpleNamespace(path=str(run / "checkpoint_000003"))}[registered]  # heard, then lost: not there
    run_recipe(cfg, "supervised", WorkerSession(lambda metrics, checkpoint: reports.append((metrics, checkpoint)),
                                                pyarrow.fs.LocalFileSystem(), str(run), handed, torch.device("cpu")))
    assert resumed == [2]
    assert reports == ([] if registered in ("newest", "damaged") else [({"epoch": 2, "val/acc": 0.5}, None)])


@pytest.mark.parametrize("stream_fails", [False, True])
def test_an_s3_checkpoint_streams_while_saved_and_the_upload_sends_only_the_rest(stream_fails, s3, tmp_path, monkeypatch, caplog):
    """The weights files reach S3 while torch.save writes them; Ray Train's upload then sends meta.json (last) and
    nothing twice. A stream that fails is only a warning: the upload sends that file whole instead."""
    from cluster import storage
    from jobs.runner import S3Checkpoints

    sent = []
    upload_dir = storage.upload_dir
    monkeypatch.setattr(storage, "upload_dir", lambda local, where, last=None, skip=frozenset():
                        sent.append(sorted(p.name for p in local.iterdir() if p.name not in skip)) or upload_dir(local, where, last, skip))
    if stream_fails:
        def broken(self, data):
            self.error = OSError("connection reset")
        monkeypatch.setattr(storage.UploadStream, "write", broken)
    experiment = storage.parse(f"s3://tl-test/streamed-{stream_fails}")
    checkpoints = S3Checkpoints(experiment)
    model = torch.nn.Linear(300, 200)
    path = save_checkpoint(tmp_path / "c", model.state_dict(), {"epoch": 1}, {"epoch": 1}, mirror=checkpoints.mirror(1))
    keys = {o["Key"] for o in storage.list_objects(experiment)}
    assert f"checkpoint_epoch_0001/{META_FILE}" not in keys  # not complete before Ray Train's upload
    if not stream_fails:
        assert keys == {"checkpoint_epoch_0001/model.pt", "checkpoint_epoch_0001/train_state.pt"}

    restored = checkpoints.upload(type("Local", (), {"path": str(path)})(), "checkpoint_epoch_0001")
    assert sent == [[META_FILE, MODEL_FILE, STATE_FILE] if stream_fails else [META_FILE]]
    assert ("streaming it to" in caplog.text) == stream_fails
    with restored.as_directory() as local:
        assert torch.equal(load_checkpoint(local).model_state["weight"], model.weight.detach())


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_what_is_written_whole_gets_the_umask_mode_not_tempfiles(umask, tmp_path, monkeypatch):
    """A checkpoint folder, a run's text files (config.yaml, result.json) and copied or downloaded files are made
    under temporary names by tempfile (0700 / 0600): once in place they read as a plain mkdir / open makes them,
    so that others on a shared file system can read the run, as the umask allows."""
    import stat

    from cluster import storage
    from tl_core import files

    previous = os.umask(umask)
    monkeypatch.setattr(files, "UMASK", umask)
    try:
        checkpoint = write(tmp_path)
        storage.write_text(storage.parse(str(tmp_path / "result.json")), "{}")
        storage.upload_file(checkpoint / META_FILE, storage.parse(str(tmp_path / "copy" / "meta.json")))
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in (checkpoint, checkpoint / MODEL_FILE, tmp_path / "result.json", tmp_path / "copy" / "meta.json")}
    assert modes == {"ckpt": 0o777 & ~umask, MODEL_FILE: 0o666 & ~umask, "result.json": 0o666 & ~umask,
                     "meta.json": 0o666 & ~umask}
