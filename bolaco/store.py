"""Per-block cache files: written atomically, verified by sha256, keyed by a manifest.

A store is a folder holding `manifest.json` (what the cache was built from), one
`block_NNN.safetensors` per decoder block and `index.json` (the sha256 of each finished block).
A block counts as done only once its file is in the index, so an interrupted run resumes at the
first missing block; a file whose bytes no longer match the index is reported as corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CacheError


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


def _sha256(path: Path) -> str:
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

    def _index(self) -> dict[str, str]:
        if not self._index_path.exists():
            return {}
        try:
            return json.loads(self._index_path.read_text())
        except json.JSONDecodeError:
            raise CacheError(f"{self.what} cache index {self._index_path} is corrupt: delete {self.root} and run again")

    def block_path(self, block: int) -> Path:
        return self.root / f"block_{block:03d}.safetensors"

    def done(self) -> list[int]:
        return sorted(int(b) for b in self._index())

    def has(self, block: int) -> bool:
        return str(block) in self._index()

    @property
    def complete(self) -> bool:
        return len(self._index()) == self.n_blocks

    def write(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.block_path(block)
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        index = self._index()
        index[str(block)] = _sha256(path)
        _write_json(self._index_path, index)
        self._verified.add(block)

    def read(self, block: int) -> dict[str, torch.Tensor]:
        return load_file(self._verified_path(block))

    def open(self, block: int):
        """A lazy (memory-mapped) reader of one block file, for reading slices of large tensors."""
        return safe_open(self._verified_path(block), framework="pt")

    def _verified_path(self, block: int) -> Path:
        path = self.block_path(block)
        expected = self._index().get(str(block))
        if expected is None:
            raise CacheError(f"{self.what} cache {self.root} has no block {block}: run the stage that builds it")
        if block not in self._verified:
            if not path.is_file() or _sha256(path) != expected:
                raise CacheError(f"{self.what} cache file {path} is corrupt or truncated: delete it "
                                 "(or the whole folder) and run again to recompute it")
            self._verified.add(block)
        return path
