"""Perplexity: non-overlapping windows of seq_len, mean token NLL over all predicted tokens, exp."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model import model_device


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float          # mean token negative log-likelihood (nats)
    tokens: int         # predicted tokens
    seconds: float
    kl: float | None = None   # mean per-token KL(model || reference), when reference log-probs were given
    focus_nll: float | None = None   # mean NLL over the positions of `focus`, when given


def perplexity(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True,
               desc: str = "ppl", on_chunk: Callable[[int, float], None] | None = None,
               reference: list[torch.Tensor] | None = None, focus: torch.Tensor | None = None) -> Perplexity:
    """`sequences` is (N, seq_len) token ids; each window predicts its seq_len - 1 next tokens.

    on_chunk(step, running_ppl) is called after every batch (for pruners and progress reports).
    reference: per-batch log-probabilities of another model (see `log_probs`) to measure KL against.
    focus: a boolean (N, seq_len - 1) mask of predicted positions whose mean NLL is reported as well."""
    device = model_device(model)
    total_nll = total_kl = focus_sum = 0.0
    total_tokens = 0
    start = time.perf_counter()
    # a context manager clears the bar before an exception (Ctrl-C) reaches the command's one-line message
    with tqdm(total=sequences.shape[0] * sequences.shape[1], desc=desc, unit="tok", disable=not progress,
              leave=False) as bar, torch.inference_mode():
        for step, i in enumerate(range(0, sequences.shape[0], batch_size)):
            ids = sequences[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            flat, targets = logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
            nll = F.cross_entropy(flat, targets, reduction="sum")
            total_nll += float(nll.double())
            if focus is not None:
                where = focus[i:i + batch_size].reshape(-1).to(device)
                focus_sum += float(F.cross_entropy(flat[where], targets[where], reduction="sum").double())
            if reference is not None:
                total_kl += kl_terms(logits, reference[step].to(device, torch.float32))
            total_tokens += ids[:, 1:].numel()
            bar.update(ids.numel())
            if on_chunk is not None:
                on_chunk(step, math.exp(total_nll / total_tokens))
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, time.perf_counter() - start,
                      total_kl / total_tokens if reference is not None else None,
                      focus_sum / max(int(focus.sum()), 1) if focus is not None else None)


def recall_positions(sequences: torch.Tensor, rare: torch.Tensor) -> torch.Tensor:
    """Boolean (N, seq_len - 1): the predicted token is rare (`rare[id]`) and already occurs earlier in its window,
    so that predicting it calls for recalling it from the context (LAMBADA's kind of next word)."""
    seen = torch.zeros_like(sequences, dtype=torch.bool)
    for row, ids in enumerate(sequences):
        _, inverse = torch.unique(ids, return_inverse=True)
        positions = torch.arange(len(ids))
        first = torch.full((int(inverse.max()) + 1,), len(ids)).scatter_reduce(0, inverse, positions, "amin")
        seen[row] = first[inverse] < positions
    targets = sequences[:, 1:]
    return seen[:, 1:] & rare.to(targets.device)[targets]


def kl_terms(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Sum over positions of KL(softmax(logits) || exp(reference)); `reference` holds log-probabilities."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float((logp.exp() * (logp - reference)).sum(dtype=torch.float64))


def log_probs(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 8,
              dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Per-batch next-token log-probabilities (B, seq_len - 1, vocab) of `model`, kept on the CPU in `dtype`."""
    out = []
    with torch.inference_mode():
        for i in range(0, sequences.shape[0], batch_size):
            ids = sequences[i:i + batch_size].to(model_device(model))
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            out.append(torch.log_softmax(logits.float(), dim=-1).to("cpu", dtype))
    return out
