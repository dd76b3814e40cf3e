"""Post-training on SmolLM2 at the study's budget: test perplexity of the best BO allocation before and after
LoRA-in-the-subspace and the diagonal-scaling variant, with training tokens and wall time.

    .venv/bin/python bench/posttrain.py [--steps 100] [--storage sqlite:///storage/bench.db]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from bolaco.data import role_sequences
from bolaco.export import count_params, export, load_compressed
from bolaco.finetune import SubspaceTuner
from bolaco.perplexity import perplexity
from bolaco.search import best_ranks
from bolaco.study import load_study
from bolaco.workspace import Workspace
from common import print_table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--storage", default="sqlite:///storage/bench.db", help="where the BO study ran")
    ap.add_argument("--name", default="bench-smollm2-20", help="study name used by bench/search.py")
    ap.add_argument("--steps", type=int)
    args = ap.parse_args()
    study = load_study(args.study)
    ranks, best = best_ranks(dataclasses.replace(study, name=args.name, storage=args.storage))
    ws = Workspace.open(study)
    dense_test = perplexity(ws.model, ws.data["test"], study.batch_size).ppl
    comp = ws.compressor()
    comp.apply(ranks)
    rows = [["dense", "-", "-", "-", dense_test, "-"]]
    with tempfile.TemporaryDirectory() as tmp:
        src = export(ws.model, ws.tokenizer, ranks, f"{tmp}/best", {"method": study.method})
        train = role_sequences({"train": study.data["calibration"], "test": study.data["test"]}, ws.tokenizer,
                               study.seq_len)["train"]
        before = perplexity(ws.model, ws.data["test"], study.batch_size).ppl
        rows.append([f"BO best (trial {best.number}), no post-training", "-", "-", "-", before,
                     f"{before / dense_test:.2f}x"])
        for variant in ("lora", "scaling"):
            cfg = dataclasses.replace(study.finetune, variant=variant,
                                      **({"steps": args.steps} if args.steps else {}))
            model, _ = load_compressed(src)
            params = count_params(model)
            t = time.perf_counter()
            tuner = SubspaceTuner(model, cfg)
            tuner.fit(train)
            model = tuner.merge()
            seconds = time.perf_counter() - t
            assert count_params(model) == params
            after = perplexity(model, ws.data["test"], study.batch_size).ppl
            tokens = cfg.steps * cfg.batch_size * cfg.grad_accum * study.seq_len
            rows.append([f"BO best + {variant}", cfg.steps, tokens, f"{seconds:.0f}", after, f"{after / dense_test:.2f}x"])
    print_table(f"Post-training on SmolLM2, {study.remove:.0%} removed, train = calibration split "
                f"({tuple(train.shape)}), test {tuple(ws.data['test'].shape)} WikiText-2, {torch.get_num_threads()} threads",
                ["model", "steps", "training tokens", "seconds", "test ppl", "vs dense"], rows)


if __name__ == "__main__":
    main()
