"""Does a low-rank lm_head pay? Held-out perplexity of SmolLM2 with its lm_head replaced by feature-space factors
(the top-r principal directions of the logits, computed through the head's input covariance: the SVD of W C^1/2),
against the dense head, in one run.

    .venv/bin/python bench/head.py [--ranks 384 256] [--calibration 64] [--sequences 32]

Calibration: WikiText-2 valid [0:N]; reported: WikiText-2 test and C4 [0:M], which calibration never read.
"""

from __future__ import annotations

import argparse

import torch

from bolaco import model as model_io
from bolaco.data import RoleSpec, role_sequences
from bolaco.evaluate.perplexity import perplexity
from bolaco.layers import LowRankLinear
from common import print_table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[384, 256])
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=32)
    args = ap.parse_args()
    model, tok = model_io.load("default")
    data = role_sequences({"calibration": RoleSpec("wikitext2-valid", 0, args.calibration),
                           "test": RoleSpec("wikitext2-test", 0, args.sequences),
                           "search": RoleSpec("c4-valid", 0, args.sequences)}, tok, 256)
    d = model.config.hidden_size
    cov, n = torch.zeros(d, d, dtype=torch.float64), 0
    with torch.inference_mode():
        for batch in data["calibration"].split(8):
            h = model.model(input_ids=batch).last_hidden_state.reshape(-1, d).double()
            cov, n = cov + h.T @ h, n + h.shape[0]
    evals, evecs = torch.linalg.eigh(cov / n)
    weight = model.lm_head.weight.detach().double()
    u = torch.linalg.svd(weight @ (evecs * evals.clamp_min(0).sqrt()) @ evecs.T, full_matrices=False)[0]
    dense_head, rows = model.lm_head, []
    for r in [None, *args.ranks]:
        model.lm_head = dense_head if r is None else LowRankLinear.from_factors(
            (u[:, :r].T @ weight).float().contiguous(), u[:, :r].float().contiguous(), None)
        ppl = {k: perplexity(model, data[k], 8, progress=False).ppl for k in ("test", "search")}
        rows.append(["dense" if r is None else f"rank {r}", sum(p.numel() for p in model.lm_head.parameters()),
                     f"{ppl['test']:.2f}", f"{ppl['search']:.2f}"])
    print_table(f"SmolLM2 lm_head, dense vs feature-space low-rank (calibration WikiText-2 valid [0:{args.calibration}]"
                f"; perplexity on the first {args.sequences} x 256 tokens)",
                ["head", "head parameters", "wikitext2-test", "c4-valid"], rows)


if __name__ == "__main__":
    main()
