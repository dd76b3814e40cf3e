"""The evaluation suite on dense SmolLM2 and on the 20 % BO model (the best BoTorch trial of bench/search.py):
perplexity on WikiText-2 / PTB / C4, the seven zero-shot tasks through lm-eval, StereoSet.

    .venv/bin/python bench/evaluate.py [--limit 200] [--sequences 64] [--stereoset-limit 1000]

The BO model is exported to out/bench-smollm2-20-bo and evaluated after reloading it, as a user would;
results are cached next to each model (bolaco-eval.json; the dense one in storage/eval/), so a rerun
only prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import optuna

from bolaco import evaluate
from bolaco import model as model_io
from bolaco.study import load_study
from bolaco.workspace import Workspace
from common import print_table


def evaluated(spec: str, plan: evaluate.EvalPlan) -> dict:
    model, tokenizer = model_io.load(spec)
    results = evaluate.ResultsFile(evaluate.results_path(spec), model_io.fingerprint(model), spec)
    return evaluate.run(model, tokenizer, plan, results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--storage", default="sqlite:///storage/bench.db")
    ap.add_argument("--bo", default="bench-smollm2-20-botorch")
    ap.add_argument("--out", default="out/bench-smollm2-20-bo")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--stereoset-limit", type=int, default=1000)
    args = ap.parse_args()
    plan = evaluate.EvalPlan(sequences=args.sequences, limit=args.limit, stereoset_limit=args.stereoset_limit)
    study = load_study(args.study)
    if not (Path(args.out) / "bolaco.json").is_file():
        best = optuna.load_study(study_name=args.bo, storage=args.storage).best_trial
        ws = Workspace.open(dataclasses.replace(study, storage=args.storage))
        ranks = {k: int(v) for k, v in best.user_attrs["ranks"].items()}
        ws.export(ws.compressor(), ranks, args.out, {"allocation": f"{args.bo} trial {best.number}"})
    columns = {"dense": evaluated(study.model, plan), "20 % BO (BoTorch best)": evaluated(args.out, plan)}
    table = evaluate.markdown_table(columns).splitlines()
    rows = [line.strip("|").split(" | ") for line in table[2:]]
    print_table(f"Evaluation suite, dense SmolLM2-135M-Instruct vs 20 % removed ({plan.describe()})",
                ["metric", *columns], [[c.strip() for c in r] for r in rows])


if __name__ == "__main__":
    main()
