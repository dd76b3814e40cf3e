"""What a trial records, as typed records: the worker writes them as Optuna user attrs, and the sampler, the
selection before export, the report, the command line and the bench scripts read them back through `TrialRecord`
(optuna-dashboard shows the same attrs)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from optuna.trial import FrozenTrial

from ..decompose import LevelMap

LEVELS = "levels"     # the user attr holding a trial's level map (read before the trial is evaluated)


def levels_key(levels: dict) -> tuple:
    """A hashable form of a level map (to find trials with the same allocation)."""
    return tuple(sorted((str(k), int(v)) for k, v in levels.items()))


@dataclass(frozen=True)
class Proposal:
    """Written when the trial is asked: the allocation and how it was proposed."""
    levels: LevelMap
    proposal: str                  # uniform, design:<name>, startup, model, fallback-acqf, fallback-duplicate, retry
    seconds_sampling: float = 0.0
    seed: int | None = None
    phase: str | None = None       # coarse or fine (coarse-to-fine search)
    error: str | None = None       # why a model step fell back
    worker: str = ""


@dataclass(frozen=True)
class Evaluation:
    """Written when the trial is evaluated."""
    params: int                    # decomposable parameters kept
    removed: float                 # share of the decomposable parameters removed
    search_ppl: float
    search_nll: float
    seconds_apply: float
    seconds_eval: float
    search_kl: float | None = None     # with a KL objective
    search_recall: float | None = None     # with the recall objective: the recall tokens' mean NLL


def write(trial, record: Proposal | Evaluation) -> None:
    for k, v in asdict(record).items():
        if v is not None:
            trial.set_user_attr(k, v)


@dataclass(frozen=True)
class TrialRecord:
    number: int
    value: float | None
    proposal: Proposal | None
    evaluation: Evaluation | None

    @classmethod
    def of(cls, trial: FrozenTrial) -> "TrialRecord":
        attrs = trial.user_attrs

        def read(kind):
            names = [f.name for f in fields(kind)]
            required = [f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING]
            if not all(n in attrs for n in required):
                return None
            return kind(**{n: attrs[n] for n in names if n in attrs})

        proposal = read(Proposal)
        if proposal is not None:
            proposal = Proposal(**{**asdict(proposal), "levels": {k: int(v) for k, v in proposal.levels.items()}})
        return cls(trial.number, trial.value, proposal, read(Evaluation))

    @property
    def levels(self) -> LevelMap:
        assert self.proposal is not None, f"trial {self.number} recorded no level map"
        return self.proposal.levels

    @property
    def removed(self) -> float:
        assert self.evaluation is not None, f"trial {self.number} was not evaluated"
        return self.evaluation.removed

    @property
    def search_ppl(self) -> float:
        assert self.evaluation is not None, f"trial {self.number} was not evaluated"
        return self.evaluation.search_ppl
