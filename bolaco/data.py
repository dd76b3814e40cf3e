"""Corpora, packing into fixed-length sequences, and the three disjoint data roles.

WikiText-2 raw (valid, test) ships with bolaco (bolaco/resources/wikitext2, CC BY-SA 3.0, see
ATTRIBUTION.md there). Everything else is read from a data directory: `--data-dir`, else
$BOLACO_DATA_DIR, else ../shared/data when it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BolacoError

RESOURCES = Path(__file__).parent / "resources"
ROLES = ("calibration", "search", "test", "train")
FITTING_ROLES = ("calibration", "search", "train")      # may never read a test split
MAY_OVERLAP = {frozenset(("calibration", "train"))}      # post-training may reuse the calibration text


@dataclass(frozen=True)
class Corpus:
    file: str          # relative to the resources folder (shipped) or the data directory
    split: str         # "valid" / "test" / "train": test splits never feed calibration or search
    layout: str        # "hf-rows": file lines as Hugging Face rows joined by blank lines; "lines"; "jsonl"
    shipped: bool = False


CORPORA = {
    "wikitext2-valid": Corpus("wikitext2/wiki.valid.raw", "valid", "hf-rows", shipped=True),
    "wikitext2-test": Corpus("wikitext2/wiki.test.raw", "test", "hf-rows", shipped=True),
    "ptb-valid": Corpus("ptb/ptb.valid.txt", "valid", "lines"),
    "ptb-test": Corpus("ptb/ptb.test.txt", "test", "lines"),
    "c4-valid": Corpus("c4/c4_validation_2k.jsonl", "valid", "jsonl"),
}


def default_data_dir() -> Path | None:
    env = os.environ.get("BOLACO_DATA_DIR")
    if env:
        return Path(env)
    for candidate in (Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def corpus_path(name: str, data_dir: str | Path | None = None) -> Path:
    if name not in CORPORA:
        raise BolacoError(f"unknown corpus '{name}'; known corpora: {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    if corpus.shipped:
        return RESOURCES / corpus.file
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None:
        raise BolacoError(f"corpus '{name}' is read from a data directory: pass --data-dir or set BOLACO_DATA_DIR")
    path = root / corpus.file
    if not path.is_file():
        raise BolacoError(f"corpus '{name}' not found: expected {path} (set --data-dir to the folder holding {corpus.file})")
    return path


def read_text(name: str, data_dir: str | Path | None = None) -> str:
    """The corpus as one string, joined the way the standard perplexity protocols do."""
    path = corpus_path(name, data_dir)
    layout = CORPORA[name].layout
    raw = path.read_text(encoding="utf-8")
    if layout == "hf-rows":
        # Hugging Face's wikitext rows are the file's lines, blank ones as "", then "\n\n".join (GPTQ protocol).
        text = "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))
    elif layout == "lines":
        text = " ".join(line.strip() for line in raw.splitlines())
    else:
        text = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
    if not text.strip():
        raise BolacoError(f"corpus '{name}' at {path} is empty")
    return text


def pack(token_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens (the trailing partial window is dropped): (N, seq_len)."""
    ids = token_ids.reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise BolacoError(f"corpus has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len).clone()


def tokenize_corpus(name: str, tokenizer, seq_len: int, data_dir: str | Path | None = None) -> torch.Tensor:
    text = read_text(name, data_dir)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return pack(ids, seq_len)


@dataclass(frozen=True)
class RoleSpec:
    """A contiguous run of packed sequences of one corpus; a negative start counts from the end."""
    corpus: str
    start: int = 0
    sequences: int | None = None   # None: to the end of the corpus

    def resolve(self, total: int, role: str) -> range:
        start = self.start + total if self.start < 0 else self.start
        stop = total if self.sequences is None else start + self.sequences
        if not 0 <= start < stop <= total:
            raise BolacoError(f"{role} data asks for sequences [{start}, {stop}) of '{self.corpus}', "
                              f"which has {total} sequences at this seq_len")
        return range(start, stop)


def check_roles(roles: dict[str, RoleSpec], totals: dict[str, int]) -> dict[str, range]:
    """Resolve the roles to sequence ranges and refuse any overlap or any use of test data for fitting."""
    missing = [r for r in roles if r not in ROLES]
    if missing:
        raise BolacoError(f"unknown data role(s) {missing}; roles are {', '.join(ROLES)}")
    ranges = {role: spec.resolve(totals[spec.corpus], role) for role, spec in roles.items()}
    for role in FITTING_ROLES:
        spec = roles.get(role)
        if spec is not None and CORPORA[spec.corpus].split == "test":
            raise BolacoError(f"{role} data may not come from the test split '{spec.corpus}': "
                              "test data is for reported numbers only")
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if roles[a].corpus == roles[b].corpus and frozenset((a, b)) not in MAY_OVERLAP:
                ra, rb = ranges[a], ranges[b]
                if max(ra.start, rb.start) < min(ra.stop, rb.stop):
                    raise BolacoError(f"{a} and {b} data overlap in '{roles[a].corpus}' "
                                      f"(sequences [{ra.start}, {ra.stop}) and [{rb.start}, {rb.stop})): roles must be disjoint")
    return ranges


def role_sequences(roles: dict[str, RoleSpec], tokenizer, seq_len: int,
                   data_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Token tensors (N, seq_len) for each role, after the disjointness check."""
    packed = {c: tokenize_corpus(c, tokenizer, seq_len, data_dir) for c in {s.corpus for s in roles.values()}}
    ranges = check_roles(roles, {c: len(t) for c, t in packed.items()})
    return {role: packed[roles[role].corpus][ranges[role].start:ranges[role].stop] for role in roles}


def token_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
