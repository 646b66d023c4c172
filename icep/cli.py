"""The ``icep`` command: ``icep run`` (the default, ``python -m icep``) and the tools around it.

Only the standard library loads here: ``icep --help`` and each command's ``--help`` answer
without torch. The help pages of ``icep run`` read the YAML files of ``conf/`` as text: each
option's description is the comment that opens its file, each key's is the comment beside or
above it.
"""

from __future__ import annotations

import difflib
import importlib
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11's; 3.10 has importlib.abc
    from importlib.abc import Traversable


@dataclass(frozen=True)
class Command:
    module: str  # holds main(argv)
    summary: str


COMMANDS = {
    "run": Command(
        "icep.app", "prune a model with one pipeline (a Hydra app; the default command)"
    ),
    "report": Command("icep.report", "compare run folders: tables, plots, one self-contained HTML"),
    "criteria": Command("icep.criteria_agreement", "how far the filter criteria agree on a model"),
    "eval": Command("icep.eval", "the accuracy of a saved model file on a dataset split"),
    "export": Command(
        "icep.export", "a saved model as ONNX, torch.export and safetensors, checked"
    ),
    "views": Command("icep.wandb_views", "save the W&B view that compares the pipelines"),
    "compare": Command("icep.bench.compare", "baseline vs ICE and its ablations, in one table"),
    "paper": Command("icep.bench.paper", "the paper's sweep (baseline vs ICE, 3 ratios x 3 seeds)"),
    "bench": Command(
        "icep.bench", "speed benchmarks: `icep bench finetune`, `icep bench pipelines`"
    ),
}

USAGE = """\
usage: icep [run] [GROUP=OPTION ...] [KEY=VALUE ...] [-m]   prune a model (the default command)
       icep COMMAND [ARGS ...]
       icep COMMAND --help                                  a command's options
"""

RUN_USAGE = """\
usage: icep run [GROUP=OPTION ...] [KEY=VALUE ...] [+experiment=NAME] [-m] [--dry-run]
       (the same as `python -m icep ...`)

Prune a model with one pipeline: train or load the dense model, prune it step by step, write
the run folder (metrics.jsonl, summary.json, model.pt). Every key of the composed config can be
overridden with Hydra's syntax; -m (--multirun) sweeps over comma-separated values.
"""

RUN_MORE = """\
more:
  icep run --help GROUP           each option of GROUP with its keys, e.g. `icep run --help pipeline`
  icep run --cfg job [OVERRIDES]  the composed config, as a run would use it
  icep run --dry-run [OVERRIDES]  the pre-flight: the model's prunable units, nothing trained
  icep run --hydra-help           Hydra's own flags; hydra/launcher and hydra/sweeper options
"""

# Config groups Hydra plugins register in code rather than in conf/.
PLUGIN_GROUPS = {
    "hydra/sweeper": {
        "icep_optuna": "Optuna over the jobs of a multirun (named objectives, pruned trials, "
        "resumable studies; README, Sweeps with Optuna)",
    },
}


def main(argv: Sequence[str] | None = None) -> None:
    """``icep [COMMAND] ARGS``: overrides and flags alone (or nothing) mean ``icep run``; a first
    word that names no command is refused in one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # the embedded default run (ResNet-20 on digits), as `python -m icep` always did
        run(args)
        return
    if args[0] in ("-h", "--help"):
        print(top_help(), end="")
        return
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"icep {version('icep')}")
        return
    name = args[0]
    if name in COMMANDS:
        args = args[1:]
    elif _looks_like_override(name):
        name = "run"
    else:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        _refuse(f"'{name}' is not an icep command; commands: {', '.join(COMMANDS)}{hint}")
    if name == "run":
        run(args)
    else:
        sys.exit(_call(COMMANDS[name].module, args))


def run(args: list[str]) -> None:
    """``icep run``: icep's help pages here, everything else (``--hydra-help`` too) to Hydra."""
    if "-h" in args or "--help" in args:
        flag = "-h" if "-h" in args else "--help"
        after = args[args.index(flag) + 1 :]
        group = next((a for a in after if not a.startswith("-") and "=" not in a), None)
        print(run_help(group), end="")
        return
    sys.argv = [sys.argv[0], *args]
    _call("icep.app", None)


def _call(module: str, args: list[str] | None) -> int:
    """``module.main(args)``; None passes no argument (the main reads sys.argv)."""
    from icep.interrupts import Interrupted, stop_on_signals

    try:  # importing torch takes seconds: a signal meanwhile stops icep with one line
        with stop_on_signals():
            entry: Callable = importlib.import_module(module).main
    except Interrupted as exc:
        print(f"icep: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    code = entry() if args is None else entry(args)
    return code or 0


def _looks_like_override(arg: str) -> bool:
    return "=" in arg or arg.startswith("-") or arg.startswith("+") or arg.startswith("~")


def _refuse(message: str) -> None:
    print(f"icep: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# ---- help pages --------------------------------------------------------------------------------


def top_help() -> str:
    width = max(len(name) for name in COMMANDS) + 3
    lines = [USAGE, "commands:"]
    lines += [f"  {name:<{width}}{command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "config groups of `icep run` (GROUP=OPTION; `icep run --help` describes each):"]
    for group, options in config_groups().items():
        lines += textwrap.wrap(
            ", ".join(options),
            _width(),
            initial_indent=f"  {_group_option(group):<20}",
            subsequent_indent=" " * 22,
            break_on_hyphens=False,
        )
    return "\n".join(lines) + "\n"


def run_help(group: str | None = None) -> str:
    groups = config_groups()
    if group is not None:
        group = group.removeprefix("+")
        if group not in groups:
            _refuse(f"'{group}' is not a config group; groups: {', '.join(groups)}")
        return group_help(group, groups[group])
    width = _width()
    defaults = default_options()
    lines = [RUN_USAGE, "config groups (GROUP=OPTION; * marks the default):"]
    for name, options in groups.items():
        lines.append(f"  {_group_option(name)}")
        column = max(map(len, options)) + 2
        for option, file in options.items():
            mark = "*" if defaults.get(name) == option else " "
            head = f"   {mark}{option:<{column}}"
            lines.append(head + _fit(_summary(file), width - len(head)))
    lines += ["", "keys of conf/config.yaml (KEY=VALUE; nested keys as dense.epochs=5):"]
    lines += [_fit(line, width) for line in key_lines(_read(files("icep.conf") / "config.yaml"))]
    return "\n".join(lines) + "\n\n" + RUN_MORE


def group_help(group: str, options: dict[str, Traversable | str]) -> str:
    width = _width()
    where = "conf/" + group if not group.startswith("hydra/sweeper") else "a Hydra plugin"
    lines = [
        f"usage: icep run {_group_option(group)}=OPTION [KEY=VALUE ...]",
        "",
        f"{group}: the options of {where}, each with the keys it sets (override any as KEY=VALUE)",
        "",
    ]
    for option, file in options.items():
        lines.append(f"{option}")
        lines += textwrap.wrap(
            _description(file) or "(no description)",
            width,
            initial_indent="  ",
            subsequent_indent="  ",
        )
        if not isinstance(file, str):
            keys = key_lines(_read(file), prefix=f"{_key_prefix(group)}")
            lines += [_fit("  " + line, width) for line in keys]
        lines.append("")
    return "\n".join(lines)


def config_groups() -> dict[str, dict[str, Traversable | str]]:
    """``{group: {option: its YAML file}}`` of conf/, subgroups as ``pipeline/finetune``, plus
    the options plugins register (their description in place of a file)."""
    groups: dict[str, dict[str, Traversable | str]] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("_"):
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml") and prefix:
                groups.setdefault(prefix.rstrip("/"), {})[entry.name[: -len(".yaml")]] = entry

    walk(files("icep.conf"), "")
    for group, options in PLUGIN_GROUPS.items():
        groups.setdefault(group, {}).update(options)
    top = ("model", "dataset", "criterion", "pipeline", "trainer", "logger", "tune", "experiment")
    return dict(sorted(groups.items(), key=lambda g: (g[0].split("/")[0] not in top, g[0])))


def default_options() -> dict[str, str]:
    """The options conf/config.yaml's defaults list picks."""
    text = _read(files("icep.conf") / "config.yaml")
    return dict(re.findall(r"^\s*-\s*([\w/]+):\s*(\w+)", text, flags=re.M))


def _group_option(group: str) -> str:
    return "+experiment" if group == "experiment" else group


def _key_prefix(group: str) -> str:
    """Where a group's keys land in the config: ``pipeline/finetune`` -> ``pipeline.finetune.``."""
    if group in ("experiment",) or group.startswith("hydra/"):
        return ""
    return group.replace("/", ".") + "."


def _read(file: Traversable) -> str:
    return file.read_text(encoding="utf-8")


def _description(file: Traversable | str) -> str:
    """The comment that opens the file (after ``# @package``), as one paragraph."""
    if isinstance(file, str):
        return file
    words = []
    for line in _read(file).splitlines():
        stripped = line.strip()
        if stripped.startswith("# @package"):
            continue
        if not stripped.startswith("#"):
            break
        words.append(stripped.lstrip("#").strip())
    return " ".join(w for w in words if w)


def _summary(file: Traversable | str) -> str:
    """The description's first sentence."""
    text = _description(file)
    return _first_sentence(text)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s+(?=[A-Z(`$+])", text, maxsplit=1)[0]


_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w.$]+):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def key_lines(text: str, prefix: str = "") -> list[str]:
    """``key: value   comment`` for each key of a YAML file outside its defaults list and
    Hydra's own settings, nested keys as ``a.b``; a key's comment is the one beside it, else
    the first sentence of the block above it."""
    lines: list[tuple[str, str]] = []  # (key=value, comment)
    block: list[str] = []
    path: list[tuple[int, str]] = []  # (indent, key) of the mappings the line is in
    skipping = None  # indent of a skipped mapping (defaults, hydra, _target_ and the like)
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not stripped or stripped.startswith("-") or match is None:
            if not stripped:
                block = []
            continue
        indent = len(match["indent"])
        if skipping is not None and indent > skipping:
            continue
        skipping = None
        key, value = match["key"], match["value"].strip()
        path = [(i, k) for i, k in path if i < indent]
        comment = match["comment"] or _first_sentence(" ".join(block))
        block = []
        if key in ("defaults", "hydra") or key.startswith("_"):
            skipping = indent
            continue
        name = prefix + ".".join([*(k for _, k in path), key])
        if not value:  # a mapping: its keys follow
            path.append((indent, key))
            if comment:
                lines.append((f"  {name}:", comment))
            continue
        lines.append((f"  {name}={value}", comment))
    column = min(max((len(k) for k, c in lines if c), default=0), 36) + 2
    return [f"{k.ljust(column - 2)}  {c}" if c else k for k, c in lines]


def _width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


if __name__ == "__main__":
    main()
