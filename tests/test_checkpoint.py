import json
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
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_local_reporter_keeps_history_and_copies(tmp_path):
    src = write(tmp_path)
    reporter = LocalReporter(tmp_path / "run")
    reporter({"epoch": 1, "val/acc": 0.5}, str(src))
    reporter({"epoch": 2, "val/acc": 0.6}, None)
    assert [h["epoch"] for h in reporter.history] == [1, 2]
    assert reporter.latest.name == "checkpoint_000001" and verify_checkpoint(reporter.latest)
