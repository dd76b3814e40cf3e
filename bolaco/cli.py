"""The `bolaco` command: one subcommand per stage, each reading a study file; flags override the file."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .errors import BolacoError


def _study(args):
    from .study import load_study
    study = load_study(args.study)
    return study.with_overrides(model=getattr(args, "model", None), data_dir=getattr(args, "data_dir", None),
                                cache_dir=getattr(args, "cache_dir", None))


def cmd_collect(args) -> None:
    from .workspace import Workspace
    ws = Workspace.open(_study(args))
    t = time.perf_counter()
    cache = ws.covariances()
    print(f"covariance cache complete: {cache.store.root} ({time.perf_counter() - t:.0f} s)")


def cmd_eval(args) -> None:
    from . import model as model_io
    from .data import tokenize_corpus
    from .perplexity import perplexity
    model, tokenizer = model_io.load(args.model, device=args.device)
    results = {}
    for corpus in args.corpus:
        seqs = tokenize_corpus(corpus, tokenizer, args.seq_len, args.data_dir)
        if args.sequences:
            seqs = seqs[:args.sequences]
        r = perplexity(model, seqs, args.batch_size, desc=corpus)
        results[corpus] = {"ppl": r.ppl, "tokens": r.tokens, "seq_len": args.seq_len, "seconds": round(r.seconds, 1)}
        print(f"{corpus}: ppl {r.ppl:.3f} over {r.tokens} tokens (seq_len {args.seq_len}, {r.seconds:.0f} s)")
    if args.json:
        print(json.dumps(results, indent=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bolaco", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def study_command(name, help_, func):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--study", required=True, help="study file (YAML) in studies/")
        s.add_argument("--model", help="override the study's model (HF id, directory, .gguf file or 'default')")
        s.add_argument("--data-dir", help="folder with the corpora that are not shipped (default ../shared/data)")
        s.add_argument("--cache-dir", help="override the cache folder (default storage/cache)")
        s.set_defaults(func=func)
        return s

    study_command("collect", "collect pooled covariances of every decomposable linear (cached, resumable)",
                  cmd_collect)

    e = sub.add_parser("eval", help="evaluate a model (dense, GGUF or exported bolaco directory)")
    e.add_argument("model", nargs="?", default="default")
    e.add_argument("--ppl", action="store_true", help="perplexity (the only evaluation so far; on by default)")
    e.add_argument("--corpus", nargs="+", default=["wikitext2-test"])
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--sequences", type=int, help="evaluate only the first N sequences")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--data-dir")
    e.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    e.add_argument("--json", action="store_true", help="also print the results as JSON")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
