"""`icep bench finetune` (icep/bench/finetune.py), moved into the package so that an installed icep has
it. This file runs the same from a checkout, as experiments/RESULTS.md's commands were given."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icep.bench.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
