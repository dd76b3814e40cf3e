"""The BO study over seeds: each configuration (sampler x parameterisation) runs with several seeds on the default
study (SmolLM2, 20 % removed); prints the median and spread (min-max) over seeds of the best trial's search and
test perplexity at trials 30 and 60, against the uniform and a hand-made allocation, the sampler seconds at
trials 10, 30, 60 and 100, and how the trials were proposed. Writes docs/search.png (median best-so-far curves).

    .venv/bin/python bench/search.py [--configs botorch:groups gp:groups tpe:groups botorch:types ...]
                                     [--seeds 0 1 2] [--trials 60] [--report-only]

A configuration is SAMPLER:SPACE[+coarseN]: SPACE is groups (7 types x 6 block groups = 42 ratios), types (one
ratio per type) or knots (a curve over depth per type, 3 knots); +coarseN proposes the first N trials with one ratio
per type, then refines (botorch only). Studies live in storage/bench.db and resume when the script is run again;
test perplexities are cached in storage/bench-test-ppl.json. Seeds are the outer loop, so an interrupted run
leaves balanced results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bolaco import search
from bolaco.evaluate.perplexity import perplexity
from bolaco.study import load_study
from bolaco.workspace import Workspace
from common import ppl_at, print_table

CHECKPOINTS = (30, 60)
SAMPLING_AT = (10, 30, 60, 100)


def config_search(base, config: str, seed: int):
    sampler, _, space = config.partition(":")
    space, _, coarse = space.partition("+coarse")
    return dataclasses.replace(base, sampler=sampler, space=space or "groups", coarse_trials=int(coarse or 0),
                               seed=seed)


def study_label(config: str, seed: int) -> str:
    return f"bench-{config.replace(':', '-').replace('+', '-')}-s{seed}"


class TestCache:
    """Test perplexity per rank map, so that a rerun of the bench evaluates nothing twice."""

    def __init__(self, path: Path, ws, comp, batch_size: int):
        self.path, self.ws, self.comp, self.batch_size = path, ws, comp, batch_size
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, ranks: dict) -> float:
        key = json.dumps(sorted(ranks.items()))
        if key not in self.values:
            self.values[key] = ppl_at(self.ws, self.comp, ranks, "test", self.batch_size)
            self.path.write_text(json.dumps(self.values))
        return self.values[key]


def spread(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}} (1 seed)"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--configs", nargs="+",
                    default=["botorch:groups", "gp:groups", "tpe:groups", "botorch:types", "botorch:groups+coarse20"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--storage", default="sqlite:///storage/bench.db")
    ap.add_argument("--plot", default="docs/search.png")
    ap.add_argument("--report-only", action="store_true", help="print the table from the stored studies")
    args = ap.parse_args()
    base = load_study(args.study)
    ws = Workspace.open(dataclasses.replace(base, storage=args.storage))
    comp = ws.compressor()
    budget = comp.budget
    test_ppl = TestCache(Path("storage/bench-test-ppl.json"), ws, comp, base.batch_size)
    dense_test = perplexity(ws.model, ws.data["test"], base.batch_size).ppl
    dense_search = perplexity(ws.model, ws.data["search"], base.batch_size).ppl
    target = budget.target(base.remove)
    uniform = budget.uniform(base.remove)
    hand = budget.fit({lid: (0.5 if lid.endswith((".q", ".k", ".o")) else 1.0)
                       for lid in budget.linears if not lid.endswith(".v")}, target)
    hand_search = ppl_at(ws, comp, hand, "search", base.batch_size)
    rows = [["dense", "-", "-", f"{dense_search:.1f}", f"{dense_test:.1f}", "1.00", "-", "-", "-"],
            ["uniform", "-", "-", f"{ppl_at(ws, comp, uniform, 'search', base.batch_size):.1f}",
             f"{test_ppl(uniform):.1f}", f"{test_ppl(uniform) / dense_test:.2f}", "-", "-", "-"],
            ["hand-made (q,k,o at half the MLP ratio, v dense)", "-", "-", f"{hand_search:.1f}",
             f"{test_ppl(hand):.1f}",
             f"{test_ppl(hand) / dense_test:.2f}", "-", "-", "-"]]
    if not args.report_only:
        for seed in args.seeds:
            for config in args.configs:
                ws.study = dataclasses.replace(base, name=study_label(config, seed), storage=args.storage,
                                               search=config_search(base.search, config, seed))
                t = time.perf_counter()
                search.run(ws, comp, create=True, trials=args.trials, artifacts=None)
                print(f"{config} seed {seed}: {time.perf_counter() - t:.0f} s (this run)", flush=True)

    storage = search.open_storage(args.storage)
    curves, sampling_rows, proposal_rows = {}, [], []
    for config in args.configs:
        at = {n: {"search": [], "test": [], "beats_hand": 0} for n in CHECKPOINTS}
        sampling = {n: [] for n in SAMPLING_AT}
        trial_seconds, proposals, n_seeds, dims = [], {}, 0, "-"
        for seed in args.seeds:
            name = f"{study_label(config, seed)}-{config_search(base.search, config, seed).sampler}"
            try:
                opt = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                continue
            done = sorted(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda tr: tr.number)
            if not done:
                continue
            n_seeds += 1
            dims = len(opt.user_attrs["variables"])
            curves.setdefault(config, []).append(_best_curve([tr.user_attrs["search_ppl"] for tr in done]))
            for n in CHECKPOINTS:
                if len(done) >= n:
                    best = min(done[:n], key=lambda tr: tr.value)
                    at[n]["search"].append(best.user_attrs["search_ppl"])
                    at[n]["test"].append(test_ppl({k: int(v) for k, v in best.user_attrs["ranks"].items()}))
                    at[n]["beats_hand"] += best.user_attrs["search_ppl"] < hand_search
            for n in SAMPLING_AT:
                if len(done) >= n:
                    sampling[n].append(done[n - 1].user_attrs["seconds_sampling"])
            trial_seconds += [tr.user_attrs["seconds_eval"] + tr.user_attrs["seconds_apply"] for tr in done[10:]]
            for k, v in search.summary(opt)["proposals"].items():
                proposals[k] = proposals.get(k, 0) + v
        for n in CHECKPOINTS:
            tests = at[n]["test"]
            rows.append([config, dims, f"{n} ({len(tests)} seeds)", spread(at[n]["search"]), spread(tests),
                         spread([v / dense_test for v in tests], ".2f"),
                         f"{at[n]['beats_hand']}/{len(tests)}" if tests else "-", "", ""])
        eval_s = statistics.median(trial_seconds) if trial_seconds else float("nan")
        sampling_rows.append([config, dims, *(f"{statistics.median(sampling[n]):.2f}" if sampling[n] else "-"
                                              for n in SAMPLING_AT), f"{eval_s:.1f}",
                              f"{statistics.median(sampling[100]) / eval_s:.1%}" if sampling[100] else "-"])
        proposal_rows.append([config, n_seeds, ", ".join(f"{k} {v}" for k, v in sorted(proposals.items()))])
    print_table(f"BO study over seeds on SmolLM2, remove {base.remove:.0%} of the decomposable parameters; search "
                f"{tuple(ws.data['search'].shape)}, test {tuple(ws.data['test'].shape)} (WikiText-2 raw). Median "
                "[min-max] over seeds of the best trial (by search objective) among the first N",
                ["allocation / config", "variables", "trials", "best search ppl", "its test ppl", "test / dense",
                 "seeds beating hand-made (search)", "", ""], [r[:7] for r in rows])
    print_table("Sampler seconds at trial N (median over seeds; one thread) and evaluation seconds per trial",
                ["config", "variables", *(f"at {n}" for n in SAMPLING_AT), "apply + eval s", "sampler / trial at 100"],
                sampling_rows)
    print_table("How the finished trials were proposed (all seeds)", ["config", "seeds", "proposals"], proposal_rows)
    _plot(curves, hand_search, rows[1][3], args.plot, base.remove)


def _best_curve(values):
    out, best = [], float("inf")
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def _plot(curves, hand, uniform, path, remove):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for config, runs in curves.items():
        n = min(len(c) for c in runs)
        med = [statistics.median(c[i] for c in runs) for i in range(n)]
        line, = ax.plot(range(1, n + 1), med, label=f"{config} (median of {len(runs)})")
        ax.fill_between(range(1, n + 1), [min(c[i] for c in runs) for i in range(n)],
                        [max(c[i] for c in runs) for i in range(n)], color=line.get_color(), alpha=0.12)
    ax.axhline(float(uniform), color="gray", ls="--", label="uniform")
    ax.axhline(hand, color="black", ls=":", label="hand-made")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("best search perplexity so far")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"SmolLM2-135M, {remove:.0%} removed: median and range over seeds")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
