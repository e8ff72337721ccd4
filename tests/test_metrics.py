import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import f1_score, precision_score, recall_score

from tl_core.metrics import ClassificationMeter

NUM_CLASSES = 4


def data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    logits = torch.randn(n, NUM_CLASSES, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, NUM_CLASSES)
    return logits, labels


def measure(logits, labels, batch_size=5) -> dict:
    meter = ClassificationMeter(NUM_CLASSES)
    for i in range(0, len(labels), batch_size):
        lg, lb = logits[i:i + batch_size], labels[i:i + batch_size]
        meter.update(lg, lb, torch.nn.functional.cross_entropy(lg, lb, reduction="sum").item())
    return meter.reduce().compute()


def test_matches_sklearn():
    logits, labels = data()
    preds = logits.argmax(1).numpy()
    m = measure(logits, labels)
    assert m["acc"] == pytest.approx((preds == labels.numpy()).mean())
    assert m["precision"] == pytest.approx(precision_score(labels, preds, average="macro", zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(labels, preds, average="macro", zero_division=0))
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))
    assert m["per_class"]["f1"] == pytest.approx(list(f1_score(labels, preds, average=None, zero_division=0)))
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert sum(map(sum, m["confusion_matrix"])) == 23 and m["count"] == 23


def test_top5_with_fewer_classes_is_one_and_top1_counts_hits():
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.2], [3.0, 0.0, 0.0, 0.0]])
    m = measure(logits, torch.tensor([2, 0]))
    assert m["acc"] == 0.5 and m["acc5"] == 1.0
    assert m["confusion_matrix"][2][1] == 1 and m["confusion_matrix"][0][0] == 1


def _rank_worker(rank, world_size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    logits, labels = data()
    shard = slice(rank, None, world_size)  # 12 and 11 samples: an uneven last batch on each rank
    out[rank] = measure(logits[shard], labels[shard])
    dist.destroy_process_group()


def test_two_ranks_on_two_shards_equal_one_rank_on_all(tmp_path):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    single = measure(*data())
    for rank in range(2):
        for key in ("loss", "acc", "acc5", "precision", "recall", "f1"):
            assert out[rank][key] == pytest.approx(single[key], abs=1e-12), key
        assert out[rank]["confusion_matrix"] == single["confusion_matrix"]


def test_metric_tensors_are_reduced_where_the_backend_can_reduce_them(monkeypatch):
    """NCCL, Ray Train's backend for GPU workers, refuses CPU tensors ("No backend type associated with device type
    cpu", seen on an H200 with bench.cuda_paths): the metric sums, kept on the CPU, are reduced on the GPU there and
    on the CPU under gloo."""
    from tl_core import distributed

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert distributed.collective_device() == torch.device("cuda", 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


def test_macro_means_leave_out_a_class_neither_true_nor_predicted():
    """A small validation split can lack a class (one with a single image goes to train): macro precision, recall and
    F1 average the classes that occur, as scikit-learn's do; the per-class lists keep every class."""
    logits, labels = data(n=40, seed=3)
    keep = labels != 3
    logits, labels = logits[keep], labels[keep]
    logits[:, 3] = -10.0  # nothing predicted as class 3 either
    preds = logits.argmax(1).numpy()
    m = measure(logits, labels)
    assert 3 not in set(labels.tolist()) | set(preds.tolist())
    assert m["precision"] == pytest.approx(precision_score(labels, preds, average="macro", zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(labels, preds, average="macro", zero_division=0))
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))
    assert len(m["per_class"]["recall"]) == NUM_CLASSES and m["per_class"]["support"][3] == 0


def test_macro_means_of_no_sample_are_zero():
    m = ClassificationMeter(NUM_CLASSES).compute()
    assert (m["precision"], m["recall"], m["f1"], m["count"]) == (0.0, 0.0, 0.0, 0)
