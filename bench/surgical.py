"""SFSD surgical search on SmolLM2 with the perplexity metric at the study's budget: evaluations and wall
time, search/test perplexity of the result, next to the BO study's best at the same number of evaluations.

    .venv/bin/python bench/surgical.py [--search 16] [--minutes 25]

The greedy pass evaluates the search split (cut in a search and a verify half) up to ~10 times per module;
--minutes caps the run, and the table then reports how far it got. Probes are kept in storage/bench.db,
so running the script again continues the same search.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import optuna
from optuna.trial import TrialState

from bolaco import surgical
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
    ap.add_argument("--minutes", type=float, default=25)
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
        probes = sorted(opt.get_trials(states=(TrialState.COMPLETE,)), key=lambda tr: tr.number)
        ranks = {p.user_attrs["module"]: p.user_attrs["rank"] for p in probes
                 if p.user_attrs["chunk"] == "verify" and p.user_attrs["accepted"] and p.user_attrs["module"] != "dense"}
        summary = {"evaluations": len(probes), "removed": 1 - comp.budget.params(ranks) / comp.budget.decomposable}
    seconds = time.perf_counter() - t
    result = [ppl_at(ws, comp, ranks, r, study.batch_size) for r in ("search", "test")]
    n = summary["evaluations"]
    bo = optuna.load_study(study_name=args.bo, storage=args.storage)
    bo_done = sorted(bo.get_trials(states=(TrialState.COMPLETE,)), key=lambda tr: tr.number)
    bo_best = min(bo_done[:max(1, min(n, len(bo_done)))], key=lambda tr: tr.value)
    bo_ranks = {k: int(v) for k, v in bo_best.user_attrs["ranks"].items()}
    bo_result = [ppl_at(ws, comp, bo_ranks, r, study.batch_size) for r in ("search", "test")]
    rows = [["surgical (SFSD, ppl metric, delta %.3g)" % study.surgical.delta, n, f"{seconds / 60:.1f}",
             "yes" if finished and summary.get("reached_budget") else "no (time cap)" if not finished else "no (metric)",
             f"{summary['removed']:.2%}", result[0], result[1]],
            [f"BO (BoTorch) best of its first {min(n, len(bo_done))} trials", min(n, len(bo_done)), "-", "yes",
             f"{bo_best.user_attrs['compression']:.2%}", bo_result[0], bo_result[1]]]
    print_table(f"Surgical search vs BO on SmolLM2, budget {study.remove:.0%}; search = last {args.search}x256 tokens "
                f"of valid (surgical: halves for search/verify), test {tuple(ws.data['test'].shape)}",
                ["strategy", "evaluations", "minutes", "budget reached", "removed", "search ppl", "test ppl"], rows)


if __name__ == "__main__":
    main()
