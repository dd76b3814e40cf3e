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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import RECORDS, Adapter
from .data import token_hash
from .errors import BolacoError
from .model import fingerprint
from .store import BlockStore, key_hash

CACHE_FORMAT = 1


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
        self.shift: torch.Tensor | None = None
        self.cov_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.means: list[torch.Tensor] = []
        self.count = 0
        self._reset()

    def _reset(self):
        self.n = 0
        self.s1 = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.s2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.dim).float()
        if self.shift is None:
            self.shift = x.mean(0)
        z = x - self.shift
        self.s1 += z.sum(0, dtype=torch.float64)
        self.s2 += (z.T @ z).double()
        self.n += z.shape[0]

    def end_partition(self) -> None:
        m = self.s1 / self.n
        self.cov_sum += self.s2 / self.n - torch.outer(m, m)
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
        return Moments(t[f"{record}.cov"], t[f"{record}.partition_means"], int(t[f"{record}.count"].item()))


def cache_key(model: torch.nn.Module, calibration: torch.Tensor, partitions: int) -> dict:
    return {"model": fingerprint(model), "calibration": token_hash(calibration),
            "seq_len": int(calibration.shape[1]), "partitions": partitions,
            "dtype": str(next(model.parameters()).dtype), "format": CACHE_FORMAT}


def cache_dir(cache_root: str | Path, key: dict) -> Path:
    return Path(cache_root) / key_hash(key)


def _capture_block_inputs(model, adapter: Adapter, batches: list[torch.Tensor]):
    """Hidden states and keyword arguments (positions, masks) with which the model calls block 0."""

    class _Captured(Exception):
        pass

    captured = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Captured

    handle = adapter.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def collect(model, calibration: torch.Tensor, cache_root: str | Path, partitions: int = 1, batch_size: int = 8,
            progress: bool = True) -> CovarianceCache:
    """Collect (or resume, or reuse) the covariance cache of `model` on `calibration` (N, seq_len) token ids."""
    adapter = Adapter(model)
    n_seq, seq_len = calibration.shape
    if n_seq == 0:
        raise BolacoError("the calibration set is empty")
    if partitions < 1 or n_seq % partitions:
        raise BolacoError(f"calibration has {n_seq} sequences, which cannot be split into {partitions} equal "
                          "partitions: choose a partition count that divides the number of sequences")
    if seq_len > adapter.max_seq_len:
        raise BolacoError(f"seq_len {seq_len} is longer than the model allows ({adapter.max_seq_len})")
    key = cache_key(model, calibration, partitions)
    store = BlockStore(cache_dir(cache_root, key) / "covariance", key, adapter.n_blocks, "covariance")
    todo = [b for b in range(adapter.n_blocks) if not store.has(b)]
    if not todo:
        return CovarianceCache(store)

    device = next(model.parameters()).device
    per_part = n_seq // partitions
    batches = [calibration[s:s + min(batch_size, p * per_part + per_part - s)].to(device)
               for p in range(partitions) for s in range(p * per_part, (p + 1) * per_part, batch_size)]
    batch_partition = [p for p in range(partitions) for _ in range(p * per_part, (p + 1) * per_part, batch_size)]
    tokens = n_seq * seq_len
    bar = tqdm(total=adapter.n_blocks, initial=adapter.n_blocks - len(todo), desc="collect", unit="block",
               disable=not progress)
    start, done = time.perf_counter(), 0
    with torch.inference_mode():
        states = _capture_block_inputs(model, adapter, batches)
        for b, block in enumerate(adapter.blocks):
            if store.has(b):   # finished earlier: only move the hidden states on
                states = [(_run_block(block, h, kw), kw) for h, kw in states]
                continue
            records = adapter.block_records(b)
            acc = {r: _Accumulator(adapter.record_dim(r), device) for r in RECORDS}
            hooks = [adapter.module(records[r][0]).register_forward_pre_hook(
                lambda _m, args, r=r: acc[r].add(args[0])) for r in RECORDS]
            try:
                new_states = []
                for i, (h, kw) in enumerate(states):
                    new_states.append((_run_block(block, h, kw), kw))
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
                tensors.update({f"{r}.cov": m.cov.cpu(), f"{r}.partition_means": m.partition_means.cpu(),
                                f"{r}.count": torch.tensor([m.count])})
            store.write(b, tensors)
            done += 1
            bar.update(1)
            bar.set_postfix_str(f"{tokens * done / adapter.n_blocks / (time.perf_counter() - start):.0f} tok/s")
    bar.close()
    return CovarianceCache(store)
