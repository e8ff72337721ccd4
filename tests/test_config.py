import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from jobs.sweep_config import load_sweep
from tl_core.config import METRIC_NAMES, RunConfig, from_dict, left_unread, override, with_overrides
from tl_core.config_file import load_config
from tl_core.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
MINIMAL = {"experiment": "exp", "data": {"root": "data/x"}}


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_leave_no_setting_unread(path):
    if "search:" in path.read_text():
        base, search = load_sweep(path)
        assert left_unread(base, search.varied_keys()) == {}
    else:
        assert left_unread(load_config(path)) == {}


def test_a_sweep_file_given_to_a_run_job_says_which_job_runs_it():
    sweep_file = next(p for p in CONFIGS if "search:" in p.read_text())
    with pytest.raises(ConfigError, match=f"^{sweep_file}: search: this is a sweep file; run it with python -m jobs.sweep "
                                          f"--config {sweep_file}$"):
        load_config(sweep_file)


def test_settings_another_setting_leaves_unread_are_named():
    """A setting only some strategies, optimizers, schedules or an early stop read, changed where the choice made
    leaves it unread, is named with that choice; the defaults of a config written whole are not."""
    cfg = from_dict({**MINIMAL, "model": {"strategy": "full", "lp_epochs": 3, "unfreeze_every": 2},
                     "optim": {"name": "adamw", "momentum": 0.95, "betas": [0.9, 0.99], "scheduler": "cosine", "gamma": 0.5},
                     "train": {"early_stopping": {"metric": "val/loss"}}})
    assert left_unread(cfg) == {"model.strategy: full": ["model.lp_epochs: 3"],
                                "optim.name: adamw": ["optim.momentum: 0.95"],
                                "optim.scheduler: cosine": ["optim.gamma: 0.5"],
                                "train.early_stopping.patience: null": ["train.early_stopping.metric: val/loss"]}
    assert left_unread(from_dict(cfg.to_dict())) == left_unread(cfg)  # a config written whole: only the changes
    read = from_dict({**MINIMAL, "model": {"strategy": "lp_ft", "lp_epochs": 3}, "train": {"epochs": 5, "early_stopping": {
        "metric": "val/loss", "patience": 2}}, "optim": {"name": "sgd", "momentum": 0.5, "scheduler": "step", "step_size": 2, "gamma": 0.5}})
    assert left_unread(read) == {}
    probe = from_dict({**MINIMAL, "model": {"strategy": "linear_probe", "backbone_lr_mult": 0.1}})
    assert left_unread(probe) == {"model.strategy: linear_probe": ["model.backbone_lr_mult: 0.1"]}


def test_a_sweep_varying_a_setting_its_fixed_choice_leaves_unread_is_named():
    """A sweep's trials set the keys of its space: varying model.lp_epochs under a fixed full strategy varies nothing;
    varying the strategy itself leaves nothing unread (its lp_ft trials read lp_epochs)."""
    cfg = from_dict({**MINIMAL, "model": {"lp_epochs": 2}, "train": {"epochs": 4}})
    assert left_unread(cfg, varied={"model.lp_epochs": {}, "optim.lr": {}}) == {
        "model.strategy: full": ["model.lp_epochs (varied by search.space)"]}
    assert left_unread(cfg, varied={"model.strategy": {}, "model.lp_epochs": {}}) == {}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_document_their_launch_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "python -m jobs." in first, first
    if "python -m jobs.sweep" in first:
        load_sweep(path)
    else:
        load_config(path)


def test_configs_directory_is_not_empty():
    assert len(CONFIGS) >= 2


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["optim.lr=0.5", "train.early_stopping.patience=3", "model.weights=null", "scaling.use_gpu=true"])
    assert cfg.optim.lr == 0.5
    assert cfg.train.early_stopping.patience == 3
    assert cfg.model.weights is None and cfg.scaling.use_gpu is True
    assert cfg.storage.root == "./runs" and cfg.model.backbone == "resnet18"


def test_round_trips_through_yaml():
    cfg = from_dict({**MINIMAL, "optim": {"name": "adamw", "lr": 3e-4}, "train": {"clip_grad_norm": 1.0}})
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_config_is_frozen():
    cfg = from_dict(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_with_overrides_revalidates():
    cfg = with_overrides(from_dict(MINIMAL), ["experiment=other"])
    assert cfg.experiment == "other"
    with pytest.raises(ConfigError, match="optim.lr"):
        with_overrides(cfg, ["optim.lr=-1"])


def test_endpoint_credentials_are_refused_and_never_echoed():
    with pytest.raises(ConfigError) as err:
        from_dict({**MINIMAL, "storage": {"endpoint_url": "http://AKIAKEY:s3cr3t@127.0.0.1:9000"}})
    assert "storage.endpoint_url: holds a credential" in str(err.value)
    assert "s3cr3t" not in str(err.value) and "AKIAKEY" not in str(err.value)


BAD = [
    ({"optim": {"lrr": 0.1}}, "optim.lrr: unknown key (did you mean optim.lr?); allowed: name, lr"),
    # a key of another section, or another tool's name for one of ours, is named; one that several sections have is not
    ({"model": {"lr": 0.1}}, "model.lr: unknown key (did you mean optim.lr?); allowed: backbone, weights"),
    ({"train": {"max_epochs": 5}}, "train.max_epochs: unknown key (did you mean train.epochs?); allowed: epochs"),
    ({"data": {"root": "/data", "batch_size": 8}}, "data.batch_size: unknown key (did you mean train.batch_size?); allowed: root"),
    ({"model": {"metric": "val/acc"}}, "model.metric: unknown key; allowed: backbone"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"train": {"epochs": "ten"}}, "train.epochs: Input should be a valid integer"),
    ({"optim": {"lr": -0.1}}, "optim.lr: Input should be greater than 0"),
    ({"optim": {"lr": 0}}, "optim.lr: Input should be greater than 0"),
    ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1"),
    ({"model": {"backbone": "resnet9000"}}, "model.backbone: unknown backbone 'resnet9000' (did you mean resnet50?); allowed: resnet18"),
    ({"optim": {"name": "lion"}}, "optim.name: unknown name 'lion'; allowed: sgd, adam, adamw, adagrad, rmsprop"),
    ({"optim": {"scheduler": "poly"}}, "optim.scheduler: unknown name 'poly'; allowed: constant, step, cosine, onecycle"),
    ({"model": {"strategy": "lora"}}, "model.strategy: Input should be 'full', 'linear_probe', 'gradual_unfreeze' or 'lp_ft'"),
    ({"checkpoint": {"metric": "val/auc"}}, "checkpoint.metric: unknown metric 'val/auc'"),
    ({"train": {"early_stopping": {"metric": "acc"}}}, "train.early_stopping.metric: unknown metric"),
    ({"experiment": "../escape"}, "experiment: expected letters, digits, '.', '_' and '-', beginning with a letter or digit "
                                  "(got '../escape')"),
    ({"train": [1]}, "train: expected a section (key: value lines under it) (got a list)"),  # "... or instance of TrainConfig"
    # a list or section says its kind, not its contents; `--set model.backbone=timm:` reads as a key with no value
    ({"model": {"backbone": None}}, "model.backbone: expected text (got no value)"),
    ({"model": {"backbone": {"timm": None}}}, "model.backbone: expected text (got key: value pairs; quote a value that ends in ':')"),
    ({"optim": {"betas": {"a": 1}}}, "optim.betas: expected a list of 2 numbers, e.g. [0.9, 0.999] (got key: value pairs)"),
    ({"scaling": {"resources_per_worker": 2}}, "scaling.resources_per_worker: expected key: value pairs (got 2)"),
    ({"data": {}}, "data.root: required key is missing"),
    # "" is the working directory: a run read the folder it was started in as class folders, or wrote its checkpoints there
    ({"data": {"root": ""}}, "data.root: empty; give a local path or s3://bucket/prefix (got '')"),
    ({"storage": {"root": " "}}, "storage.root: empty; give a local path or s3://bucket/prefix (got ' ')"),
    ({"optim": {"nesterov": True, "name": "adam"}}, "nesterov: needs name: sgd"),
    ({"data": {"root": "/data", "label_column": "text"}}, "data: label_column: 'text' is text_column too; the labels must be in a column of their own"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers: must be >= 1 (got 0)"),
    ({"scaling": {"num_workers": {"min": 4, "max": 2}}}, "scaling.num_workers: {min, max} range: min (4) must not exceed max (2)"),
    ({"scaling": {"num_workers": {"min": 1}}}, "scaling.num_workers: {min, max} range: max: required key is missing"),
    ({"scaling": {"num_workers": "many"}}, "scaling.num_workers: expected a number of workers or {min: N, max: M} (got 'many')"),
    ({"scaling": {"resources_per_worker": {"GPU": 1}}}, "scaling: resources_per_worker: GPU needs use_gpu: true"),
    ({"train": {"val_every": 2}}, "checkpoint.every: 1 must be a multiple of train.val_every (2): a checkpoint holds"),
    ({"train": {"val_every": 0}}, "train.val_every: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("patch,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_values_name_the_field(patch, message):
    raw = {**MINIMAL, **patch}
    with pytest.raises(ConfigError) as err:
        from_dict(raw, source="run.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "experiment: x\ndata:\n  root: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run.yaml: not valid YAML at line \d+"):
        load_config(path)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config file is a directory"):
        load_config(tmp_path)
    os.mkfifo(tmp_path / "fifo.yaml")  # a read would wait for a writer forever
    with pytest.raises(ConfigError, match="fifo.yaml: config file is not a regular file"):
        load_config(tmp_path / "fifo.yaml")
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="experiment is a value, not a section"):
        load_config(path, ["experiment.name=3"])


@pytest.mark.parametrize("backbone,hint", [
    ("Resnet18", "unknown backbone 'Resnet18' (did you mean resnet18?); allowed: resnet18"),
    ("resnet152", "unknown backbone 'resnet152' (timm has it: timm:resnet152); allowed:"),  # not torchvision's here
    ("TIMM:resnet18", "unknown backbone 'TIMM:resnet18' (the prefix is lower case: timm:resnet18); allowed:"),
    ("timm:RESNET18", "unknown timm model 'RESNET18' (did you mean timm:resnet18?); list timm's names with python -c "
                      "\"import timm; print(timm.list_models('*resnet*'))\""),
    ("timm:tf_efficientnet_lite_0", "unknown timm model 'tf_efficientnet_lite_0' (did you mean timm:tf_efficientnet_lite0?)"),
    ("timm:", "model.backbone: timm: needs a model name after it, e.g. timm:tf_efficientnet_lite0 (got 'timm:')"),
    ("zzzz", "unknown backbone 'zzzz'; allowed:"),  # nothing near: no guess
    # timm.create_model's hub names: the hint was to list the models named like '*hf-hub*'
    ("timm:hf-hub:timm/resnet18.a1_in1k", "timm's hub names (hf-hub:) are not taken: name the model and its tag, "
                                          "timm:resnet18.a1_in1k, with model.weights: imagenet or its tag"),
    ("timm:hf-hub:acme/net", "timm's hub names (hf-hub:) are not taken: name a timm model (timm:<name>) and give the "
                             "repository's weights file as model.weights"),
])
def test_a_misspelt_backbone_says_what_was_meant(backbone, hint):
    with pytest.raises(ConfigError, match=re.escape(hint)):
        from_dict({**MINIMAL, "model": {"backbone": backbone}})


def test_metric_names_cover_what_the_loop_reports():
    assert {"val/acc", "val/f1", "train/loss", "epoch"} <= set(METRIC_NAMES)
    assert RunConfig.model_fields.keys() >= {"data", "model", "optim", "train", "scaling", "checkpoint", "storage"}


def test_num_workers_is_a_count_or_an_elastic_range():
    fixed = from_dict({**MINIMAL, "scaling": {"num_workers": 3}}).scaling
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers) == (False, 3, 3)
    elastic = from_dict({**MINIMAL, "scaling": {"num_workers": {"min": 1, "max": 4}, "accelerator_type": "A10G"}}).scaling
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers) == (True, 1, 4)
    assert from_dict(yaml.safe_load(RunConfig.model_validate({**MINIMAL, "scaling": elastic.model_dump()}).to_yaml())).scaling == elastic


@pytest.mark.parametrize("key,value", [
    ("experiment", "76333_00000"),  # a Ray Tune trial id: YAML 1.1 reads bare digits with underscores as an integer
    ("experiment", "1e5"),
    ("data.root", Path("/data/set: two")),  # ": " would make a bare value a mapping
    ("storage.root", "s3://bucket/runs"),
])
def test_an_override_keeps_a_string_a_string(key, value):
    cfg = with_overrides(from_dict(MINIMAL), [override(key, value)])
    section, _, name = key.rpartition(".")
    assert getattr(getattr(cfg, section) if section else cfg, name) == str(value)


def test_numbers_with_an_exponent_read_as_numbers_everywhere(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-4 as the text "1e-4": a search range of such "numbers" was refused
    run = {**MINIMAL, "optim": {"lr": "LR"}}
    path = write(tmp_path, yaml.safe_dump(run).replace("LR", "3e-4") + "search:\n  scheduler: {name: asha, max_t: 2}\n"
                 "  space:\n    optim.lr: {loguniform: [1e-5, 1E-1]}\n    optim.weight_decay: {choice: [0, 5e-2, +1e-3]}\n")
    base, search = load_sweep(path, ["train.label_smoothing=1e-1"])
    assert (base.optim.lr, base.train.label_smoothing) == (3e-4, 0.1)
    assert search.space == {"optim.lr": {"loguniform": [1e-5, 0.1]}, "optim.weight_decay": {"choice": [0, 0.05, 1e-3]}}
    for text in ("1e5", "1E-4", "2_0e3"):  # text that reads as a number is quoted when written, so it stays text
        cfg = with_overrides(from_dict(MINIMAL), [override("experiment", text)])
        assert from_dict(yaml.safe_load(cfg.to_yaml())).experiment == text
        assert load_config(write(tmp_path, cfg.to_yaml())).experiment == text


def test_off_on_yes_and_no_read_as_words_and_booleans_take_them(tmp_path):
    """YAML 1.1 reads `off` as false: `train.amp: off`, an allowed value, was refused ("got False"). As in YAML 1.2
    only true and false are booleans; a boolean key takes the words as pydantic does, and a written config quotes
    them, so other YAML readers read them back as written."""
    text = "experiment: exp\ntrain:\n  amp: off\ndata:\n  root: /data\n  augment: no\n  hflip: yes\n"
    cfg = load_config(write(tmp_path, text), ["scaling.use_gpu=off", "model.freeze_bn_stats=On"])
    assert (cfg.train.amp, cfg.data.augment, cfg.data.hflip, cfg.scaling.use_gpu, cfg.model.freeze_bn_stats) == ("off", False, True, False, True)
    assert yaml.safe_load(cfg.to_yaml())["train"]["amp"] == "off"
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg
    _, search = load_sweep(write(tmp_path, text + "search:\n  space:\n    train.amp: {choice: [off, auto]}\n"), [])
    assert search.space == {"train.amp": {"choice": ["off", "auto"]}}


def test_a_sweep_files_train_epochs_is_its_max_t_and_never_silently_replaced(tmp_path):
    """train.epochs: 4 in a sweep file ran every trial for 10 epochs (max_t's default), and said nothing."""
    def sweep(train: dict, scheduler: dict, overrides=()):
        run = {**MINIMAL, "train": train, "search": {"scheduler": scheduler, "space": {"optim.lr": {"choice": [0.1, 0.01]}}}}
        return load_sweep(write(tmp_path, yaml.safe_dump(run)), list(overrides))

    base, search = sweep({"epochs": 4}, {"name": "asha"})
    assert base.train.epochs == search.scheduler.max_t == 4
    base, search = sweep({"batch_size": 8}, {"name": "asha"})  # neither: max_t's default
    assert base.train.epochs == search.scheduler.max_t == 10
    base, search = sweep({"epochs": 6}, {"name": "asha", "max_t": 6})
    assert base.train.epochs == 6
    with pytest.raises(ConfigError, match=r"run.yaml: train.epochs: 4, but search.scheduler.max_t: 9 is every trial's "
                                          r"train.epochs; set one of them, or both to the same number$"):
        sweep({"epochs": 4}, {"name": "asha", "max_t": 9})
    with pytest.raises(ConfigError, match=r"train.epochs: 3, but search.scheduler.max_t: 6"):
        sweep({"epochs": 6}, {"name": "asha", "max_t": 6}, ["train.epochs=3"])
    base, search = sweep({"epochs": 6}, {"name": "asha", "max_t": 6}, ["train.epochs=3", "search.scheduler.max_t=3"])
    assert base.train.epochs == search.scheduler.max_t == 3
    with pytest.raises(ConfigError, match=r"train.epochs: 'four' must be a whole number of epochs, at least 1$"):
        sweep({"epochs": "four"}, {"name": "asha"})
    with pytest.raises(ConfigError, match=r"search.scheduler: grace_period: 5 is more than max_t 4"):
        sweep({"epochs": 4}, {"name": "asha", "grace_period": 5})
