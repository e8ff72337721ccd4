"""The transfer-learning demo (`make demo`): pretrain on digits 0-4, fine-tune on 3 labels per class of
digits 5-9, and compare with the same backbone trained from scratch on the same 15 labelled images.

    python -m jobs.demo [--set k=v ...]     (overrides apply to every stage, e.g. --set scaling.num_workers=1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster import storage
from jobs.claim import claimed
from jobs.cli import guarded
from jobs.preflight import check_run
from jobs.results import write_result
from jobs.runner import run_trainer
from jobs.staging import experiment_location
from tl_core.config import with_overrides
from tl_core.config_file import load_config
from tl_core.demo_data import write_digits
from tl_core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LOCAL_DIGITS = Path("data/digits")


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--prepare", action="store_true",
                        help="only the data and the source model (what `ray job submit ... configs/demo.yaml` reads)")
    args = parser.parse_args(argv)

    pretrain = load_config(CONFIGS / "demo-pretrain.yaml", args.overrides)
    finetune = load_config(CONFIGS / "demo.yaml", args.overrides)
    # Scratch gets the LR that suited it best in a small search (0.01; 0.05 diverges without a source model).
    scratch = with_overrides(finetune, ["experiment=demo-scratch", "model.weights=null", "model.backbone_lr_mult=1.0",
                                        "model.freeze_bn_stats=false", "optim.lr=0.01"])
    target = place_digits(pretrain, finetune)
    stages = [("pretrain", pretrain)] if args.prepare else [("pretrain", pretrain), ("finetune", finetune), ("scratch", scratch)]
    results = {}
    for name, cfg in stages:
        storage.delete(experiment_location(cfg))  # the demo's own outputs from an earlier run
        cfg = check_run(cfg, resume=False)
        print(f"\n=== {name}: {cfg.experiment} ({cfg.data.root}) ===", flush=True)
        with claimed(cfg):
            results[name] = write_result(cfg, run_trainer(cfg, recipe=cfg.pretrain.method))
    if not args.prepare:
        print_table(results, target)
    return 0


def place_digits(pretrain, finetune) -> Path:
    """Write the digits ImageFolders locally, and upload them when the configs read them from S3; returns
    the local target-task folder."""
    source_root = pretrain.data.root
    digits_root = source_root.rsplit("/", 1)[0]
    _, target = write_digits(LOCAL_DIGITS, labels_per_class=3, seed=0)
    if storage.is_uri(digits_root):
        location = storage.parse(digits_root, pretrain.storage.endpoint_url, field="data.root")
        storage.check_access(location)
        storage.upload_dir(LOCAL_DIGITS, location)
        print(f"digits uploaded to {location.uri}", flush=True)
    elif Path(digits_root).resolve() != LOCAL_DIGITS.resolve():
        raise ConfigError(f"data.root: the demo writes its digits to {LOCAL_DIGITS} or an s3:// prefix, not {digits_root}")
    if Path(finetune.data.root).name != target.name:
        raise ConfigError(f"data.root: configs/demo.yaml reads {finetune.data.root}; the demo writes {target.name}")
    return target


def print_table(results: dict, target: Path) -> None:
    n_val = sum(1 for _ in (target / "val").rglob("*.png"))
    n_train = sum(1 for _ in (target / "train").rglob("*.png"))
    print(f"\nSource task: digits 0-4, val/acc {results['pretrain']['final_metrics']['val/acc']:.3f}")
    print(f"Target task: digits 5-9, {n_train} labelled training images (3 per class), {n_val} validation images")
    print(f"{'resnet18 at 32 px, final epoch':<34}{'val/acc':>9}{'val/f1':>9}")
    for label, key in (("trained from scratch", "scratch"), ("fine-tuned from the source model", "finetune")):
        m = results[key]["final_metrics"]
        print(f"{label:<34}{m['val/acc']:>9.3f}{m['val/f1']:>9.3f}")
    gain = results["finetune"]["final_metrics"]["val/acc"] - results["scratch"]["final_metrics"]["val/acc"]
    print(f"{'transfer gain':<34}{gain:>+9.3f}")
    print(f"\nRuns, checkpoints and result.json files: {results['finetune']['best_checkpoint'].rsplit('/', 2)[0]}/")


if __name__ == "__main__":
    sys.exit(main())
