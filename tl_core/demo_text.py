"""The text demo's real data, with nothing downloaded: the docstrings of Python's own standard library, each labelled
by the package it documents (email, http, asyncio, unittest, xml, logging, importlib, urllib).

Every machine with Python has this text, written by people for people. It is a fair topic-classification test: the
docstrings of one package share a subject but not a template, and a docstring's package is not spelt out in it (the
package's own name is masked, so `json` does not give away json). A pretrained encoder knows what "a MIME part" or
"an event loop" is about; a model trained from scratch on a few labelled docstrings must learn it from them.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import pkgutil
import random
import re
import warnings
from collections import Counter
from pathlib import Path

PACKAGES = ("email", "http", "asyncio", "unittest", "xml", "logging", "importlib", "urllib")  # 96+ docstrings each
MIN_CHARS, MAX_CHARS = 40, 600


def docstrings(package: str) -> list[str]:
    """Every distinct docstring of `package`'s modules, classes, functions and methods, cleaned and masked."""
    root = importlib.import_module(package)
    modules = [root]
    if hasattr(root, "__path__"):
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if ".test" in info.name or "__main__" in info.name:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    modules.append(importlib.import_module(info.name))
            except Exception:  # noqa: BLE001 - a submodule needing an optional C extension
                continue
    found: list[str] = []
    for module in modules:
        objects = [module]
        for _, obj in inspect.getmembers(module):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "").startswith(package):
                objects.append(obj)
                if inspect.isclass(obj):
                    objects += [m for _, m in inspect.getmembers(obj, inspect.isfunction) if m.__module__.startswith(package)]
        for obj in objects:
            text = _clean(inspect.getdoc(obj) or "", package)
            if len(text) >= MIN_CHARS:
                found.append(text)
    return sorted(set(found))


def _clean(text: str, package: str) -> str:
    text = " ".join(text.split())[:MAX_CHARS]
    return re.sub(rf"\b{re.escape(package)}\b", "___", text, flags=re.IGNORECASE)


def write_docstrings(root: str | Path, *, labels_per_class: int = 5, val_per_class: int = 40, seed: int = 0) -> Path:
    """ROOT/docstrings-<n>shot-seed<s>/{train,val}.csv (columns text, label): `labels_per_class` training texts per
    package and up to `val_per_class` validation texts; returns the folder."""
    out = Path(root) / f"docstrings-{labels_per_class}shot-seed{seed}"
    if (out / "train.csv").is_file() and (out / "val.csv").is_file():
        return out
    rng = random.Random(seed)
    rows = {"train": [], "val": []}
    found = {package: docstrings(package) for package in PACKAGES}
    seen = Counter(text for texts in found.values() for text in texts)
    for package in PACKAGES:
        texts = [text for text in found[package] if seen[text] == 1]
        random.Random(1000 + PACKAGES.index(package)).shuffle(texts)  # the validation texts never depend on the seed
        val, pool = texts[:val_per_class], texts[val_per_class:]
        rng.shuffle(pool)
        rows["val"] += [(t, package) for t in val]
        rows["train"] += [(t, package) for t in pool[:labels_per_class]]
    out.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(items)
    return out
