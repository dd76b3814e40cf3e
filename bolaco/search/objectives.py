"""What a search measures: one spec, with its direction, shared by the BO study and the surgical search.

An objective measures the model as it is now on a named chunk of its data (the BO study: "search", the whole
search split; the surgical search: "search" and "verify", two disjoint halves) and returns a `Measured` value.
Registered in OBJECTIVES under the name `search.objective` uses; `surgical.metric` takes those names or a
zero-shot task, whose accuracy (to maximise) is measured on seeded rows through lm-eval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch

from ..evaluate import perplexity as ppl_eval
from ..registry import Registry


@dataclass(frozen=True)
class Measured:
    value: float                    # what the search minimises (or maximises)
    ppl: float | None = None
    nll: float | None = None
    kl: float | None = None
    recall: float | None = None     # mean NLL of the recall tokens (objective ppl+recall)
    seconds: float = 0.0


class Objective:
    direction: ClassVar[Literal["minimize", "maximize"]] = "minimize"
    unit: ClassVar[str] = "nats/token"
    reference: ClassVar[bool] = False    # compares with the dense model: one dense pass per chunk when made
    recall: ClassVar[bool] = False       # measures the recall tokens (rarity counted on the calibration tokens)

    def __init__(self, model, chunks: dict[str, torch.Tensor], batch_size: int, kl_weight: float = 1.0,
                 recall_weight: float = 1.0, calibration: torch.Tensor | None = None):
        self.model, self.chunks, self.batch_size = model, chunks, batch_size
        self.kl_weight, self.recall_weight = kl_weight, recall_weight

    def measure(self, chunk: str = "search", on_batch: Callable[[int, float], None] | None = None,
                desc: str = "") -> Measured:
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@OBJECTIVES.register("ppl")
class LogPerplexity(Objective):
    """The mean token NLL (log-perplexity): the GP models it better than perplexity, whose scale grows fast."""

    def __init__(self, model, chunks, batch_size, kl_weight=1.0, recall_weight=1.0, calibration=None):
        super().__init__(model, chunks, batch_size, kl_weight, recall_weight, calibration)
        # the dense model's log-probs, once, for the KL terms (the model is dense when the objective is made)
        self.references = {c: ppl_eval.log_probs(model, seqs, batch_size) for c, seqs in chunks.items()} \
            if self.reference else {}
        self.focus = {}
        if self.recall:
            assert calibration is not None, "the recall objective counts token rarity on the calibration tokens"
            vocab = int(max(calibration.max(), *(seqs.max() for seqs in chunks.values()))) + 1
            rare = torch.bincount(calibration.reshape(-1), minlength=vocab) < calibration.numel() * RARE_SHARE
            self.focus = {c: ppl_eval.recall_positions(seqs, rare) for c, seqs in chunks.items()}

    def value(self, nll: float, kl: float | None, recall: float | None) -> float:
        return nll

    def measure(self, chunk="search", on_batch=None, desc=""):
        r = ppl_eval.perplexity(self.model, self.chunks[chunk], self.batch_size, desc=desc or chunk,
                                on_chunk=on_batch, reference=self.references.get(chunk), progress=bool(desc),
                                focus=self.focus.get(chunk))
        return Measured(self.value(r.nll, r.kl, r.focus_nll), r.ppl, r.nll, r.kl, r.focus_nll, r.seconds)


@OBJECTIVES.register("kl")
class KLToDense(LogPerplexity):
    """KL(compressed || dense) per token on the search split."""
    reference = True

    def value(self, nll, kl, recall):
        assert kl is not None
        return kl


@OBJECTIVES.register("ppl+kl")
class LogPerplexityAndKL(LogPerplexity):
    """NLL + kl_weight x KL(compressed || dense), nats per token (Bolaco's objective)."""
    reference = True

    def value(self, nll, kl, recall):
        assert kl is not None
        return nll + self.kl_weight * kl


# a token is rare when it makes less than 1 in 2,000 of the calibration tokens (fewer than 16 of the default's
# 32,768); the recall objective's ranking of five maps held from 1 in 11,000 to 1 in 650 (docs/benchmarks.md)
RARE_SHARE = 1 / 2000


@OBJECTIVES.register("ppl+recall")
class LogPerplexityAndRecall(LogPerplexity):
    """NLL + recall_weight x the mean NLL of the recall tokens: rare tokens that already occur earlier in their
    window. The plain mean is dominated by local predictions; maps alike on it differ by a factor 2-3 in what they
    lose on recalling a name or a rare word from the context, which is what LAMBADA measures."""
    recall = True

    def value(self, nll, kl, recall):
        assert recall is not None
        return nll + self.recall_weight * recall


class TaskAccuracy(Objective):
    """lm-eval accuracy of a zero-shot task on seeded row subsets (the chunks are row index lists)."""
    direction: ClassVar[Literal["minimize", "maximize"]] = "maximize"
    unit = "accuracy"

    def __init__(self, model, tokenizer, task: str, loaded: dict, rows: dict[str, list[int]], batch_size: int = 8):
        from ..evaluate.tasks import lm_wrapper
        self.task, self.loaded, self.rows = task, loaded, rows
        self.lm = lm_wrapper(model, tokenizer, batch_size)

    def measure(self, chunk="search", on_batch=None, desc=""):
        from ..evaluate.tasks import evaluate
        start = time.perf_counter()
        acc = evaluate(self.lm, self.loaded, samples={self.task: self.rows[chunk]})[self.task]["acc"]
        return Measured(acc, seconds=time.perf_counter() - start)


def make_objective(name: str, model, chunks: dict[str, torch.Tensor], batch_size: int, kl_weight: float = 1.0,
                   recall_weight: float = 1.0, calibration: torch.Tensor | None = None) -> Objective:
    return OBJECTIVES.get(name, "search.objective")(model, chunks, batch_size, kl_weight, recall_weight, calibration)

