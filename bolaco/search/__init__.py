"""The Bayesian-optimisation study (DESIGN 2.5, 2.6): keep ratios of the searched linears under an exact
parameter budget, proposed by a budget-aware sampler, evaluated on the search split, stored in any
SQLAlchemy database and shared by any number of workers."""

from .sampler import BudgetSampler
from .space import SearchSpace
from .worker import (ARTIFACT_DIR, allocation_heatmap, best_ranks, masked_url, open_storage, run, study_name, summary)

__all__ = ["ARTIFACT_DIR", "BudgetSampler", "SearchSpace", "allocation_heatmap", "best_ranks", "masked_url",
           "open_storage", "run", "study_name", "summary"]
