"""The benchmarks' command lines: a bad number stops before anything runs (`python -m bench.transfer --seeds 0`
crashed after starting Ray; `--trials 0` and `--parallel 0` started a study)."""

import importlib

import pytest


@pytest.mark.parametrize("module,argv,message", [
    ("bench.transfer", ["--seeds", "0"], "argument --seeds: 0 must be at least 1"),
    ("bench.transfer", ["--trials", "-1"], "argument --trials: -1 must be at least 1"),
    ("bench.transfer", ["--parallel", "0"], "argument --parallel: 0 must be at least 1"),
    ("bench.transfer", ["--report", "-5"], "argument --report: -5 must be a finite number above 0"),
    ("bench.sweep_asha", ["--samples", "0"], "argument --samples: 0 must be at least 1"),
    ("bench.data_scale", ["--sizes", "1000", "0"], "argument --sizes: 0 must be at least 1"),
])
def test_a_bad_number_is_a_usage_error_naming_the_command(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2
    assert f"python -m {module}: error: {message}" in capsys.readouterr().err


def test_a_study_report_without_runs_rewrites_nothing(tmp_path, monkeypatch, capsys):
    """`--report MINUTES` writes the study's outputs (transfer.json, .md, .png, the README's table) from what a study
    cut short left in rows.jsonl; with none there it would have rewritten them from nothing new."""
    from bench import transfer

    monkeypatch.setattr(transfer, "WORK", tmp_path / "work")
    monkeypatch.setattr(transfer, "report", lambda *args: pytest.fail("report written"))
    with pytest.raises(SystemExit) as exit_:
        transfer.main(["--report", "30"])
    assert exit_.value.code == 2
    assert f"--report: {tmp_path / 'work' / 'rows.jsonl'} holds no runs" in capsys.readouterr().err
