"""Zero-shot tasks through lm-eval (docs/design.md, "Evaluation").

bolaco's seven tasks run on the local copies in the data directory: the task YAMLs in
bolaco/resources/lm_eval_tasks are lm-eval's own definitions (prompts, choices, metrics) with a `custom_dataset`
loader that reads the data directory (see local_data.py there for where a local file's layout differs from the
original). They are indexed with `TaskManager(include_path=..., include_defaults=False)`, which skips lm-eval's
few thousand built-in tasks. Any other task name is looked up in lm-eval's own registry (which may download its
data set). Tasks run with `lm_eval.evaluator.evaluate` on an `HFLM` wrapping the model object, so a compressed
model in memory is evaluated as it is. The surgical search (bolaco.search.surgical) uses the same path on seeded
row subsets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import RESOURCES, default_data_dir
from ..errors import BolacoError

TASKS_DIR = RESOURCES / "lm_eval_tasks"
ZERO_SHOT = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "lambada_openai")
PERPLEXITY_TASKS = ("wikitext",)       # lm-eval's document-level word perplexity on the shipped WikiText-2
KNOWN = ZERO_SHOT + PERPLEXITY_TASKS


def _quiet() -> None:
    # lm-eval logs every request batch and warns on each custom_dataset; bolaco shows its own progress.
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_tasks(names: list[str] | tuple[str, ...], data_dir: str | Path | None = None,
               num_fewshot: int | None = None) -> dict:
    """lm-eval's loaded task dict ({'tasks': {name: Task}, ...}): bolaco's local tasks, or lm-eval's own for any
    other name; `num_fewshot` examples per task where given (lm-eval's default otherwise)."""
    from lm_eval.tasks import TaskManager
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None and any(n in ZERO_SHOT for n in names):
        raise BolacoError("the zero-shot tasks are read from a data directory: pass --data-dir or set "
                          "BOLACO_DATA_DIR (a folder with piqa/, arc/, boolq/, ... as in ../shared/data)")
    _quiet()
    local = all(n in KNOWN for n in names)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not local,
                          metadata={"data_dir": str(root) if root else ""})
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise BolacoError(f"unknown task(s) {', '.join(unknown)}: neither bolaco's ({', '.join(KNOWN)}) nor "
                          "lm-eval's (`lm-eval ls tasks` lists them)")
    try:
        loaded = manager.load(list(names))
    except FileNotFoundError as exc:
        raise BolacoError(f"task data not found: {exc.filename} (data directory {root})") from None
    except Exception as exc:   # lm-eval's own tasks fetch their data sets, which fails offline
        raise BolacoError(f"lm-eval could not load {', '.join(names)}: {str(exc).splitlines()[0][:200]}") from None
    if num_fewshot is not None:
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=num_fewshot)
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
