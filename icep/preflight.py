"""The pre-flight check: before any training, show that icep can prune the model, or refuse it in
one line that names the model, the layer and the way out.

On a copy of the freshly built model (no weights are needed) it

1. runs a forward pass in eval and in training mode on a batch of two inputs of the dataset's
   shape: the output must be one tensor of logits (too small an input, or a model that returns
   auxiliary outputs, fails here);
2. refuses attention layers: icep's units are conv channels, it does not prune heads;
3. builds Torch-Pruning's dependency graph and finds the units within a time limit (some graphs
   make Torch-Pruning loop for ever);
4. prunes every unit once, at the run's ratio, with a forward pass after each.

``python -m icep ... --dry-run`` prints the unit table (:meth:`Preflight.table`) and stops.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from icep.errors import IcepError
from icep.pruning import L1, PruningEngine, Unit, count_macs_params, ignored_modules


@dataclass
class UnitRow:
    """One unit of the table: what it cuts, and the share of the model's parameters and MACs
    in the layers whose channels it cuts (output or input side)."""

    index: int
    name: str
    layers: list[str]
    channels: list[int]
    params_share: float
    macs_share: float


@dataclass
class Preflight:
    model: str
    input_shape: tuple[int, ...]
    params: int
    macs: int
    units: list[UnitRow] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # layer -> why no unit cuts it

    def table(self) -> str:
        """The unit table, one line per unit, then the layers left out and why."""
        head = (
            f"{self.model} on {'x'.join(map(str, self.input_shape))} inputs: "
            f"{len(self.units)} units, {self.params / 1e6:.3f}M params, {self.macs / 1e6:.2f}M MACs"
        )
        rows = [("unit", "block", "layers", "channels", "params", "MACs")]
        for unit in self.units:
            rows.append(
                (
                    str(unit.index),
                    unit.name,
                    ", ".join(unit.layers),
                    ", ".join(map(str, unit.channels)),
                    f"{100 * unit.params_share:.1f}%",
                    f"{100 * unit.macs_share:.1f}%",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [head, ""]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        lines += [f"left out: {layer}: {why}" for layer, why in self.excluded.items()]
        lines.append("params and MACs: the share in the layers whose channels the unit cuts")
        return "\n".join(line.rstrip() for line in lines)


def preflight(
    model: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    name: str,
    ignored: Sequence[str] = (),
    ratio: float = 0.5,
    seconds: float = 60.0,
) -> Preflight:
    """Check that ``model`` (left untouched) can be pruned; raise an :class:`IcepError` that says
    what fails and how to get past it otherwise."""
    original = copy.deepcopy(model).cpu().float()
    model = copy.deepcopy(original)
    shape = tuple(input_shape)
    _check_forward(model, shape, num_classes, name)
    ignored_layers = ignored_modules(model, ignored, name)
    _check_attention(model, set(ignored_layers), name)
    example = torch.zeros(1, *shape)
    try:
        with _time_limit(seconds):
            engine = PruningEngine(model, example, ignored_layers)
    except TimeoutError:
        raise IcepError(
            f"model {name}: Torch-Pruning's dependency graph did not finish within "
            f"{seconds:g} s (model.preflight_seconds); the model cannot be pruned by icep as it "
            "is: leave the layers it loops on out with model.ignored_layers, or choose another "
            "model"
        ) from None
    except Exception as exc:  # Torch-Pruning cannot trace it
        raise IcepError(
            f"model {name}: Torch-Pruning cannot trace it ({_first_line(exc)}); icep cannot "
            "prune this model: choose another one, or leave the layers that fail out with "
            "model.ignored_layers"
        ) from None
    macs, params = count_macs_params(model, example)
    report = Preflight(name, shape, params, macs, excluded=dict(engine.excluded))
    if not engine.units:
        raise IcepError(
            f"model {name} has no pruning unit: the channels of every conv are tied to a "
            "residual add, a concatenation, the classifier or an ignored layer"
            + _excluded_note(engine)
            + "; icep prunes the inside of blocks, choose a model that has some"
        )
    layer_params, layer_macs = _layer_costs(model, example)
    for unit in engine.units:
        cut = engine.layers_cut(unit.convs)
        report.units.append(
            UnitRow(
                unit.index,
                unit.name,
                list(unit.convs),
                list(unit.channels),
                sum(layer_params.get(n, 0) for n in cut) / max(params, 1),
                sum(layer_macs.get(n, 0) for n in cut) / max(macs, 1),
            )
        )
    broken = _units_that_break(engine, original, ignored, ratio, num_classes, name)
    if broken:
        one = len(broken) == 1
        listed = ", ".join(
            f"{unit.index} ({unit.name}: {', '.join(unit.convs)})"
            if one
            else f"{unit.index} ({unit.name})"
            for unit, _ in broken
        )
        first_layers = ",".join(unit.convs[0] for unit, _ in broken)
        raise IcepError(
            f"model {name}: pruning unit{'' if one else 's'} {listed} by {ratio:g} breaks it "
            f"({broken[0][1]}); leave {'it' if one else 'them'} out with "
            f"'model.ignored_layers=[{first_layers}]'"
        )
    return report


def _units_that_break(
    engine: PruningEngine,
    original: nn.Module,
    ignored: Sequence[str],
    ratio: float,
    num_classes: int,
    name: str,
) -> list[tuple[Unit, str]]:
    """Every unit whose pruning (after the units before it that prune cleanly) raises or changes
    the output's shape, with the first line of its error. After a failure the check starts again
    on a fresh copy of ``original`` without the units found so far."""
    example = engine.example_inputs
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    broken: list[tuple[Unit, str]] = []
    while True:
        for unit in engine.units:
            if any(unit.index == b.index for b, _ in broken):
                continue
            try:
                engine.prune_unit(unit.index, ratio, L1())
                with torch.no_grad():
                    out = engine.model.eval()(x)
                if not isinstance(out, torch.Tensor) or out.shape != (2, num_classes):
                    raise RuntimeError(f"the output became {_describe(out)}")
            except Exception as exc:
                broken.append((unit, _first_line(exc)))
                break
        else:
            return broken
        trial = copy.deepcopy(original)
        engine = PruningEngine(trial, example, ignored_modules(trial, ignored, name))


def _check_forward(model: nn.Module, shape: tuple[int, ...], num_classes: int, name: str) -> None:
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    for mode in ("eval", "training"):
        model.train(mode == "training")
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as exc:
            size = "x".join(map(str, shape))
            raise IcepError(
                f"model {name} fails on {size} inputs in {mode} mode ({_first_line(exc)}); if "
                "the input is too small for it, raise dataset.image_size (ImageNet models of "
                "torchvision and timm expect 224)"
            ) from None
        if not isinstance(out, torch.Tensor):
            raise IcepError(
                f"model {name} returns {_describe(out)} in {mode} mode, not a tensor of logits; "
                "build it without auxiliary outputs (torchvision googlenet and inception_v3: "
                "+model.arch.aux_logits=false)"
            )
        if out.shape != (2, num_classes):
            raise IcepError(
                f"model {name} returns logits of shape {tuple(out.shape)} for a batch of 2, "
                f"expected (2, {num_classes}); its classifier must end in dataset's "
                f"{num_classes} classes"
            )
    model.eval()


def _check_attention(model: nn.Module, ignored: set[nn.Module], name: str) -> None:
    attention: list[str] = []
    for layer, module in model.named_modules():
        if module in ignored or any(layer.startswith(f"{outer}.") for outer in attention):
            continue
        if isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
            attention.append(layer)
    if attention:
        shown = ", ".join(attention[:3]) + (", ..." if len(attention) > 3 else "")
        raise IcepError(
            f"model {name} has attention layers ({shown}): icep prunes conv channels, not "
            "attention heads; choose a CNN, or leave them out with "
            f"model.ignored_layers=[{_pattern(attention)}] to prune only the convs around them"
        )


def _pattern(layers: list[str]) -> str:
    """One shell pattern for a list of qualified names (``blocks.*.attn``), or the first name."""
    parts = [layer.split(".") for layer in layers]
    if len({len(p) for p in parts}) != 1:
        return layers[0]
    merged = [p[0] if len(set(p)) == 1 else "*" for p in zip(*parts, strict=True)]
    return ".".join(merged)


def _layer_costs(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """Parameters and MACs (one input) of every conv and linear layer."""
    params, macs = {}, {}
    hooks = []
    for layer_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            params[layer_name] = sum(p.numel() for p in module.parameters(recurse=False))

            def count(module, _inputs, output, layer_name=layer_name):
                per_output = module.weight[0].numel()  # in/groups * kernel, or in_features
                macs[layer_name] = macs.get(layer_name, 0) + output.numel() * per_output

            hooks.append(module.register_forward_hook(count))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return params, macs


def _excluded_note(engine: PruningEngine) -> str:
    if not engine.excluded:
        return ""
    layer, why = next(iter(engine.excluded.items()))
    return f" (left out: {layer}, {why})"


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds`` (SIGALRM: the main thread of a POSIX
    process only; elsewhere no limit)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def expire(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
