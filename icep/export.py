"""``python -m icep.export MODEL [KEY=VALUE ...]``: a saved model as ONNX, a ``torch.export``
program and safetensors weights, each checked against the PyTorch model.

Every file lands next to MODEL (or in ``out=DIR``) under MODEL's name: ``model.onnx`` (dynamic
batch, opset of the installed exporter, run in onnxruntime for the check), ``model.pt2``
(``torch.export.save``; ``torch.export.load(...).module()`` runs it) and ``model.safetensors``
(the weights, with the architecture, layer shapes and the model file's ``meta`` as JSON in its
metadata: ``icep.serialization.load_model`` and ``model.checkpoint=`` read it back). Each file
also carries the preprocessing and class names. The check runs the exported model and the
PyTorch one on a seeded random batch (and ONNX and the program on a second batch size, which
proves the batch is dynamic) and prints the largest absolute difference of the logits; above
``atol`` the export fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icep.cli_errors import one_line, run_command
from icep.errors import IcepError
from icep.eval import split_arguments

if TYPE_CHECKING:  # torch loads when a model does: `icep export --help` answers at once
    import torch
    from torch import nn

FORMATS = ("onnx", "program", "safetensors")
SUFFIXES = {"onnx": ".onnx", "program": ".pt2", "safetensors": ".safetensors"}
KEYS = {
    "formats": "onnx,program,safetensors",  # which files, comma-separated
    "out": None,  # the folder; None: MODEL's
    "batch": "8",  # the check's batch size (a second check runs batch + 1)
    "atol": "1e-4",  # the largest allowed absolute difference of the logits (fp32)
    "seed": "0",  # of the check's random batch
}

USAGE = f"""\
usage: icep export MODEL [KEY=VALUE ...]

Export MODEL (a model.pt icep saved) and check each export against the PyTorch model. Keys:
  formats=onnx,program,safetensors   which files (default: all three)
  out=DIR                            where they go (default: MODEL's folder)
  batch=8                            the check batch's size; the check also runs batch + 1
  atol=1e-4                          the largest allowed difference of the logits
  seed=0                             the check batch's seed
ONNX needs onnx, onnxscript and onnxruntime: pip install 'icep[export]'.
Files: MODEL's name with {", ".join(SUFFIXES.values())}.
"""


@dataclass
class Export:
    """One exported file and its check: the largest absolute difference of the logits from the
    PyTorch model's (None: the export failed, ``error`` says why)."""

    format: str
    path: Path
    max_abs_diff: float | None = None
    checked_on: str = ""
    error: str | None = None

    def ok(self, atol: float) -> bool:
        return self.error is None and self.max_abs_diff is not None and self.max_abs_diff <= atol

    def line(self, atol: float) -> str:
        if self.error is not None:
            return f"  {self.format:<12} failed: {self.error}"
        verdict = "ok" if self.ok(atol) else f"ABOVE {atol:g}"
        return (
            f"  {self.format:<12} {self.path}  max |diff| {self.max_abs_diff:.2e} "
            f"{self.checked_on} ({verdict})"
        )


def _settings(overrides: list[str]) -> dict[str, Any]:
    keys = dict(KEYS)
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in keys:
            raise IcepError(f"{key} is not an export key; keys: {', '.join(KEYS)}")
        keys[key] = value
    formats = [f.strip() for f in str(keys["formats"]).split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise IcepError(f"formats: got {keys['formats']!r}; choose from {', '.join(FORMATS)}")
    try:
        batch, atol, seed = int(keys["batch"]), float(keys["atol"]), int(keys["seed"])
    except ValueError as exc:
        raise IcepError(f"batch, atol, seed: {exc}; batch=8 atol=1e-4 seed=0") from None
    if batch < 1 or atol < 0:
        raise IcepError(f"batch={batch} atol={atol}: batch must be >= 1 and atol >= 0")
    return {"formats": formats, "out": keys["out"], "batch": batch, "atol": atol, "seed": seed}


def _difference(ours: torch.Tensor, theirs: Any) -> float:
    import torch

    return float((ours - torch.as_tensor(theirs)).abs().max())


def export_onnx(model: nn.Module, batches: list[torch.Tensor], path: Path, info: dict) -> Export:
    """``torch.onnx.export`` (the dynamo exporter) with a dynamic batch, checked in
    onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise IcepError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'icep[export]' "
            "(or formats=program,safetensors)"
        ) from None
    import torch

    from icep.serialization import atomic_open

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (batches[0],),
        dynamo=True,
        dynamic_shapes=({0: batch},),
        input_names=["input"],
        output_names=["logits"],
        verbose=False,
    )
    for key, value in info.items():
        program.model.metadata_props[f"icep.{key}"] = json.dumps(value)
    import onnx_ir

    with atomic_open(path) as f:
        f.write(onnx_ir.to_proto(program.model).SerializeToString())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.no_grad():
        diff = max(_difference(model(x), session.run(None, {name: x.numpy()})[0]) for x in batches)
    sizes = " and ".join(str(len(x)) for x in batches)
    return Export("onnx", path, diff, f"onnxruntime {onnxruntime.__version__} CPU, batches {sizes}")


def export_program(model: nn.Module, batches: list[torch.Tensor], path: Path, info: dict) -> Export:
    """``torch.export`` with a dynamic batch, saved with ``torch.export.save`` and checked after
    loading it back."""
    import torch

    from icep.serialization import atomic_open

    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (batches[0],), dynamic_shapes=({0: batch},))
    with atomic_open(path) as f:
        torch.export.save(program, f, extra_files={"icep.json": json.dumps(info)})
    again = torch.export.load(path).module()
    with torch.no_grad():
        diff = max(_difference(model(x), again(x)) for x in batches)
    sizes = " and ".join(str(len(x)) for x in batches)
    return Export("program", path, diff, f"torch.export.load, batches {sizes}")


def export_safetensors(
    model: nn.Module, batches: list[torch.Tensor], path: Path, blob: dict
) -> Export:
    """The weights as safetensors, with what rebuilds the model as JSON metadata; checked by
    loading the model back from the file."""
    import torch
    from safetensors.torch import save

    from icep.serialization import atomic_open, load_model

    state = {k: v.contiguous() for k, v in blob["state_dict"].items()}
    metadata = {
        key: json.dumps(blob[key]) for key in ("format", "arch", "layers", "meta") if key in blob
    }
    with atomic_open(path) as f:
        f.write(save(state, metadata=metadata))
    again = load_model(path)
    with torch.no_grad():
        diff = _difference(model(batches[0]), again(batches[0]))
    return Export("safetensors", path, diff, f"reloaded, batch {len(batches[0])}")


EXPORTERS: dict[str, Callable[..., Export]] = {
    "onnx": export_onnx,
    "program": export_program,
    "safetensors": export_safetensors,
}


def export_file(path: Path, overrides: list[str]) -> tuple[list[Export], float]:
    """Export the model file ``path`` as ``overrides`` say; the exports and the tolerance."""
    import torch

    from icep.serialization import load_model, read_model_file

    settings = _settings(overrides)
    if not path.is_file():
        raise IcepError(f"{path} is not a file; give a model.pt that icep saved")
    blob = read_model_file(path)
    model = load_model(path)
    meta = blob.get("meta", {})
    shape = meta.get("preprocessing", {}).get("input_shape")
    if shape is None:
        raise IcepError(
            f"{path} records no input shape (saved by an older icep); run it again to save one"
        )
    generator = torch.Generator().manual_seed(settings["seed"])
    sizes = (settings["batch"], settings["batch"] + 1)
    batches = [torch.randn(n, *shape, generator=generator) for n in sizes]
    info = {k: meta[k] for k in ("model", "preprocessing", "classes") if meta.get(k) is not None}
    out = Path(settings["out"]) if settings["out"] else path.parent
    results = []
    for kind in settings["formats"]:
        target = out / f"{path.stem}{SUFFIXES[kind]}"
        print(f"icep: exporting {path} as {kind} ...", file=sys.stderr, flush=True)
        argument = blob if kind == "safetensors" else info
        try:
            results.append(EXPORTERS[kind](model, batches, target, argument))
        except (IcepError, OSError):
            raise
        except Exception as exc:  # the exporter cannot trace this model: say so, go on
            results.append(Export(kind, target, error=f"{type(exc).__name__}: {one_line(exc)}"))
    return results, settings["atol"]


def main(argv: list[str] | None = None) -> None:
    def body() -> None:
        path, overrides = split_arguments(sys.argv[1:] if argv is None else argv, USAGE)
        results, atol = export_file(path, overrides)
        print(f"icep: exported {path}, checked against the PyTorch model (fp32):", flush=True)
        for result in results:
            print(result.line(atol), flush=True)
        failed = [r.format for r in results if not r.ok(atol)]
        if failed:
            print(f"icep: error: {', '.join(failed)} did not pass", file=sys.stderr, flush=True)
            sys.exit(1)

    run_command(body)


if __name__ == "__main__":
    main()
