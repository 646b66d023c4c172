"""``python -m icep.eval MODEL [KEY=VALUE ...]``: the accuracy of a saved model on a dataset split.

The data comes from the same config as a run's (``conf/eval.yaml``: ``dataset``, ``trainer``,
``seed``, ``paths.cache``); by default the dataset, its settings and the seed the model file
records, so a run's model is measured on the data it was pruned on. ``dataset=NAME`` picks
another one, ``dataset.KEY=VALUE`` changes one setting of either.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from icep.cli_errors import run_command
from icep.errors import ConfigError, IcepError

USAGE = """\
usage: icep eval MODEL [KEY=VALUE ...]

The accuracy of MODEL (a model.pt icep saved) on a dataset split. Keys (conf/eval.yaml):
  split=test|val            the split (default test)
  dataset=NAME              another dataset than the one MODEL records (conf/dataset/)
  dataset.KEY=VALUE         one dataset setting, e.g. dataset.root=/data/cifar10
  seed=N                    the seed that draws val and subsets (default: the run's)
  trainer.device=cpu|cuda   trainer.eval_batch_size=N, trainer.amp=false ... (conf/trainer/)
  format=text|json          one line, or a JSON object for scripts
"""

# The ConfigStore option that holds the dataset a model file records.
_RECORDED = "_model_file"


def split_arguments(argv: list[str], usage: str) -> tuple[Path, list[str]]:
    """(MODEL, the KEY=VALUE overrides) from a model command's arguments; ``-h`` prints
    ``usage``."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage, end="")
        sys.exit(0)
    paths = [a for a in argv if "=" not in a and not a.startswith("-")]
    if len(paths) != 1:
        got = "no model file" if not paths else f"{len(paths)} files ({', '.join(paths)})"
        raise IcepError(f"give one model file, then KEY=VALUE settings; got {got}")
    return Path(paths[0]), [a for a in argv if a != paths[0]]


def compose_eval(meta: dict[str, Any], overrides: list[str]):
    """conf/eval.yaml with ``overrides``; the dataset and seed the model file records
    (``meta``) unless they name others."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = {o.key_or_group for o in parsed}
    extra = []
    if "dataset" not in keys and meta.get("dataset"):
        ConfigStore.instance().store(group="dataset", name=_RECORDED, node=meta["dataset"])
        extra.append(f"dataset={_RECORDED}")
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[*extra, *overrides])
    if cfg.get("dataset") is None:
        raise ConfigError(
            "dataset", "the model file records no dataset (saved by an older icep); name one"
        )
    if cfg.seed is None:
        cfg.seed = meta.get("seed", 0)
    if cfg.split not in ("test", "val"):
        raise ConfigError("split", f"got {cfg.split!r}; must be test or val")
    if cfg.format not in ("text", "json"):
        raise ConfigError("format", f"got {cfg.format!r}; must be text or json")
    return cfg


def evaluate_file(path: Path, overrides: list[str]) -> tuple[dict[str, Any], str]:
    """The accuracy of the model file ``path`` on the split ``overrides`` choose, with what it
    was measured on, and the output ``format`` they ask for."""
    from icep.data import data_from_config
    from icep.serialization import load_model, read_model_file
    from icep.train import Trainer

    if not path.is_file():
        raise IcepError(f"{path} is not a file; give a model.pt that icep saved")
    blob = read_model_file(path)
    meta = blob.get("meta", {})
    cfg = compose_eval(meta, overrides)
    trainer = Trainer.from_config(cfg.trainer)
    data = data_from_config(cfg, trainer.device)
    loader = data.val if cfg.split == "val" else data.test
    if loader is None:
        raise ConfigError("split", "val: this dataset holds no val split (dataset.val_fraction=0)")
    arch = blob["arch"]
    shape = meta.get("preprocessing", {}).get("input_shape")
    if arch.get("num_classes") != data.num_classes or (
        shape is not None and list(shape) != list(data.input_shape)
    ):
        raise IcepError(
            f"{path} takes {'x'.join(map(str, shape or ['?']))} inputs in "
            f"{arch.get('num_classes')} classes; {data.name} gives "
            f"{'x'.join(map(str, data.input_shape))} in {data.num_classes}: pick its dataset="
        )
    model = trainer.prepare(load_model(path))
    accuracy = trainer.evaluate(model, loader, cfg.split)
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": str(path),
        "dataset": data.name,
        "split": cfg.split,
        "images": len(loader.dataset),
        "accuracy": accuracy,
        "params": params,
        "device": str(trainer.device),
        "recorded": meta.get("summary", {}).get(f"acc_final_{cfg.split}"),
    }, cfg.format


def main(argv: list[str] | None = None) -> None:
    def body() -> None:
        path, overrides = split_arguments(sys.argv[1:] if argv is None else argv, USAGE)
        result, output = evaluate_file(path, overrides)
        if output == "json":
            print(json.dumps(result), flush=True)
            return
        recorded = result["recorded"]
        said = "" if recorded is None else f" (the run recorded {recorded:.2f}%)"
        print(
            f"icep: {result['model']}: {result['split']} accuracy {result['accuracy']:.2f}% on "
            f"{result['images']} {result['dataset']} images{said}, {result['params']:,} params, "
            f"{result['device']}",
            flush=True,
        )

    run_command(body)


if __name__ == "__main__":
    main()
