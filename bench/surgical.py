"""SFSD surgical search on SmolLM2 with the perplexity metric at the study's budget: evaluations and wall
time, search/test perplexity of the result, next to the BO study's best at the same number of evaluations.

    .venv/bin/python bench/surgical.py [--search 16] [--minutes 75]

The greedy pass evaluates the search split (cut in a search and a verify half) up to ~10 times per module;
--minutes caps the run, and the table then reports how far it got. Probes are kept in storage/bench.db,
so running the script again continues the same search; "eval minutes" sums the recorded probes' own
evaluation time, so it is the cost of the whole search however many runs it took. The BO study
(bench/search.py) ran far fewer evaluations, so the table also shows where surgical stood after as many.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import optuna
from optuna.trial import TrialState

from bolaco.search import surgical
from bolaco.data import RoleSpec
from bolaco.study import load_study
from bolaco.workspace import Workspace
from common import ppl_at, print_table


class OutOfTime(Exception):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--search", type=int, default=16, help="search sequences (two halves: search and verify)")
    ap.add_argument("--minutes", type=float, default=75)
    ap.add_argument("--storage", default="sqlite:///storage/bench.db")
    ap.add_argument("--bo", default="bench-smollm2-20-botorch", help="BO study to compare with")
    args = ap.parse_args()
    base = load_study(args.study)
    data = {**base.data, "search": RoleSpec("wikitext2-valid", -args.search, args.search)}
    study = dataclasses.replace(base, name="bench-smollm2-20", data=data, storage=args.storage)
    ws = Workspace.open(study)
    comp = ws.compressor()
    metric = surgical.perplexity_metric(ws)
    deadline = time.perf_counter() + args.minutes * 60

    def timed(chunk):
        if time.perf_counter() > deadline:
            raise OutOfTime
        return metric(chunk)

    opt = optuna.create_study(study_name="bench-smollm2-20-surgical", storage=args.storage, load_if_exists=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t = time.perf_counter()
    try:
        ranks, summary = surgical.surgical_search(comp, timed, study.surgical, comp.budget.target(study.remove), opt)
        finished = True
    except OutOfTime:
        finished = False
        summary = {}
    probes = sorted(opt.get_trials(states=(TrialState.COMPLETE,)), key=lambda tr: tr.number)
    budget = comp.budget

    def row(label, done, status, tokens_per_eval, removed=None, ranks=None):
        ranks = surgical.accepted_ranks(done) if ranks is None else ranks
        removed = 1 - budget.params(ranks) / budget.decomposable if removed is None else removed
        minutes = sum(p.user_attrs.get("seconds", float("nan")) for p in done) / 60
        return [label, len(done), f"{len(done) * tokens_per_eval / 1e6:.2f}", f"{minutes:.1f}", status,
                f"{removed:.2%}", *(ppl_at(ws, comp, ranks, r, study.batch_size) for r in ("search", "test"))]

    half = (args.search // 2) * study.seq_len
    status = ("yes" if summary.get("reached_budget") else "no (metric)") if finished else "no (time cap)"
    bo = optuna.load_study(study_name=args.bo, storage=args.storage)
    bo_done = sorted(bo.get_trials(states=(TrialState.COMPLETE,)), key=lambda tr: tr.number)
    bo_best = min(bo_done, key=lambda tr: tr.value)
    bo_ranks = {k: int(v) for k, v in bo_best.user_attrs["ranks"].items()}
    bo_tokens = base.data["search"].sequences * base.seq_len      # bench/search.py uses the study's search role
    rows = [row(f"surgical (SFSD, ppl metric, delta {study.surgical.delta:g})", probes, status, half),
            row(f"surgical after its first {len(bo_done)} evaluations", probes[:len(bo_done)], "no", half),
            [f"BO (BoTorch) best of its {len(bo_done)} trials", len(bo_done), f"{len(bo_done) * bo_tokens / 1e6:.2f}",
             f"{sum(t.user_attrs['seconds_eval'] for t in bo_done) / 60:.1f}", "yes",
             f"{bo_best.user_attrs['compression']:.2%}",
             *(ppl_at(ws, comp, bo_ranks, r, study.batch_size) for r in ("search", "test"))]]
    print_table(f"Surgical search vs BO on SmolLM2, budget {study.remove:.0%}; surgical evaluates halves of the last "
                f"{args.search}x256 tokens of valid (search/verify), BO the last 32x256; "
                f"test {tuple(ws.data['test'].shape)}; "
                f"this run took {(time.perf_counter() - t) / 60:.1f} min",
                ["strategy", "evaluations", "Mtokens evaluated", "eval minutes", "budget reached", "removed",
                 "search ppl", "test ppl"], rows)


if __name__ == "__main__":
    main()
