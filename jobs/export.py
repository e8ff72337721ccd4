"""Export a run's best model for a runtime that is not this training code.

    python -m jobs.export RUN --format safetensors|torchscript|onnx --out PATH

RUN is a finished run (its result.json names the best checkpoint) or a checkpoint directory, local or s3://. PATH
(local or s3://) receives the model, and PATH.json (e.g. model.onnx.json) how to feed it:

- images: {"input": {"layout": "NCHW", "size", "resize", "center_crop", "mean", "std", "dtype"}, "classes", ...}: an
  RGB image resized (shorter side) to `size`, centre-cropped to `size`, scaled to [0, 1], normalised with mean/std;
  the output is one logit per class. ONNX and TorchScript take a batch of any size.
- text: {"input": {"tokenizer": files beside PATH in PATH.tokenizer/, "max_length", "pooling"}, "classes", ...}; the
  model takes input_ids and attention_mask (int64, batch x tokens).

safetensors holds the state dict (load it into `tl_core.models.build_model(...)`); torchscript is traced; onnx is
written by torch.onnx's TorchScript-based exporter (opset 17) and checked with onnxruntime before it is kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from cluster import storage
from jobs.best_model import load_model, local_checkpoint
from jobs.cli import ArgumentParser, guarded, run_module
from tl_core.errors import ConfigError

FORMATS = ("safetensors", "torchscript", "onnx")
#: file suffixes that name one format alone (.pt and .pth hold TorchScript or pickled state dicts alike)
FORMAT_OF_SUFFIX = {".safetensors": "safetensors", ".onnx": "onnx"}
OUTPUT_SUFFIXES = ("", ".json", ".tokenizer")  # OUT itself, its description, a text model's tokenizer
ONNX_OPSET = 17
#: how far an export's logits may be from the checkpoint's: ATOL + RTOL x |logit| (two runtimes' float32 kernels agree
#: to ~1e-6 of a value, so a model whose logits run into the thousands differs by more than any fixed 1e-4)
ATOL, RTOL = 1e-4, 1e-4


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(__name__, __doc__)
    parser.add_argument("run", help="a finished run or a checkpoint directory, local or s3://")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="where the model goes, local or s3://; its description goes to OUT.json")
    args = parser.parse_args(argv)
    out = storage.parse(args.out, field="--out")
    named = FORMAT_OF_SUFFIX.get(Path(out.path).suffix.lower(), args.format)
    if named != args.format:
        raise ConfigError(f"--out: {Path(out.path).name} ends in {Path(out.path).suffix}, the suffix of {named} files, but --format "
                          f"is {args.format}; give --format {named}, or an --out named for {args.format}")
    storage.check_creatable(out, "--out")
    for suffix in OUTPUT_SUFFIXES:  # never over an earlier export, nor into a folder
        if storage.exists(target := storage.parse(out.uri + suffix, field="--out"), "--out"):
            raise ConfigError(f"--out: {target.uri} already exists; an export goes to a new path")
    checkpoint = local_checkpoint(args.run)
    model, description = load_model(checkpoint)
    with tempfile.TemporaryDirectory(prefix="tl-export-") as tmp:
        written = export(model, description, args.format, Path(tmp) / "model", out.uri.rsplit("/", 1)[-1])
        publish(written, out)
    metric = description["config"]["checkpoint"]["metric"]  # what the run chose its best checkpoint by
    value = description["source"]["metrics"].get(metric)
    score = f" ({value:.4f} {metric})" if value is not None else ""
    print(f"{out.uri}: {args.format} of {description['source']['checkpoint']}{score}, described in {out.uri}.json")
    return 0


def example_inputs(description: dict) -> tuple:
    if description["modality"] == "text":
        ids = torch.randint(1000, 2000, (2, 16))
        return ids, torch.ones_like(ids)
    size = description["input"]["size"]
    return (torch.randn(2, 3, size, size),)


class _TextInputs(nn.Module):
    """A text classifier called with two tensors (what TorchScript and ONNX take) instead of a dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})


def export(model: nn.Module, description: dict, fmt: str, path: Path, name: str) -> list[tuple[Path, str]]:
    """Write the model in `fmt` and its description; [(local file or folder, suffix after OUT)]. `name`: OUT's
    own, by which the description names the tokenizer beside it. ConfigError in one line when the model cannot be
    expressed in `fmt` or the export does not reproduce its logits."""
    text = description["modality"] == "text"
    callable_model = _TextInputs(model) if text else model
    inputs = example_inputs(description)
    with torch.no_grad():
        expected = callable_model(*inputs)
    description = {**description, "format": fmt}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's and exporter's notes are not the user's business
            if fmt == "safetensors":
                from safetensors.torch import save_model

                save_model(model, str(path))
            elif fmt == "torchscript":
                traced = torch.jit.trace(callable_model, inputs)
                check(traced(*inputs), expected, fmt)
                traced.save(str(path))
            else:
                names = description["input"]["names"]
                axes = {name: {0: "batch", **({1: "tokens"} if text else {})} for name in names}
                torch.onnx.export(callable_model, inputs, str(path), dynamo=False, opset_version=ONNX_OPSET, input_names=names,
                                  output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}})
                import onnxruntime

                session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                got = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)})[0]
                check(torch.from_numpy(got), expected, fmt)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - an operator the format lacks, a model the tracer cannot follow
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"--format {fmt}: {description['source']['backbone']} cannot be exported as {fmt} ({reason})") from None
    files = [(path, "")]
    if text:  # the tokenizer travels with the model
        tokenizer = path.with_name("tokenizer")
        shutil.copytree(description["input"]["tokenizer"], tokenizer)
        description["input"]["tokenizer"] = f"{name}.tokenizer/"  # beside the description, as it names it
        files.append((tokenizer, ".tokenizer"))
    meta = path.with_name("model.json")
    meta.write_text(json.dumps(description, indent=1))
    return files + [(meta, ".json")]


def check(got: torch.Tensor, expected: torch.Tensor, fmt: str) -> None:
    if not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):  # a NaN on either side fails too
        raise ConfigError(f"--format {fmt}: the exported model's logits differ from the checkpoint's by up to "
                          f"{(got - expected).abs().max().item():.2g}, more than {ATOL:g} + {RTOL:g} x |logit| (its logits "
                          f"reach {expected.abs().max().item():.2g}); the export is not kept")


def publish(files: list[tuple[Path, str]], out) -> None:
    """Each written file (or folder) to OUT + its suffix, local or S3, whole or not at all."""
    for local, suffix in files:
        target = storage.parse(out.uri + suffix, field="--out")
        if local.is_dir():
            if target.is_s3:
                storage.upload_dir(local, target)
            else:
                shutil.copytree(local, target.path, dirs_exist_ok=True)
        else:
            if not target.is_s3:
                Path(target.path).parent.mkdir(parents=True, exist_ok=True)
            storage.upload_file(local, target)


if __name__ == "__main__":
    run_module("jobs.export")
