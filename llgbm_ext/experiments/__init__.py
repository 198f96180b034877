"""Experiments built from the library: comparisons of generator variants (the demo, ablations)."""

from .comparison import ComparisonConfig, Variant, run_comparison

__all__ = ["ComparisonConfig", "Variant", "run_comparison"]
