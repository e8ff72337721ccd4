"""Does `model.backbone: timm:<name>` work for every kind of model timm has? One model of each timm family.

For each of timm's model families (the module that defines it: `resnet`, `vision_transformer`, `levit`, ...), the
model with the fewest parameters (among the family's first 40 names, counted on the meta device) is built as the
product builds it (`build_model`: the task's 3-class head in place of timm's, at the backbone's pretrained input
size, random weights) and run under each strategy: a forward and backward pass of 2 images in training mode, then
which parameters got gradients. It passes when the output has the 3 classes, a linear probe trains the head's 2
tensors alone, gradual unfreezing (one block open) trains more, full fine-tuning trains at least as many, and under
no strategy is a trainable parameter left without a gradient (which DDP refuses on more than one worker); and
the model saved as a run saves it loads back as the next run's `model.weights`, computing the same logits.
A model the product refuses says why in one line (ConfigError), recorded as such.

    python -m bench.timm_families          # ~10 min on 2 cores; writes bench/results/timm_families.json
"""

from __future__ import annotations

import collections
import tempfile
import time
import warnings

import torch

from bench.common import write_result
from tl_core.config import ModelConfig
from tl_core.errors import ConfigError
from tl_core.models import apply_strategy, backbone_blocks, build_model, pretrained_input_size, set_train_mode

STRATEGIES = (("linear_probe", 0), ("gradual_unfreeze", 1), ("full", 0))


def smallest_of_each_family() -> dict[str, str]:
    import timm
    from timm.models._registry import _model_to_module

    families: dict[str, list[str]] = collections.defaultdict(list)
    for name in timm.list_models():
        families[_model_to_module.get(name, "?")].append(name)
    smallest = {}
    for family, names in sorted(families.items()):
        sizes = {}
        for name in names[:40]:
            try:
                with torch.device("meta"):
                    sizes[name] = sum(p.numel() for p in timm.create_model(name, num_classes=1).parameters())
            except Exception:  # noqa: BLE001 - a model timm itself cannot build this way is not ours to judge
                continue
        if sizes:
            smallest[family] = min(sizes, key=sizes.get)
    return smallest


def trained_tensors(backbone: str) -> dict:
    """How many parameter tensors each strategy trains in one step of `backbone`, and its unfreezing blocks."""
    size = pretrained_input_size(backbone)
    cfg = ModelConfig(backbone=backbone, strategy="gradual_unfreeze", unfreeze_every=1)
    model = build_model(cfg, ["a", "b", "c"], size)
    images = torch.randn(2, 3, size, size)
    trained, without_gradient = {}, []
    for strategy, epoch in STRATEGIES:
        apply_strategy(model, cfg.model_copy(update={"strategy": strategy}), epoch)
        set_train_mode(model)
        out = model(images)
        if out.shape != (2, 3):
            raise AssertionError(f"output {tuple(out.shape)}, not (2, 3)")
        out.sum().backward()
        trained[strategy] = sum(1 for p in model.parameters() if p.requires_grad and p.grad is not None)
        without_gradient += [f"{strategy}: {n}" for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        model.zero_grad(set_to_none=True)
    return {"image_size": size, "blocks": len(backbone_blocks(model)), "trained_tensors": trained,
            "without_gradient": without_gradient, "reloads": reloads(model, cfg, size, images)}


def reloads(model: torch.nn.Module, cfg: ModelConfig, size: int, images: torch.Tensor) -> bool:
    """Whether a file of the model, as a run of ours saves it, is a source for the next run (`model.weights`) that
    computes the same logits."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), f"{tmp}/model.pt")
        again = build_model(cfg.model_copy(update={"weights": f"{tmp}/model.pt"}), ["a", "b", "c"], size)
    with torch.no_grad():
        return torch.allclose(again.eval()(images), model.eval()(images), atol=1e-5)


def main() -> None:
    warnings.filterwarnings("ignore")
    rows = []
    for family, name in smallest_of_each_family().items():
        started = time.perf_counter()
        row = {"family": family, "model": name}
        try:
            row.update(trained_tensors(f"timm:{name}"))
            t = row["trained_tensors"]
            row["ok"] = (t["linear_probe"] == 2 and t["gradual_unfreeze"] > 2 and t["full"] >= t["gradual_unfreeze"]
                         and not row["without_gradient"] and row["reloads"])
        except ConfigError as exc:
            row.update(ok=False, refused=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded: a failure is the finding
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{'ok' if row['ok'] else 'NO':3} {family:28} {name:40} {row.get('refused') or row.get('error') or ''}", flush=True)
        rows.append(row)
    write_result("timm_families", {"families": len(rows), "ok": sum(r["ok"] for r in rows),
                                   "refused": sum("refused" in r for r in rows), "failed": sum("error" in r for r in rows),
                                   "rows": rows})


if __name__ == "__main__":
    main()
