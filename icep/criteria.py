"""How much the pruning criteria agree, layer by layer (METHOD.md section 5).

    python -m icep.criteria --list
    python -m icep.criteria model=resnet20 dataset=digits [--ratio 0.5] [--criteria l1,l2,fpgm]

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
from typing import Any

import numpy as np
import torch
from hydra.errors import HydraException

from icep.errors import IcepError
from icep.pruning import CRITERIA, Criterion, PruningEngine, build_criterion, prepare_criterion

# Must match the engine's rounding of ceil(ratio * C) (icep/pruning/engine.py).
_CEIL_TOLERANCE = 1e-9


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank (as Spearman's correlation needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse = np.unique(values, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; NaN when either ranking is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


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
    path: Path,
    names: Sequence[str],
    panels: dict[str, Sequence[Sequence[float]]],
    cell: int = 48,
) -> None:
    """One heat map per panel (title -> matrix), side by side, as a PNG drawn with PIL (icep
    does not depend on matplotlib): red is 1, white 0, blue -1, grey undefined."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = int(max(probe.textlength(n, font=font) for n in names)) + 12
    title_h, k = 24, len(names)
    side = label + k * cell
    image = Image.new("RGB", (len(panels) * (side + 20), title_h + side + 10), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, matrix) in enumerate(panels.items()):
        x0 = p * (side + 20)
        draw.text((x0 + 4, 4), title, fill="black", font=font)
        for i, name in enumerate(names):
            y = title_h + label + i * cell + cell // 2 - 5
            draw.text((x0 + 4, y), name, fill="black", font=font)
            # Column labels, vertical, on the top band.
            text = Image.new("RGB", (label, 12), "white")
            ImageDraw.Draw(text).text((2, 0), name, fill="black", font=font)
            image.paste(
                text.rotate(90, expand=True), (x0 + label + i * cell + cell // 2 - 6, title_h)
            )
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                left, top = x0 + label + j * cell, title_h + label + i * cell
                draw.rectangle(
                    (left, top, left + cell - 1, top + cell - 1),
                    fill=_colour(value),
                    outline="white",
                )
                text = "-" if math.isnan(value) else f"{value:.2f}"
                draw.text((left + 8, top + cell // 2 - 5), text, fill="black", font=font)
    image.save(path)


def _colour(value: float) -> tuple[int, int, int]:
    if math.isnan(value):
        return (200, 200, 200)
    t = max(-1.0, min(1.0, value))
    fade = int(255 * (1 - abs(t)))
    return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def _criterion_options(name: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The settings of ``conf/criterion/NAME.yaml``, as the run config resolves them."""
    from hydra import compose

    cfg = compose("config", overrides=[*overrides, f"criterion={name}"])
    return {k: v for k, v in cfg.criterion.items() if k != "name"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m icep.criteria",
        description="Per-layer agreement of the pruning criteria on one model: Spearman rank "
        "correlation and overlap of the pruned filters, averaged over the layers.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet56")
    parser.add_argument("--list", action="store_true", help="list the criteria and exit")
    parser.add_argument(
        "--criteria", default=",".join(CRITERIA), help="comma-separated (default: all)"
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio for the overlap")
    parser.add_argument(
        "--batches", type=int, help="training batches for data-dependent criteria (default: yaml)"
    )
    parser.add_argument("--out", type=Path, help="output folder")
    args = parser.parse_args(argv)
    if args.list:
        for name, cls in CRITERIA.items():
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            print(f"{name:<16}{'(data) ' if cls.needs_data else ''}{doc}")
        return 0
    try:
        result, out = run(args)
    except (IcepError, HydraException) as exc:  # a bad option or override: one line, no trace
        print(f"icep.criteria: {str(exc).splitlines()[0]}", file=sys.stderr)
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
    from hydra import compose, initialize_config_module

    from icep.config import validate
    from icep.data import data_from_config
    from icep.dense import dense_model
    from icep.errors import ConfigError
    from icep.seeding import seed_everything
    from icep.train import Trainer

    names = [n.strip() for n in args.criteria.split(",") if n.strip()]
    if not 0.0 < args.ratio < 1.0:
        raise ConfigError("--ratio", f"must lie in (0, 1), got {args.ratio}")
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(args.overrides))
        options = {n: _criterion_options(n, args.overrides) for n in names if n in CRITERIA}
    validate(cfg)
    criteria = {}
    for name in names:
        kwargs = options.get(name, {})
        if args.batches is not None and "batches" in kwargs:
            kwargs["batches"] = args.batches
        criteria[name] = build_criterion(name, **kwargs)
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
