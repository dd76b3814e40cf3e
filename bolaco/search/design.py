"""Designed start-up allocations (`search.design`): evaluated first, before any space-filling draw, so that a study
starts from informed points instead of a lottery between basins (docs/design.md, "The search").

- uniform: every searched unit at the same keep ratio.
- importance: MoDeGPT's rule. A block's importance is one minus the cosine similarity of its input and output
  hidden states (the covariance cache records it); per-block removal shares are softmax(-importance / 0.015)
  (capped at 80 %, the excess spread over the others), the same ratio for every unit of a block.
- sensitivity: one pass per unit type (ASVD's and SFSD's ranking): only that type compressed to the keep ratio
  that would meet the budget alone (floored at r_min), the others dense; the rise of the search NLL, d_t, is the
  type's sensitivity. With a loss growing as a_t s^2 in the removed share s, the budget is met at least loss by
  removal shares proportional to 1 / a_t, i.e. to 1 / d_t.
Each design is projected into the search space (nearest point on the budget hyperplane) before it is stored.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..registry import Registry
from .objectives import make_objective
from .records import levels_key
from .space import SearchSpace

log = logging.getLogger(__name__)

Design = Callable[..., torch.Tensor]              # (workspace, compressor, space) -> a point of the space
DESIGNS: Registry[Design] = Registry("start-up design")
SMOOTHING, MAX_REMOVED = 0.015, 0.8               # MoDeGPT's allocation constants


@DESIGNS.register("uniform")
def uniform(ws, comp, space: SearchSpace) -> torch.Tensor:
    return space.vector(space.uniform_point())


@DESIGNS.register("importance")
def importance(ws, comp, space: SearchSpace) -> torch.Tensor:
    cov = ws.covariances(progress=False)
    n = comp.adapter.n_blocks
    scores = torch.tensor([1 - cov.block_cosine(b) for b in range(n)], dtype=torch.float64)
    share = 1 - float(space.rhs + sum(space.budget.units[u].fixed for u in space.uids)) / \
        sum(space.budget.dense(u) for u in space.uids)
    weights = torch.softmax(-scores / SMOOTHING, 0)
    removed = weights * n * share
    for _ in range(n):      # cap, and spread the excess over the blocks below the cap
        over = removed > MAX_REMOVED
        if not over.any():
            break
        excess = float((removed[over] - MAX_REMOVED).sum())
        removed[over] = MAX_REMOVED
        free = ~over
        removed[free] += excess * weights[free] / weights[free].sum()
    return space.point_of({u: float(1 - removed[space.budget.units[u].block]) for u in space.uids})


@DESIGNS.register("sensitivity")
def sensitivity(ws, comp, space: SearchSpace) -> torch.Tensor:
    objective = make_objective("ppl", ws.model, {"search": ws.data["search"]}, ws.study.evaluate.batch_size)
    comp.restore()
    dense = objective.measure().value
    budget = space.budget
    types = list(dict.fromkeys(budget.units[u].type for u in space.uids))
    need = budget.decomposable - space.target       # parameters the budget removes
    rise = {}
    for t in types:
        uids = [u for u in space.uids if budget.units[u].type == t]
        own = sum(budget.dense(u) for u in uids)
        keep = max(space.r_min, 1 - need / own)
        comp.apply(budget.levels_for_keeps({u: keep for u in uids}))
        try:
            rise[t] = max(objective.measure().value - dense, 1e-6)
        finally:
            comp.restore()
    log.info("sensitivity (search NLL rise, one type compressed at a time): " +
             ", ".join(f"{t} {v:.3f}" for t, v in rise.items()))
    inverse = {t: 1 / v for t, v in rise.items()}
    share_of = {t: sum(budget.dense(u) for u in space.uids if budget.units[u].type == t) for t in types}
    scale = need / sum(inverse[t] * share_of[t] for t in types)      # removed share of type t = scale / rise_t
    return space.point_of({u: 1 - min(1 - space.r_min, scale * inverse[budget.units[u].type]) for u in space.uids})


def designed_points(ws, comp, space: SearchSpace) -> dict[str, dict[str, float]]:
    """The study's designs as points of the search space, in order, without two of the same level map."""
    out, seen = {}, set()
    for name in ws.study.search.design:
        x = DESIGNS.get(name, "search.design")(ws, comp, space)
        key = levels_key(space.levels(x))
        if key in seen:
            log.info("start-up design %s gives the level map of an earlier design: not evaluated twice", name)
            continue
        seen.add(key)
        out[name] = space.point(x)
    return out
