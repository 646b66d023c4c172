"""One seed for every random source a run draws from."""

from __future__ import annotations

import random
from typing import Any

import numpy as np


def seed_everything(seed: int, data: Any = None) -> None:
    """Seed Python, NumPy and torch, and restart the train loader's shuffling from ``seed``."""
    import torch  # loaded by then; here so that importing icep.app does not load it

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = getattr(getattr(data, "train", None), "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
