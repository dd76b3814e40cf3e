"""Applying a level map to a loaded model in place, and restoring the dense layers exactly.

The dense layers are kept aside (no copy, no deep copy of the model), so restoring puts back the very same
tensors; building a unit's layers at a level slices the cached tensors of its method (bolaco.decompose.bases)."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from .bases import Bases
from .budget import LevelMap
from .methods import Decomposition


class Compressor:
    def __init__(self, decomposition: Decomposition, bases: Bases):
        self.decomposition, self.bases = decomposition, bases
        self.adapter, self.budget = decomposition.adapter, decomposition.budget
        self._dense: dict[str, nn.Linear] = {}
        self._levels: LevelMap = {}

    @property
    def levels(self) -> LevelMap:
        """The level map the model carries now."""
        return dict(self._levels)

    def dense(self, lid: str) -> nn.Linear:
        """The model's original layer `lid` (whether or not it is replaced now)."""
        return self._dense.get(lid) or cast(nn.Linear, self.adapter.module(lid))

    def open_loop(self, uid: str, level: int) -> dict[str, nn.Module]:
        """The layers of unit `uid` at `level`, built from the cached bases (linear id -> module)."""
        with torch.no_grad():
            return self.decomposition.method_of(uid).build(self.decomposition.units[uid], level,
                                                           self.bases.parts(uid), self.dense)

    def install(self, lid: str, module: nn.Module) -> None:
        """Put `module` in the place of linear `lid`, keeping the original dense layer for `restore`."""
        old = self.adapter.replace(lid, module)
        self._dense.setdefault(lid, cast(nn.Linear, old))

    def apply(self, levels: LevelMap, refitted: dict[str, nn.Module] | None = None) -> None:
        """Make the model carry exactly `levels` (what it carried before is restored first): every unit's layers
        from the bases, or the `refitted` layers (closed_loop.refit) where given."""
        self.budget.check(levels)
        self.restore()
        refitted = refitted or {}
        for uid, level in levels.items():
            for lid, module in self.open_loop(uid, level).items():
                self.install(lid, refitted.get(lid, module))
        self._levels = dict(levels)

    def restore(self) -> None:
        for lid, dense in self._dense.items():
            self.adapter.replace(lid, dense)
        self._dense.clear()
        self._levels = {}
