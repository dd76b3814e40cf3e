"""Choosing what to export (docs/design.md, "Selection"): guard against the winner's curse.

The trial with the lowest value on a few thousand search tokens is not the best model: the search value of the
best of many trials is biased low, and the closed-loop refit can make a map worse held out. So the best
`search.select_top` trials are measured again, open-loop and (when the study refits) refitted, on the selection
split, which calibration, search, training and test never read, and the best of those is exported. The refits
are cached per level map, so the export's refit of the winner costs nothing more.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from ..decompose import LevelMap
from .objectives import make_objective
from .worker import ranked_trials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    trial: int
    refit: bool
    search_ppl: float
    selection_ppl: float
    selection_value: float


def select(ws, comp, opt, top: int) -> tuple[LevelMap, bool, dict]:
    """(the level map to export, whether to refit it, the record of the selection for bolaco.json)."""
    ranked = [r for r in ranked_trials(opt) if r.evaluation is not None][:top]
    cfg = ws.study.search
    objective = make_objective(cfg.objective, ws.model, {"selection": ws.data["selection"]},
                               ws.study.evaluate.batch_size, cfg.kl_weight, cfg.recall_weight, ws.data["calibration"])
    candidates = []
    for record in ranked:
        for refit in (False, True) if ws.study.decompose.refit else (False,):
            comp.apply(record.levels, ws.refit(comp, record.levels) if refit else None)
            try:
                m = objective.measure("selection", desc=f"select trial {record.number}" + (" refit" if refit else ""))
            finally:
                comp.restore()
            assert m.ppl is not None, "the BO objectives measure perplexity"
            candidates.append(Candidate(record.number, refit, record.search_ppl, m.ppl, m.value))
            log.info(f"selection: trial {record.number}{' refitted' if refit else ''}: selection ppl {m.ppl:.3f} "
                     f"(search ppl {record.search_ppl:.3f})")
    best = min(candidates, key=lambda c: (c.selection_value, c.trial, c.refit))
    levels = next(r.levels for r in ranked if r.number == best.trial)
    return levels, best.refit, {"trial": best.trial, "refit": best.refit,
                                "candidates": [asdict(c) for c in candidates]}
