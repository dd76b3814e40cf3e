"""Collect: pooled covariances of the inputs of every decomposable linear (DESIGN 2.3), cached per block.

The calibration set runs through the model one decoder block at a time (inputs of block 0 are
captured once, then each block's outputs feed the next), so memory holds one block's statistics
and the calibration hidden states, never all activations, and each finished block is written
to disk before the next starts.

Per record (one input tensor shared by q/k/v, o, gate/up, down) and per partition p of the
calibration sequences: mean mu_p and centred covariance C_p. Stored: the pooled covariance
Sigma = mean_p C_p, the partition means (mu = mean_p mu_p) and the token count. Partitions have
equal token counts, so the uncentred second moment over all tokens is exactly
E[xx^T] = Sigma + mean_p mu_p mu_p^T.

Sums are accumulated in float64; on disk the covariance is the upper triangle in float32 (a quarter of the
dense float64 matrix; relative error at most 2^-24 per entry), the means stay float64.
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

CACHE_FORMAT = 2


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


def gram(z: torch.Tensor) -> torch.Tensor:
    """z^T z in float32. Half-precision activations on a GPU use the tensor cores with float32 accumulation
    (the products of half values are exact in float32); elsewhere the product is taken in float32."""
    if z.is_cuda and z.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(z.T, z, out_dtype=torch.float32)
        except (TypeError, RuntimeError):   # torch without the out_dtype overload
            pass
    z = z.float()
    return z.T @ z


def cache_bytes(adapter: Adapter, partitions: int) -> int:
    """Bytes the covariance cache of `adapter`'s model takes on disk (before the small JSON files)."""
    dims = (adapter.record_dim(r) for r in adapter.record_names)
    per_block = sum(d * (d + 1) // 2 * 4 + partitions * d * 8 + 8 for d in dims)
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


class _Accumulator:
    """Per-partition sums in float64 from float32 chunk products, shifted by the first chunk's mean
    so that C = E[zz^T] - E[z]E[z]^T does not cancel catastrophically on large-mean channels."""

    def __init__(self, dim: int, device: torch.device):
        self.dim, self.device = dim, device
        self.shift: torch.Tensor | None = None   # float32 inputs only: half ones keep their exact products
        self.cov_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.means: list[torch.Tensor] = []
        self.count = 0
        self._reset()

    def _reset(self):
        self.n = 0
        self.s1 = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.s2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.dim)
        if self.shift is None:
            self.shift = x.float().mean(0) if x.dtype == torch.float32 else torch.zeros(self.dim, device=x.device)
        z = x - self.shift if x.dtype == torch.float32 else x
        self.s1 += z.sum(0, dtype=torch.float64)
        self.s2 += gram(z).double()
        self.n += z.shape[0]

    def end_partition(self) -> None:
        m = self.s1 / self.n
        self.cov_sum += self.s2 / self.n - torch.outer(m, m)
        assert self.shift is not None, "end_partition before any add"
        self.means.append(self.shift.double() + m)
        self.count += self.n
        self._reset()

    def moments(self) -> Moments:
        cov = self.cov_sum / len(self.means)
        return Moments((cov + cov.T) / 2, torch.stack(self.means), self.count)


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


def cache_key(model: torch.nn.Module, calibration: torch.Tensor, partitions: int) -> dict:
    return {"model": fingerprint(model), "calibration": token_hash(calibration),
            "seq_len": int(calibration.shape[1]), "partitions": partitions,
            "dtype": str(next(model.parameters()).dtype), "format": CACHE_FORMAT}


def cache_dir(cache_root: str | Path, key: dict) -> Path:
    return Path(cache_root) / key_hash(key)


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
    per_part = n_seq // partitions
    batches = [calibration[s:s + min(batch_size, p * per_part + per_part - s)]
               for p in range(partitions) for s in range(p * per_part, (p + 1) * per_part, batch_size)]
    batch_partition = [p for p in range(partitions) for _ in range(p * per_part, (p + 1) * per_part, batch_size)]
    tokens = n_seq * seq_len
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
                records = adapter.block_records(b)
                acc = {r: _Accumulator(adapter.record_dim(r), device) for r in adapter.record_names}
                hooks = [adapter.module(records[r][0]).register_forward_pre_hook(
                    lambda _m, args, r=r: acc[r].add(args[0])) for r in adapter.record_names]
                try:
                    new_states = []
                    for i, (h, kw) in enumerate(zip(states, block_kwargs[b])):
                        new_states.append(run_block(block, h, kw))
                        if i + 1 == len(states) or batch_partition[i + 1] != batch_partition[i]:
                            for a in acc.values():
                                a.end_partition()
                finally:
                    for h in hooks:
                        h.remove()
            states = new_states
            tensors = {}
            for r, a in acc.items():
                m = a.moments()
                tensors.update({f"{r}.cov": pack_symmetric(m.cov).cpu(),
                                f"{r}.partition_means": m.partition_means.cpu(),
                                f"{r}.count": torch.tensor([m.count])})
            store.write(b, tensors)
            done += 1
            bar.update(1)
            bar.set_postfix_str(f"{tokens * done / adapter.n_blocks / (time.perf_counter() - start):.0f} tok/s")
    return CovarianceCache(store)
