"""The comparison and benchmark scripts the README and ``experiments/RESULTS.md`` cite, installed
with icep: ``icep compare`` (:mod:`.compare`), ``icep paper`` (:mod:`.paper`), ``icep bench
finetune`` (:mod:`.finetune`) and ``icep bench pipelines`` (:mod:`.pipelines`). The files under
``experiments/`` run the same code from a checkout."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "finetune": ("icep.bench.finetune", "one fine-tune epoch: icep's loop against the reference"),
    "pipelines": ("icep.bench.pipelines", "baseline vs ICE over seeds, with the tuning counted"),
}


def main(argv: list[str] | None = None) -> int:
    """``icep bench BENCHMARK [ARGS ...]``: the benchmark's own main with the rest."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        lines = ["usage: icep bench BENCHMARK [ARGS ...]", "", "benchmarks:"]
        lines += [f"  {name:<11}{summary}" for name, (_, summary) in BENCHES.items()]
        lines += ["", "`icep bench BENCHMARK --help` for its options"]
        print("\n".join(lines))
        return 0 if args else 2
    if args[0] not in BENCHES:
        print(
            f"icep: error: '{args[0]}' is not a benchmark; choose from {', '.join(BENCHES)}",
            file=sys.stderr,
        )
        return 2
    return importlib.import_module(BENCHES[args[0]][0]).main(args[1:]) or 0
