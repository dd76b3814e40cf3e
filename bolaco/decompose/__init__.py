"""Stage 2, decomposition (docs/design.md, "Methods" to "The closed-loop refit"): the study's methods
(`Decomposition`: per-matrix factors and structured modules, one registry), the units they make and their exact
budget, the bases each method precomputes per block (cached), a level map applied by slicing them (`Compressor`),
and the closed-loop refit of a chosen level map."""

from .bases import Bases, build_bases
from .budget import Budget, LevelMap, Unit
from .closed_loop import refit
from .compressor import Compressor
from .methods import METHODS, Decomposition, Method, check_names

__all__ = ["METHODS", "Bases", "Budget", "Compressor", "Decomposition", "LevelMap", "Method", "Unit", "build_bases",
           "check_names", "refit"]
