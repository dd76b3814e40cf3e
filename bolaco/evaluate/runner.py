"""The evaluation suite (DESIGN 2.10): perplexity on WikiText-2 / PTB / C4, seven zero-shot tasks through
lm-eval, StereoSet bias; each result cached in a JSON file next to the model and re-read, not recomputed.

A plan lists items (one corpus, task or StereoSet at one sample size); each item's result is written to the
JSON file as soon as it is done, keyed by what it measured, so an interrupted run resumes at the first
missing item and a run with other sample sizes adds to the file instead of overwriting it. The file also
holds the model's weight fingerprint: results of other weights (a re-exported folder) are not re-used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data import CORPORA, tokenize_corpus
from ..errors import BolacoError
from ..store import atomic_write
from .tasks import ZERO_SHOT

log = logging.getLogger(__name__)

DEFAULT_CORPORA = ("wikitext2-test", "ptb-test", "c4-valid")
CORPUS_LABELS = {"wikitext2-test": "WikiText-2 test", "wikitext2-valid": "WikiText-2 valid", "ptb-test": "PTB test",
                 "ptb-valid": "PTB valid", "c4-valid": "C4 valid (2k-doc sample)"}
RESULTS_FILE = "bolaco-eval.json"


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate and on how much data; None as a size means the whole corpus / task / set."""
    corpora: tuple[str, ...] = DEFAULT_CORPORA
    seq_len: int = 256
    sequences: int | None = 64
    tasks: tuple[str, ...] = ZERO_SHOT
    limit: int | None = 200
    stereoset: bool = True
    stereoset_limit: int | None = 1000
    batch_size: int = 8
    data_dir: str | None = field(default=None, compare=False)

    def items(self) -> list[str]:
        size = lambda n: "all" if n is None else str(n)  # noqa: E731
        keys = [f"ppl/{c}/seq{self.seq_len}/{size(self.sequences)}" for c in self.corpora]
        keys += [f"task/{t}/{size(self.limit)}" for t in self.tasks]
        if self.stereoset:
            keys.append(f"stereoset/{size(self.stereoset_limit)}")
        return keys

    def describe(self) -> str:
        ppl = f"{self.sequences} x {self.seq_len} tokens per corpus" if self.sequences else \
            f"whole corpora at seq_len {self.seq_len}"
        tasks = f"{self.limit} rows per task" if self.limit else "every row of each task"
        bias = "" if not self.stereoset else \
            f", StereoSet {'first ' + str(self.stereoset_limit) if self.stereoset_limit else 'all'} examples"
        return f"sample: {ppl}, {tasks}{bias}"


def results_path(spec: str | None) -> Path:
    """<dir>/bolaco-eval.json for a model directory (exported or dense); storage/eval/<name>.json for a GGUF
    file, the default model or a hub id (their folders are not ours to write in)."""
    from ..model import resolve
    src = resolve(spec)
    if src.gguf_file is None and Path(src.location).is_dir():
        return Path(src.location) / RESULTS_FILE
    name = src.gguf_file or src.location
    return Path("storage") / "eval" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".json")


def _digest(results: dict) -> str:
    return hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()


class ResultsFile:
    """Evaluation results of one model's weights (by fingerprint), with a sha256 of the results so that an
    edited or damaged file is recomputed instead of reported."""

    def __init__(self, path: Path, fingerprint: str, label: str):
        self.path, self.fingerprint, self.label = Path(path), fingerprint, label
        self.results: dict = {}
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
                same = stored["fingerprint"] == fingerprint
                results, digest = stored["results"], stored.get("sha256")
            except (ValueError, KeyError, TypeError):
                raise BolacoError(f"{self.path} is not a bolaco results file: delete it or pass --results") from None
            if digest != _digest(results):
                log.warning("results file %s does not match its sha256 (edited or damaged): recomputing", self.path)
            elif same:
                self.results = results

    def save(self, key: str, value: dict) -> None:
        self.results[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"model": self.label, "fingerprint": self.fingerprint, "results": self.results,
                           "sha256": _digest(self.results)}, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def run(model, tokenizer, plan: EvalPlan, results: ResultsFile, force: bool = False,
        progress: bool = True, log=log.info) -> dict:
    """Evaluate every item of the plan not yet in `results` (all of them with force); returns the plan's results."""
    todo = [k for k in plan.items() if force or k not in results.results]
    if any(k.startswith("task/") for k in todo):
        from .tasks import evaluate as lm_eval_tasks, lm_wrapper, load_tasks
        lm = lm_wrapper(model, tokenizer, plan.batch_size)
    for key in todo:
        kind, name = key.split("/")[:2]
        start = time.perf_counter()
        if kind == "ppl":
            from .perplexity import perplexity
            seqs = tokenize_corpus(name, tokenizer, plan.seq_len, plan.data_dir)
            seqs = seqs[:plan.sequences] if plan.sequences else seqs
            r = perplexity(model, seqs, plan.batch_size, desc=name, progress=progress)
            value = {"ppl": r.ppl, "tokens": r.tokens}
        elif kind == "task":
            value = lm_eval_tasks(lm, load_tasks([name], plan.data_dir), limit=plan.limit)[name]
        else:
            from .bias import evaluate_stereoset
            value = evaluate_stereoset(model, tokenizer, plan.data_dir, plan.stereoset_limit, 2 * plan.batch_size,
                                       progress)
        value["seconds"] = round(time.perf_counter() - start, 1)
        results.save(key, value)
        log(f"{key}: {summary(key, value)} ({value['seconds']:.0f} s)")
    return {k: results.results[k] for k in plan.items()}


def summary(key: str, value: dict) -> str:
    kind = key.split("/")[0]
    if kind == "ppl":
        return f"ppl {value['ppl']:.2f}"
    if kind == "task":
        return ", ".join(f"{m} {value[m]:.4f}" for m in ("acc", "acc_norm", "word_perplexity") if m in value)
    o = value["overall"]
    return f"LMS {o['lms']:.2f}, SS {o['ss']:.2f}, ICAT {o['icat']:.2f}"


def table_rows(results: dict) -> list[tuple[str, str]]:
    """(row label, formatted value) for one model's results, in a stable order."""
    rows = []
    accs = []
    for key, v in results.items():
        kind, name, *rest = key.split("/")
        if kind == "ppl":
            rows.append((f"{CORPUS_LABELS.get(name, name)} ppl (seq {rest[0][3:]}, {rest[1]} seqs)", f"{v['ppl']:.2f}"))
        elif kind == "task" and "acc" in v:
            for m in ("acc", "acc_norm"):
                if m in v:
                    se = v.get(f"{m}_stderr")
                    spread = f" ± {100 * se:.1f}" if se is not None else ""
                    rows.append((f"{name} {m} ({rest[0]} rows)", f"{100 * v[m]:.1f}" + spread))
            accs.append(v["acc"])
        elif kind == "task":       # lm-eval's wikitext: document-level word perplexity
            rows.append((f"{name} word ppl ({rest[0]} documents)", f"{v['word_perplexity']:.2f}"))
        else:
            for split in ("intrasentence", "intersentence"):
                if split in v:
                    rows.append((f"StereoSet {split} ICAT", f"{v[split]['overall']['icat']:.2f}"))
            o = v["overall"]
            rows += [(f"StereoSet LMS ({name} examples)", f"{o['lms']:.2f}"), ("StereoSet SS (50 = unbiased)",
                     f"{o['ss']:.2f}"), ("StereoSet ICAT (100 = ideal)", f"{o['icat']:.2f}")]
    if len(accs) > 1:
        rows.append((f"mean acc over {len(accs)} tasks", f"{100 * sum(accs) / len(accs):.1f}"))
    return rows


def markdown_table(columns: dict[str, dict]) -> str:
    """One column per model (name -> the results of `run`), one row per metric; '-' where a model lacks one."""
    per_model = {name: dict(table_rows(res)) for name, res in columns.items()}
    labels = list(dict.fromkeys(label for rows in per_model.values() for label in rows))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + label + " | " + " | ".join(rows.get(label, "-") for rows in per_model.values()) + " |"
              for label in labels]
    return "\n".join(lines)


def without_data_dir(plan: EvalPlan) -> tuple[EvalPlan, list[str]]:
    """The plan reduced to what ships with bolaco (WikiText-2 and lm-eval's wikitext), and what was dropped."""
    from .tasks import ZERO_SHOT
    corpora = tuple(c for c in plan.corpora if CORPORA[c].shipped)
    tasks = tuple(t for t in plan.tasks if t not in ZERO_SHOT)
    skipped = [c for c in plan.corpora if c not in corpora] + [t for t in plan.tasks if t not in tasks]
    skipped += ["stereoset"] if plan.stereoset else []
    return replace(plan, corpora=corpora, tasks=tasks, stereoset=False), skipped


def check_plan(plan: EvalPlan) -> None:
    from .tasks import KNOWN
    unknown = [c for c in plan.corpora if c not in CORPORA]
    if unknown:
        raise BolacoError(f"unknown corpus {unknown} (known: {', '.join(CORPORA)})")
    unknown = [t for t in plan.tasks if t not in KNOWN]
    if unknown:
        raise BolacoError(f"unknown task {unknown} (known: {', '.join(KNOWN)})")
    if plan.seq_len < 2 or (plan.sequences is not None and plan.sequences < 1) or \
            (plan.limit is not None and plan.limit < 1):
        raise BolacoError("eval needs seq_len >= 2 and positive sample sizes")
