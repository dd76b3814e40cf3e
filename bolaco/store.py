"""Per-block cache files: written atomically, verified by sha256, keyed by a manifest.

A store is a folder holding `manifest.json` (what the cache was built from), one
`block_NNN.safetensors` per decoder block and `index.json` (size and sha256 of each finished block).
A block counts as done only once its file is in the index and its bytes match it (checked once per
process), so an interrupted run resumes at the first missing block, and a truncated or altered file is
dropped from the index and recomputed by the stage that builds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CacheError

log = logging.getLogger(__name__)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True)))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class BlockStore:
    """A folder of per-block safetensors files for one cache key."""

    def __init__(self, root: Path, key: dict, n_blocks: int, what: str):
        self.root = Path(root)
        self.key = key
        self.n_blocks = n_blocks
        self.what = what
        self._verified: set[int] = set()
        manifest = self.root / "manifest.json"
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                raise CacheError(f"{self.what} cache manifest {manifest} is corrupt: delete {self.root} and run again")
            if found != {"key": key, "n_blocks": n_blocks}:
                raise CacheError(f"{self.what} cache {self.root} was built for different inputs than asked for "
                                 f"(manifest differs): delete {self.root} and run again")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json(manifest, {"key": key, "n_blocks": n_blocks})

    @property
    def _index_path(self) -> Path:
        return self.root / "index.json"

    def _index(self) -> dict[str, dict]:
        """{block: {"size", "sha256"}}; an unreadable index loses nothing but the time to re-verify its blocks."""
        if not self._index_path.exists():
            return {}
        try:
            index = json.loads(self._index_path.read_text())
            if not all(isinstance(e, dict) and {"size", "sha256"} <= set(e) for e in index.values()):
                raise ValueError("entries without size and sha256")
            return index
        except ValueError as exc:
            log.warning("%s cache index %s is unreadable (%s): every block is recomputed", self.what,
                        self._index_path, exc)
            self._index_path.unlink()
            return {}

    def block_path(self, block: int) -> Path:
        return self.root / f"block_{block:03d}.safetensors"

    def _problem(self, block: int) -> str | None:
        """Why block `block`'s file does not match its index entry (None: it matches)."""
        entry, path = self._index().get(str(block)), self.block_path(block)
        if entry is None:
            return "not in the index"
        if not path.is_file():
            return "its file is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{size} bytes instead of {entry['size']}"
        if file_sha256(path) != entry["sha256"]:
            return "its sha256 differs from the index"
        return None

    def _drop(self, block: int) -> None:
        index = self._index()
        index.pop(str(block), None)
        _write_json(self._index_path, index)
        self.block_path(block).unlink(missing_ok=True)
        self._verified.discard(block)

    def has(self, block: int) -> bool:
        """Whether block `block` is done: indexed and its bytes verified. A corrupt block is dropped (logged),
        so that the stage computes it again."""
        if block in self._verified:
            return True
        if str(block) not in self._index():
            return False
        problem = self._problem(block)
        if problem is None:
            self._verified.add(block)
            return True
        log.warning("%s cache block %d (%s) is corrupt: %s; recomputing it", self.what, block,
                    self.block_path(block), problem)
        self._drop(block)
        return False

    @property
    def complete(self) -> bool:
        return all(self.has(b) for b in range(self.n_blocks))

    def write(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.block_path(block)
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        index = self._index()
        index[str(block)] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        _write_json(self._index_path, index)
        self._verified.add(block)

    def read(self, block: int) -> dict[str, torch.Tensor]:
        return load_file(self._verified_path(block))

    def open(self, block: int):
        """A lazy (memory-mapped) reader of one block file, for reading slices of large tensors."""
        return safe_open(self._verified_path(block), framework="pt")

    def _verified_path(self, block: int) -> Path:
        if str(block) not in self._index():
            raise CacheError(f"{self.what} cache {self.root} has no block {block}: run the stage that builds it")
        if not self.has(block):   # dropped: the next run of the same command recomputes it
            raise CacheError(f"{self.what} cache block {block} in {self.root} was corrupt and is now dropped: "
                             "run the command again to recompute it")
        return self.block_path(block)
