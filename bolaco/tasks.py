"""Zero-shot multiple-choice tasks from the local data directory, scored by log-likelihood.

Prompts and choices follow lm-eval's task definitions (`Question: {q}\\nAnswer:` and the choices after a
" " delimiter, for PIQA and ARC); scoring follows lm-eval's `loglikelihood`: the continuation's tokens are
those of tokenize(context + continuation) past tokenize(context), trailing spaces of the context move to
the continuation, acc = argmax of the summed log-probability, acc_norm = argmax of it divided by the
choice's length in characters. `tests/test_tasks.py` checks the agreement with lm-eval itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import default_data_dir
from .errors import BolacoError


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


def _piqa(root: Path) -> list[Example]:
    rows = [json.loads(line) for line in (root / "piqa" / "valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (root / "piqa" / "valid-labels.lst").read_text().split()]
    return [Example(f"Question: {r['goal']}\nAnswer:", (r["sol1"], r["sol2"]), y) for r, y in zip(rows, labels)]


def _arc(root: Path, name: str) -> list[Example]:
    out = []
    for line in (root / "arc" / f"{name}-Test.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            labels = [c["label"] for c in r["question"]["choices"]]
            out.append(Example(f"Question: {r['question']['stem']}\nAnswer:",
                               tuple(c["text"] for c in r["question"]["choices"]), labels.index(r["answerKey"])))
    return out


TASKS = {"piqa": _piqa, "arc_easy": lambda root: _arc(root, "ARC-Easy"),
         "arc_challenge": lambda root: _arc(root, "ARC-Challenge")}


def load_task(name: str, data_dir: str | Path | None = None) -> list[Example]:
    if name not in TASKS:
        raise BolacoError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None:
        raise BolacoError(f"task '{name}' is read from a data directory: pass --data-dir or set BOLACO_DATA_DIR")
    try:
        return TASKS[name](root)
    except FileNotFoundError as exc:
        raise BolacoError(f"task '{name}': {exc.filename} not found under the data directory {root}")


def split(examples: list[Example], search: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Disjoint (search, test) parts: a seeded permutation, the first `search` rows for the search."""
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in perm[:search]], [examples[i] for i in perm[search:]]


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx, cont = _encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont], device=next(model.parameters()).device)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1], use_cache=False).logits[0].float(), dim=-1)
    targets = ids[0, len(ctx):]
    return float(logp[len(ctx) - 1:].gather(1, targets[:, None]).sum(dtype=torch.float64))


def accuracy(model, tokenizer, examples: list[Example]) -> dict[str, float]:
    """lm-eval's acc and acc_norm over `examples`."""
    if not examples:
        raise BolacoError("no task rows to score")
    acc = acc_norm = 0
    for ex in examples:
        lls = [loglikelihood(model, tokenizer, ex.context, " " + c) for c in ex.choices]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == ex.label
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(ex.choices[i])) == ex.label
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}
