# Sourced THERE, at the start of a device call that carries .device (see prepare.sh):
#   source experiments/device/setup.sh && python3 experiments/bench_finetune.py --data "$ICEP_ARCHIVE" ...
# Installs the carried wheels into the machine's Python (nothing is fetched), puts the checkout
# on the path, points the caches at a local folder and prints the versions a result must name.
set -euo pipefail
python3 -m pip install -q --no-index --find-links .device/wheels \
    hydra-core omegaconf optuna torch-pruning 2>&1 | grep -v "^WARNING: Running pip as" || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ICEP_CACHE="${ICEP_CACHE:-/tmp/icep-cache}"
export ICEP_ARCHIVE="$PWD/$(ls .device/*.tar.gz | head -1)"
export WANDB_MODE=disabled
python3 - <<'PY'
import datetime, torch, torchvision
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'}; "
      f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"cudnn {torch.backends.cudnn.version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      flush=True)
PY
