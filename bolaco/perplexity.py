"""Perplexity: non-overlapping windows of seq_len, mean token NLL over all predicted tokens, exp."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float          # mean token negative log-likelihood (nats)
    tokens: int         # predicted tokens
    seconds: float


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True,
               desc: str = "ppl", on_chunk: Callable[[int, float], None] | None = None) -> Perplexity:
    """`sequences` is (N, seq_len) token ids; each window predicts its seq_len - 1 next tokens.

    on_chunk(step, running_ppl) is called after every batch (for pruners and progress reports)."""
    device = model_device(model)
    total_nll = 0.0
    total_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=sequences.shape[0] * sequences.shape[1], desc=desc, unit="tok", disable=not progress,
               leave=False)
    with torch.inference_mode():
        for step, i in enumerate(range(0, sequences.shape[0], batch_size)):
            ids = sequences[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                  reduction="sum")
            total_nll += float(nll.double())
            total_tokens += ids[:, 1:].numel()
            bar.update(ids.numel())
            if on_chunk is not None:
                on_chunk(step, math.exp(total_nll / total_tokens))
    bar.close()
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, time.perf_counter() - start)
