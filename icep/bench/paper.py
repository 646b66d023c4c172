"""usage: icep paper slurm|local|toy [OVERRIDES ...]

The paper's main comparison: baseline iterative vs ICE-Pruning at ratios 0.6/0.7/0.8 over
seeds 0-2 (18 jobs, ``+experiment=paper_comparison``), then the comparison report of the sweep.

    icep paper slurm [OVERRIDES ...]   ResNet-152 / CIFAR-10 on a Slurm cluster
    icep paper local [OVERRIDES ...]   the same, as processes on this machine
    icep paper toy   [OVERRIDES ...]   ResNet-20 / digits on a CPU, minutes

e.g. ``icep paper slurm hydra.launcher.partition=gpu dataset.root=/data/cifar10``. The sweep folder
is ``outputs/<experiment>/<date>/`` (``hydra.sweep.dir=`` picks another): report.html, report.md,
report.csv and the plots land there, the failed or unfinished jobs listed too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "slurm": ("paper_comparison", ["hydra/launcher=slurm"]),
    "local": ("paper_comparison", ["hydra/launcher=local"]),
    "toy": ("paper_comparison_toy", []),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not args or args[0] not in MODES:
        got = f"'{args[0]}' is not a mode" if args else "no mode given"
        print(f"icep paper: {got}; choose slurm, local or toy (icep paper --help)", file=sys.stderr)
        return 2
    experiment, launcher = MODES[args[0]]
    overrides = args[1:]
    given = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")), None)
    sweep_dir = Path(given or f"outputs/{experiment}/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    if given is None:
        overrides.append(f"hydra.sweep.dir={sweep_dir}")
    icep = [sys.executable, "-m", "icep"]
    status = subprocess.call([*icep, "-m", f"+experiment={experiment}", *launcher, *overrides])
    if sweep_dir.is_dir():  # the report lists the jobs that failed or did not finish too
        report = subprocess.call([*icep, "report", str(sweep_dir)])
        status = status or report
    return status


if __name__ == "__main__":
    sys.exit(main())
