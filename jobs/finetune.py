"""Fine-tune a pretrained backbone on a target dataset with Ray Train (DDP).

    python -m jobs.finetune --config configs/demo.yaml [--set optim.lr=0.01 ...] [--resume]
"""

from __future__ import annotations

from jobs.claim import claimed
from jobs.cli import guarded, parse_args, run_module
from jobs.preflight import load_and_check
from jobs.results import run_summary, write_result
from jobs.runner import run_trainer
from tl_core.errors import ConfigError


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __name__, __doc__)
    cfg = load_and_check(args)
    if cfg.pretrain.method != "supervised":
        raise ConfigError(f"pretrain.method: {cfg.pretrain.method} is a pretraining method; run it with python -m jobs.pretrain")
    with claimed(cfg):
        result = write_result(cfg, run_trainer(cfg, recipe="supervised"))
    print(f"{cfg.experiment}: {run_summary(result)} -> {result['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    run_module("jobs.finetune")
