"""The evaluation suite (docs/design.md, "Evaluation"): perplexity on WikiText-2 / PTB / C4, zero-shot tasks
through lm-eval, StereoSet bias; each result cached in a JSON file next to the model and re-read, not recomputed.

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
class EvalKey:
    """What one result measured; its text is the key in the results file: `ppl/<corpus>/seq<L>/<sequences>`,
    `task/<task>/<rows>[/<k>shot]`, `stereoset/<examples>` (a size of `all`: everything)."""
    kind: str                      # ppl, task or stereoset
    name: str = ""                 # the corpus or the task
    size: int | None = None        # sequences, rows or examples; None: all of them
    seq_len: int | None = None     # ppl only
    fewshot: int | None = None     # task only; None: lm-eval's default

    def __str__(self) -> str:
        size = "all" if self.size is None else str(self.size)
        if self.kind == "ppl":
            return f"ppl/{self.name}/seq{self.seq_len}/{size}"
        if self.kind == "task":
            return f"task/{self.name}/{size}" + (f"/{self.fewshot}shot" if self.fewshot is not None else "")
        return f"stereoset/{size}"

    @classmethod
    def parse(cls, text: str) -> "EvalKey":
        kind, *rest = text.split("/")
        size = lambda s: None if s == "all" else int(s)  # noqa: E731
        if kind == "ppl":
            return cls(kind, rest[0], size(rest[2]), int(rest[1][3:]))
        if kind == "task":
            return cls(kind, rest[0], size(rest[1]), fewshot=int(rest[2][:-4]) if len(rest) > 2 else None)
        return cls(kind, size=size(rest[0]))


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate and on how much data; None as a size means the whole corpus / task / set."""
    corpora: tuple[str, ...] = DEFAULT_CORPORA
    seq_len: int = 256
    sequences: int | None = 64
    tasks: tuple[str, ...] = ZERO_SHOT
    limit: int | None = 200
    num_fewshot: int | None = None
    stereoset: bool = True
    stereoset_limit: int | None = 1000
    batch_size: int = 8
    data_dir: str | None = field(default=None, compare=False)
    cache_dir: str | None = field(default=None, compare=False)    # tokenized corpora (see data.corpus_tokens)

    def keys(self) -> list[EvalKey]:
        keys = [EvalKey("ppl", c, self.sequences, self.seq_len) for c in self.corpora]
        keys += [EvalKey("task", t, self.limit, fewshot=self.num_fewshot) for t in self.tasks]
        if self.stereoset:
            keys.append(EvalKey("stereoset", size=self.stereoset_limit))
        return keys

    def items(self) -> list[str]:
        return [str(k) for k in self.keys()]

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
    todo = [k for k in plan.keys() if force or str(k) not in results.results]
    if any(k.kind == "task" for k in todo):
        from .tasks import evaluate as lm_eval_tasks, lm_wrapper, load_tasks
        lm = lm_wrapper(model, tokenizer, plan.batch_size)
    for key in todo:
        start = time.perf_counter()
        if key.kind == "ppl":
            from .perplexity import perplexity
            seqs = tokenize_corpus(key.name, tokenizer, plan.seq_len, plan.data_dir, plan.cache_dir)
            seqs = seqs[:plan.sequences] if plan.sequences else seqs
            r = perplexity(model, seqs, plan.batch_size, desc=key.name, progress=progress)
            value = {"ppl": r.ppl, "tokens": r.tokens}
        elif key.kind == "task":
            value = lm_eval_tasks(lm, load_tasks([key.name], plan.data_dir, plan.num_fewshot),
                                  limit=plan.limit)[key.name]
        else:
            from .bias import evaluate_stereoset
            value = evaluate_stereoset(model, tokenizer, plan.data_dir, plan.stereoset_limit, 2 * plan.batch_size,
                                       progress)
        value["seconds"] = round(time.perf_counter() - start, 1)
        results.save(str(key), value)
        log(f"{key}: {summary(str(key), value)} ({value['seconds']:.0f} s)")
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
    for text, v in results.items():
        key = EvalKey.parse(text)
        size = "all" if key.size is None else key.size
        shots = f", {key.fewshot}-shot" if key.fewshot is not None else ""
        if key.kind == "ppl":
            rows.append((f"{CORPUS_LABELS.get(key.name, key.name)} ppl (seq {key.seq_len}, {size} seqs)",
                         f"{v['ppl']:.2f}"))
        elif key.kind == "task" and "acc" in v:
            for m in ("acc", "acc_norm"):
                if m in v:
                    se = v.get(f"{m}_stderr")
                    spread = f" ± {100 * se:.1f}" if se is not None else ""
                    rows.append((f"{key.name} {m} ({size} rows{shots})", f"{100 * v[m]:.1f}" + spread))
            accs.append(v["acc"])
        elif key.kind == "task" and "word_perplexity" in v:     # lm-eval's wikitext: document-level word ppl
            rows.append((f"{key.name} word ppl ({size} documents)", f"{v['word_perplexity']:.2f}"))
        elif key.kind == "task":
            rows += [(f"{key.name} {m} ({size} rows{shots})", f"{val:.4f}") for m, val in v.items()
                     if not m.endswith("_stderr") and m not in ("rows", "seconds")]
        else:
            name = str(size)
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
    """The plan reduced to what ships with bolaco (WikiText-2, and lm-eval's own tasks), and what was dropped."""
    from .tasks import ZERO_SHOT
    corpora = tuple(c for c in plan.corpora if CORPORA[c].shipped)
    tasks = tuple(t for t in plan.tasks if t not in ZERO_SHOT)
    skipped = [c for c in plan.corpora if c not in corpora] + [t for t in plan.tasks if t not in tasks]
    skipped += ["stereoset"] if plan.stereoset else []
    return replace(plan, corpora=corpora, tasks=tasks, stereoset=False), skipped


def check_plan(plan: EvalPlan) -> None:
    unknown = [c for c in plan.corpora if c not in CORPORA]
    if unknown:
        raise BolacoError(f"unknown corpus {unknown} (known: {', '.join(CORPORA)})")
    if plan.num_fewshot is not None and plan.num_fewshot < 0:
        raise BolacoError(f"--num-fewshot is {plan.num_fewshot}: give 0 or more examples")
    if plan.seq_len < 2 or (plan.sequences is not None and plan.sequences < 1) or \
            (plan.limit is not None and plan.limit < 1):
        raise BolacoError("eval needs seq_len >= 2 and positive sample sizes")
