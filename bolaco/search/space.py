"""The search space: keep ratios of the searched units as a linear function of a few variables.

Every parameterisation writes the keep ratio of each searched unit (a projection with per-matrix factors, or a
structured module) as a convex combination of the variables, keep = W x with x in [r_min, 1]^d and rows of W
summing to 1:
- `groups`: one variable per (unit type group, contiguous block group), a step function over depth;
- `types`: one variable per unit type group, the same ratio in every block;
- `knots`: per unit type group a piecewise-linear curve over depth through `knots` evenly spaced values.
Units of types kept dense are not searched at all. Parameter count is (up to rounding) linear in the keep ratios,
so the budget is the hyperplane P . x = rhs with P = W^T (dense parameters of each unit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..arch import linear_id
from ..decompose import Budget, Decomposition, LevelMap
from ..errors import BolacoError
from ..study import Study

log = logging.getLogger(__name__)


def _type_groups(types: tuple[str, ...], tie, dense) -> list[tuple[str, ...]]:
    unknown = [t for t in [t for g in tie for t in g] + list(dense) if t not in types]
    if unknown:
        raise BolacoError(f"search: unknown unit type(s) {', '.join(unknown)} in search.tie or search.dense "
                          f"(this study's unit types are {', '.join(types)})")
    tied = [tuple(g) for g in tie]
    return tied + [(t,) for t in types if t not in dense and all(t not in g for g in tied)]


def _depth_weights(space: str, n_blocks: int, groups: int, knots: int) -> tuple[list[str], torch.Tensor]:
    """Variable suffixes of one type group and the (n_blocks, n_vars) weights of each block on them."""
    if space == "types":
        return [""], torch.ones(n_blocks, 1, dtype=torch.float64)
    if space == "groups":
        g = min(groups, n_blocks)
        if g < groups:
            log.warning("search.groups %d is more than the model's %d blocks: using %d (one group per block)",
                        groups, n_blocks, g)
        owner = [b * g // n_blocks for b in range(n_blocks)]
        names = []
        for j in range(g):
            blocks = [b for b in range(n_blocks) if owner[b] == j]
            names.append(f".b{blocks[0]}-{blocks[-1]}")
        w = torch.zeros(n_blocks, g, dtype=torch.float64)
        w[torch.arange(n_blocks), torch.tensor(owner)] = 1
        return names, w
    k = min(knots, n_blocks)
    if k < 2:
        raise BolacoError("search.knots must be at least 2 (a curve over depth needs two ends)")
    w = torch.zeros(n_blocks, k, dtype=torch.float64)
    for b in range(n_blocks):
        pos = b * (k - 1) / max(n_blocks - 1, 1)
        lo = min(int(pos), k - 2)
        frac = pos - lo
        w[b, lo], w[b, lo + 1] = 1 - frac, frac
    return [f".k{i}" for i in range(k)], w


def scale_onto_plane(v: torch.Tensor, coef: torch.Tensor, rhs: float, lo: float, hi: float) -> torch.Tensor:
    """clip(s v, lo, hi) with the scale s (per row of v) for which coef . clip(s v, lo, hi) = rhs; the sum is
    monotone in s, so a bisection finds it. Needs lo * sum(coef) < rhs < hi * sum(coef) and coef > 0."""
    v = v.clamp(min=1e-9)
    s_lo = torch.zeros(v.shape[:-1] + (1,), dtype=v.dtype)
    s_hi = (hi / v.min(dim=-1, keepdim=True).values).to(v.dtype)
    for _ in range(100):
        mid = (s_lo + s_hi) / 2
        below = (v * mid).clamp(lo, hi) @ coef < rhs
        s_lo = torch.where(below.unsqueeze(-1), mid, s_lo)
        s_hi = torch.where(below.unsqueeze(-1), s_hi, mid)
    return (v * (s_lo + s_hi) / 2).clamp(lo, hi)


@dataclass(frozen=True)
class SearchSpace:
    names: tuple[str, ...]        # variables, the columns of `weights`
    uids: tuple[str, ...]         # searched units, the rows of `weights`
    weights: torch.Tensor         # keep(uids[i]) = weights[i] @ x, float64, rows sum to 1
    type_group: tuple[int, ...]   # per variable: index of its type group (the coarse variable it refines)
    r_min: float
    budget: Budget
    target: int

    @classmethod
    def from_study(cls, study: Study, decomposition: Decomposition) -> "SearchSpace":
        cfg = study.search
        n_blocks, budget = decomposition.adapter.n_blocks, decomposition.budget
        groups_of_types = _type_groups(decomposition.unit_types, cfg.tie, cfg.dense)
        suffixes, depth = _depth_weights(cfg.space, n_blocks, cfg.groups, cfg.knots)
        names, uids, type_group = [], [], []
        for g, tg in enumerate(groups_of_types):
            names += [f"{'+'.join(tg)}{s}" for s in suffixes]
            type_group += [g] * len(suffixes)
            uids += [linear_id(b, t) for b in range(n_blocks) for t in tg]
        weights = torch.zeros(len(uids), len(names), dtype=torch.float64)
        row = 0
        for g, tg in enumerate(groups_of_types):
            for b in range(n_blocks):
                for _ in tg:
                    weights[row, g * len(suffixes):(g + 1) * len(suffixes)] = depth[b]
                    row += 1
        space = cls(tuple(names), tuple(uids), weights, tuple(type_group), cfg.r_min, budget,
                    budget.target(study.budget.remove))
        total = float(space.coefficients.sum())
        remove = study.budget.remove
        if space.rhs <= space.r_min * total:
            raise BolacoError(f"the search space cannot meet remove={remove}: with r_min={cfg.r_min} and "
                              f"types {list(cfg.dense)} kept dense ({space.dense_rest:,} parameters) the searched "
                              "units would need keep ratios below r_min; lower r_min or search more types")
        if space.rhs >= total:
            raise BolacoError(f"remove={remove} is met with every searched unit dense: nothing to search")
        return space

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def coefficients(self) -> torch.Tensor:
        """P_j, the slope of the parameter count in x_j, in `names` order."""
        dense = torch.tensor([float(self.budget.dense(u)) for u in self.uids], dtype=torch.float64)
        return self.weights.T @ dense

    @property
    def dense_rest(self) -> int:
        """Parameters of the units that are not searched (types kept dense)."""
        searched = set(self.uids)
        return sum(self.budget.dense(u) for u in self.budget.units if u not in searched)

    @property
    def rhs(self) -> float:
        """P . x must equal this for the budget to be met (before rounding)."""
        offset = sum(self.budget.units[u].fixed for u in self.uids)
        return float(self.target - offset - self.dense_rest)

    def vector(self, point: dict[str, float]) -> torch.Tensor:
        return torch.tensor([float(point[n]) for n in self.names], dtype=torch.float64)

    def point(self, x: torch.Tensor) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, x.tolist())}

    def uniform_point(self) -> dict[str, float]:
        return self.point(torch.full((self.dim,), self.rhs / float(self.coefficients.sum()), dtype=torch.float64))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The point clip(s x, r_min, 1) on the budget hyperplane: keeps the shape of any sampler's proposal,
        stays in the box, and is the identity for points already on the plane."""
        return scale_onto_plane(x, self.coefficients, self.rhs, self.r_min, 1.0)

    def keeps(self, x: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.uids, (self.weights @ x).tolist()))

    def levels(self, point: dict[str, float] | torch.Tensor) -> LevelMap:
        x = point if isinstance(point, torch.Tensor) else self.vector(point)
        return self.budget.fit(self.keeps(x), self.target)

    def point_of(self, keeps: dict[str, float]) -> torch.Tensor:
        """The point of the space nearest (least squares) to per-unit keep ratios, projected onto the budget
        hyperplane: how a designed allocation (uniform, importance, sensitivity) enters the search."""
        target = torch.tensor([keeps.get(u, 1.0) for u in self.uids], dtype=torch.float64)
        x = torch.linalg.lstsq(self.weights, target.unsqueeze(-1)).solution.squeeze(-1)
        return self.project(x.clamp(self.r_min, 1.0))

    # Normalised coordinates u in [0, 1]^d, x = r_min + (1 - r_min) u, as the GP sees them.
    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.r_min) / (1 - self.r_min)

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        return self.r_min + (1 - self.r_min) * u

    def unit_constraint(self, lift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The budget hyperplane in unit coordinates (of x, or of z with x = lift @ z) as BoTorch's
        (indices, coefficients, rhs), scaled so that the coefficients sum to 1 (raw counts make SLSQP fail)."""
        p = self.coefficients if lift is None else lift.T @ self.coefficients
        coef = p * (1 - self.r_min)
        rhs = self.rhs - self.r_min * float(p.sum())
        scale = float(coef.sum())
        return torch.arange(len(p)), coef / scale, rhs / scale

    @property
    def coarse_lift(self) -> torch.Tensor:
        """(d, n_type_groups): x = lift @ z gives every variable of a type group its group's value z."""
        lift = torch.zeros(self.dim, max(self.type_group) + 1, dtype=torch.float64)
        lift[torch.arange(self.dim), torch.tensor(self.type_group)] = 1
        return lift

    def coarse_of(self, x: torch.Tensor) -> torch.Tensor:
        """The coarse coordinates of x: per type group, the parameter-weighted mean of its variables
        (exact for points of the coarse subspace)."""
        lift, p = self.coarse_lift, self.coefficients
        return (lift.T @ (p * x)) / (lift.T @ p)
