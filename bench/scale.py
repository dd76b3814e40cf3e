"""What a study costs at real widths: random-init LLaMA-shaped models with a few blocks at the widths of Llama-3 1B,
8B and 70B, on whatever device is present. Per block: collect, bases, refit; per trial: apply, evaluation of a
search split, one sampler step; memory and disk. Totals are extrapolated to the full depth of each model.

    .venv/bin/python bench/scale.py [--shapes 1b 8b 70b] [--blocks 2] [--dtype bfloat16] [--device cuda]
                                    [--calibration 128] [--seq-len 2048] [--search 32]

Timings need no trained weights; the GGUF default is not used. On a CPU use small sizes, e.g.
    .venv/bin/python bench/scale.py --shapes tiny 1b --blocks 1 --calibration 16 --seq-len 256 --search 8 \
        --dtype float32 --vocab 1000 --routes tiny
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from bolaco.arch import adapter_for
from bolaco.calibrate import cache_bytes, collect
from bolaco.decompose.bases import build_bases, input_root, make_budget, output_basis, Compressor
from bolaco.evaluate.perplexity import perplexity
from bolaco.decompose import refit
from common import print_table

# (hidden, intermediate, heads, kv heads, full depth, vocab)
SHAPES = {"tiny": (512, 1536, 8, 4, 16, 32000), "1b": (2048, 8192, 32, 8, 16, 128256),
          "8b": (4096, 14336, 32, 8, 32, 128256), "70b": (8192, 28672, 64, 8, 80, 128256)}


def build(shape: str, blocks: int, dtype: torch.dtype, vocab: int | None) -> LlamaForCausalLM:
    hidden, inter, heads, kv, _, full_vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=blocks, vocab_size=vocab or full_vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)   # to_empty leaves buffers (inv_freq) uninitialised
    with torch.no_grad():
        for p in model.parameters():   # small random weights: finite activations through the blocks
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.eval()


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def folder_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def basis_routes(shape: str, device: torch.device) -> tuple[float, float]:
    """Seconds for the Q of one gate projection: eigh of W C W^T (d_ff x d_ff) vs Cholesky + SVD of W L."""
    hidden, inter = SHAPES[shape][:2]
    g = torch.Generator().manual_seed(0)
    f = torch.randn(hidden, hidden, generator=g, dtype=torch.float64)
    c = (f @ f.T / hidden).to(device)
    w = torch.randn(inter, hidden, generator=g, dtype=torch.float64).to(device)
    _, eigh_s = timed(lambda: torch.linalg.eigh(w @ c @ w.T), device)
    _, svd_s = timed(lambda: output_basis(w, c, input_root(c)), device)
    return eigh_s, svd_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b", "70b"])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calibration", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--search", type=int, default=32, help="search-split sequences per trial")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--vocab", type=int, help="smaller vocabulary than the real one (CPU runs)")
    ap.add_argument("--stream", action="store_true", help="keep the model in CPU memory, stream blocks to --device")
    ap.add_argument("--cache", default=None, help="cache folder (default: a temporary folder)")
    ap.add_argument("--routes", nargs="*", help="shapes whose two basis routes are timed (default: --shapes; a "
                                                "d_ff x d_ff float64 eigh takes minutes on a small CPU)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows, totals, routes = [], [], []
    for shape in args.shapes:
        depth = SHAPES[shape][4]
        model = build(shape, args.blocks, dtype, args.vocab)
        if not args.stream:
            model.to(device)
        adapter = adapter_for(model)
        g = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        calib = torch.randint(0, vocab, (args.calibration, args.seq_len), generator=g)
        search_ids = torch.randint(0, vocab, (args.search, args.seq_len), generator=g)
        root = Path(args.cache or tempfile.mkdtemp(prefix=f"bolaco-scale-{shape}-"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def forward():
            with torch.inference_mode():
                for i in range(0, len(calib), args.batch_size):
                    model.model(input_ids=calib[i:i + args.batch_size].to(device), use_cache=False)
        if not args.stream:
            _, fwd = timed(forward, device)
        cov, collect_s = timed(lambda: collect(model, calib, root, batch_size=args.batch_size, progress=False,
                                               device=device), device)
        bases, bases_s = timed(lambda: build_bases(adapter, cov, "feature", progress=False, device=device), device)
        comp = Compressor(adapter, bases, make_budget(adapter, "feature", 8))
        where, load_s = timed(lambda: bases.load(device, adapter.linears), device)
        ranks = comp.budget.uniform(0.2)
        _, apply_s = timed(lambda: comp.apply(ranks), device)
        applies = [timed(lambda: comp.apply(ranks), device)[1] for _ in range(3)]
        ev = perplexity(model, search_ids, args.batch_size, progress=False) if not args.stream else None
        comp.restore()
        _, refit_s = timed(lambda: refit(comp, ranks, calib, centred=True, batch_size=args.batch_size,
                                              progress=False, device=device), device)
        peak = peak_gib(device)
        cache_gb, full_cache = folder_gb(root), cache_bytes(adapter, 1) / args.blocks * depth / 1e9
        bases_gb = sum(folder_gb(p) for p in root.rglob("bases-*") if p.is_dir())
        tokens = calib.numel()
        per = lambda s: s / args.blocks   # noqa: E731
        rows.append([shape, f"{per(collect_s):.2f}", f"{collect_s / fwd:.2f}" if not args.stream else "-",
                     f"{per(bases_s):.2f}", f"{per(refit_s):.2f}", f"{min(applies):.3f}",
                     f"{ev.seconds:.2f}" if ev else "-",
                     f"{min(applies) / ev.seconds:.1%}" if ev else "-", where, f"{peak:.1f}",
                     f"{cache_gb / args.blocks:.2f}"])
        totals.append([shape, depth, f"{per(collect_s) * depth / 60:.1f}", f"{per(bases_s) * depth / 60:.1f}",
                       f"{per(refit_s) * depth / 60:.1f}", f"{full_cache:.1f}",
                       f"{bases_gb / args.blocks * depth:.1f}",
                       f"{ev.seconds * depth / args.blocks:.1f}" if ev else "-"])
        if shape in (args.shapes if args.routes is None else args.routes):
            routes.append([shape, *(f"{s:.2f}" for s in basis_routes(shape, device))])
        model = comp = bases = None   # free this shape before the next
        if args.cache is None:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{shape}: done ({tokens:,} calibration tokens)", flush=True)
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print_table(f"Per block / per trial on {on}, {args.dtype}, {args.blocks} blocks, calibration {args.calibration} x "
                f"{args.seq_len} tokens, search split {args.search} x {args.seq_len}"
                + (", model streamed from CPU memory" if args.stream else ""),
                ["shape", "collect s/block", "collect / plain forward", "bases s/block", "refit s/block",
                 "apply s (20 % map)", "eval s (search split)", "apply / eval", "factors in", "peak GiB",
                 "covariance+bases GB/block"], rows)
    print_table("Extrapolated to the full depth (minutes, GB; an eval of the search split scales with depth too)",
                ["shape", "blocks", "collect min", "bases min", "refit min", "covariance cache GB",
                 "bases GB", "eval s per trial"], totals)
    print_table("Basis of one gate projection (float64): eigh of W C W^T vs Cholesky + SVD of W L, seconds",
                ["shape", "eigh (d_ff x d_ff)", "Cholesky + SVD (d_ff x d)"], routes)
    print_table("One BoTorch sampler step (CPU, one thread; independent of the model's size): 42 variables",
                ["finished trials", "cold GP fit, s", "warm-started, s"], sampler_steps())


def sampler_steps() -> list[list]:
    from bolaco.search.sampler import botorch_step
    torch.set_num_threads(1)
    out = []
    for n in (30, 60, 100):
        g = torch.Generator().manual_seed(n)
        x = torch.rand(n, 42, generator=g, dtype=torch.float64)
        y = (x - 0.3).square().sum(1) + 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
        constraint = (torch.arange(42), torch.full((42,), 1 / 42, dtype=torch.float64), 0.5)
        (_, warm), cold = timed(lambda: botorch_step(x[:-1], y[:-1], None, constraint, 0), torch.device("cpu"))
        _, warm_s = timed(lambda: botorch_step(x, y, None, constraint, 1, warm), torch.device("cpu"))
        out.append([n, f"{cold:.2f}", f"{warm_s:.2f}"])
    return out


if __name__ == "__main__":
    main()
