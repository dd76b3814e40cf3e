"""Shared by the bench scripts: bolaco's own commands run in this process, held-out evaluation rows against the
dense model measured in the same run, medians over seeds, and tables that print the command that made them."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

from bolaco import evaluate
from bolaco import model as model_io

# held out from every role of the default study: perplexity on the first 64 x 256 tokens of each test set, and the
# zero-shot tasks where SmolLM2-135M is clearly above chance (the first `limit` rows)
CORPORA = ("wikitext2-test", "ptb-test", "c4-valid")
TASKS = {"piqa": "acc", "hellaswag": "acc_norm", "arc_easy": "acc", "openbookqa": "acc_norm", "lambada_openai": "acc"}
LABELS = {"wikitext2-test": "WikiText-2", "ptb-test": "PTB", "c4-valid": "C4", "piqa": "PIQA",
          "hellaswag": "HellaSwag", "arc_easy": "ARC-e", "openbookqa": "OBQA", "lambada_openai": "LAMBADA"}


def code_version() -> str:
    """The commit (and whether the tree differs from it): a bench's work folder is per code version, so a study or
    cache left by older code is never resumed."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "bolaco"], capture_output=True, text=True).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bolaco(*args: str) -> None:
    """A `bolaco` command, through the same code as the shell's (quiet)."""
    from bolaco.cli import main
    code = main([*args, "-q"])
    if code != 0:
        raise SystemExit(f"bolaco {' '.join(args)} failed with exit code {code}")


class HeldOut:
    """Held-out figures of models (loaded from export folders or in memory), cached per weight fingerprint."""

    def __init__(self, folder: Path, limit: int, tasks: bool = True):
        self.folder, self.limit, self.tasks = folder, limit, tasks
        folder.mkdir(parents=True, exist_ok=True)

    def plan(self, tasks: bool) -> evaluate.EvalPlan:
        return evaluate.EvalPlan(corpora=CORPORA, sequences=64, tasks=tuple(TASKS) if tasks else (),
                                 limit=self.limit, stereoset=False, cache_dir=str(self.folder / "tokens"))

    def __call__(self, name: str, model, tokenizer, tasks: bool | None = None) -> dict[str, float]:
        plan = self.plan(self.tasks if tasks is None else tasks)
        results = evaluate.ResultsFile(self.folder / f"{name}.json", model_io.fingerprint(model), name)
        out = evaluate.run(model, tokenizer, plan, results, progress=False, log=lambda m: print(f"  {name} {m}"))
        row = {c: out[str(evaluate.EvalKey("ppl", c, 64, 256))]["ppl"] for c in CORPORA}
        for t, metric in TASKS.items():
            key = str(evaluate.EvalKey("task", t, self.limit))
            if key in out:
                row[t] = out[key][metric]
        return row

    def export(self, name: str, folder: Path, tasks: bool | None = None) -> dict[str, float]:
        import bolaco as b
        model, tokenizer = b.load(folder)
        return self(name, model, tokenizer, tasks)


def ratios(row: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    """Perplexity over dense's, and the share of dense accuracy kept, per column."""
    return {k: v / dense[k] for k, v in row.items() if k in dense}


def spread(values: list[float], digits: int = 2) -> str:
    """median [min-max]."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in r) + " |")
    print(f"\ncommand: {' '.join(['python'] + sys.argv)}", flush=True)
