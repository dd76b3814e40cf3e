"""Collect: pooled covariances of the inputs of every decomposable linear (docs/design.md, "Collect"), per block.

The calibration set runs through the model one decoder block at a time (inputs of block 0 are captured once, then
each block's outputs feed the next), so memory holds one block's statistics and the calibration hidden states,
never all activations, and each finished block is written to disk before the next starts.

Per record (one input tensor shared by q/k/v, o, gate/up, down) and per partition p of the calibration sequences:
mean mu_p and centred covariance C_p. Stored: the pooled covariance Sigma = mean_p C_p, the partition means
(mu = mean_p mu_p) and the token count. Partitions have equal token counts, so the uncentred second moment over all
tokens is exactly E[xx^T] = Sigma + mean_p mu_p mu_p^T. Per block also the mean cosine similarity of the block's
input and output hidden states (MoDeGPT's block importance is one minus it).

Sums are accumulated in float64; on disk the covariance is the upper triangle in float32 (a quarter of the dense
float64 matrix; relative error at most 2^-24 per entry), the means stay float64.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import Adapter, adapter_for
from ..data import token_hash
from ..errors import BolacoError
from ..model import fingerprint
from ..store import BlockStore, key_hash
from .stream import capture_block_inputs, execution_device, on_device, run_block

CACHE_FORMAT = 3   # 3: the block's input/output cosine similarity


def pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    """The upper triangle (row-major) of a symmetric matrix, in float32."""
    i, j = torch.triu_indices(m.shape[0], m.shape[0], device=m.device)
    return m[i, j].float()


def unpack_symmetric(v: torch.Tensor, d: int) -> torch.Tensor:
    """The float64 symmetric matrix whose upper triangle is `v`."""
    i, j = torch.triu_indices(d, d)
    m = torch.zeros(d, d, dtype=torch.float64)
    m[i, j] = v.double()
    m[j, i] = v.double()
    return m


def products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b in float32. Half-precision activations on a GPU use the tensor cores with float32 accumulation
    (the products of half values are exact in float32); elsewhere the product is taken in float32."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        try:
            return torch.mm(a.T, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):   # torch without the out_dtype overload
            pass
    return a.float().T @ b.float()


class ShiftedSums:
    """Float64 sums of float32 chunk products of a stream x with a stream y (y = x when not given). Each float32
    stream is shifted by its first chunk's mean, so that Cov = E[zz'^T] - E[z]E[z']^T does not cancel
    catastrophically on large-mean channels; half-precision inputs keep their exact products unshifted."""

    def __init__(self, dim_x: int, dim_y: int | None, device: torch.device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)   # noqa: E731
        self.dims = (dim_x, dim_y or dim_x)
        self.paired = dim_y is not None
        self.sx, self.sy, self.sxy, self.n = z(self.dims[0]), z(self.dims[1]), z(*self.dims), 0
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _shift_of(x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(0) if x.dtype == torch.float32 else torch.zeros(x.shape[1], device=x.device)

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, self.dims[0])
        y = x if y is None else y.detach().reshape(-1, self.dims[1])
        if self.shift is None:
            self.shift = (self._shift_of(x), self._shift_of(y) if self.paired else self._shift_of(x))
        zx = x - self.shift[0] if x.dtype == torch.float32 else x
        zy = zx if not self.paired else (y - self.shift[1] if y.dtype == torch.float32 else y)
        self.sx += zx.sum(0, dtype=torch.float64)
        self.sy += zy.sum(0, dtype=torch.float64) if self.paired else 0
        self.sxy += products(zx, zy).double()
        self.n += zx.shape[0]

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.shift is not None, "no chunk added"
        mx = self.sx / self.n
        my = self.sy / self.n if self.paired else mx
        return self.shift[0].double() + mx, self.shift[1].double() + my

    def cov(self) -> torch.Tensor:
        """Cov(x, y) = E[(x - mu_x)(y - mu_y)^T] (symmetrised when y is x)."""
        mx = self.sx / self.n
        my = self.sy / self.n if self.paired else mx
        c = self.sxy / self.n - torch.outer(mx, my)
        return c if self.paired else (c + c.T) / 2


@dataclass(frozen=True)
class Moments:
    """Statistics of one input tensor x (d,) of a block."""
    cov: torch.Tensor              # pooled centred covariance Sigma, (d, d) float64
    partition_means: torch.Tensor  # (P, d) float64
    count: int                     # tokens seen

    @property
    def mean(self) -> torch.Tensor:
        return self.partition_means.mean(0)

    @property
    def second(self) -> torch.Tensor:
        """Uncentred second moment E[xx^T] over all tokens."""
        mu = self.partition_means
        return self.cov + mu.T @ mu / mu.shape[0]


class PooledAccumulator:
    """The pooled covariance of one record over equal partitions of the calibration tokens."""

    def __init__(self, dim: int, device: torch.device):
        self.dim, self.device = dim, device
        self.cov_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.means: list[torch.Tensor] = []
        self.count = 0
        self.part = ShiftedSums(dim, None, device)

    def add(self, x: torch.Tensor) -> None:
        self.part.add(x)

    def end_partition(self) -> None:
        self.cov_sum += self.part.cov()
        self.means.append(self.part.means()[0])
        self.count += self.part.n
        self.part = ShiftedSums(self.dim, None, self.device)

    def moments(self) -> Moments:
        return Moments(self.cov_sum / len(self.means), torch.stack(self.means), self.count)


class CovarianceCache:
    """Read access to a finished collect run."""

    def __init__(self, store: BlockStore):
        self.store = store

    @property
    def root(self) -> Path:
        return self.store.root.parent

    def moments(self, block: int, record: str) -> Moments:
        t = self.store.read(block)
        means = t[f"{record}.partition_means"]
        return Moments(unpack_symmetric(t[f"{record}.cov"], means.shape[1]), means, int(t[f"{record}.count"].item()))

    def block_cosine(self, block: int) -> float:
        """Mean cosine similarity of the block's input and output hidden states over the calibration tokens."""
        return float(self.store.read(block)["block.cosine"])


def cache_bytes(adapter: Adapter, partitions: int) -> int:
    """Bytes the covariance cache of `adapter`'s model takes on disk (before the small JSON files)."""
    dims = (adapter.record_dim(r) for r in adapter.record_names)
    per_block = sum(d * (d + 1) // 2 * 4 + partitions * d * 8 + 8 for d in dims) + 8
    return per_block * adapter.n_blocks


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Refuse to start a cache that the disk cannot hold."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise BolacoError(f"the {what} needs {needed / 1e9:.1f} GB in {folder} but only {free / 1e9:.1f} GB are "
                          "free: free some space or point cache_dir (--cache-dir) at a larger disk")


def cache_key(model: torch.nn.Module, calibration: torch.Tensor, partitions: int) -> dict:
    return {"model": fingerprint(model), "calibration": token_hash(calibration),
            "seq_len": int(calibration.shape[1]), "partitions": partitions,
            "dtype": str(next(model.parameters()).dtype), "format": CACHE_FORMAT}


def cache_dir(cache_root: str | Path, key: dict) -> Path:
    return Path(cache_root) / key_hash(key)


def _batches(calibration: torch.Tensor, partitions: int, batch_size: int) -> tuple[list[torch.Tensor], list[int]]:
    """Batches of calibration rows that never straddle a partition, and the partition of each."""
    per_part = len(calibration) // partitions
    batches, owner = [], []
    for p in range(partitions):
        for s in range(p * per_part, (p + 1) * per_part, batch_size):
            batches.append(calibration[s:min(s + batch_size, (p + 1) * per_part)])
            owner.append(p)
    return batches, owner


def _block_statistics(adapter: Adapter, block_index: int, block, states, block_kwargs, owner,
                      device) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Run one block over every batch with hooks on its records: (the block file's tensors, the next states)."""
    records = adapter.block_records(block_index)
    acc = {r: PooledAccumulator(adapter.record_dim(r), device) for r in adapter.record_names}
    hooks = [adapter.module(records[r][0]).register_forward_pre_hook(lambda _m, args, r=r: acc[r].add(args[0]))
             for r in adapter.record_names]
    cosine, tokens, new_states = 0.0, 0, []
    try:
        for i, (h, kw) in enumerate(zip(states, block_kwargs)):
            out = run_block(block, h, kw)
            new_states.append(out)
            cosine += float(torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1).double().sum())
            tokens += h.shape[0] * h.shape[1]
            if i + 1 == len(states) or owner[i + 1] != owner[i]:
                for a in acc.values():
                    a.end_partition()
    finally:
        for hook in hooks:
            hook.remove()
    tensors = {"block.cosine": torch.tensor(cosine / tokens, dtype=torch.float64)}
    for r, a in acc.items():
        m = a.moments()
        tensors.update({f"{r}.cov": pack_symmetric(m.cov).cpu(), f"{r}.partition_means": m.partition_means.cpu(),
                        f"{r}.count": torch.tensor([m.count])})
    return tensors, new_states


def collect(model, calibration: torch.Tensor, cache_root: str | Path, partitions: int = 1, batch_size: int = 8,
            progress: bool = True, device: str | torch.device | None = None) -> CovarianceCache:
    """Collect (or resume, or reuse) the covariance cache of `model` on `calibration` (N, seq_len) token ids.

    device: where the blocks run (default: where the model is). A model in CPU memory with a GPU device
    streams: each block visits the GPU for its own pass only."""
    adapter = adapter_for(model)
    n_seq, seq_len = calibration.shape
    if n_seq == 0:
        raise BolacoError("the calibration set is empty")
    if partitions < 1 or n_seq % partitions:
        raise BolacoError(f"calibration has {n_seq} sequences, which cannot be split into {partitions} equal "
                          "partitions: choose a partition count that divides the number of sequences")
    if seq_len > adapter.max_seq_len:
        raise BolacoError(f"seq_len {seq_len} is longer than the model allows ({adapter.max_seq_len})")
    key = cache_key(model, calibration, partitions)
    folder = cache_dir(cache_root, key) / "covariance"
    if not (folder / "manifest.json").exists():
        check_disk(folder, cache_bytes(adapter, partitions), "covariance cache")
    store = BlockStore(folder, key, adapter.n_blocks, "covariance")
    todo = [b for b in range(adapter.n_blocks) if not store.has(b)]
    if not todo:
        return CovarianceCache(store)
    device = execution_device(model, device)
    batches, owner = _batches(calibration, partitions, batch_size)
    start, done = time.perf_counter(), 0
    with tqdm(total=adapter.n_blocks, initial=adapter.n_blocks - len(todo), desc="collect", unit="block",
              disable=not progress) as bar, torch.inference_mode():
        states, block_kwargs = capture_block_inputs(model, adapter, batches, device)
        for b, block in enumerate(adapter.blocks):
            if b > max(todo):
                break
            with on_device(model, block, device):
                if store.has(b):   # finished earlier: only move the hidden states on
                    states = [run_block(block, h, kw) for h, kw in zip(states, block_kwargs[b])]
                    continue
                tensors, states = _block_statistics(adapter, b, block, states, block_kwargs[b], owner, device)
            store.write(b, tensors)
            done += 1
            bar.update(1)
            bar.set_postfix_str(f"{n_seq * seq_len * done / adapter.n_blocks / (time.perf_counter() - start):.0f} "
                                "tok/s")
    return CovarianceCache(store)
