"""Which memory layout a conv net trains fastest in on the CPU: a training step per layout, per backbone, one thread.

tl_core.state.memory_format_for puts a convolutional net in channels_last on CUDA, and on the CPU from
CPU_CHANNELS_LAST_FROM_PX. This times a training step (forward, backward, AdamW) of each backbone in both layouts,
alternating so that drift in machine speed hits both, and writes the median seconds per image, the ratio
channels_last / contiguous and the layout the product picks. Target: the picked layout is never slower than the
other by more than 3% (the two are within noise where neither wins).

    python -m bench.memory_format [--steps 4]
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import argument_parser, write_result
from jobs.cli import count
from tl_core.config import ModelConfig
from tl_core.models import build_model
from tl_core.state import memory_format_for

#: (backbone, input size): the study's models, and the sizes users train ImageNet backbones at
CASES = [("resnet18", 32), ("resnet18", 64), ("resnet18", 160), ("resnet50", 160), ("timm:tf_efficientnet_lite0", 64),
         ("timm:tf_efficientnet_lite0", 128), ("timm:efficientnet_b0", 160), ("timm:convnext_atto", 160)]


def step_seconds(model: torch.nn.Module, layout: torch.memory_format, size: int, batch: int, steps: int) -> list[float]:
    """Seconds per image of `steps` training steps in `layout`, after one warm-up step."""
    model = model.to(memory_format=layout)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    labels = torch.randint(0, 5, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if i:
            times.append((time.perf_counter() - started) / batch)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--steps", type=count, default=4, help="timed steps per layout and round")
    parser.add_argument("--rounds", type=count, default=2, help="alternations of the two layouts")
    parser.add_argument("--batch-size", type=count, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for backbone, size in CASES:
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=backbone), [str(i) for i in range(5)], size).train()
        timed = {torch.contiguous_format: [], torch.channels_last: []}
        for _ in range(args.rounds):
            for layout, times in timed.items():
                times.extend(step_seconds(model, layout, size, args.batch_size, args.steps))
        contiguous, channels_last = (statistics.median(t) for t in timed.values())
        picked = memory_format_for(model, torch.device("cpu"), size) == torch.channels_last
        rows.append({"backbone": backbone, "image_size": size, "contiguous_ms_per_image": round(1000 * contiguous, 2),
                     "channels_last_ms_per_image": round(1000 * channels_last, 2), "ratio": round(channels_last / contiguous, 3),
                     "picked": "channels_last" if picked else "contiguous",
                     "picked_over_other": round(channels_last / contiguous if picked else contiguous / channels_last, 3)})
        print(rows[-1], flush=True)
    write_result("memory_format", {
        "setup": {"step": "forward, backward, AdamW", "batch_size": args.batch_size, "torch_threads": 1,
                  "steps_per_layout": args.steps * args.rounds},
        "cases": rows, "target": "picked_over_other <= 1.03 for every backbone",
        "meets_target": all(r["picked_over_other"] <= 1.03 for r in rows),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
