"""Measurement, used by every stage and by `bolaco eval`: perplexity (`evaluate.perplexity`), lm-eval zero-shot
tasks, StereoSet, and the cached evaluation of a model (`run` with an `EvalPlan` into a `ResultsFile`)."""

from .runner import (DEFAULT_CORPORA, RESULTS_FILE, EvalKey, EvalPlan, ResultsFile, check_plan, markdown_table,
                     results_path, run, without_data_dir)
from .tasks import ZERO_SHOT

__all__ = ["DEFAULT_CORPORA", "RESULTS_FILE", "ZERO_SHOT", "EvalKey", "EvalPlan", "ResultsFile", "check_plan",
           "markdown_table", "results_path", "run", "without_data_dir"]
