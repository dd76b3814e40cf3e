"""The held-out quality table on SmolLM2 at 20 % removed: every row a ratio to the dense model measured in the same
run, on text and tasks that calibration, search and post-training never saw.

    .venv/bin/python bench/quality.py [--variants wiki-ppl wiki-ppl+kl wiki-kl mix-ppl] [--seeds 0 1 2]
                                      [--trials 60] [--config botorch:groups] [--ft-steps 400] [--limit 200]
    (the README's table: --config botorch:types --trials 30 --variants mix-ppl --ridges --ft-steps 100
     --ft-lr 0.001 --ft-lora-dense-off, then the same with --ft-steps 400: the study's post-training)

Rows: uniform; the BO best of each search variant (objective x calibration/search data, optionally a refit inside
every trial), open-loop and after the closed-loop refit (perplexity columns: median [min-max] over seeds);
post-training in the low-rank subspace of
the best row, next to the dense model fine-tuned with the same data, tokens and settings. Columns: WikiText-2
test, PTB test and C4 perplexity (first 64 x 256 tokens of each), and the accuracy of the zero-shot tasks where
the dense model is clearly above chance (first --limit rows). Task columns are measured on the seed whose BO
best has the median search value. Data roles (sequence ranges at seq_len 256, all disjoint):
  wiki: calibration WikiText-2 valid [0:128], search valid [-32:]
  mix:  calibration WikiText-2 valid [0:64] + C4 [-80:-16], search valid [-16:] + C4 [-16:]
  post-training: the study's train role (C4 [64:1264]); reported C4 perplexity: C4 [0:64] (same source, other
  documents: marked)
BO studies resume from storage/bench.db (the wiki-ppl variant is bench/search.py's study of the same config and
seed); evaluations are cached in storage/bench-quality/.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import math
import pstats
import statistics
import time
from pathlib import Path

from optuna.trial import TrialState

from bolaco import evaluate
from bolaco import search
from bolaco import model as model_io
from bolaco.data import RoleSpec, describe, role_sequences
from bolaco.export import export, load_compressed
from bolaco.finetune import SubspaceTuner
from bolaco.evaluate.perplexity import perplexity
from bolaco.study import load_study
from bolaco.workspace import Workspace
from common import print_table
from search import config_search, study_label

CORPORA = ("wikitext2-test", "ptb-test", "c4-valid")
TASKS = {"piqa": "acc", "hellaswag": "acc_norm", "arc_easy": "acc", "openbookqa": "acc_norm"}
DATA = {"wiki": {"calibration": RoleSpec("wikitext2-valid", 0, 128), "search": RoleSpec("wikitext2-valid", -32, 32)},
        "mix": {"calibration": (RoleSpec("wikitext2-valid", 0, 64), RoleSpec("c4-valid", -80, 64)),
                "search": (RoleSpec("wikitext2-valid", -16, 16), RoleSpec("c4-valid", -16, 16))}}
# variant -> (data, objective, calibration sequences of the refit inside every trial: 0 for none)
VARIANTS = {"wiki-ppl": ("wiki", "ppl", 0), "wiki-ppl+kl": ("wiki", "ppl+kl", 0), "wiki-kl": ("wiki", "kl", 0),
            "mix-ppl": ("mix", "ppl", 0), "mix-kl": ("mix", "kl", 0), "mix-ppl+kl": ("mix", "ppl+kl", 0),
            "mix-ppl-refit": ("mix", "ppl", 32)}
CACHE = Path("storage/bench-quality")


class Evaluator:
    """Held-out perplexities (and tasks) of in-memory models, cached per model fingerprint."""

    def __init__(self, tokenizer, limit: int):
        self.tokenizer, self.limit = tokenizer, limit
        CACHE.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, model, tasks: bool) -> dict:
        plan = evaluate.EvalPlan(corpora=CORPORA, sequences=64, tasks=tuple(TASKS) if tasks else (), limit=self.limit,
                                 stereoset=False)
        results = evaluate.ResultsFile(CACHE / f"{name}.json", model_io.fingerprint(model), name)
        out = evaluate.run(model, self.tokenizer, plan, results, progress=False, log=lambda m: print(f"  {name} {m}"))
        row = {c: out[f"ppl/{c}/seq256/64"]["ppl"] for c in CORPORA}
        if tasks:
            row.update({t: out[f"task/{t}/{self.limit}"][m] for t, m in TASKS.items()})
        return row


def workspace(base, data: str, storage: str) -> Workspace:
    roles = {**DATA[data], "test": RoleSpec("wikitext2-test", 0, 64)}
    return Workspace.open(dataclasses.replace(base, data=roles, storage=storage, name=f"quality-{data}"))


def bo_best(ws, comp, base, variant: str, config: str, seed: int, trials: int, storage: str):
    data, objective, refit_sequences = VARIANTS[variant]
    label = study_label(config, seed) if variant == "wiki-ppl" \
        else f"quality-{variant}-{config.replace(':', '-')}-s{seed}"
    cfg = dataclasses.replace(config_search(base.search, config, seed), objective=objective,
                              refit=bool(refit_sequences), refit_sequences=refit_sequences)
    ws.study = dataclasses.replace(ws.study, name=label, search=cfg, storage=storage)
    opt = search.run(ws, comp, create=True, trials=trials, artifacts=None)
    done = sorted(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)[:trials]
    best = min(done, key=lambda t: t.value)
    return {k: int(v) for k, v in best.user_attrs["ranks"].items()}, best.user_attrs["search_ppl"]


def finetune(model, tokenizer, base, tag: str, steps: int, lr: float, rank: int, distill: float = 0.0, teacher=None,
             lora_dense: bool = True):
    """LoRA on the study's train role (what `bolaco finetune` reads); tag names the model (row and seed, or
    "dense") in the checkpoint folder; lora_dense: also on the projections the rank map keeps dense."""
    dense = tag == "dense"
    cfg = dataclasses.replace(base.finetune, steps=steps, lr=lr, lora_r=rank, lora_alpha=2 * rank, warmup=steps // 20,
                              variant="lora", checkpoint_every=max(25, steps // 4), distill=distill,
                              lora_dense=lora_dense)
    spec = base.data["train"]
    train = role_sequences({"train": spec}, tokenizer, base.seq_len)["train"]
    key = f"{tag}-{steps}-{lr}-{rank}-{spec}" + (f"-kd{distill}" if distill else "") + ("-ld" if lora_dense else "")
    t = time.perf_counter()
    tuner = SubspaceTuner(model, cfg, teacher=teacher, dense=dense)
    tuner.fit(train, checkpoint=CACHE / "finetune" / key)
    return tuner.merge(), time.perf_counter() - t, steps * cfg.batch_size * base.seq_len


def refit_steps(profile: cProfile.Profile) -> list[tuple[str, float]]:
    """Where an uncached refit's seconds go, from cProfile's cumulative times of bolaco.decompose.closed_loop."""
    cum = {}
    for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in pstats.Stats(profile).stats.items():
        if file.endswith("closed_loop.py"):
            cum[name] = cum.get(name, 0.0) + ct
    stats, partial = cum["add"], cum["_pair_stats"] - cum["add"]
    return [("float64 statistics of the paired inputs (PairAccumulator.add)", stats),
            ("compressed block up to each record, in the in-block order (_pair_stats)", partial),
            ("the fits (fit_linear)", cum["fit_linear"]),
            ("held-out check (_worse_than_open_loop)", cum["_worse_than_open_loop"]),
            ("the rest: the dense pass and the compressed pass of every block",
             cum["refit"] - stats - partial - cum["fit_linear"] - cum["_worse_than_open_loop"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--variants", nargs="+", default=["wiki-ppl", "wiki-ppl+kl", "wiki-kl", "mix-ppl"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant-seeds", nargs="*", default=[], metavar="VARIANT=S,S",
                    help="fewer (or other) seeds for some variants, e.g. wiki-kl=0")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--config", default="botorch:groups", help="sampler:space of the BO studies (bench/search.py)")
    ap.add_argument("--limit", type=int, default=200, help="rows per zero-shot task")
    ap.add_argument("--ft-steps", type=int, help="post-training steps (default: the study's finetune.steps; 0: none)")
    ap.add_argument("--ft-lr", type=float, help="default: the study's finetune.lr")
    ap.add_argument("--ft-rank", type=int, help="LoRA rank (default: the study's finetune.lora_r)")
    ap.add_argument("--ft-sweep", action="store_true", help="also a short sweep of LoRA rank x learning rate")
    ap.add_argument("--ft-distill", type=float, default=0.0,
                    help="> 0: also the same LoRA with this weight x KL(dense || model) added to the loss")
    ap.add_argument("--ft-row", help="the row to post-train (default: the best BO row by the geometric mean)")
    ap.add_argument("--ft-lora-dense-off", action="store_true",
                    help="also the LoRA without the layers the rank map keeps dense (finetune.lora_dense: false)")
    ap.add_argument("--ridges", type=float, nargs="*", default=[0.01, 1.0],
                    help="refit shrinkage values to compare on the uniform map, besides the study's")
    ap.add_argument("--refit-cost", action="store_true",
                    help="also time an uncached refit of the uniform map against plain forward passes")
    ap.add_argument("--uniform-tasks", action="store_true", help="zero-shot tasks on the uniform row too")
    ap.add_argument("--storage", default="sqlite:///storage/bench.db")
    args = ap.parse_args()
    base = load_study(args.study)
    args.ft_steps = base.finetune.steps if args.ft_steps is None else args.ft_steps
    args.ft_lr = base.finetune.lr if args.ft_lr is None else args.ft_lr
    args.ft_rank = base.finetune.lora_r if args.ft_rank is None else args.ft_rank
    variant_seeds = {v: [int(s) for s in seeds.split(",")] for v, _, seeds in
                     (item.partition("=") for item in args.variant_seeds)}
    spaces = {}
    for variant in args.variants:
        spaces.setdefault(VARIANTS[variant][0], []).append(variant)
    rows, columns = {}, list(CORPORA) + list(TASKS)
    dense_model, tokenizer = model_io.load(base.model)
    ev = Evaluator(tokenizer, args.limit)
    dense = ev("dense", dense_model, tasks=True)
    del dense_model
    costs = []
    chosen = {}   # row name -> (variant, seed, ranks, ws, comp) of the median seed
    for data, variants in spaces.items():
        ws = workspace(base, data, args.storage)
        comp = ws.compressor()
        if data == next(iter(spaces)):   # the uniform rows, with the first variant's calibration
            uniform = comp.budget.uniform(base.remove)
            comp.apply(uniform)
            rows["uniform"] = [ev("uniform", ws.model, tasks=args.uniform_tasks)]
            for ridge in sorted(set(args.ridges) | {base.refit_ridge}):
                ws.study = dataclasses.replace(ws.study, refit_ridge=ridge)
                layers = ws.refit(comp, uniform)
                comp.apply(uniform, layers)
                rows[f"uniform + refit (ridge {ridge})"] = [ev(f"uniform-refit-{ridge}", ws.model, tasks=False)]
                comp.restore()
            ws.study = dataclasses.replace(ws.study, refit_ridge=base.refit_ridge)
            if args.refit_cost:   # an uncached refit against plain forward passes over the same tokens
                forward = [perplexity(ws.model, ws.data["calibration"], base.batch_size, progress=False).seconds]
                profile = cProfile.Profile()
                t = time.perf_counter()
                profile.runcall(ws.refit, comp, uniform, cache=False, progress=False)
                refit_s = time.perf_counter() - t
                forward.append(perplexity(ws.model, ws.data["calibration"], base.batch_size, progress=False).seconds)
                forward_s = statistics.mean(forward)
                costs = [["refit of the uniform map (uncached)", f"{refit_s:.0f}", f"{refit_s / forward_s:.2f}"],
                         *[[f"  {step}", f"{s:.0f}", f"{s / forward_s:.2f}"] for step, s in refit_steps(profile)],
                         ["plain forward over the calibration set (before and after, mean)", f"{forward_s:.0f}",
                          "1.00"]]
        for variant in variants:
            found = []
            for seed in variant_seeds.get(variant, args.seeds):
                ranks, search_ppl = bo_best(ws, comp, base, variant, args.config, seed, args.trials, args.storage)
                found.append((search_ppl, seed, ranks))
            median = sorted(found)[len(found) // 2]
            for refit in (False, True):
                name = f"BO {variant}" + (" + refit" if refit else "")
                rows[name] = []
                for _search_ppl, seed, ranks in found:
                    comp.apply(ranks, ws.refit(comp, ranks) if refit else None)
                    tag = f"{variant}-s{seed}{'-refit' if refit else ''}"
                    rows[name].append(ev(tag, ws.model, tasks=(seed == median[1])))
                    comp.restore()
                chosen[name] = (variant, median[1], median[2], ws, comp, refit)
    dense_row = dense

    def geo(row):   # geometric mean of the perplexity ratios: the criterion that picks the default
        return math.exp(statistics.mean(math.log(row[c] / dense_row[c]) for c in CORPORA))

    table = []
    for name, runs in rows.items():
        cells = []
        for c in columns:
            vals = [r[c] / dense_row[c] for r in runs if c in r]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.2f}")
            else:
                cells.append(f"{statistics.median(vals):.2f} [{min(vals):.2f}-{max(vals):.2f}]")
        table.append([name, len(runs), *cells, f"{statistics.median(geo(r) for r in runs):.2f}"])
    best = min((n for n in rows if n.startswith("BO")), key=lambda n: statistics.median(geo(r) for r in rows[n]))
    dense_cells = [f"{dense_row[c]:.2f}" if c in CORPORA else f"{100 * dense_row[c]:.1f} %" for c in columns]
    print_table(f"Held-out quality on SmolLM2-135M at {base.remove:.0%} removed, ratios to dense (perplexity: lower is "
                f"better; accuracy: kept share). BO: {args.config}, {args.trials} trials, seeds {args.seeds}"
                f"{''.join(' (' + v + ': ' + str(s) + ')' for v, s in variant_seeds.items())}; tasks: "
                f"first {args.limit} rows, on the median seed",
                ["model", "seeds", *columns, "geo-mean ppl ratio"],
                [["dense (absolute)", "-", *dense_cells, "1.00"], *table])
    print(f"\nbest row by the geometric mean of the perplexity ratios: {best}")
    if costs:
        print_table("Refit cost on this CPU (calibration 128 x 256 tokens)", ["step", "seconds", "x forward"], costs)

    if args.ft_steps:
        row = args.ft_row or best
        variant, seed, ranks, ws, comp, refit = chosen[row]
        comp.apply(ranks, ws.refit(comp, ranks) if refit else None)
        src = export(ws.model, ws.tokenizer, ranks, CACHE / "best", {"method": base.method, "row": row})
        comp.restore()
        lora_dense = base.finetune.lora_dense
        settings = [(args.ft_rank, args.ft_lr, args.ft_steps, 0.0, lora_dense)]
        if args.ft_sweep:
            settings = [(r, lr, max(50, args.ft_steps // 4), 0.0, lora_dense)
                        for r in (8, 32) for lr in (1e-4, 3e-4, 1e-3)] + settings
        if args.ft_distill:
            settings.append((args.ft_rank, args.ft_lr, args.ft_steps, args.ft_distill, lora_dense))
        if args.ft_lora_dense_off:
            settings.append((args.ft_rank, args.ft_lr, args.ft_steps, 0.0, False))
        model_tag = f"{variant}-s{seed}{'-refit' if refit else ''}"
        ft_rows = []
        for rank, lr, steps, distill, ld in settings:
            model, _ = load_compressed(src, fuse=False)
            teacher = model_io.load(base.model)[0] if distill else None
            model, seconds, tokens = finetune(model, tokenizer, base, model_tag, steps, lr, rank, distill, teacher, ld)
            del teacher
            tag = (f"ft-{model_tag}-r{rank}-lr{lr}-s{steps}" + (f"-kd{distill}" if distill else "")
                   + ("-ld" if ld else ""))
            final = steps == args.ft_steps and rank == args.ft_rank and lr == args.ft_lr and ld == lora_dense
            r = ev(tag, model, tasks=final)
            how = (f"r {rank}, lr {lr}, {steps} steps" + (f", distill {distill}" if distill else "")
                   + ("" if ld else ", low-rank layers only"))
            ft_rows.append([f"{row} + LoRA ({how})", tokens, f"{seconds:.0f}",
                            *(f"{r[c] / dense_row[c]:.2f}" if c in r else "-" for c in columns)])
            if final and not distill:   # the baseline: LoRA on every projection of the dense model
                dmodel, _ = model_io.load(base.model)
                dmodel, dseconds, _ = finetune(dmodel, tokenizer, base, "dense", steps, lr, rank)
                d = ev(f"dense-ft-r{rank}-lr{lr}-s{steps}", dmodel, tasks=True)
                ft_rows.append([f"dense + the same LoRA (r {rank}, lr {lr}, {steps} steps)", tokens, f"{dseconds:.0f}",
                                *(f"{d[c] / dense_row[c]:.2f}" for c in columns)])
                ft_rows.append(["compressed + LoRA relative to dense + LoRA", "-", "-",
                                *(f"{r[c] / d[c]:.2f}" for c in columns)])
        print_table(f"Post-training on the study's train role {describe(base.data['train'])} (general web text; the "
                    "reported C4 column is the same source, other documents), ratios to the dense model without "
                    "post-training",
                    ["model", "training tokens", "seconds", *columns], ft_rows)
    Path("storage/bench-quality/summary.json").write_text(json.dumps({"dense": dense_row, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
