"""Stage 2, factors (DESIGN 2.3, 2.4): per-linear feature-space bases built once from the covariances, a rank map
applied to the model by slicing them (`Compressor`), the parameter budget, and the closed-loop refit of a chosen
rank map."""

from .bases import Compressor, adds_bias, build_bases, make_budget
from .budget import Budget, RankMap
from .closed_loop import refit

__all__ = ["Budget", "Compressor", "RankMap", "adds_bias", "build_bases", "make_budget", "refit"]
