#!/usr/bin/env bash
# Run HERE, before a call on a lent GPU machine: it fills .device/ (git-ignored) with what that
# machine lacks, since it reaches no package registry. Its image already holds PyTorch,
# torchvision, timm, scikit-learn, safetensors, tqdm, pillow and matplotlib; icep also needs
# Hydra, OmegaConf, Optuna and Torch-Pruning (W&B is only imported with logger=wandb).
#
#   bash experiments/device/prepare.sh [ARCHIVE]     # then carry ".device" in the device call
#
# Wheels are pinned by constraints.txt, built for the machine's Python 3.12; the CIFAR-10 JPEG
# archive (default ../shared/data/cifar10-jpeg.tar.gz) is copied beside them.
set -euo pipefail
cd "$(dirname "$0")/../.."
archive="${1:-../shared/data/cifar10-jpeg.tar.gz}"
dest=.device
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$dest/wheels"

pure=(hydra-core omegaconf antlr4-python3-runtime optuna alembic colorlog Mako torch-pruning)
binary=(SQLAlchemy greenlet)
# Pure-Python ones as wheels built here (antlr4's runtime ships only as an sdist).
"$python" -m pip wheel -q --no-deps -c constraints.txt -w "$dest/wheels" "${pure[@]}"
"$python" -m pip download -q --no-deps -c constraints.txt -d "$dest/wheels" \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${binary[@]}"
if [[ -f "$archive" ]]; then
    cp "$archive" "$dest/"
else
    echo "prepare.sh: no archive at $archive; pass its path as the first argument" >&2
    exit 1
fi
du -sh "$dest" | awk '{print "prepare.sh: " $1 " in '"$dest"' (a device call carries at most 64 MiB)"}'
