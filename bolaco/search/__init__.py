"""Stage 3, search (docs/design.md, "The search", "The surgical search"): keep ratios of the searched units under
an exact parameter budget, proposed by a budget-aware sampler (model steps in SAMPLERS), started from designed
allocations, measured by an objective (OBJECTIVES), stored in any SQLAlchemy database and shared by any number of
workers; the best few re-measured on a selection split before export; SFSD's greedy search beside it."""

from .design import DESIGNS
from .objectives import OBJECTIVES, Objective, make_objective
from .records import LEVELS, Evaluation, Proposal, TrialRecord
from .sampler import SAMPLERS, BudgetSampler, ModelStep
from .selection import select
from .space import SearchSpace
from .worker import (allocation_heatmap, artifact_dir, best_levels, load_optuna_study, masked_url, open_storage,
                     ranked_trials, run, study_name, summary)

__all__ = ["DESIGNS", "LEVELS", "OBJECTIVES", "SAMPLERS", "BudgetSampler", "Evaluation", "ModelStep", "Objective",
           "Proposal", "SearchSpace", "TrialRecord", "allocation_heatmap", "artifact_dir", "best_levels",
           "load_optuna_study", "make_objective", "masked_url", "open_storage", "ranked_trials", "run", "select",
           "study_name", "summary"]
