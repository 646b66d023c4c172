"""How much the pruning criteria agree, layer by layer (METHOD.md section 5).

    python -m icep.criteria_agreement --list
    python -m icep.criteria_agreement model=resnet20 dataset=digits [--ratio 0.5] [--criteria l1,l2]

The arguments without dashes are Hydra overrides of icep's config (``conf/config.yaml``): the
model is ``model.checkpoint`` when set, otherwise the cached dense model of that config (trained
and cached first if there is none, as ``python -m icep`` would). Each criterion takes its settings
from ``conf/criterion/NAME.yaml``. For every conv the pruning units cut, it scores the filters with
every criterion, then reports, averaged over those layers:

- the Spearman rank correlation between every pair of criteria;
- the overlap of the filters each would prune at ``--ratio``: shared filters / filters pruned.

It prints both matrices and writes ``similarity.json`` (matrices, per-layer values),
``similarity.csv`` (one row per pair) and ``similarity.png`` (two heat maps) to ``--out``
(default: ``${paths.outputs}/criteria/MODEL-DATASET``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from icep.errors import IcepError

if TYPE_CHECKING:  # torch, scipy and Hydra load when criteria are compared, not for --help
    import torch

    from icep.pruning import Criterion, PruningEngine

# Must match the engine's rounding of ceil(ratio * C) (icep/pruning/engine.py).
_CEIL_TOLERANCE = 1e-9


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties share their average rank); NaN when either ranking is
    constant, where it is undefined (checked here, so scipy does not warn)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def pruned_set(scores: np.ndarray, ratio: float) -> set[int]:
    """The filters the engine would remove at ``ratio``: the ``ceil(ratio * C)`` lowest (at most
    ``C - 1``), ties broken by position."""
    n = min(math.ceil(ratio * len(scores) - _CEIL_TOLERANCE), len(scores) - 1)
    return set(np.argsort(scores, kind="stable")[: max(n, 0)].tolist())


def overlap(a: set[int], b: set[int]) -> float:
    """Shared filters / filters pruned (both sets have the same size); NaN when nothing is pruned."""
    return len(a & b) / len(a) if a else math.nan


def score_layers(
    engine: PruningEngine,
    criteria: dict[str, Criterion],
    loader: Iterable[Any] | None,
    device: torch.device | str,
) -> dict[str, dict[str, np.ndarray]]:
    """``{conv name: {criterion name: scores}}`` for every conv the engine's units cut."""
    from icep.pruning import prepare_criterion

    convs = [name for unit in engine.units for name in unit.convs]
    layers: dict[str, dict[str, np.ndarray]] = {name: {} for name in convs}
    for cname, criterion in criteria.items():
        prepare_criterion(criterion, engine, convs, loader, device)
        for name in convs:
            scores = criterion(engine.model.get_submodule(name))
            layers[name][cname] = scores.detach().double().cpu().numpy()
    return layers


def compare(layers: dict[str, dict[str, np.ndarray]], ratio: float) -> dict[str, Any]:
    """Per-layer and mean (over layers, NaNs left out) Spearman and overlap matrices."""
    names = list(next(iter(layers.values())))
    k = len(names)
    per_layer: dict[str, dict[str, list[list[float]]]] = {}
    for layer, scores in layers.items():
        rho, shared = np.full((k, k), math.nan), np.full((k, k), math.nan)
        sets = {n: pruned_set(scores[n], ratio) for n in names}
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                rho[i, j] = spearman(scores[a], scores[b])
                shared[i, j] = overlap(sets[a], sets[b])
        per_layer[layer] = {"spearman": rho.tolist(), "overlap": shared.tolist()}
    result: dict[str, Any] = {"criteria": names, "ratio": ratio, "layers": list(layers)}
    for key in ("spearman", "overlap"):
        stack = np.array([per_layer[layer][key] for layer in layers])
        defined = ~np.isnan(stack)
        total = np.where(defined, stack, 0.0).sum(axis=0)
        count = defined.sum(axis=0)
        mean = np.divide(total, count, out=np.full((k, k), math.nan), where=count > 0)
        result[key] = mean.tolist()
    result["per_layer"] = per_layer
    return result


def format_matrix(title: str, names: Sequence[str], matrix: Sequence[Sequence[float]]) -> str:
    first = max(len(n) for n in names) + 1
    widths = [max(7, len(n) + 1) for n in names]
    header = "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = [title, " " * first + header]
    for name, row in zip(names, matrix, strict=True):
        cells = "".join(
            f"{'-' if math.isnan(v) else f'{v:.3f}':>{w}}" for v, w in zip(row, widths, strict=True)
        )
        lines.append(f"{name:<{first}}{cells}")
    return "\n".join(lines)


def write_results(result: dict[str, Any], out: Path) -> list[Path]:
    """similarity.json, similarity.csv and similarity.png in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "similarity.json", out / "similarity.csv", out / "similarity.png"]
    paths[0].write_text(json.dumps(_finite(result), indent=2) + "\n")
    names = result["criteria"]
    with paths[1].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["criterion_a", "criterion_b", "spearman", "overlap"])
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                writer.writerow([a, b, result["spearman"][i][j], result["overlap"][i][j]])
    write_heatmaps(
        paths[2],
        names,
        {
            "Spearman correlation": result["spearman"],
            f"overlap of pruned filters (ratio {result['ratio']})": result["overlap"],
        },
    )
    return paths


def _finite(node: Any) -> Any:
    """NaN as null: JSON has no NaN."""
    if isinstance(node, float):
        return None if math.isnan(node) else node
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_finite(v) for v in node]
    return node


def write_heatmaps(
    path: Path, names: Sequence[str], panels: dict[str, Sequence[Sequence[float]]]
) -> None:
    """One heat map per panel (title -> matrix), side by side in one PNG, every cell annotated
    with its value: red is 1, white 0, blue -1, grey (``-``) undefined."""
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display needed
    from matplotlib.figure import Figure

    k = len(names)
    side = 1.5 + 0.55 * k
    fig = Figure(figsize=(side * len(panels) + 1.0, side + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    cmap = mpl.colormaps["bwr"].with_extremes(bad="lightgrey")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, matrix) in zip(axes, panels.items(), strict=True):
        values = np.asarray(matrix, dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-1.0, vmax=1.0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        for (i, j), value in np.ndenumerate(values):
            text = "-" if math.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=120)


def criterion_options() -> list[str]:
    """The criteria a run can use: the options of the ``criterion`` config group."""
    from importlib.resources import files

    return sorted(
        p.name[: -len(".yaml")]
        for p in (files("icep.conf") / "criterion").iterdir()
        if p.name.endswith(".yaml")
    )


def build_criteria(
    names: Sequence[str], overrides: Sequence[str], batches: int | None = None
) -> dict[str, Criterion]:
    """Each criterion as a run with ``criterion=NAME`` and ``overrides`` builds it from
    conf/criterion/NAME.yaml; ``batches`` replaces the data criteria's own."""
    from hydra import compose

    from icep.config import build, validate
    from icep.errors import ConfigError

    options = criterion_options()
    unknown = [n for n in names if n not in options]
    if unknown:
        raise ConfigError(
            "--criteria", f"unknown criterion '{unknown[0]}'; choose from {', '.join(options)}"
        )
    criteria = {}
    for name in names:
        cfg = compose("config", overrides=[*overrides, f"criterion={name}"])
        if batches is not None and "batches" in cfg.criterion:
            cfg.criterion.batches = batches
        validate(cfg)
        criteria[name] = build(cfg, "criterion")
    return criteria


def _hydra_error() -> type[Exception]:
    from hydra.errors import HydraException

    return HydraException


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="icep criteria",
        description="Per-layer agreement of the pruning criteria on one model: Spearman rank "
        "correlation and overlap of the pruned filters, averaged over the layers.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet56")
    parser.add_argument("--list", action="store_true", help="list the criteria and exit")
    parser.add_argument("--criteria", help="comma-separated (default: all)")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio for the overlap")
    parser.add_argument(
        "--batches", type=int, help="training batches for data-dependent criteria (default: yaml)"
    )
    parser.add_argument("--out", type=Path, help="output folder")
    args = parser.parse_args(argv)
    if args.list:
        from hydra import initialize_config_module

        with initialize_config_module("icep.conf", version_base="1.3"):
            criteria = build_criteria(criterion_options(), [])
        for name, criterion in criteria.items():
            doc = (type(criterion).__doc__ or "").strip().splitlines()[0]
            print(f"{name:<16}{'(data) ' if criterion.needs_data else ''}{doc}")
        return 0
    try:
        result, out = run(args)
    except (IcepError, _hydra_error()) as exc:  # a bad option or override: one line, no trace
        print(f"icep.criteria_agreement: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    names = result["criteria"]
    print(f"{len(result['layers'])} layers; mean over layers")
    print(format_matrix("Spearman correlation", names, result["spearman"]))
    print(
        format_matrix(f"overlap of pruned filters at ratio {args.ratio}", names, result["overlap"])
    )
    for path in write_results(result, out):
        print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Compose the config, load the model and data, score and compare."""
    import torch
    from hydra import compose, initialize_config_module

    from icep.config import validate
    from icep.data import data_from_config
    from icep.dense import dense_model
    from icep.errors import ConfigError
    from icep.pruning import PruningEngine
    from icep.seeding import seed_everything
    from icep.train import Trainer

    names = (
        [n.strip() for n in args.criteria.split(",") if n.strip()]
        if args.criteria
        else criterion_options()
    )
    if not 0.0 < args.ratio < 1.0:
        raise ConfigError("--ratio", f"must lie in (0, 1), got {args.ratio}")
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(args.overrides))
        validate(cfg)
        criteria = build_criteria(names, args.overrides, args.batches)
    seed_everything(cfg.seed)
    trainer = Trainer.from_config(cfg.trainer)
    data = data_from_config(cfg, trainer.device)
    model, _ = dense_model(cfg, data, trainer)
    engine = PruningEngine(model, torch.zeros(1, *data.input_shape, device=trainer.device))
    layers = score_layers(engine, criteria, data.train, trainer.device)
    out = args.out or Path(cfg.paths.outputs) / "criteria" / f"{cfg.model.name}-{cfg.dataset.name}"
    return compare(layers, args.ratio), out


if __name__ == "__main__":
    sys.exit(main())
