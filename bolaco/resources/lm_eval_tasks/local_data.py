"""Loaders of the local copies of the zero-shot tasks, for lm-eval's `custom_dataset` (bolaco/evaluate/tasks.py).

lm-eval calls each loader with the task's metadata; bolaco's TaskManager puts the data directory there as
`data_dir`. Each loader returns the split that lm-eval's own task definition evaluates, in the layout of
the Hugging Face dataset that definition reads, so the YAMLs next to this file keep lm-eval's prompts
unchanged. Where the local file differs from the original (see ../../../docs/evaluation.md):
- HellaSwag: the local file has the preprocessed query, not ctx_a/ctx_b, so lm-eval's
  `ctx_b.capitalize()` cannot be applied; the query is used as it is (scores close to, not equal to, lm-eval's).
- WinoGrande: the local file gives the two contexts (sentence up to the blank, option filled in) and the
  continuation; those are exactly lm-eval's doc_to_choice and doc_to_target, so the YAML reads them directly.
- OpenBookQA and ARC: the original JSONL schema (question.stem, question.choices) is mapped to the HF layout.
- BoolQ: labels come as "true"/"false" strings; lm-eval's SuperGLUE layout has 1/0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
# lm-eval's own detokenizer and word/byte counts for wikitext, re-exported for wikitext.yaml
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _split(name: str, rows: list[dict]) -> dict[str, datasets.Dataset]:
    return {name: datasets.Dataset.from_list(rows)}


def boolq(data_dir: str, **_) -> dict:
    rows = _rows(Path(data_dir) / "boolq" / "val.jsonl")
    return _split("validation", [{"question": r["question"], "passage": r["passage"],
                                  "label": int(str(r["label"]).lower() == "true")} for r in rows])


def piqa(data_dir: str, **_) -> dict:
    root = Path(data_dir) / "piqa"
    rows = _rows(root / "valid.jsonl")
    labels = [int(x) for x in (root / "valid-labels.lst").read_text().split()]
    if len(labels) != len(rows):
        raise ValueError(f"{root}: {len(rows)} rows but {len(labels)} labels")
    return _split("validation", [{**r, "label": y} for r, y in zip(rows, labels)])


def _clean(text: str) -> str:
    """lm-eval's hellaswag preprocess (the local file has had it applied already; idempotent)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(data_dir: str, **_) -> dict:
    rows = _rows(Path(data_dir) / "hellaswag" / "hellaswag_val_full.jsonl")
    return _split("validation", [{"query": _clean(r["query"]), "choices": [_clean(e) for e in r["endings"]],
                                  "label": int(r["label"])} for r in rows])


def winogrande(data_dir: str, **_) -> dict:
    rows = _rows(Path(data_dir) / "winogrande" / "llmfoundry_winogrande.jsonl")
    return _split("validation", [{"contexts": r["context_options"], "continuation": r["continuation"],
                                  "gold": int(r["gold"])} for r in rows])


def winogrande_gold(doc: dict) -> int:
    return doc["gold"]


def winogrande_contexts(doc: dict) -> list[str]:
    return doc["contexts"]


def winogrande_continuation(doc: dict) -> str:
    return doc["continuation"]


def _choice_rows(rows: list[dict]) -> list[dict]:
    return [{"question": r["question"]["stem"], "answerKey": r["answerKey"].strip(),
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]


def arc_easy(data_dir: str, **_) -> dict:
    return _split("test", _choice_rows(_rows(Path(data_dir) / "arc" / "ARC-Easy-Test.jsonl")))


def arc_challenge(data_dir: str, **_) -> dict:
    return _split("test", _choice_rows(_rows(Path(data_dir) / "arc" / "ARC-Challenge-Test.jsonl")))


def openbookqa(data_dir: str, **_) -> dict:
    rows = _choice_rows(_rows(Path(data_dir) / "openbookqa" / "test.jsonl"))
    return _split("test", [{"question_stem": r.pop("question"), **r} for r in rows])


def wikitext(**_) -> dict:
    """WikiText-2 raw test (shipped with bolaco) cut into articles at the level-1 headings, as in
    EleutherAI/wikitext_document_level, which lm-eval's wikitext task reads."""
    from bolaco.data import RESOURCES
    text = (RESOURCES / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    pages = re.split(r"(?m)^(?= = [^=].* = $)", text)
    return _split("test", [{"page": p} for p in pages if p.strip()])


def lambada(data_dir: str, **_) -> dict:
    """OpenAI's LAMBADA test file ({"text": ...} per line), byte-identical to the one lm-eval pins."""
    return _split("test", _rows(Path(data_dir) / "lambada" / "lambada_test.jsonl"))
