"""Zero-shot tasks through lm-eval on the local copies in the data directory (DESIGN 2.10).

The task YAMLs in bolaco/resources/lm_eval_tasks are lm-eval's own definitions (prompts, choices, metrics)
with a `custom_dataset` loader that reads the data directory (see local_data.py there for where a local
file's layout differs from the original). They are indexed with `TaskManager(include_path=...,
include_defaults=False)`, which skips lm-eval's few thousand built-in tasks, and run with
`lm_eval.evaluator.evaluate` on an `HFLM` wrapping the model object, so a compressed model in memory is
evaluated as it is. The surgical search (bolaco.surgical) uses the same path on seeded row subsets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import RESOURCES, default_data_dir
from ..errors import BolacoError

TASKS_DIR = RESOURCES / "lm_eval_tasks"
ZERO_SHOT = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PERPLEXITY_TASKS = ("wikitext",)       # lm-eval's document-level word perplexity on the shipped WikiText-2
KNOWN = ZERO_SHOT + PERPLEXITY_TASKS


def _quiet() -> None:
    # lm-eval logs every request batch and warns on each custom_dataset; bolaco shows its own progress.
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_tasks(names: list[str] | tuple[str, ...], data_dir: str | Path | None = None) -> dict:
    """lm-eval's loaded task dict ({'tasks': {name: Task}, ...}) for bolaco's local tasks."""
    from lm_eval.tasks import TaskManager
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise BolacoError(f"unknown task(s) {unknown} (known: {', '.join(KNOWN)})")
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None and any(n in ZERO_SHOT for n in names):
        raise BolacoError("the zero-shot tasks are read from a data directory: pass --data-dir or set "
                          "BOLACO_DATA_DIR (a folder with piqa/, arc/, boolq/, ... as in ../shared/data)")
    _quiet()
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(root) if root else ""})
    try:
        loaded = manager.load(list(names))
    except FileNotFoundError as exc:
        raise BolacoError(f"task data not found: {exc.filename} (data directory {root})") from None
    _quiet()
    return loaded


def lm_wrapper(model, tokenizer, batch_size: int = 8):
    from lm_eval.models.huggingface import HFLM
    _quiet()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate(lm, loaded: dict, limit: int | None = None, samples: dict[str, list[int]] | None = None,
             log_samples: bool = False) -> dict:
    """{task: {metric: value, metric_stderr: value, 'rows': n}} (and 'samples' with log_samples)."""
    from lm_eval.evaluator import evaluate as lm_evaluate
    _quiet()
    out = lm_evaluate(lm=lm, task_dict=loaded, limit=limit, samples=samples, bootstrap_iters=1000,
                      log_samples=log_samples, verbosity="ERROR")
    results = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and name not in ("alias", "sample_len"):
                row[name] = float(value)
        row["rows"] = int(out["n-samples"][task]["effective"])
        results[task] = row
    if log_samples:
        results["samples"] = out["samples"]
    return results


def n_docs(loaded: dict, task: str) -> int:
    return len(loaded["tasks"][task].eval_docs)


def split(n: int, search: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Disjoint (search, test) row indices: a seeded permutation of range(n), the first `search` for search."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:search]), sorted(perm[search:])
