"""Corpora, packing into fixed-length sequences, and the three disjoint data roles.

WikiText-2 raw (valid, test; CC BY-SA 3.0) and a 2,000-document C4 validation sample (ODC-BY) ship with
bolaco (bolaco/resources, see ATTRIBUTION.md there). Everything else is read from a data directory: `--data-dir`, else
$BOLACO_DATA_DIR, else ../shared/data when it exists.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import BolacoError

RESOURCES = Path(__file__).parent / "resources"
ROLES = ("calibration", "search", "selection", "test", "train")
FITTING_ROLES = ("calibration", "search", "selection", "train")      # may never read a test split
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
    "c4-valid": Corpus("c4/c4_validation_2k.jsonl.gz", "valid", "jsonl", shipped=True),   # ODC-BY, see ATTRIBUTION.md
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
        raise BolacoError(f"corpus '{name}' not found: expected {path} "
                          f"(set --data-dir to the folder holding {corpus.file})")
    return path


def read_text(name: str, data_dir: str | Path | None = None) -> str:
    """The corpus as one string, joined the way the standard perplexity protocols do."""
    path = corpus_path(name, data_dir)
    layout = CORPORA[name].layout
    raw = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" \
        else path.read_text(encoding="utf-8")
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


def tokenizer_hash(tokenizer) -> str:
    """An identity of a tokenizer's behaviour: its serialized fast tokenizer (vocabulary, merges, normalisation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def corpus_tokens(name: str, tokenizer, data_dir: str | Path | None = None,
                  cache_dir: str | Path | None = None) -> torch.Tensor:
    """The whole corpus as token ids (no special tokens). With `cache_dir`, cached per (tokenizer, file contents):
    tokenizing the shipped C4 sample takes seconds, on every command of a study otherwise."""
    path = corpus_path(name, data_dir)
    cached = None
    if cache_dir is not None:
        h = hashlib.sha256(f"{tokenizer_hash(tokenizer)}:{name}:".encode() + path.read_bytes()).hexdigest()[:20]
        cached = Path(cache_dir) / "tokens" / f"{name}-{h}.safetensors"
        if cached.is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                return load_file(cached)["ids"].long()
            except (SafetensorError, OSError, KeyError):   # damaged: tokenized again below
                cached.unlink(missing_ok=True)
    ids = tokenizer(read_text(name, data_dir), return_tensors="pt", add_special_tokens=False).input_ids.reshape(-1)
    if cached is not None:
        from safetensors.torch import save_file
        from .store import atomic_write
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, lambda tmp: save_file({"ids": ids.to(torch.int32).contiguous()}, tmp))
        except OSError:     # a read-only cache only costs the next command the tokenization
            pass
    return ids


def tokenize_corpus(name: str, tokenizer, seq_len: int, data_dir: str | Path | None = None,
                    cache_dir: str | Path | None = None) -> torch.Tensor:
    return pack(corpus_tokens(name, tokenizer, data_dir, cache_dir), seq_len)


class RoleSpec(BaseModel):
    """A contiguous run of packed sequences of one corpus; a negative start counts from the end."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    corpus: str
    start: int = 0
    sequences: int | None = Field(None, ge=1)   # None ("all"): to the end of the corpus

    def __init__(self, *args, **kw):
        """Positional too: RoleSpec("c4-valid", -80, 64) is {corpus: c4-valid, start: -80, sequences: 64}."""
        super().__init__(**dict(zip(("corpus", "start", "sequences"), args)), **kw)

    @field_validator("corpus")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in CORPORA:
            raise ValueError(f"unknown corpus; known corpora: {', '.join(CORPORA)}")
        return name

    @field_validator("sequences", mode="before")
    @classmethod
    def _all(cls, value):
        return None if value == "all" else value

    def resolve(self, total: int, role: str) -> range:
        start = self.start + total if self.start < 0 else self.start
        stop = total if self.sequences is None else start + self.sequences
        if not 0 <= start < stop <= total:
            raise BolacoError(f"{role} data asks for sequences [{start}, {stop}) of '{self.corpus}', "
                              f"which has {total} sequences at this seq_len")
        return range(start, stop)


Role = tuple[RoleSpec, ...]    # a mixture of ranges (of one or several corpora); usually one


def role_parts(role: Role | RoleSpec) -> tuple[RoleSpec, ...]:
    return role if isinstance(role, tuple) else (role,)


def describe(role: Role | RoleSpec) -> str:
    """Python-slice notation of the role's sequences: c4-valid[-80:-16] + wikitext2-valid[-16:]."""
    def end(p: RoleSpec) -> str:
        stop = None if p.sequences is None else p.start + p.sequences
        return "" if stop is None or (p.start < 0 and stop == 0) else str(stop)
    return " + ".join(f"{p.corpus}[{p.start}:{end(p)}]" for p in role_parts(role))


def check_roles(roles: dict[str, Role], totals: dict[str, int]) -> dict[str, list[range]]:
    """Resolve the roles to sequence ranges (one per part) and refuse any overlap or any use of test data
    for fitting."""
    missing = [r for r in roles if r not in ROLES]
    if missing:
        raise BolacoError(f"unknown data role(s) {missing}; roles are {', '.join(ROLES)}")
    ranges = {role: [p.resolve(totals[p.corpus], role) for p in role_parts(spec)] for role, spec in roles.items()}
    for role in FITTING_ROLES:
        for p in role_parts(roles.get(role, ())):
            if CORPORA[p.corpus].split == "test":
                raise BolacoError(f"{role} data may not come from the test split '{p.corpus}': "
                                  "test data is for reported numbers only")
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i:]:
            for pi, (pa, ra) in enumerate(zip(role_parts(roles[a]), ranges[a])):
                for pj, (pb, rb) in enumerate(zip(role_parts(roles[b]), ranges[b])):
                    if (a, pi) >= (b, pj) or pa.corpus != pb.corpus or frozenset((a, b)) in MAY_OVERLAP:
                        continue
                    if max(ra.start, rb.start) < min(ra.stop, rb.stop):
                        raise BolacoError(f"{a} and {b} data overlap in '{pa.corpus}' (sequences [{ra.start}, "
                                          f"{ra.stop}) and [{rb.start}, {rb.stop})): roles must be disjoint")
    return ranges


def role_sequences(roles: dict[str, Role], tokenizer, seq_len: int, data_dir: str | Path | None = None,
                   cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Token tensors (N, seq_len) for each role (the parts of a mixture one after the other), after the
    disjointness check."""
    corpora = {p.corpus for spec in roles.values() for p in role_parts(spec)}
    packed = {c: tokenize_corpus(c, tokenizer, seq_len, data_dir, cache_dir) for c in corpora}
    ranges = check_roles(roles, {c: len(t) for c, t in packed.items()})
    return {role: torch.cat([packed[p.corpus][r.start:r.stop] for p, r in zip(role_parts(spec), ranges[role])])
            for role, spec in roles.items()}


def same_source(a: Role, b: Role) -> list[str]:
    """Corpora families (wikitext2, ptb, c4) that two roles share, e.g. a training set and a test set."""
    fam = lambda role: {p.corpus.split("-")[0] for p in role_parts(role)}   # noqa: E731
    return sorted(fam(a) & fam(b))


def token_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
