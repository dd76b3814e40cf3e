"""The bases cache: what each method precomputes per block (Method.prepare), built once and reused by every trial.

One self-verifying block store per method, next to the covariance cache it was computed from, keyed by that
cache's key and the method's settings (bolaco.store). Computed in float64 on the model's device (the CPU as a
fallback when the device runs out of memory or lacks a kernel). A worker loads every tensor once into device (or
pinned host) memory, so that applying a level map slices them and computes nothing but a few small products.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calibrate import CovarianceCache, check_disk
from ..store import BlockStore, key_hash
from .methods import Decomposition, Method

_BYTES = {"F64": 8, "I64": 8, "F32": 4, "BF16": 2, "F16": 2}


def _prepare(method: Method, cov: CovarianceCache, block: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        return method.prepare(cov, block, device, dtype)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if device.type == "cpu":
            raise
        first_line = str(exc).splitlines()[0][:120]
        warnings.warn(f"{method.name} bases of block {block} on {device} failed ({first_line}); using the CPU",
                      stacklevel=3)
        return method.prepare(cov, block, torch.device("cpu"), dtype)


def build_bases(decomposition: Decomposition, cov: CovarianceCache, progress: bool = True,
                device: str | torch.device | None = None) -> "Bases":
    """Compute (or resume, or reuse) every method's cached tensors, on `device` (default: the model's)."""
    adapter = decomposition.adapter
    device = torch.device(device) if device is not None else next(adapter.model.parameters()).device
    model_dtype = next(adapter.model.parameters()).dtype
    dtype = model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float32
    stores = {}
    for method in decomposition.methods:
        key = {"covariance": cov.store.key, **method.key()}
        folder = cov.root / f"bases-{method.name}-{key_hash(key)[:8]}"
        if not (folder / "manifest.json").exists():
            check_disk(folder, method.prepared_bytes(), f"{method.name} bases cache")
        store = BlockStore(folder, key, adapter.n_blocks, f"{method.name} bases")
        todo = [b for b in range(adapter.n_blocks) if not store.has(b)]
        with tqdm(todo, desc=f"bases ({method.name})", unit="block", disable=not progress or not todo) as bar:
            for b in bar:
                store.write(b, _prepare(method, cov, b, device, dtype))
        stores[method.name] = store
    return Bases(decomposition, stores)


class Bases:
    """Read access to the cached tensors of every unit: memory-mapped until `load` puts them in memory."""

    def __init__(self, decomposition: Decomposition, stores: dict[str, BlockStore]):
        self.decomposition, self.stores = decomposition, stores
        self._handles: dict[tuple[str, int], object] = {}
        self._loaded: dict[str, dict[str, torch.Tensor]] | None = None
        self.location = "disk (memory-mapped)"

    def _handle(self, method: str, block: int) -> Any:
        if (method, block) not in self._handles:
            self._handles[method, block] = self.stores[method].open(block)
        return self._handles[method, block]

    def _keys(self, uid: str) -> tuple[Any, list[str]]:
        unit = self.decomposition.units[uid]
        handle = self._handle(self.decomposition.method_of(uid).name, unit.block)
        return handle, [k for k in handle.keys() if k.split(".", 1)[0] == unit.type]

    def parts(self, uid: str) -> dict[str, torch.Tensor]:
        """The cached tensors of unit `uid`, by part name."""
        if self._loaded is not None:
            return self._loaded[uid]
        handle, keys = self._keys(uid)
        return {k.split(".", 1)[1]: handle.get_tensor(k) for k in keys}

    def load(self, device: torch.device) -> str:
        """Read every unit's tensors once into `device` memory if they fit in half of what is free there, else
        into (pinned, when a GPU is used) host memory; returns where they went."""
        need = 0
        for uid in self.decomposition.units:
            handle, keys = self._keys(uid)
            for k in keys:
                sl = handle.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                need += n * _BYTES.get(sl.get_dtype(), 4)
        target = torch.device("cpu")
        if device.type == "cuda" and need < 0.5 * torch.cuda.mem_get_info(device)[0]:
            target = device
        pin = device.type == "cuda" and target.type == "cpu"
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        for uid in self.decomposition.units:
            handle, keys = self._keys(uid)
            loaded[uid] = {}
            for k in keys:
                t = handle.get_tensor(k).to(target)
                loaded[uid][k.split(".", 1)[1]] = t.pin_memory() if pin else t
        self._loaded = loaded
        self.location = f"{target}" + (" (pinned)" if pin else "")
        return self.location
