"""BO study benchmark on SmolLM2 at the default study's budget: best search perplexity vs trial for
BoTorch-with-constraint, GPSampler, TPE and random, against the uniform and a hand-made allocation;
test perplexity of each best; sampler seconds per trial; wall time. Writes docs/search.png.

    .venv/bin/python bench/search.py [--trials 40] [--samplers botorch gp tpe random]

Studies live in storage/bench.db and resume when the script is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from optuna.trial import TrialState

from bolaco import search
from bolaco.perplexity import perplexity
from bolaco.study import load_study
from bolaco.workspace import Workspace
from common import ppl_at, print_table


def best_curve(values):
    out, best = [], float("inf")
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--samplers", nargs="+", default=["botorch", "gp", "tpe", "random"])
    ap.add_argument("--storage", default="sqlite:///storage/bench.db")
    ap.add_argument("--plot", default="docs/search.png")
    args = ap.parse_args()
    base = load_study(args.study)
    ws = Workspace.open(dataclasses.replace(base, storage=args.storage))
    comp = ws.compressor()
    budget = comp.budget
    target = budget.target(base.remove)

    def ppl(ranks, role="test"):
        return ppl_at(ws, comp, ranks, role, base.batch_size)

    dense_test = perplexity(ws.model, ws.data["test"], base.batch_size).ppl
    dense_search = perplexity(ws.model, ws.data["search"], base.batch_size).ppl
    uniform = budget.uniform(base.remove)
    hand = budget.fit({lid: (0.5 if lid.endswith((".q", ".k", ".o")) else 1.0)
                       for lid in budget.linears if not lid.endswith(".v")}, target)
    rows = [["dense", "-", dense_search, dense_test, "-", "-", "-", "-", "-"],
            ["uniform", "-", ppl(uniform, "search"), ppl(uniform), "-", "-", "-", "-", "-"],
            ["hand-made (q,k,o at half the MLP ratio, v dense)", "-", ppl(hand, "search"), ppl(hand),
             "-", "-", "-", "-", "-"]]
    curves = {}
    for sampler in args.samplers:
        study = dataclasses.replace(ws.study, name=f"bench-{base.name}",
                                    search=dataclasses.replace(base.search, sampler=sampler))
        ws.study = study
        t = time.perf_counter()
        opt = search.run(ws, comp, create=True, trials=args.trials, artifacts=None)
        wall = time.perf_counter() - t
        done = sorted(opt.get_trials(states=(TrialState.COMPLETE,)), key=lambda tr: tr.number)[:args.trials]
        curve = best_curve([tr.value for tr in done])
        curves[sampler] = curve
        best = min(done, key=lambda tr: tr.value)
        sampling = {n: done[n - 1].user_attrs["seconds_sampling"] for n in (10, 30, 60) if n <= len(done)}
        first_30 = curve[min(29, len(curve) - 1)]
        rows.append([sampler, len(done), best.value, ppl({k: int(v) for k, v in best.user_attrs["ranks"].items()}),
                     best.number, first_30, *(f"{sampling[n]:.2f}" if n in sampling else "-" for n in (10, 30, 60))])
        print(f"{sampler}: best search ppl {best.value:.2f} at trial {best.number}, wall {wall:.0f} s (this run)")
    print_table(f"BO study on SmolLM2, remove {base.remove:.0%} of the decomposable parameters, search "
                f"{tuple(ws.data['search'].shape)}, test {tuple(ws.data['test'].shape)} (WikiText-2 raw), "
                f"{len(search.SearchSpace.from_study(base, ws.adapter, budget).names)} variables",
                ["allocation / sampler", "trials", "best search ppl", "test ppl of best", "best trial",
                 "best search ppl within 30 trials", "sampler s at trial 10", "at 30", "at 60"], rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for sampler, curve in curves.items():
        ax.plot(range(len(curve)), curve, label=sampler)
    ax.axhline(rows[1][2], color="gray", ls="--", label="uniform")
    ax.axhline(rows[2][2], color="black", ls=":", label="hand-made")
    ax.set_xlabel("trial")
    ax.set_ylabel("best search perplexity so far")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"SmolLM2-135M, {base.remove:.0%} removed")
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
