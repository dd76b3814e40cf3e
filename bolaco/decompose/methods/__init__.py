"""Decomposition methods: how a unit of the model is made smaller at a level (docs/design.md, "Methods").

Each method is one class registered in METHODS under the name a study file uses:
- per-matrix factors (`decompose.method`): feature, feature-uncentred, weight (factors.py); every projection
  type the structured modules leave is a unit of its own;
- structured modules (`decompose.modules`): mlp (neurons kept, mlp.py), qk (head dimensions kept) and vo (rank per
  head group) (heads.py); each takes over the projection types the family's adapter lists for it.

A method says which units a block has and what each costs (`units`), precomputes what applying any level needs
from the calibration statistics (`prepare`, cached per block by bolaco.decompose.bases), builds the layers of a
unit at a level from that (`build`, a slice and a small product: it runs for every trial), and names the layers
the closed-loop refit fits (`refit_targets`). `Decomposition` puts the study's methods together for one model.
"""

from __future__ import annotations

import logging

from ...arch import Adapter
from ..budget import Budget, Unit
from . import factors, heads, mlp  # noqa: F401  (each registers its methods)
from .base import METHODS, DenseLayer, Method, check_names, matrix_methods

log = logging.getLogger(__name__)

__all__ = ["METHODS", "DenseLayer", "Decomposition", "Method", "check_names", "matrix_methods"]


class Decomposition:
    """The study's methods applied to one model: which method owns each unit, the units, their budget."""

    def __init__(self, adapter: Adapter, method: str, modules: tuple[str, ...] = (), multiple: int = 8):
        check_names(method, modules)
        self.adapter = adapter
        self.methods: list[Method] = []
        taken: set[str] = set()
        for name in modules:
            types = adapter.modules.get(name)
            if types is None:
                log.info("%s models have no structured '%s' module: its projections keep per-matrix factors (%s)",
                         adapter.family, name, method)
                continue
            self.methods.append(METHODS.get(name)(adapter, types, multiple))
            taken |= set(types)
        rest = tuple(t for t in adapter.types if t not in taken)
        if rest:
            self.methods.append(METHODS.get(method)(adapter, rest, multiple))
        self.methods.sort(key=lambda m: adapter.types.index(m.types[0]))     # block order: q/k before v/o, MLP last
        self.units: dict[str, Unit] = {}
        self._owner: dict[str, Method] = {}
        for b in range(adapter.n_blocks):
            for m in self.methods:
                for u in m.units(b):
                    self.units[u.id] = u
                    self._owner[u.id] = m
        self.budget = Budget(self.units)

    @property
    def unit_types(self) -> tuple[str, ...]:
        """Unit types in block order (search variables, heat maps and reports use them)."""
        return tuple(dict.fromkeys(u.type for u in self.units.values()))

    def method_of(self, uid: str) -> Method:
        return self._owner[uid]

    def block_units(self, block: int) -> list[Unit]:
        return [u for u in self.units.values() if u.block == block]

    def unit_of(self, lid: str) -> Unit:
        block, _ = lid.split(".")
        return next(u for u in self.block_units(int(block)) if lid in u.linears)

    def describe(self) -> str:
        return ", ".join(f"{m.name} ({'+'.join(m.types)})" for m in self.methods)

