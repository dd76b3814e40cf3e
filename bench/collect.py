"""Collect throughput vs a plain forward over the same tokens, peak memory, cache size, and the dense
baseline perplexity of SmolLM2 on WikiText-2 test at seq_len 2048 and 256.

    .venv/bin/python bench/collect.py [--calibration 128] [--partitions 4] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from bolaco.data import tokenize_corpus
from bolaco.evaluate.perplexity import perplexity
from bolaco.workspace import Workspace
from common import bench_study, print_table


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def forward_seconds(module, sequences, batch_size):
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            module(input_ids=sequences[i:i + batch_size], use_cache=False)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study = bench_study(args.study, args.calibration, 32, 16, args.partitions, f"{tmp}/cache")
        ws = Workspace.open(study)
        cal = ws.data["calibration"]
        tokens = cal.numel()
        forward_seconds(ws.model, cal[:2], 2)   # warm-up
        full = forward_seconds(ws.model, cal, study.batch_size)
        stack = forward_seconds(ws.model.model, cal, study.batch_size)
        base_rss, base_peak = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        cache = ws.covariances()
        collect_s = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        size = sum(p.stat().st_size for p in Path(cache.store.root).rglob("*") if p.is_file())
        rows = [["plain forward, whole LM (with lm_head)", tokens / full, full / full],
                ["plain forward, decoder stack only", tokens / stack, stack / full],
                ["collect (block by block, 4 records per block)", tokens / collect_s, collect_s / full],
                ["collect / decoder-stack forward", "", collect_s / stack]]
        mem = [["RSS after loading model and data (MiB)", base_rss],
               ["peak RSS before collect (MiB)", base_peak],
               ["peak RSS during collect (MiB)", peak],
               ["covariance cache on disk (MiB)", size / 2**20]]
    print_table(f"Collect on SmolLM2: {args.calibration}x{study.seq_len} calibration tokens, P={args.partitions}, "
                f"batch {study.batch_size}, {torch.get_num_threads()} threads",
                ["pass", "tokens/s", "seconds / plain forward"], rows)
    print_table("Memory and disk", ["what", "MiB"], mem)
    if not args.skip_baseline:
        base = []
        for seq_len in (2048, 256):
            seqs = tokenize_corpus("wikitext2-test", ws.tokenizer, seq_len)
            r = perplexity(ws.model, seqs, batch_size=max(1, 2048 // seq_len))
            base.append([seq_len, len(seqs), r.tokens, r.ppl, r.seconds])
        print_table("Dense SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), WikiText-2 raw test, whole split",
                    ["seq_len", "windows", "predicted tokens", "ppl", "seconds"], base)


if __name__ == "__main__":
    main()
