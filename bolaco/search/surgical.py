"""SFSD surgical search (docs/design.md, "The surgical search"; arXiv 2405.13039): greedy, unit by unit.

Units are visited from the last block backwards (configurable start, order and types). For each unit the levels
of a grid (the smallest level, then 10 %, 20 %, ... of the break-even level) are tried from small to large, and
the smallest whose objective on the search chunk stays within tolerance of the dense model's is kept, if it also
passes on a second, disjoint verification chunk; otherwise the unit stays dense. The search stops once the
parameter budget is met. Tolerance: for objectives to maximise (a task's accuracy) value >= dense - delta; for
log-perplexity value <= dense + (accepted + 1) log(1 + delta), SFSD's geometric allowance on perplexity
(ppl <= dense (1 + delta)^(accepted + 1)) that grows with the number of units already compressed. The objective
is one of bolaco.search.objectives (search-split log-perplexity, or a zero-shot task's accuracy), each measured on
two disjoint halves of its data: "search" and "verify".

Every probe is an Optuna trial of its own study in the same store (value: the objective; user attrs: module,
rank (the level), chunk, accepted, seconds), so the dashboard shows the search, and a rerun replays the recorded
probes instead of evaluating them again: an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, cast

import optuna
from optuna.distributions import IntDistribution

from ..arch import linear_id
from ..decompose import Compressor, LevelMap
from ..errors import BolacoError
from ..study import SurgicalConfig
from .objectives import OBJECTIVES, Objective, TaskAccuracy, make_objective

Metric = Callable[[str], float]       # chunk name ("search" or "verify") -> objective of the model as it is now


def module_order(comp: Compressor, cfg: SurgicalConfig) -> list[str]:
    types = comp.decomposition.unit_types
    unknown = [t for t in cfg.types if t not in types]
    if unknown:
        raise BolacoError(f"surgical: unknown unit type(s) {', '.join(unknown)} (this study's unit types are "
                          f"{', '.join(types)})")
    n = comp.adapter.n_blocks
    start = n - 1 if cfg.start_block is None else cfg.start_block
    if not 0 <= start < n:
        raise BolacoError(f"surgical: start block {start} is outside 0..{n - 1}")
    blocks = range(start, -1, -1) if cfg.backwards else range(start, n)
    return [linear_id(b, t) for b in blocks for t in (cfg.types or types)]


def rank_grid(comp: Compressor, uid: str, cfg: SurgicalConfig) -> list[int]:
    """The smallest level, then the fractions of the break-even level, rounded to the unit's step; ascending,
    unique."""
    unit = comp.budget.units[uid]
    top, m = unit.max_level(1), unit.step
    grid = {1 if m == 1 else m} | {max(m, round(f * top / m) * m) for f in cfg.fractions}
    return sorted(k for k in grid if 0 < k <= top)


def run(ws, comp, progress: bool = True) -> tuple[LevelMap, dict]:
    """The study's surgical search, probes logged in the study store as `<study>-surgical-<metric>`."""
    from . import open_storage
    cfg = ws.study.surgical
    objective = surgical_objective(ws, cfg)
    name = f"{ws.study.name}-surgical-{cfg.metric}"
    study = optuna.create_study(study_name=name, storage=open_storage(ws.study.storage), load_if_exists=True,
                                direction=objective.direction)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return surgical_search(comp, lambda chunk: objective.measure(chunk).value, cfg,
                           comp.budget.target(ws.study.budget.remove), study, progress,
                           higher_is_better=objective.direction == "maximize")


class _ProbeLog:
    """Probes as Optuna trials; the i-th probe of a rerun reuses the i-th recorded one."""

    def __init__(self, study: optuna.Study | None):
        self.study = study
        self.recorded = []
        if study is not None:
            self.recorded = sorted(study.get_trials(deepcopy=False,
                                                    states=(optuna.trial.TrialState.COMPLETE,)),
                                   key=lambda t: t.number)
        self.index = 0

    def probe(self, lid: str, rank: int, chunk: str, evaluate: Callable[[], float], accepted: Callable[[float], bool],
              module_index: int) -> tuple[float, bool]:
        i, self.index = self.index, self.index + 1
        if i < len(self.recorded):
            t = self.recorded[i]
            if (t.user_attrs["module"], t.user_attrs["rank"], t.user_attrs["chunk"]) != (lid, rank, chunk):
                raise BolacoError("the recorded surgical probes do not match this search (other settings or model): "
                                  "delete that study or use another study name")
            return cast(float, t.value), bool(t.user_attrs["accepted"])
        start = time.perf_counter()
        value = evaluate()
        seconds = time.perf_counter() - start
        ok = accepted(value)
        if self.study is not None:
            self.study.add_trial(optuna.trial.create_trial(
                params={"module": module_index, "rank": rank},
                distributions={"module": IntDistribution(-1, 10**6), "rank": IntDistribution(0, 10**6)},
                value=value, user_attrs={"module": lid, "rank": rank, "chunk": chunk, "accepted": ok,
                            "seconds": seconds}))
        return value, ok


def accepted_ranks(probes: list[optuna.trial.FrozenTrial]) -> LevelMap:
    """The rank map that a sequence of recorded probes (in order) had built: every verified acceptance."""
    return {p.user_attrs["module"]: p.user_attrs["rank"] for p in probes
            if p.user_attrs["chunk"] == "verify" and p.user_attrs["accepted"] and p.user_attrs["module"] != "dense"}


def surgical_search(comp: Compressor, metric: Metric, cfg: SurgicalConfig, target: int,
                    study: optuna.Study | None = None, progress: bool = True,
                    higher_is_better: bool = False) -> tuple[LevelMap, dict]:
    """Greedy SFSD search; returns (level map, summary). `target` is the parameter budget to reach. A metric to
    minimise is a log-perplexity (see the module docstring)."""
    from tqdm.auto import tqdm
    budget = comp.budget
    log = _ProbeLog(study)
    comp.restore()
    dense = {chunk: log.probe("dense", 0, chunk, functools.partial(metric, chunk), lambda v: True, -1)[0]
             for chunk in ("search", "verify")}
    ranks: LevelMap = {}
    evaluations = 2

    def within(value: float, chunk: str) -> bool:
        if higher_is_better:
            return value >= dense[chunk] - cfg.delta
        return value <= dense[chunk] + (len(ranks) + 1) * math.log1p(cfg.delta)

    order = module_order(comp, cfg)
    with tqdm(order, desc="surgical", unit="module", disable=not progress) as bar:
        for index, lid in enumerate(bar):
            if budget.params(ranks) <= target:
                break
            for k in rank_grid(comp, lid, cfg):
                comp.apply({**ranks, lid: k})
                _, ok = log.probe(lid, k, "search", lambda: metric("search"), lambda v: within(v, "search"), index)
                evaluations += 1
                if not ok:
                    continue
                _, verified = log.probe(lid, k, "verify", lambda: metric("verify"), lambda v: within(v, "verify"),
                                        index)
                evaluations += 1
                if verified:
                    ranks[lid] = k
                break          # the smallest passing rank is the only candidate; a failed verification reverts
            bar.set_postfix(removed=f"{1 - budget.params(ranks) / budget.decomposable:.1%}")
    comp.restore()
    params = budget.params(ranks)
    return ranks, {"evaluations": evaluations, "params": params, "reached_budget": params <= target,
                   "removed": 1 - params / budget.decomposable, "dense": dense}


def surgical_objective(ws, cfg: SurgicalConfig) -> Objective:
    """The objective of `surgical.metric` on two disjoint halves of its data: a registered objective on the search
    split, or the accuracy of a zero-shot task on `task_rows` seeded rows (the task's other rows stay unseen)."""
    if cfg.metric in OBJECTIVES:
        seqs = ws.data["search"]
        if len(seqs) < 2:
            raise BolacoError("surgical search needs at least 2 search sequences (one per chunk)")
        half = len(seqs) // 2
        return make_objective(cfg.metric, ws.model, {"search": seqs[:half], "verify": seqs[half:]},
                              ws.study.evaluate.batch_size, ws.study.search.kl_weight,
                              ws.study.search.recall_weight, ws.data["calibration"])
    from ..evaluate.tasks import ZERO_SHOT, load_tasks, n_docs, split
    if cfg.metric not in ZERO_SHOT:
        raise BolacoError(f"surgical.metric '{cfg.metric}' is neither an objective ({', '.join(OBJECTIVES.names())}) "
                          f"nor a zero-shot task ({', '.join(ZERO_SHOT)})")
    loaded = load_tasks([cfg.metric], ws.study.data.dir)
    search_rows, _test_rows = split(n_docs(loaded, cfg.metric), cfg.task_rows, 0)
    if len(search_rows) < 2:
        raise BolacoError(f"surgical search needs at least 2 rows of task '{cfg.metric}'")
    half = len(search_rows) // 2
    return TaskAccuracy(ws.model, ws.tokenizer, cfg.metric, loaded,
                        {"search": search_rows[:half], "verify": search_rows[half:]}, ws.study.evaluate.batch_size)
