"""A complete study on a random-init model of a real width, through the `bolaco` commands a user runs: collect,
search (bases and trials), export (selection, closed-loop refit, write), reload and evaluate, LoRA post-training.
Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the shipped WikiText-2 text.

    .venv/bin/python bench/study_e2e.py [--width 1b] [--blocks 16] [--trials 40] [--dtype bfloat16] [--device cuda]

On a CPU run it at its smallest, so that it cannot rot:
    .venv/bin/python bench/study_e2e.py --width tiny --blocks 2 --trials 4 --dtype float32 --device cpu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import bolaco
from bolaco.data import read_text
from common import bolaco as run, print_table
from scale import WIDTHS


def model_folder(folder: Path, width: str, blocks: int, dtype: str) -> None:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([read_text("wikitext2-valid")], vocab_size=4096, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    hidden, inter, heads, kv = WIDTHS[width]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=blocks, vocab_size=len(tokenizer),
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", default="1b", choices=list(WIDTHS))
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bolaco-e2e-"))
    model_folder(work / "model", args.width, args.blocks, args.dtype)
    study = work / "study.yaml"
    study.write_text(f"""name: e2e
model: {{path: {work / 'model'}, dtype: {args.dtype}}}
seq_len: {args.seq_len}
storage: sqlite:///{work}/studies.db
cache_dir: {work}/cache
data:
  calibration: {{corpus: wikitext2-valid, start: 0, sequences: 32}}
  search: {{corpus: wikitext2-valid, start: -8, sequences: 8}}
  selection: {{corpus: wikitext2-valid, start: 32, sequences: 8}}
  test: {{corpus: wikitext2-test, start: 0, sequences: 8}}
  train: {{corpus: c4-valid, start: 0, sequences: 64}}
budget: {{remove: 0.2}}
decompose: {{modules: [mlp, qk, vo], refit: true}}
search: {{trials: {args.trials}, design: [uniform, importance], startup: 4, select_top: 2, prefetch: true}}
finetune: {{steps: 10, batch_size: 4, checkpoint_every: 100}}
""")
    s = ["--study", str(study), "--device", args.device]
    seconds = {}
    for name, cmd in [("collect", ["collect", *s]), ("search (bases + trials)", ["search", *s]),
                      ("export (selection, refit, write)", ["export", *s, "--out", str(work / "out")]),
                      ("finetune (10 steps)", ["finetune", *s, "--from", str(work / "out"),
                                               "--out", str(work / "ft")])]:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run(*cmd)
        seconds[name] = (time.perf_counter() - t,
                         torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0)
    t = time.perf_counter()
    model, tokenizer = bolaco.load(work / "out", dtype=args.dtype, device_map=args.device)
    meta = json.loads((work / "out" / "bolaco.json").read_text())
    seconds["reload"] = (time.perf_counter() - t, 0.0)
    rows = [[k, f"{v:.1f}", f"{m:.1f}" if m else "-"] for k, (v, m) in seconds.items()]
    tokens = 10 * 4 * args.seq_len
    print_table(f"A {args.width}-width, {args.blocks}-block random-init study on {args.device}, {args.dtype}, "
                f"{args.trials} trials; export keeps {meta['params']:,} parameters; LoRA "
                f"{tokens / seconds['finetune (10 steps)'][0]:.0f} tokens/s (teacher and loading included)",
                ["stage", "seconds", "peak GPU GiB"], rows)
    del model, tokenizer


if __name__ == "__main__":
    main()
