"""Classification metrics from a confusion matrix, summed over DDP ranks before they are computed."""

from __future__ import annotations

import torch

from tl_core.distributed import all_reduce_sum

TOP_K = 5  # val/acc5


def uninformative(name: str, num_classes: int) -> bool:
    """A metric that says nothing for this many classes: top-5 accuracy is 1 by definition with five or fewer."""
    return name == "val/acc5" and num_classes <= TOP_K


class ClassificationMeter:
    """Accumulates loss, top-5 hits and the confusion matrix (rows: true class, columns: predicted)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.totals = torch.zeros(2, dtype=torch.float64)  # [sum of per-sample loss, top-5 hits]

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: float) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        self.confusion += confusion_matrix(labels, logits.argmax(dim=1), self.num_classes)
        k = min(TOP_K, self.num_classes)
        hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        self.totals += torch.tensor([float(loss_sum), float(hits)], dtype=torch.float64)

    def reduce(self) -> "ClassificationMeter":
        """Sum over all ranks: the exact metrics of the whole dataset, however unevenly it was sharded."""
        all_reduce_sum(self.confusion)
        all_reduce_sum(self.totals)
        return self

    def compute(self) -> dict:
        n = max(self.confusion.sum().item(), 1)
        return {"loss": self.totals[0].item() / n, "acc5": self.totals[1].item() / n, **confusion_scores(self.confusion)}


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The counts of (true class, predicted class) pairs: rows true, columns predicted."""
    return torch.bincount(labels * num_classes + preds, minlength=num_classes ** 2).view(num_classes, num_classes)


def confusion_scores(confusion: torch.Tensor) -> dict:
    """Accuracy, macro precision, recall and F1, and each class's, of a confusion matrix (rows: true class, columns:
    predicted), with the matrix and its count."""
    cm = confusion.double()
    count = cm.sum()
    tp = cm.diag()
    precision = torch.where(cm.sum(0) > 0, tp / cm.sum(0).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(cm.sum(1) > 0, tp / cm.sum(1).clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    # Macro means over the classes that occur, as true or predicted labels (scikit-learn's choice): a class a
    # small validation split lacks, and that nothing was predicted as, has no precision or recall to average in.
    seen = (cm.sum(0) + cm.sum(1)) > 0
    return {
        "acc": tp.sum().item() / max(count.item(), 1.0),
        "precision": _mean(precision[seen]),
        "recall": _mean(recall[seen]),
        "f1": _mean(f1[seen]),
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                      "support": cm.sum(1).long().tolist()},
        "confusion_matrix": confusion.tolist(),
        "count": int(count.item()),
    }


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if values.numel() else 0.0
