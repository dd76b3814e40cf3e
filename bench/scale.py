"""Memory and time per stage at real widths, measured against `bolaco plan`: random-init LLaMA-shaped models (the
widths of Llama-3 1B, 8B, 70B) at two depths, each stage run through bolaco's own code (collect, bases, search
trials, refit), the peak host (and GPU) memory of each stage, and the plan's estimate of the same.

    .venv/bin/python bench/scale.py [--width 1b] [--blocks 2 8] [--calibration 8] [--seq-len 256] [--search 4]
                                    [--dtype float32] [--device cpu] [--trials 2]

Apart from the weights (and the bases the search holds, which are per block like the weights), no stage's memory may
grow with depth: collect, bases and refit stream one block at a time. Timings need no trained weights; the real
vocabulary is replaced by 1,024 tokens (the output layer is timed by the plan apart).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bolaco.arch import adapter_for
from bolaco.calibrate import collect
from bolaco.decompose import Compressor, Decomposition, build_bases, refit
from bolaco.evaluate.perplexity import perplexity
from bolaco.layers import ColumnsLinear, LowRankLinear, NarrowLinear, RowsLinear
from bolaco.plan import measure, peak, plan, reset_peak, resident
from bolaco.study import Study
from common import print_table

# hidden, intermediate, heads, kv heads
WIDTHS = {"tiny": (512, 1536, 8, 4), "1b": (2048, 8192, 32, 8), "8b": (4096, 14336, 32, 8),
          "70b": (8192, 28672, 64, 8)}
GB = 2**30


def build(width: str, blocks: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    hidden, inter, heads, kv = WIDTHS[width]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=blocks, vocab_size=1024,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():   # small random weights: finite activations through the blocks
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


COMPRESSED = (LowRankLinear, RowsLinear, ColumnsLinear, NarrowLinear)    # the layers a trial's map installs


def tensor_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


def stage(device, fn):
    """(result, seconds, peak host bytes, peak device bytes) of one stage."""
    reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (out, time.perf_counter() - t, *peak(device))


def study_for(model, folder: Path, args) -> Study:
    model.config.save_pretrained(folder)       # the plan reads the configuration only
    roles = {"calibration": [{"corpus": "wikitext2-valid", "start": 0, "sequences": args.calibration}],
             "search": [{"corpus": "wikitext2-valid", "start": -args.search, "sequences": args.search}],
             "selection": [{"corpus": "wikitext2-valid", "start": args.calibration, "sequences": args.search}]}
    return Study.model_validate({"name": "scale", "model": {"path": str(folder), "dtype": args.dtype},
                                 "seq_len": args.seq_len, "data": roles, "cache_dir": str(folder / "cache"),
                                 "collect": {"partitions": 1, "batch_size": args.batch_size},
                                 "evaluate": {"batch_size": args.batch_size},
                                 "decompose": {"modules": ["mlp", "qk", "vo"], "refit": True},
                                 "search": {"trials": args.trials, "design": ["uniform"], "select_top": 1}})


def run_depth(blocks: int, args, device: torch.device, process: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"bolaco-scale-{blocks}-"))
    model = build(args.width, blocks, getattr(torch, args.dtype), str(device))
    study = study_for(model, folder, args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 1024, (args.calibration, args.seq_len), generator=g)
    search_ids = torch.randint(0, 1024, (args.search, args.seq_len), generator=g)
    estimate = plan(study, str(device), measure(study, model.config, device), process=process)
    out = {"weights": weights, "plan": estimate, "result": {"collect": 0, "bases": 0}}
    cov, *out["collect"] = stage(device, lambda: collect(model, calib, folder / "cache", batch_size=args.batch_size,
                                                         progress=False, device=device))
    decomposition = Decomposition(adapter_for(model), "feature", ("mlp", "qk", "vo"), 8)
    bases, *out["bases"] = stage(device, lambda: build_bases(decomposition, cov, progress=False, device=device))
    comp = Compressor(decomposition, bases)
    budget = decomposition.budget
    levels = budget.fit({u: 0.8 for u in budget.units}, budget.target(0.2))

    def trials() -> float:
        """Reads the bases into memory (the search does it once; the plan counts it apart), then the trials;
        returns the seconds of the read."""
        start = time.perf_counter()
        comp.bases.load(device)
        read = time.perf_counter() - start
        for _ in range(args.trials):
            comp.apply(levels)
            perplexity(model, search_ids, args.batch_size, progress=False)
        return read
    read, seconds, *memory = stage(device, trials)
    out["search"] = [(seconds - read) / args.trials, *memory]
    held = sum(m.prepared_bytes() for m in decomposition.methods)          # the bases, loaded for the trials
    out["result"]["search"] = held + tensor_bytes(m for m in model.modules() if isinstance(m, COMPRESSED))
    comp.restore()
    refitted, *out["refit"] = stage(device, lambda: refit(comp, levels, calib, batch_size=args.batch_size,
                                                          progress=False, device=device))
    out["result"]["refit"] = held + tensor_bytes(refitted.values())       # the bases still loaded, the layers returned
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", default="1b", choices=list(WIDTHS))
    ap.add_argument("--blocks", type=int, nargs=2, default=[2, 8])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calibration", type=int, default=8, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--search", type=int, default=4, help="search-split sequences per trial")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    process = resident()           # the interpreter and its libraries
    results = {n: run_depth(n, args, device, process) for n in args.blocks}
    rows = []
    for n, r in results.items():
        p, w = r["plan"], r["weights"]
        for name in ("collect", "bases", "search", "refit"):
            seconds, host, dev = r[name]
            est_s = {"search": p.trial_seconds, "refit": p.refit_seconds}.get(name) or p.stage(name).seconds
            est = p.stage("export" if name == "refit" else name)
            rows.append([n, name + (" (per trial)" if name == "search" else ""), f"{seconds:.1f}", f"{est_s:.1f}",
                         f"{est_s / seconds - 1:+.0%}", f"{host / GB:.2f}", f"{est.host / GB:.2f}",
                         f"{est.host / host - 1:+.0%}", f"{(host - w) / GB:.2f}",
                         f"{dev / GB:.2f}" if device.type == "cuda" else "-"])
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print_table(f"Measured vs `bolaco plan`, {args.width} width, {args.dtype}, on {on}; calibration {args.calibration} "
                f"x {args.seq_len} tokens, search split {args.search} x {args.seq_len}, batch {args.batch_size} "
                "(refit: the one the plan's export counts per candidate)",
                ["blocks", "stage", "seconds", "plan s", "plan error", "peak host GiB", "plan GiB", "plan error",
                 "above weights GiB", "peak GPU GiB"], rows)
    lo, hi = args.blocks
    growth = []
    for name in ("collect", "bases", "search", "refit"):
        above = [results[n][name][1] - results[n]["weights"] - process for n in (lo, hi)]
        work = [a - results[n]["result"][name] for a, n in zip(above, (lo, hi))]
        growth.append([name, *(f"{a / GB:.2f}" for a in above), f"{above[1] / above[0] - 1:+.0%}",
                       *(f"{w / GB:.2f}" for w in work), f"{work[1] / work[0] - 1:+.0%}"])
    print_table(f"Peak host memory above the weights and the process ({process / GB:.2f} GiB) at {lo} and {hi} "
                "blocks; then less what grows with depth like the weights: the bases a trial slices, the layers of "
                "the applied map, the refitted layers. Target: the working memory within 10 %",
                ["stage", f"{lo} blocks GiB", f"{hi} blocks GiB", "growth", f"{lo} blocks working GiB",
                 f"{hi} blocks working GiB", "growth"], growth)


if __name__ == "__main__":
    main()
