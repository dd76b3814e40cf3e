"""Which projections are faster dense than factorised when serving at a given batch size on this device.

Each record (the projections that read one input: q, k, v; gate, up) is timed as a decoding step sees it: one
token per row, the low-rank members' down factors stacked (fuse_shared_inputs), first with every member
factorised, then with each member dense in turn. A type is slower factorised when its record runs at least
MARGIN faster with that member dense (repeated runs on a shared CPU differ by a few per cent). Random weights at
block 0's shapes and the ranks of the allocation in question: the time of a product depends on shapes only."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import LowRankLinear, fuse_shared_inputs


MARGIN = 0.05


@dataclass(frozen=True)
class TypeTiming:
    type: str
    rank: int
    factorised_us: float     # the record with every member factorised
    dense_us: float          # the record with this member dense, the others factorised

    @property
    def keep_dense(self) -> bool:
        return self.dense_us < (1 - MARGIN) * self.factorised_us


def _record(shapes: dict[str, tuple[int, int, int]], dense: str | None, device, dtype) -> nn.ModuleDict:
    layers = nn.ModuleDict({t: nn.Linear(i, o, bias=False) if t == dense else LowRankLinear(i, o, k, bias=True)
                            for t, (i, o, k) in shapes.items()}).to(device=device, dtype=dtype)
    fuse_shared_inputs(layers, [[t for t in shapes if t != dense]])
    return layers


def _us_per_step(layers: nn.ModuleDict, x: torch.Tensor, calls: int) -> float:
    def step():
        for m in layers.values():
            m(x)
    with torch.inference_mode():
        for _ in range(max(5, calls // 10)):
            step()
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            step()
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def time_types(records: dict[str, dict[str, tuple[int, int, int]]], batch: int, device="cpu",
               dtype=torch.float32, calls: int = 300, rounds: int = 5) -> list[TypeTiming]:
    """records: record -> {type: (d_in, d_out, rank)} of the factorised types. Medians of `rounds` alternating
    rounds, since a shared machine is noisy."""
    out = []
    for shapes in records.values():
        d_in = next(iter(shapes.values()))[0]
        x = torch.randn(batch, 1, d_in, device=device, dtype=dtype)
        variants: dict[str | None, nn.ModuleDict] = {v: _record(shapes, v, device, dtype) for v in (None, *shapes)}
        times: dict[str | None, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for v, layers in variants.items():
                times[v].append(_us_per_step(layers, x, calls))
        med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
        out += [TypeTiming(t, k, med[None], med[t]) for t, (_, _, k) in shapes.items()]
    return out
