"""The `bolaco` command: one subcommand per stage, each reading a study file; flags override the file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .errors import BolacoError
from .evaluate import DEFAULT_CORPORA


def _study(args):
    from .study import load_study
    study = load_study(args.study, args.set or [])
    # the storage URL may hold a password: $BOLACO_STORAGE keeps it off command lines (`ps` shows those to all)
    return study.with_overrides(model=args.model, data_dir=args.data_dir, cache_dir=args.cache_dir,
                                storage=args.storage or os.environ.get("BOLACO_STORAGE") or None)


def cmd_collect(args) -> None:
    from .workspace import Workspace
    ws = Workspace.open(_study(args), device=args.device)
    t = time.perf_counter()
    cache = ws.covariances()
    print(f"covariance cache complete: {cache.store.root} ({time.perf_counter() - t:.0f} s)")


def cmd_compress(args) -> None:
    from .workspace import Workspace
    if not args.uniform:
        raise BolacoError("compress needs an allocation: --uniform "
                          "(the searched allocations come from `bolaco search`)")
    study = _study(args)
    ws = Workspace.open(study, device=args.device)
    comp = ws.compressor()
    ranks = comp.budget.uniform(study.remove, study.search.dense)
    ws.export(comp, ranks, args.out or f"out/{study.name}-uniform", {"allocation": "uniform"})


def cmd_speed(args) -> None:
    from . import model as model_io
    from .arch import adapter_for
    from .decompose import make_budget
    from .evaluate.speed import time_types
    study = _study(args)
    model, _ = model_io.load(study.model, dtype=study.dtype)       # for the shapes only
    adapter = adapter_for(model)
    ranks = make_budget(adapter, study.method, study.rank_multiple).uniform(study.remove, study.search.dense)
    records = {r: {lid.split(".")[1]: (adapter.linears[lid].d_in, adapter.linears[lid].d_out, ranks[lid])
                   for lid in lids if lid in ranks} for r, lids in adapter.block_records(0).items()}
    device = args.device or "cpu"
    timings = time_types({r: s for r, s in records.items() if s}, args.batch, device, getattr(torch, study.dtype))
    print(f"block 0 at the uniform allocation of {study.remove:.0%} removed, batch {args.batch}, one token per row, "
          f"{device}; microseconds per step of the projections that read one input:")
    print(f"{'type':>8} {'rank':>6} {'all factorised':>15} {'this one dense':>15}  faster")
    for t in timings:
        print(f"{t.type:>8} {t.rank:>6} {t.factorised_us:>15.1f} {t.dense_us:>15.1f}  "
              f"{'dense' if t.keep_dense else 'factorised'}")
    dense = sorted(set(study.search.dense) | {t.type for t in timings if t.keep_dense},
                   key=adapter.types.index)
    if dense == sorted(study.search.dense, key=adapter.types.index):
        print("every searched type is at least as fast factorised: nothing to change")
    else:
        print(f"keep dense for serving at batch {args.batch} here (the budget goes to the other types): "
              f"--set 'search.dense=[{', '.join(dense)}]', or `dense: [{', '.join(dense)}]` in the study file")


def cmd_export(args) -> None:
    from .search import best_ranks, study_name
    from .workspace import Workspace
    study = _study(args)
    if args.ranks:
        try:
            ranks = {str(k): int(v) for k, v in json.loads(open(args.ranks).read()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise BolacoError(f"cannot read rank map {args.ranks}: {exc}")
        extra = {"allocation": f"rank map {args.ranks}"}
    else:   # the best trial so far; workers may still be running
        ranks, best = best_ranks(study)
        extra = {"allocation": f"best trial {best.number} of study {study_name(study)}",
                 "search_ppl_at_search_time": best.user_attrs["search_ppl"]}
    ws = Workspace.open(study, device=args.device)
    comp = ws.compressor()
    ws.export(comp, ranks, args.out or f"out/{study.name}", extra)


def _search(args, create: bool) -> None:
    from . import search
    from .workspace import Workspace
    study = _study(args)
    search.open_storage(study.storage)   # fail fast on a bad URL, before loading the model
    ws = Workspace.open(study, device=args.device)
    opt = search.run(ws, ws.compressor(), create=create, trials=args.trials)
    done = [t for t in opt.trials if t.value is not None]
    if done:
        best = opt.best_trial
        print(f"best trial {best.number}: search ppl {best.user_attrs['search_ppl']:.3f} (objective "
              f"{study.search.objective} {best.value:.4f}), removed {best.user_attrs['compression']:.2%} of the "
              "decomposable parameters")


def cmd_search(args) -> None:
    _search(args, create=True)


def cmd_worker(args) -> None:
    _search(args, create=False)


def cmd_surgical(args) -> None:
    from .search import surgical
    from .workspace import Workspace
    study = _study(args)
    ws = Workspace.open(study, device=args.device)
    comp = ws.compressor()
    t = time.perf_counter()
    ranks, summary = surgical.run(ws, comp)
    summary["seconds"] = round(time.perf_counter() - t, 1)
    print(f"surgical: {summary['evaluations']} evaluations, {summary['seconds']:.0f} s, removed "
          f"{summary['removed']:.2%} of the decomposable parameters"
          + ("" if summary["reached_budget"] else f" (the metric forbids more; budget was {study.remove:.0%})"))
    ws.export(comp, ranks, args.out or f"out/{study.name}-surgical",
              {"allocation": "surgical (SFSD)", "surgical": summary})


def cmd_dashboard(args) -> None:
    # served from this process: the storage URL (and its password) never appears on a command line `ps` shows
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi
    from .search import masked_url, open_storage

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *_args):   # no line per HTTP request
            pass

    study = _study(args)
    storage = open_storage(study.storage)
    Path(args.artifact_dir).mkdir(parents=True, exist_ok=True)
    app = wsgi(storage, artifact_store=FileSystemArtifactStore(args.artifact_dir))
    try:
        server = make_server(args.host, args.port, app, handler_class=QuietHandler)
    except OSError as exc:
        raise BolacoError(f"the dashboard cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): "
                          "choose another port with --port (make dashboard PORT=...)")
    print(f"optuna-dashboard for {masked_url(study.storage)} on http://{args.host}:{args.port} (Ctrl-C stops it)",
          flush=True)
    with server:
        server.serve_forever()


def cmd_finetune(args) -> None:
    import hashlib
    from pathlib import Path
    from .data import describe, role_sequences, same_source
    from .export import ExportMeta, count_params, export, load_compressed
    from .finetune import SubspaceTuner
    from .evaluate.perplexity import perplexity
    study = _study(args)
    cfg = study.finetune
    source = Path(args.source or f"out/{study.name}")
    if not (source / "bolaco.json").is_file():
        raise BolacoError(f"no exported bolaco model at {source}: run `make export` (the best trial) "
                          "or pass --from DIR")
    model, tokenizer = load_compressed(source, device=args.device, fuse=False)   # it will be trained
    meta = ExportMeta.read(source)
    roles = {"train": study.data.get("train", study.data.get("calibration")),
             **{r: study.data[r] for r in ("search", "test") if r in study.data}}
    if roles["train"] is None:
        raise BolacoError(f"study '{study.name}' names no data.train or data.calibration to train on")
    shared = same_source(roles["train"], roles["test"]) if "test" in roles else []
    if shared:   # disjoint sequences, same source: the test figure then measures adaptation, not recovery
        print(f"warning: the training text ({describe(roles['train'])}) comes from the same source as the test set "
              f"({', '.join(shared)}); its test perplexity measures adaptation to that source, not recovery. "
              "Set data.train to another corpus (e.g. c4-valid) for a held-out figure.")
    data = role_sequences(roles, tokenizer, study.seq_len, study.data_dir)
    teacher = None
    if cfg.distill > 0:
        from . import model as model_io
        teacher, _ = model_io.load(study.model, dtype=study.dtype, device=args.device)

    def ppl():
        return {r: perplexity(model, data[r], study.batch_size, desc=r).ppl for r in ("search", "test") if r in data}

    before = ppl()
    print("before: " + ", ".join(f"{r} ppl {v:.2f}" for r, v in before.items()))
    key = hashlib.sha256(json.dumps([meta.ranks, meta.params, dataclasses.asdict(cfg),
                                     describe(roles["train"])]).encode()).hexdigest()[:12]
    t = time.perf_counter()
    tuner = SubspaceTuner(model, cfg, teacher=teacher)
    losses = tuner.fit(data["train"], checkpoint=Path(study.cache_dir).parent / "finetune" / key)
    seconds = time.perf_counter() - t
    model = tuner.merge()
    after = ppl()
    print("after:  " + ", ".join(f"{r} ppl {v:.2f}" for r, v in after.items()) +
          f" ({cfg.steps} steps, {cfg.steps * cfg.batch_size * cfg.grad_accum * study.seq_len:,} tokens, "
          f"{seconds:.0f} s)")
    info = dict(meta.info)
    info["finetune"] = {**dataclasses.asdict(cfg), "source": str(source), "train_data": describe(roles["train"]),
                        "same_source_as_test": shared,
                        "tokens": cfg.steps * cfg.batch_size * cfg.grad_accum * study.seq_len,
                        "seconds": round(seconds, 1), "final_loss": losses[-1] if losses else None,
                        "perplexity_before": before, "perplexity_after": after}
    info["perplexity"] = {"seq_len": study.seq_len, **after}
    out = export(model, tokenizer, meta.ranks, args.out or f"{source}-ft-{cfg.variant}", info, study.shard_size)
    print(f"wrote {out}: {count_params(model):,} parameters (unchanged by merging)")


def cmd_eval(args) -> None:
    import bolaco
    from . import evaluate
    from . import model as model_io
    from .data import default_data_dir
    from .evaluate import ZERO_SHOT
    chosen = args.ppl or args.tasks is not None or args.stereoset
    plan = evaluate.EvalPlan(
        corpora=tuple(args.corpus) if (args.ppl or not chosen) else (), seq_len=args.seq_len,
        sequences=None if args.full else args.sequences,
        tasks=(tuple(args.tasks) or ZERO_SHOT) if args.tasks is not None else () if chosen else ZERO_SHOT,
        limit=None if args.full else args.limit, stereoset=args.stereoset or not chosen,
        stereoset_limit=None if args.full else args.stereoset_limit, batch_size=args.batch_size,
        data_dir=args.data_dir)
    evaluate.check_plan(plan)
    if not args.data_dir and default_data_dir() is None:
        plan, skipped = evaluate.without_data_dir(plan)
        if skipped:
            print(f"no data directory (--data-dir, $BOLACO_DATA_DIR or ../shared/data): skipping {', '.join(skipped)}")
    path = Path(args.results) if args.results else evaluate.results_path(args.model)
    print(f"bolaco eval {args.model}: {plan.describe()}{'' if args.full else ' (--full for everything)'}")
    model, tokenizer = bolaco.load(args.model, device=args.device)
    results = evaluate.ResultsFile(path, model_io.fingerprint(model), args.model)
    cached = [k for k in plan.items() if k in results.results and not args.force]
    if cached:
        print(f"re-using {len(cached)} cached result(s) from {path} (--force to recompute)")
    out = evaluate.run(model, tokenizer, plan, results, force=args.force)
    print(f"\n{evaluate.markdown_table({args.model: out})}\n\nresults: {path}")
    if args.json:
        print(json.dumps(out, indent=1))


def cmd_report(args) -> None:
    from . import model as model_io
    from .arch import adapter_for
    from .decompose import make_budget
    from .report import build
    from .study import load_study
    study = _study(args)
    compare = [load_study(p) for p in args.compare]
    model, _ = model_io.load(study.model)       # for the layer shapes the budget counts
    adapter = adapter_for(model)
    path = build(study, make_budget(adapter, study.method, study.rank_multiple), adapter.types, adapter.n_blocks,
                 args.out or f"out/{study.name}-report", compare)
    print(f"wrote {path} and its pictures")


def cmd_families(args) -> None:
    from .arch import ADAPTERS
    for a in ADAPTERS:
        print(f"{a.name}\n  model_type: {', '.join(a.model_types)}\n  compressed: {', '.join(a.paths)}"
              + (f"\n  dense: {a.dense_note}" if a.dense_note else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bolaco", description=__doc__, epilog=EXIT_CODES)
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages of bolaco")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    def study_command(name, help_, func):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--study", required=True, help="study file (YAML) in studies/")
        s.add_argument("--model", help="override the study's model (HF id, directory, .gguf file or 'default')")
        s.add_argument("--data-dir", help="folder with the corpora that are not shipped (default ../shared/data)")
        s.add_argument("--cache-dir", help="override the cache folder (default storage/cache)")
        s.add_argument("--storage", help="override the study storage URL (e.g. postgresql+psycopg://...); "
                                             "or set $BOLACO_STORAGE, which keeps a password off the command line")
        s.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
        s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override any study-file setting, checked like the file, e.g. --set budget.remove=0.3 "
                            "--set search.sampler=tpe --set finetune.steps=200 (repeatable)")
        s.set_defaults(func=func)
        return s

    study_command("collect", "collect pooled covariances of every decomposable linear (cached, resumable)",
                  cmd_collect)

    c = study_command("compress", "compress with a uniform allocation at the study's budget and export it",
                      cmd_compress)
    c.add_argument("--uniform", action="store_true", help="the same keep ratio for every linear")
    c.add_argument("--out", help="output folder (default out/<study>-uniform)")

    v = study_command("speed", "time each projection type dense vs factorised at a serving batch size on this "
                               "device, and name the types to keep dense (search.dense)", cmd_speed)
    v.add_argument("--batch", type=int, default=1, help="rows per decoding step when serving (default 1)")

    x = study_command("export", "write the compressed model of the study's best trial (or of a rank map)",
                      cmd_export)
    x.add_argument("--ranks", help="JSON file with a rank map {\"block.type\": rank} instead of the best trial")
    x.add_argument("--out", help="output folder (default out/<study>)")

    for name, func, help_ in (("search", cmd_search, "create or resume the BO study and run its trials"),
                              ("worker", cmd_worker, "join an existing study (any machine) and run trials")):
        w = study_command(name, help_, func)
        w.add_argument("--trials", type=int, help="total finished trials to reach (default: the study file's)")

    g = study_command("surgical", "SFSD greedy rank search (search perplexity or a zero-shot task's accuracy), "
                               "then export", cmd_surgical)
    g.add_argument("--out", help="output folder (default out/<study>-surgical)")

    f = study_command("finetune", "post-train an exported model inside its low-rank subspace and merge it",
                      cmd_finetune)
    f.add_argument("--from", dest="source", help="exported model folder (default out/<study>, see make export)")
    f.add_argument("--out", help="output folder (default <from>-ft-<variant>)")

    d = study_command("dashboard", "optuna-dashboard on the study storage", cmd_dashboard)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--artifact-dir", default="storage/artifacts")

    r = study_command("report", "Markdown report with pictures: search curves, allocation heat map, "
                                "evaluation tables (from the study store and cached eval results)", cmd_report)
    r.add_argument("--compare", nargs="*", default=[], help="other study files to draw next to this one")
    r.add_argument("--out", help="output folder (default out/<study>-report)")

    e = sub.add_parser("eval", help="evaluation suite: perplexity, zero-shot tasks (lm-eval), StereoSet; "
                                     "everything unless --ppl/--tasks/--stereoset pick some")
    e.add_argument("model", nargs="?", default="default",
                   help="HF id, model directory, exported bolaco directory, .gguf file or 'default'")
    e.add_argument("--ppl", action="store_true", help="perplexity on --corpus")
    e.add_argument("--tasks", nargs="*", help="zero-shot tasks through lm-eval (no names: all seven; "
                                              "also 'wikitext', lm-eval's word perplexity)")
    e.add_argument("--stereoset", action="store_true", help="StereoSet LMS / SS / ICAT")
    e.add_argument("--corpus", nargs="+", default=list(DEFAULT_CORPORA))
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--sequences", type=int, default=64, help="perplexity on the first N sequences of each corpus")
    e.add_argument("--limit", type=int, default=200, help="rows per zero-shot task")
    e.add_argument("--stereoset-limit", type=int, default=1000, help="first N StereoSet examples")
    e.add_argument("--full", action="store_true", help="whole corpora, every task row, all of StereoSet")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--data-dir", help="folder with PTB, C4, the tasks and StereoSet (default ../shared/data)")
    e.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    e.add_argument("--results", help="results JSON (default: next to the model, or storage/eval/)")
    e.add_argument("--force", action="store_true", help="recompute results that are cached")
    e.add_argument("--json", action="store_true", help="also print the results as JSON")
    e.set_defaults(func=cmd_eval)

    sub.add_parser("families", help="the model families bolaco compresses, and which projections in each"
                   ).set_defaults(func=cmd_families)
    return p


EXIT_CODES = "exit codes: 0 done, 2 a usage or input error (one line says what to do), 130 interrupted (Ctrl-C)"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests swap it between calls of main)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


_HANDLER = _StderrHandler()


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """bolaco's library modules log (warnings such as a recomputed cache block); the command shows them."""
    log = logging.getLogger("bolaco")
    if _HANDLER not in log.handlers:
        _HANDLER.setFormatter(logging.Formatter("bolaco: %(message)s"))
        log.addHandler(_HANDLER)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if getattr(args, "device", "unset") is None:
        args.device = "cuda" if torch.cuda.is_available() else None
    try:
        args.func(args)
    except BolacoError as exc:
        print(f"bolaco: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bolaco: interrupted; finished work is cached and resumes on the next run", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
