"""Perplexity of uniform allocations per method and budget on SmolLM2, apply vs eval time, bases build time,
and prefill / generation speed of an exported 20 % model against the dense one.

    .venv/bin/python bench/decompose.py [--calibration 64] [--test 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import bolaco
from bolaco.decompose.bases import METHODS, Compressor, build_bases, make_budget
from bolaco.export import count_params, export
from bolaco.evaluate.perplexity import perplexity
from bolaco.workspace import Workspace
from common import bench_study, print_table


def speed(model, ids_prefill, prompt, new_tokens):
    with torch.inference_mode():
        model(input_ids=ids_prefill[:1, :32])  # warm-up
        t = time.perf_counter()
        model(input_ids=ids_prefill, use_cache=False)
        prefill = ids_prefill.numel() / (time.perf_counter() - t)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        gen = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t)
    return prefill, gen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--search", type=int, default=32)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        study = bench_study(args.study, args.calibration, args.search, args.test, args.partitions, f"{tmp}/cache")
        ws = Workspace.open(study)
        test = ws.data["test"]
        dense = perplexity(ws.model, test).ppl
        t = time.perf_counter()
        cov = ws.covariances()
        collect_s = time.perf_counter() - t
        rows, timing = [["dense", "-", "-", dense]], []
        comps = {}
        for method in METHODS:
            t = time.perf_counter()
            bases = build_bases(ws.adapter, cov, method)
            timing.append([f"bases build ({method})", time.perf_counter() - t])
            t = time.perf_counter()
            bases.load(next(ws.model.parameters()).device, ws.adapter.linears)
            timing.append([f"bases load into memory ({method})", time.perf_counter() - t])
            comps[method] = Compressor(ws.adapter, bases, make_budget(ws.adapter, method, study.rank_multiple))
        for remove in args.budgets:
            for method, comp in comps.items():
                ranks = comp.budget.uniform(remove)
                comp.apply(ranks)
                removed = 1 - comp.budget.params(ranks) / comp.budget.decomposable
                rows.append([method, f"{remove:.0%}", f"{removed:.2%}", perplexity(ws.model, test).ppl])
                comp.restore()
        comp = comps["feature"]
        ranks = comp.budget.uniform(0.2)
        applies = []
        for _ in range(3):
            t = time.perf_counter()
            comp.apply(ranks)
            applies.append(time.perf_counter() - t)
            comp.restore()
        comp.apply(ranks)
        search_eval = perplexity(ws.model, ws.data["search"]).seconds
        apply_s = min(applies)
        timing += [["collect (calibration)", collect_s], ["apply 20 % rank map", apply_s],
                   ["eval search split", search_eval], ["apply / eval", apply_s / search_eval]]
        out = export(ws.model, ws.tokenizer, ranks, f"{tmp}/out", {"method": "feature"})
        comp.restore()
        small, _ = bolaco.load(out)
        prefill_ids, prompt = ws.data["search"][:8], ws.data["search"][:1, :32]
        d_pre, d_gen = speed(ws.model, prefill_ids, prompt, 64)
        s_pre, s_gen = speed(small, prefill_ids, prompt, 64)
        speed_rows = [["dense", count_params(ws.model), d_pre, d_gen],
                      ["feature 20 % (exported, reloaded)", count_params(small), s_pre, s_gen],
                      ["ratio", count_params(ws.model) / count_params(small), s_pre / d_pre, s_gen / d_gen]]
    print_table(f"WikiText-2 raw test perplexity, uniform allocation, seq_len {study.seq_len}, test {args.test}x"
                f"{study.seq_len} tokens, calibration {args.calibration}x{study.seq_len} from valid, "
                f"P={args.partitions}",
                ["method", "budget", "removed (decomposable)", "test ppl"], rows)
    print_table("Seconds", ["step", "seconds"], timing)
    print_table("Speed on this CPU (prefill 8x256 tokens, generation 64 tokens greedy from a 32-token prompt)",
                ["model", "parameters", "prefill tok/s", "generate tok/s"], speed_rows)


if __name__ == "__main__":
    main()
