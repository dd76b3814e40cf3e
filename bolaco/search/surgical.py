"""SFSD surgical rank search (DESIGN 2.7, arXiv 2405.13039): greedy, module by module.

Modules are visited from the last block backwards (configurable start, order and types). For each module
the ranks of a grid (rank 1, then 10 %, 20 %, ... of the break-even rank) are tried from small to large,
and the smallest whose metric on the search chunk stays within tolerance of the dense model's is kept,
if it also passes on a second, disjoint verification chunk; otherwise the module stays dense. The
search stops once the parameter budget is met. Tolerance: for accuracy-like metrics (higher is better)
metric >= dense - delta; for perplexity (lower is better) metric <= dense * (1 + delta) ** (accepted + 1),
SFSD's geometric allowance that grows with the number of modules already compressed. The metric is the
search-split perplexity or the accuracy of a zero-shot task (bolaco.tasks), each cut into two disjoint
halves: "search" and "verify".

Every probe is an Optuna trial of its own study in the same store (value: the metric; user attrs: module,
rank, chunk, accepted, seconds), so the dashboard shows the search, and a rerun replays the recorded
probes instead of evaluating them again: an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, cast

import optuna
from optuna.distributions import IntDistribution

from ..arch import Adapter, linear_id
from ..decompose import RankMap
from ..decompose import Compressor
from ..errors import BolacoError
from ..study import SurgicalConfig

Metric = Callable[[str], float]       # chunk name ("search" or "verify") -> metric of the model as it is now


def module_order(adapter: Adapter, cfg: SurgicalConfig) -> list[str]:
    adapter.check_types(cfg.types, "surgical")
    types = cfg.types or adapter.types
    n = adapter.n_blocks
    start = n - 1 if cfg.start_block is None else cfg.start_block
    if not 0 <= start < n:
        raise BolacoError(f"surgical: start block {start} is outside 0..{n - 1}")
    blocks = range(start, -1, -1) if cfg.backwards else range(start, n)
    return [linear_id(b, t) for b in blocks for t in types]


def rank_grid(comp: Compressor, lid: str, cfg: SurgicalConfig) -> list[int]:
    """Rank 1, then the fractions of the break-even rank, rounded to the rank multiple; ascending, unique."""
    top = comp.budget.max_rank(lid, 1)
    m = comp.budget.multiple
    grid = {1} | {max(m, round(f * top / m) * m) for f in cfg.fractions}
    return sorted(k for k in grid if 0 < k <= top)


def run(ws, comp, progress: bool = True) -> tuple[RankMap, dict]:
    """The study's surgical search, probes logged in the study store as `<study>-surgical-<metric>`."""
    from . import open_storage
    cfg = ws.study.surgical
    name = f"{ws.study.name}-surgical-{cfg.metric}"
    study = optuna.create_study(study_name=name, storage=open_storage(ws.study.storage), load_if_exists=True,
                                direction="minimize" if cfg.metric == "ppl" else "maximize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric = perplexity_metric(ws) if cfg.metric == "ppl" else task_metric(ws, cfg.metric, cfg.task_rows)
    return surgical_search(comp, metric, cfg, comp.budget.target(ws.study.remove), study, progress,
                           higher_is_better=cfg.metric != "ppl")


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


def accepted_ranks(probes: list[optuna.trial.FrozenTrial]) -> RankMap:
    """The rank map that a sequence of recorded probes (in order) had built: every verified acceptance."""
    return {p.user_attrs["module"]: p.user_attrs["rank"] for p in probes
            if p.user_attrs["chunk"] == "verify" and p.user_attrs["accepted"] and p.user_attrs["module"] != "dense"}


def surgical_search(comp: Compressor, metric: Metric, cfg: SurgicalConfig, target: int,
                    study: optuna.Study | None = None, progress: bool = True,
                    higher_is_better: bool = False) -> tuple[RankMap, dict]:
    """Greedy SFSD search; returns (rank map, summary). `target` is the parameter budget to reach."""
    from tqdm.auto import tqdm
    adapter, budget = comp.adapter, comp.budget
    log = _ProbeLog(study)
    comp.restore()
    dense = {chunk: log.probe("dense", 0, chunk, functools.partial(metric, chunk), lambda v: True, -1)[0]
             for chunk in ("search", "verify")}
    ranks: RankMap = {}
    evaluations = 2

    def within(value: float, chunk: str) -> bool:
        if higher_is_better:
            return value >= dense[chunk] - cfg.delta
        return value <= dense[chunk] * (1 + cfg.delta) ** (len(ranks) + 1)

    order = module_order(adapter, cfg)
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


def perplexity_metric(ws, batch_size: int | None = None) -> Metric:
    """Search-split perplexity, the split cut in two disjoint halves: 'search' and 'verify'."""
    from ..evaluate.perplexity import perplexity
    seqs = ws.data["search"]
    if len(seqs) < 2:
        raise BolacoError("surgical search needs at least 2 search sequences (one per chunk)")
    half = len(seqs) // 2
    chunks = {"search": seqs[:half], "verify": seqs[half:]}
    return lambda chunk: perplexity(ws.model, chunks[chunk], batch_size or ws.study.batch_size, progress=False).ppl


def task_metric(ws, task: str, rows: int, seed: int = 0, batch_size: int = 8) -> Metric:
    """lm-eval accuracy on `rows` seeded rows of a local zero-shot task, cut in two disjoint halves; the
    other rows of the task stay unseen by the search (bolaco.tasks.split)."""
    from ..evaluate.tasks import ZERO_SHOT, evaluate, lm_wrapper, load_tasks, n_docs, split
    if task not in ZERO_SHOT:
        raise BolacoError(f"surgical metric '{task}' is neither 'ppl' nor a zero-shot task ({', '.join(ZERO_SHOT)})")
    loaded = load_tasks([task], ws.study.data_dir)
    search_rows, _test_rows = split(n_docs(loaded, task), rows, seed)
    if len(search_rows) < 2:
        raise BolacoError(f"surgical search needs at least 2 rows of task '{task}'")
    half = len(search_rows) // 2
    chunks = {"search": search_rows[:half], "verify": search_rows[half:]}
    lm = lm_wrapper(ws.model, ws.tokenizer, batch_size)
    return lambda chunk: evaluate(lm, loaded, samples={task: chunks[chunk]})[task]["acc"]
