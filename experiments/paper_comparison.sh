#!/usr/bin/env bash
# `icep paper` (icep/bench/paper.py) from a checkout: the paper's main comparison, baseline
# iterative vs ICE-Pruning at ratios 0.6/0.7/0.8 over seeds 0-2, then the report of the sweep.
#   experiments/paper_comparison.sh slurm|local|toy [OVERRIDES...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m icep paper "$@"
