"""Pretrain a backbone on a source task; its run directory is a valid `model.weights` for jobs.finetune.

    python -m jobs.pretrain --config configs/demo-pretrain.yaml [--set k=v ...] [--resume]   (supervised)
    python -m jobs.pretrain --config configs/demo-simclr.yaml                                  (SimCLR, no labels)

`pretrain.method: supervised` trains the classifier end to end on labelled images; `simclr` trains the
backbone with a contrastive loss on unlabelled ones (tl_core.simclr) and keeps the backbone only.
"""

from __future__ import annotations

from jobs.claim import claimed
from jobs.cli import guarded, parse_args, run_module
from jobs.preflight import load_and_check
from jobs.results import run_summary, write_result
from jobs.runner import run_trainer


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __name__, __doc__)
    cfg = load_and_check(args)
    with claimed(cfg):
        result = write_result(cfg, run_trainer(cfg, recipe=cfg.pretrain.method))
    print(f"{cfg.experiment}: {run_summary(result)}; "
          f"fine-tune from it with model.weights={result['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    run_module("jobs.pretrain")
