"""nacd: neighbour-aware corpus distillation."""

__version__ = "0.1.0"
