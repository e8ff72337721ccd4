"""The transfer-learning demo (`make demo`): 3 labels per class of digits 5-9 (15 images), learnt three ways and
compared on the same validation images: from scratch, fine-tuned from a source model pretrained here on digits
0-4, and fine-tuned from a real ImageNet EfficientNet-Lite0 (shipped offline in a PyPI package).

    python -m jobs.demo [--set k=v ...]     (overrides apply to every stage, e.g. --set scaling.num_workers=1)
    python -m jobs.demo --text              (text: all-MiniLM-L6-v2 against scratch on 5 docstrings per package)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cluster import storage
from jobs.claim import claimed
from jobs.cli import ArgumentParser, Interrupted, guarded, run_module
from jobs.preflight import check_run
from jobs.results import write_result
from jobs.runner import run_trainer
from jobs.staging import experiment_location
from tl_core.config import with_overrides
from tl_core.config_file import load_config
from tl_core.demo_data import write_digits
from tl_core.errors import ConfigError
from tl_core.text_models import is_text_backbone

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LOCAL_DIGITS = Path("data/digits")


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(__name__, __doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--prepare", action="store_true",
                        help="only the data and the source model (what `ray job submit ... configs/demo.yaml` reads)")
    parser.add_argument("--text", action="store_true", help="the text demo: MiniLM against scratch on docstrings")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # worker lines without colour codes, on a terminal too
    if args.text:
        return text_demo(args.overrides, prepare=args.prepare)
    pretrain = load_config(CONFIGS / "demo-pretrain.yaml", args.overrides)
    finetune = load_config(CONFIGS / "demo.yaml", args.overrides)
    imagenet = load_config(CONFIGS / "demo-imagenet.yaml", args.overrides)
    # Scratch gets the LR that suited it best in a small search (0.01; 0.05 diverges without a source model).
    scratch = with_overrides(finetune, ["experiment=demo-scratch", "model.weights=null", "model.backbone_lr_mult=1.0",
                                        "model.freeze_bn_stats=false", "optim.lr=0.01"])
    target = place_digits(pretrain, finetune)
    stages = [("pretrain", pretrain)]
    if not args.prepare:
        stages += [("scratch", scratch), ("finetune", finetune), ("imagenet", imagenet)]
    results = run_stages(stages)
    if not args.prepare:
        print_table(results, {"scratch": scratch, "finetune": finetune, "imagenet": imagenet}, target)
    return 0


def run_stages(stages: list[tuple[str, object]]) -> dict:
    """Each stage's run from a clean start, with progress lines; returns each stage's result.json."""
    results = {}
    for i, (name, cfg) in enumerate(stages, 1):
        storage.delete(experiment_location(cfg))  # the demo's own outputs from an earlier run
        inputs = f"on up to {cfg.data.max_length} tokens" if is_text_backbone(cfg.model.backbone) else f"at {cfg.data.image_size} px"
        print(f"\n=== stage {i}/{len(stages)}, {STAGE_TITLES[name]}: {cfg.model.backbone} {inputs}, {cfg.train.epochs} epochs ===",
              flush=True)
        started = time.monotonic()
        cfg = check_run(cfg, resume=False)  # its lines (the source weights it loads) belong to the stage
        try:
            with claimed(cfg):
                results[name] = write_result(cfg, run_trainer(cfg, recipe=cfg.pretrain.method))
        except Interrupted:  # not resumable: the demo starts each stage from a clean run
            raise Interrupted(f"the demo stopped in stage {i}/{len(stages)} ({name}); run it again to start over") from None
        print(f"=== stage {i}/{len(stages)} done in {time.monotonic() - started:.0f} s: "
              f"val/acc {results[name]['final_metrics']['val/acc']:.3f} ===", flush=True)
    return results


def text_demo(overrides: list[str], prepare: bool) -> int:
    """MiniLM (pretrained, linear probe) against the same architecture trained from scratch, on 5 labelled docstrings
    of each of 8 standard-library packages. Scratch trains every layer with AdamW at 1e-3 for 20 epochs,
    validated every 5th."""
    from tl_core.demo_text import write_docstrings

    pretrained = load_config(CONFIGS / "demo-text.yaml", overrides)
    # The 320 validation texts take over twice as long as an epoch on 40 (8 against 3.5 s): every 5th and the last.
    scratch = with_overrides(pretrained, ["experiment=demo-text-scratch", "model.weights=null", "model.strategy=full",
                                          "optim.lr=1e-3", "train.epochs=20", "train.val_every=5", "checkpoint.every=5"])
    root = pretrained.data.root.rsplit("/", 1)[0]
    if storage.is_uri(root) or Path(pretrained.data.root).resolve() != (Path(root) / "docstrings-5shot-seed0").resolve():
        raise ConfigError(f"data.root: the text demo writes its docstrings to a local folder, not {pretrained.data.root}")
    target = write_docstrings(root, labels_per_class=5, seed=0)
    print(f"docstrings written to {target}", flush=True)
    if prepare:
        return 0
    results = run_stages([("text-scratch", scratch), ("text-minilm", pretrained)])
    n_train, n_val = (sum(1 for _ in open(target / f"{split}.csv")) - 1 for split in ("train", "val"))
    print(f"\nTarget task: the docstrings of {len(results['text-minilm']['classes'])} standard-library packages, "
          f"{n_train} labelled training texts (5 per package), {n_val} validation texts\n")
    print(f"{'how the 40 texts were used':<34}{'model':<20}{'pretrained on':<26}{'val/acc':>8}{'val/f1':>8}{'gain':>8}")
    base = results["text-scratch"]["final_metrics"]["val/acc"]
    for label, key, source in (("trained from scratch", "text-scratch", "no"),
                               ("linear probe of the encoder", "text-minilm", "1B sentence pairs")):
        m = results[key]["final_metrics"]
        gain = "" if key == "text-scratch" else f"{m['val/acc'] - base:+.3f}"
        print(f"{label:<34}{'all-MiniLM-L6-v2':<20}{source:<26}{m['val/acc']:>8.3f}{m['val/f1']:>8.3f}{gain:>8}")
    print("\nval/acc and val/f1 (macro) of the final epoch; gain = val/acc over scratch.")
    return 0


STAGE_TITLES = {
    "text-scratch": "train all-MiniLM-L6-v2's architecture from scratch on the 40 texts",
    "text-minilm": "linear probe of the pretrained all-MiniLM-L6-v2 on the 40 texts",
    "pretrain": "pretrain the source model on digits 0-4",
    "scratch": "train from scratch on the 15 target images",
    "finetune": "fine-tune the source model on the 15 target images",
    "imagenet": "fine-tune ImageNet EfficientNet-Lite0 on the 15 target images",
}


def place_digits(pretrain, finetune) -> Path:
    """Write the digits ImageFolders locally, and upload them when the configs read them from S3; returns
    the local target-task folder."""
    source_root = pretrain.data.root
    digits_root = source_root.rsplit("/", 1)[0]
    _, target = write_digits(LOCAL_DIGITS, labels_per_class=3, seed=0)
    if storage.is_uri(digits_root):
        location = storage.parse(digits_root, pretrain.storage.endpoint_url, field="data.root")
        storage.check_access(location, "data.root")
        storage.upload_dir(LOCAL_DIGITS, location)
        print(f"digits uploaded to {location.uri}", flush=True)
    elif Path(digits_root).resolve() != LOCAL_DIGITS.resolve():
        raise ConfigError(f"data.root: the demo writes its digits to {LOCAL_DIGITS} or an s3:// prefix, not {digits_root}")
    if Path(finetune.data.root).name != target.name:
        raise ConfigError(f"data.root: configs/demo.yaml reads {finetune.data.root}; the demo writes {target.name}")
    return target


def print_table(results: dict, configs: dict, target: Path) -> None:
    n_val = sum(1 for _ in (target / "val").rglob("*.png"))
    n_train = sum(1 for _ in (target / "train").rglob("*.png"))
    print(f"\nSource task: digits 0-4 (resnet18 trained here), val/acc {results['pretrain']['final_metrics']['val/acc']:.3f}")
    print(f"Target task: digits 5-9, {n_train} labelled training images (3 per class), {n_val} validation images\n")
    rows = [("trained from scratch", "scratch", "no"),
            ("fine-tuned from the source model", "finetune", "digits 0-4, here"),
            ("fine-tuned from an ImageNet model", "imagenet", "ImageNet-1k")]
    print(f"{'how the 15 images were used':<34}{'model':<28}{'pretrained on':<18}{'val/acc':>8}{'val/f1':>8}{'gain':>8}")
    base = results["scratch"]["final_metrics"]["val/acc"]
    for label, key, source in rows:
        cfg, m = configs[key], results[key]["final_metrics"]
        model = f"{cfg.model.backbone.removeprefix('timm:')} {cfg.data.image_size}px"
        gain = "" if key == "scratch" else f"{m['val/acc'] - base:+.3f}"
        print(f"{label:<34}{model:<28}{source:<18}{m['val/acc']:>8.3f}{m['val/f1']:>8.3f}{gain:>8}")
    print("\nval/acc and val/f1 (macro) of the final epoch; gain = val/acc over scratch.")
    print(f"Runs, checkpoints and result.json files: {results['finetune']['best_checkpoint'].rsplit('/', 2)[0]}/")


if __name__ == "__main__":
    run_module("jobs.demo")
