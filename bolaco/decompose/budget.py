"""Exact parameter accounting for rank maps (DESIGN 2.5).

A rank map is {linear_id: k}; a linear that is absent stays dense. A low-rank linear holds
k (d_in + d_out) factor entries plus a bias of d_out when the dense layer had one or the method
adds one (the centred feature method keeps the mean of the discarded directions as a bias).
A layer is made low-rank only at ranks where that is smaller than the dense layer; ranks are
multiples of `multiple`. The keep ratio of a layer is its parameter count over the dense count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch import LinearInfo
from ..errors import BolacoError

RankMap = dict[str, int]


@dataclass(frozen=True)
class Budget:
    linears: dict[str, LinearInfo]
    adds_bias: bool = True
    multiple: int = 8

    def dense(self, lid: str) -> int:
        li = self.linears[lid]
        return li.d_in * li.d_out + (li.d_out if li.bias else 0)

    def lowrank(self, lid: str, k: int) -> int:
        li = self.linears[lid]
        return k * (li.d_in + li.d_out) + (li.d_out if li.bias or self.adds_bias else 0)

    def max_rank(self, lid: str, multiple: int | None = None) -> int:
        """Largest rank (a multiple of `multiple`) at which the low-rank layer is smaller than the dense one;
        0 if none."""
        m = multiple or self.multiple
        li = self.linears[lid]
        # k (d_in + d_out) + lowrank_bias < d_in d_out + dense_bias  <=>  k < limit
        spare = self.dense(lid) - self.lowrank(lid, 0)
        k = min(-(-spare // (li.d_in + li.d_out)) - 1, li.d_in, li.d_out)
        return max(k, 0) // m * m

    @property
    def decomposable(self) -> int:
        return sum(self.dense(lid) for lid in self.linears)

    def params(self, ranks: RankMap) -> int:
        return sum(self.lowrank(lid, ranks[lid]) if lid in ranks else self.dense(lid) for lid in self.linears)

    def target(self, remove: float) -> int:
        """Parameters the decomposable part may keep when `remove` of it is removed."""
        if not 0 <= remove < 1:
            raise BolacoError(f"budget remove={remove}: give the fraction of parameters to remove, in [0, 1)")
        target = int(self.decomposable * (1 - remove))
        floor = self.params({lid: self.multiple for lid in self.linears if self.max_rank(lid)})
        if target < floor:
            raise BolacoError(f"budget remove={remove:.3f} is impossible: even rank {self.multiple} everywhere keeps "
                              f"{floor / self.decomposable:.1%} of the decomposable parameters; remove at most "
                              f"{1 - floor / self.decomposable:.3f}")
        return target

    def check(self, ranks: RankMap) -> None:
        for lid, k in ranks.items():
            if lid not in self.linears:
                raise BolacoError(f"rank map names unknown linear '{lid}'")
            if k <= 0 or k > self.max_rank(lid, 1):
                raise BolacoError(f"rank {k} for {lid} does not save parameters (allowed 1..{self.max_rank(lid, 1)})")

    def keep(self, lid: str, ranks: RankMap) -> float:
        return (self.lowrank(lid, ranks[lid]) if lid in ranks else self.dense(lid)) / self.dense(lid)

    def rank_for_keep(self, lid: str, keep: float) -> int | None:
        """The rank whose layer keeps about `keep` of its parameters; None (dense) if that saves nothing."""
        li = self.linears[lid]
        k = round(keep * self.dense(lid) / (li.d_in + li.d_out) / self.multiple) * self.multiple
        k = max(k, self.multiple)
        return None if k > self.max_rank(lid) else k

    def ranks_for_keeps(self, keeps: dict[str, float]) -> RankMap:
        out = {}
        for lid, keep in keeps.items():
            k = self.rank_for_keep(lid, keep)
            if k is not None:
                out[lid] = k
        return out

    def _grow(self, lid: str, ranks: RankMap) -> int | None:
        """Parameters added by the next step of `lid` (next rank, or back to dense); None when already dense."""
        if lid not in ranks:
            return None
        k = ranks[lid] + self.multiple
        nxt = self.lowrank(lid, k) if k <= self.max_rank(lid) else self.dense(lid)
        return nxt - self.lowrank(lid, ranks[lid])

    def fit(self, keeps: dict[str, float], target: int) -> RankMap:
        """The rank map closest to the keep-ratio shape `keeps` that uses at most `target` parameters and is
        within one rounding step of it: the ratios are scaled by the largest factor that fits, then layers
        grow one step at a time (largest keep first) while the budget allows. Only the layers named in
        `keeps` may change; every other layer stays dense."""
        unknown = set(keeps) - set(self.linears)
        if unknown:
            raise BolacoError(f"keep ratios name unknown linears {sorted(unknown)[:3]}")
        if not keeps:
            raise BolacoError("no layer may be compressed: give keep ratios for at least one linear")
        keeps = dict(keeps)
        lo, hi = 0.0, 1.0 / max(min(keeps.values()), 1e-6)
        if self.params(self.ranks_for_keeps({l: r * hi for l, r in keeps.items()})) <= target:
            lo = hi
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.params(self.ranks_for_keeps({l: r * mid for l, r in keeps.items()})) <= target:
                lo = mid
            else:
                hi = mid
        ranks = self.ranks_for_keeps({l: r * lo for l, r in keeps.items()})
        used = self.params(ranks)
        if used > target:
            raise BolacoError(f"no rank map with multiples of {self.multiple} fits {target} parameters")
        grown = True
        while grown:
            grown = False
            for lid in sorted(ranks, key=lambda l: -keeps[l]):
                step = self._grow(lid, ranks)
                if step is not None and used + step <= target:
                    k = ranks[lid] + self.multiple
                    if k <= self.max_rank(lid):
                        ranks[lid] = k
                    else:
                        del ranks[lid]
                    used += step
                    grown = True
        return ranks

    def min_step(self, ranks: RankMap) -> int:
        """The smallest possible growth of any layer: how close `fit` gets to its target."""
        steps = [s for s in (self._grow(lid, ranks) for lid in ranks) if s is not None]
        return min(steps) if steps else 0

    def uniform(self, remove: float, dense: tuple[str, ...] = ()) -> RankMap:
        """Every layer at the same keep ratio, meeting the budget within one rounding step; the types in `dense`
        stay dense, so the others give up their share."""
        keeps = {lid: 1.0 for lid, li in self.linears.items() if li.type not in dense}
        return self.fit(keeps, self.target(remove))
