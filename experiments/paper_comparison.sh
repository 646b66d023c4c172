#!/usr/bin/env bash
# The paper's main comparison, baseline iterative vs ICE-Pruning at ratios 0.6/0.7/0.8 over
# seeds 0-2 (18 jobs), then the comparison report of the sweep:
#   experiments/paper_comparison.sh slurm [OVERRIDES...]   ResNet-152 / CIFAR-10 on a Slurm cluster
#   experiments/paper_comparison.sh local [OVERRIDES...]   the same, as processes on this machine
#   experiments/paper_comparison.sh toy   [OVERRIDES...]   ResNet-20 / digits on a CPU, minutes
# e.g. experiments/paper_comparison.sh slurm hydra.launcher.partition=gpu dataset.root=/data/cifar10
# The sweep folder is outputs/<experiment>/<date>/: report.md, report.html, report.csv and the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
mode="${1:-}"
shift || true
case "$mode" in
  slurm) experiment=paper_comparison; launcher=(hydra/launcher=slurm) ;;
  local) experiment=paper_comparison; launcher=(hydra/launcher=local) ;;
  toy) experiment=paper_comparison_toy; launcher=() ;;
  *) echo "usage: $0 slurm|local|toy [OVERRIDES...]" >&2; exit 2 ;;
esac
sweep_dir="outputs/$experiment/$(date +%Y-%m-%d_%H-%M-%S)"
status=0
"$PYTHON" -m icep -m "+experiment=$experiment" ${launcher[@]+"${launcher[@]}"} \
  "hydra.sweep.dir=$sweep_dir" "$@" || status=$?
# The report also lists the jobs that failed or did not finish.
if [ -d "$sweep_dir" ]; then
  "$PYTHON" -m icep.report "$sweep_dir"
fi
exit "$status"
