"""icep: cost-efficient iterative pruning of CNNs."""

__version__ = "0.1.0"
