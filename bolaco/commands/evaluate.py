"""`bolaco eval`: the evaluation suite on any model (dense, exported, hub id, GGUF), cached next to it."""

from __future__ import annotations

import json
from pathlib import Path

import bolaco
from .. import evaluate
from .. import model as model_io
from ..data import default_data_dir
from ..errors import BolacoError
from ..evaluate import DEFAULT_CORPORA, ZERO_SHOT


def plan_of(args) -> evaluate.EvalPlan:
    chosen = args.ppl or args.tasks is not None or args.stereoset
    return evaluate.EvalPlan(
        corpora=tuple(args.corpus or DEFAULT_CORPORA) if (args.ppl or not chosen) else (), seq_len=args.seq_len,
        sequences=None if args.full else args.sequences,
        tasks=(tuple(args.tasks) or ZERO_SHOT) if args.tasks is not None else () if chosen else ZERO_SHOT,
        limit=None if args.full else args.limit, num_fewshot=args.num_fewshot,
        stereoset=args.stereoset or not chosen, stereoset_limit=None if args.full else args.stereoset_limit,
        batch_size=args.batch_size, data_dir=args.data_dir, cache_dir=args.cache_dir)


def evaluate_model(args) -> dict:
    plan = plan_of(args)
    evaluate.check_plan(plan)
    if not args.data_dir and default_data_dir() is None:
        plan, skipped = evaluate.without_data_dir(plan)
        if skipped:
            print(f"no data directory (--data-dir, $BOLACO_DATA_DIR or ../shared/data): skipping {', '.join(skipped)}")
    path = Path(args.results) if args.results else evaluate.results_path(args.model)
    print(f"bolaco eval {args.model}: {plan.describe()}{'' if args.full else ' (--full for everything)'}")
    model, tokenizer = bolaco.load(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    if tokenizer is None:
        raise BolacoError(f"{args.model} has no tokenizer: export it again, or save the tokenizer into that folder")
    results = evaluate.ResultsFile(path, model_io.fingerprint(model), args.model)
    cached = [k for k in plan.items() if k in results.results and not args.force]
    if cached:
        print(f"re-using {len(cached)} cached result(s) from {path} (--force to recompute)")
    out = evaluate.run(model, tokenizer, plan, results, force=args.force)
    print(f"\n{evaluate.markdown_table({args.model: out})}\n\nresults: {path}")
    if args.json:
        print(json.dumps(out, indent=1))
    return out
