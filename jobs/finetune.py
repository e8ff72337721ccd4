"""Fine-tune a pretrained backbone on a target dataset with Ray Train (DDP).

    python -m jobs.finetune --config configs/demo.yaml [--set optim.lr=0.01 ...] [--resume]
"""

from __future__ import annotations

import sys

from jobs.common import guarded, load_and_check, parse_args, run_trainer, write_result


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, description=__doc__.splitlines()[0])
    cfg = load_and_check(args)
    result = write_result(cfg, run_trainer(cfg))
    print(f"{cfg.experiment}: {result['epochs_completed']} epochs, best {result['best_metric']} "
          f"-> {result['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
