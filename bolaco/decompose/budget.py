"""Exact parameter accounting for level maps (docs/design.md, "The budget").

A *unit* is what one integer level decides: a projection with per-matrix factors (level = rank k, parameters
k (d_in + d_out) plus a bias of d_out when the dense layer had one or the method adds one), or a structured
module (level = MLP neurons kept, head dimensions kept, or V/O rank per head group). Every unit's parameter count
is affine in its level, `fixed + per_level * level`, which makes the budget a linear constraint on the search
variables. A level map is {unit id: level}; a unit that is absent stays dense. A unit is compressed only at
levels where it is smaller than the dense layers it replaces, and levels are multiples of the unit's step.
The keep ratio of a unit is its parameter count over the dense count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BolacoError

LevelMap = dict[str, int]


@dataclass(frozen=True)
class Unit:
    id: str                     # "3.q", "3.mlp"
    block: int
    type: str                   # a projection type (q, k, ..., qkv) or a structured module (mlp, qk, vo)
    linears: tuple[str, ...]    # the linear ids whose layers it replaces
    dense: int                  # parameters of those layers, dense
    fixed: int                  # parameters at level L: fixed + per_level * L
    per_level: int
    step: int                   # levels are multiples of this
    full: int                   # the largest meaningful level (the dense layer's rank or width)

    def params(self, level: int) -> int:
        return self.fixed + self.per_level * level

    def max_level(self, step: int | None = None) -> int:
        """The largest level (a multiple of `step`) at which the unit is smaller than dense; 0 if none."""
        s = step or self.step
        # fixed + per_level * L < dense  <=>  L < (dense - fixed) / per_level
        below = -(-(self.dense - self.fixed) // self.per_level) - 1
        return max(min(below, self.full), 0) // s * s


@dataclass(frozen=True)
class Budget:
    units: dict[str, Unit]

    def dense(self, uid: str) -> int:
        return self.units[uid].dense

    def at(self, uid: str, level: int) -> int:
        return self.units[uid].params(level)

    def max_level(self, uid: str, step: int | None = None) -> int:
        return self.units[uid].max_level(step)

    @property
    def decomposable(self) -> int:
        return sum(u.dense for u in self.units.values())

    def params(self, levels: LevelMap) -> int:
        return sum(self.at(uid, levels[uid]) if uid in levels else u.dense for uid, u in self.units.items())

    def target(self, remove: float) -> int:
        """Parameters the decomposable part may keep when `remove` of it is removed."""
        if not 0 <= remove < 1:
            raise BolacoError(f"budget remove={remove}: give the fraction of parameters to remove, in [0, 1)")
        target = int(self.decomposable * (1 - remove))
        floor = self.params({uid: u.step for uid, u in self.units.items() if u.max_level()})
        if target < floor:
            raise BolacoError(f"budget remove={remove:.3f} is impossible: even the smallest level everywhere keeps "
                              f"{floor / self.decomposable:.1%} of the decomposable parameters; remove at most "
                              f"{1 - floor / self.decomposable:.3f}")
        return target

    def check(self, levels: LevelMap) -> None:
        for uid, level in levels.items():
            if uid not in self.units:
                raise BolacoError(f"level map names unknown unit '{uid}'")
            top = self.max_level(uid, 1)
            if level <= 0 or level > top:
                raise BolacoError(f"level {level} for {uid} does not save parameters (allowed 1..{top})")

    def keep(self, uid: str, levels: LevelMap) -> float:
        return (self.at(uid, levels[uid]) if uid in levels else self.dense(uid)) / self.dense(uid)

    def level_for_keep(self, uid: str, keep: float) -> int | None:
        """The level whose unit keeps about `keep` of its parameters; None (dense) if that saves nothing."""
        u = self.units[uid]
        level = round((keep * u.dense - u.fixed) / u.per_level / u.step) * u.step
        level = max(level, u.step)
        return None if level > u.max_level() else level

    def levels_for_keeps(self, keeps: dict[str, float]) -> LevelMap:
        out = {}
        for uid, keep in keeps.items():
            level = self.level_for_keep(uid, keep)
            if level is not None:
                out[uid] = level
        return out

    def _grow(self, uid: str, levels: LevelMap) -> int | None:
        """Parameters added by the next step of `uid` (next level, or back to dense); None when already dense."""
        if uid not in levels:
            return None
        u = self.units[uid]
        nxt = levels[uid] + u.step
        return (u.params(nxt) if nxt <= u.max_level() else u.dense) - u.params(levels[uid])

    def fit(self, keeps: dict[str, float], target: int) -> LevelMap:
        """The level map closest to the keep-ratio shape `keeps` that uses at most `target` parameters and is
        within one rounding step of it: the ratios are scaled by the largest factor that fits, then units grow
        one step at a time (largest keep first) while the budget allows. Only the units named in `keeps` may
        change; every other unit stays dense."""
        unknown = set(keeps) - set(self.units)
        if unknown:
            raise BolacoError(f"keep ratios name unknown units {sorted(unknown)[:3]}")
        if not keeps:
            raise BolacoError("no unit may be compressed: give keep ratios for at least one unit")
        lo, hi = 0.0, 1.0 / max(min(keeps.values()), 1e-6)
        if self.params(self.levels_for_keeps({u: r * hi for u, r in keeps.items()})) <= target:
            lo = hi
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.params(self.levels_for_keeps({u: r * mid for u, r in keeps.items()})) <= target:
                lo = mid
            else:
                hi = mid
        levels = self.levels_for_keeps({u: r * lo for u, r in keeps.items()})
        used = self.params(levels)
        if used > target:
            raise BolacoError(f"no level map fits {target} parameters")
        grown = True
        while grown:
            grown = False
            for uid in sorted(levels, key=lambda u: -keeps[u]):
                step = self._grow(uid, levels)
                if step is not None and used + step <= target:
                    nxt = levels[uid] + self.units[uid].step
                    if nxt <= self.max_level(uid):
                        levels[uid] = nxt
                    else:
                        del levels[uid]
                    used += step
                    grown = True
        return levels

    def min_step(self, levels: LevelMap) -> int:
        """The smallest possible growth of any unit: how close `fit` gets to its target."""
        steps = [s for s in (self._grow(uid, levels) for uid in levels) if s is not None]
        return min(steps) if steps else 0

    def uniform(self, remove: float, dense: tuple[str, ...] = ()) -> LevelMap:
        """Every unit at the same keep ratio, meeting the budget within one rounding step; the unit types in `dense`
        stay dense, so the others give up their share."""
        keeps = {uid: 1.0 for uid, u in self.units.items() if u.type not in dense}
        return self.fit(keeps, self.target(remove))
