"""Closed-loop refit of a chosen rank map (DESIGN 2.4b).

Open-loop factors are fitted to the dense model's inputs; at serving time every layer sees the inputs of the
*compressed* model, and the errors add up over depth. The refit walks the blocks in order with two streams of
calibration hidden states: the dense model's (x) and the compressed model's (x~, earlier blocks already
refitted). Inside a block the records are refitted in order (q/k/v, then o, then gate/up, then down), each from
the inputs that the layers refitted before it produce, so every low-rank linear maps the inputs it will really
see to the dense layer's outputs. The layers the rank map keeps dense stay as they are: refitting them too (a
full-rank regression on the compressed inputs) raised held-out perplexity on every corpus (bench/quality.py).

For y = W x + b, with C = Cov(x, x~) and S = Cov(x~), the regression is shrunk towards the dense layer:
W* = argmin E||W x - W' x~||^2 + lam ||W' - W||^2 = W (C + lam I)(S + lam I)^-1, lam = ridge x the mean input
variance. With x~ = x it is W for every lam; directions in which x~ barely varies keep the dense map instead of
being amplified by S^-1 (which, fitted on one domain, hurts perplexity on others). With S + lam I = L L^T:
- rank k (reduced-rank regression): Q_k = top-k eigenvectors of W* S W*^T, the covariance of the fitted outputs
  W* x~; down = Q_k^T W*, up = Q_k, bias = W mu + b - up down mu~ (the output mean is kept exactly);
- uncentred variant (methods without a bias term): second moments in place of covariances, bias b unchanged.
With x~ = x and no ridge this is the open-loop centred method. Statistics are float64 sums of float32 chunk
products; the cost is one dense pass and about 2.6 passes of the compressed block per block. The refitted
layers are cached per block under a key of (model, calibration, rank map, variant, ridge) and resume.

A regression fitted on a few thousand tokens can fit them and miss the rest: on some rank maps (up compressed
beside a dense gate, a massive attention-sink activation in the stream) it lowered every block's calibration
error and multiplied held-out perplexity a hundredfold. So every 8th calibration sequence is held out, and a
block whose refitted output is further from the dense block's on those sequences than its open-loop output
keeps its open-loop factors (an eighth of a compressed block pass more).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, parse_linear_id
from .budget import RankMap
from ..calibrate import cache_key, gram
from .bases import input_root, left_singular
from ..layers import LowRankLinear
from ..errors import BolacoError
from ..store import BlockStore, key_hash
from ..calibrate import capture_block_inputs, execution_device, on_device, run_block

REFIT_FORMAT = 4   # 3: dense layers are no longer refitted; 4: held-out sequences can keep a block open-loop
HOLDOUT = 8        # every 8th calibration sequence judges the refit instead of fitting it


@dataclass(frozen=True)
class PairStats:
    """Paired statistics of the dense input x and the compressed model's input x~ of one record."""
    mean_x: torch.Tensor     # (d,) float64
    mean_t: torch.Tensor     # (d,)
    cross: torch.Tensor      # Cov(x, x~) = E[(x - mu)(x~ - mu~)^T], (d, d)
    cov_t: torch.Tensor      # Cov(x~)
    count: int

    def uncentred(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x x~^T], E[x~ x~^T])."""
        return (self.cross + torch.outer(self.mean_x, self.mean_t), self.cov_t + torch.outer(self.mean_t, self.mean_t))


class PairAccumulator:
    """Float64 sums from float32 chunk products, each stream shifted by its first chunk's mean."""

    def __init__(self, dim: int, device: torch.device):
        self.dim = dim
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)   # noqa: E731
        self.sx, self.st, self.sxt, self.stt, self.n = z(dim), z(dim), z(dim, dim), z(dim, dim), 0
        self.shift_x: torch.Tensor | None = None
        self.shift_t: torch.Tensor | None = None

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x, t = x.detach().reshape(-1, self.dim).float(), t.detach().reshape(-1, self.dim).float()
        if self.shift_x is None or self.shift_t is None:
            self.shift_x, self.shift_t = x.mean(0), t.mean(0)
        zx, zt = x - self.shift_x, t - self.shift_t
        self.sx += zx.sum(0, dtype=torch.float64)
        self.st += zt.sum(0, dtype=torch.float64)
        self.sxt += (zx.T @ zt).double()
        self.stt += gram(zt).double()
        self.n += zx.shape[0]

    def stats(self) -> PairStats:
        mx, mt = self.sx / self.n, self.st / self.n
        cov_t = self.stt / self.n - torch.outer(mt, mt)
        assert self.shift_x is not None and self.shift_t is not None, "stats before any add"
        return PairStats(self.shift_x.double() + mx, self.shift_t.double() + mt,
                         self.sxt / self.n - torch.outer(mx, mt), (cov_t + cov_t.T) / 2, self.n)


def fit_linear(weight: torch.Tensor, bias: torch.Tensor | None, stats: PairStats, rank: int,
               centred: bool, ridge: float) -> dict[str, torch.Tensor]:
    """The refitted layer in float64: {down, up, bias} at `rank`; `bias` is absent when the layer gets none."""
    w = weight.to(stats.cross.device, torch.float64)
    b = None if bias is None else bias.to(w)
    if centred:
        a, s = stats.cross, stats.cov_t
    else:
        a, s = stats.uncentred()
    d = s.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=s.device)
    lam = ridge * float(torch.diagonal(s).mean().clamp(min=1e-30))
    root, info = torch.linalg.cholesky_ex(s + lam * eye)
    for _ in range(30):   # singular even with the ridge: grow it until the factorisation succeeds
        if not int(info):
            break
        lam = max(lam * 10, 1e-12)
        root, info = torch.linalg.cholesky_ex(s + lam * eye)
    else:
        raise BolacoError("the refit's input statistics are not finite (overflowing activations?): "
                          "export without the refit (decompose.refit: false)")
    # B = W (A + lam I) L^-T, computed as (L^-1 (W A + lam W)^T)^T
    bmat = torch.linalg.solve_triangular(root, (w @ a + lam * w).T, upper=False).T
    w_star = torch.linalg.solve_triangular(root.T, bmat.T, upper=True).T           # B L^-1 = W (A + lam I) S^-1
    out_mean = (w @ stats.mean_x + (b if b is not None else 0)) if centred else None
    # the principal directions of the fitted outputs W* x~, whose covariance is W* S W*^T (S without the ridge)
    q = left_singular(w_star @ input_root(s))[0][:, :rank]
    down = q.T @ w_star
    result = {"down": down, "up": q}
    if centred:
        result["bias"] = out_mean - q @ (down @ stats.mean_t)
    elif b is not None:
        result["bias"] = b
    return result


def _module(parts: dict[str, torch.Tensor], dense: nn.Linear, dense_bias: bool) -> LowRankLinear:
    dt, dev = dense.weight.dtype, dense.weight.device
    t = {k: v.to(dev, dt).contiguous() for k, v in parts.items()}
    return LowRankLinear.from_factors(t["down"], t["up"], t.get("bias"), dense_bias=dense_bias)


def _parts_of(module: LowRankLinear) -> dict[str, torch.Tensor]:
    parts = {"down": module.down.weight, "up": module.up.weight}
    bias = module.up.bias
    if bias is not None:
        parts["bias"] = bias
    return {k: v.detach().cpu().contiguous() for k, v in parts.items()}


def refit_key(model, calibration: torch.Tensor, ranks: RankMap, centred: bool, ridge: float, holdout: int) -> dict:
    return {"base": cache_key(model, calibration, 1), "centred": centred, "ridge": ridge, "format": REFIT_FORMAT,
            "holdout": holdout,
            "ranks": hashlib.sha256(json.dumps(sorted(ranks.items())).encode()).hexdigest()}


class _Stop(Exception):
    pass


def refit(comp, ranks: RankMap, calibration: torch.Tensor, centred: bool, ridge: float = 0.1,
          batch_size: int = 8, cache_root: str | Path | None = None, device: str | torch.device | None = None,
          progress: bool = True, holdout: int = HOLDOUT) -> dict[str, LowRankLinear]:
    """Refitted low-rank layers {linear id: module} for `ranks`, fitted on `calibration` (N, seq_len); apply them
    with `comp.apply(ranks, refitted)`. Every `holdout`-th sequence is held out (when N >= 2 x holdout; 0: none):
    a block whose refitted output is further from the dense block's on those sequences than its open-loop
    output keeps its open-loop factors (it is absent from the result). The model is dense again on return.
    With `cache_root`, finished blocks are cached and a rerun resumes."""
    adapter: Adapter = comp.adapter
    model = adapter.model
    comp.restore()
    device = execution_device(model, device)
    store = None
    if cache_root is not None:
        key = refit_key(model, calibration, ranks, centred, ridge, holdout)
        store = BlockStore(Path(cache_root) / f"refit-{key_hash(key)}", key, adapter.n_blocks, "refit")
    refitted: dict[str, LowRankLinear] = {}
    if store is not None and store.complete:   # all cached: nothing to run
        for b in range(adapter.n_blocks):
            refitted.update(_read_block(store, b, comp))
        return refitted
    held = (torch.arange(len(calibration)) % holdout == holdout - 1) if holdout and len(calibration) >= 2 * holdout \
        else torch.zeros(len(calibration), dtype=torch.bool)
    fit_rows, held_rows = calibration[~held], calibration[held]
    batches = [rows[i:i + batch_size] for rows in (fit_rows, held_rows) for i in range(0, len(rows), batch_size)]
    n_fit = -(-len(fit_rows) // batch_size)   # batches[:n_fit] fit the layers, the rest judge them
    changed = False          # whether the compressed stream differs from the dense one yet
    kept_open = 0
    bar = tqdm(total=adapter.n_blocks, desc="refit", unit="block", disable=not progress)
    try:
        with torch.inference_mode():
            dense_h, block_kwargs = capture_block_inputs(model, adapter, batches, device)
            comp_h = list(dense_h)
            for b, block in enumerate(adapter.blocks):
                kwargs = block_kwargs[b]
                records = adapter.block_records(b)
                lowrank = [l for r in adapter.record_names for l in records[r] if l in ranks]
                with on_device(model, block, device):
                    # the dense block: its output and the inputs of its four records
                    dense_in: dict[str, list[torch.Tensor]] = {r: [] for r in adapter.record_names}
                    hooks = [adapter.module(records[r][0]).register_forward_pre_hook(
                        lambda _m, a, r=r: dense_in[r].append(a[0])) for r in adapter.record_names]
                    try:
                        next_dense = [run_block(block, h, kw) for h, kw in zip(dense_h, kwargs)]
                    finally:
                        for h in hooks:
                            h.remove()
                    if store is not None and store.has(b):
                        fitted = _read_block(store, b, comp)
                    else:
                        fitted = {}
                        for r in adapter.record_names:
                            lids = [l for l in records[r] if l in ranks]
                            if not lids:
                                continue
                            stats = _pair_stats(adapter, block, records[r][0], comp_h[:n_fit], kwargs[:n_fit],
                                                dense_in[r][:n_fit], device)
                            for lid in lids:
                                dense = comp.dense(lid)
                                parts = fit_linear(dense.weight, dense.bias, stats, ranks[lid], centred, ridge)
                                fitted[lid] = _module(parts, dense, adapter.linears[lid].bias)
                                comp.install(lid, fitted[lid])
                        if fitted and n_fit < len(batches) and _worse_than_open_loop(
                                block, comp, ranks, fitted, comp_h[n_fit:], kwargs[n_fit:], next_dense[n_fit:]):
                            fitted = {}
                        if store is not None:
                            store.write(b, {f"{parse_linear_id(lid)[1]}.{k}": v
                                            for lid, m in fitted.items() for k, v in _parts_of(m).items()})
                    for lid in lowrank:
                        comp.install(lid, fitted[lid] if lid in fitted else comp.open_loop(lid, ranks[lid]))
                    refitted.update(fitted)
                    kept_open += bool(lowrank) and not fitted
                    changed |= bool(lowrank)
                    comp_h = [run_block(block, h, kw) for h, kw in zip(comp_h, kwargs)] if changed else next_dense
                dense_h = next_dense
                bar.update(1)
                bar.set_postfix(open_loop=kept_open)
    finally:
        bar.close()
        comp.restore()
    return refitted


def _worse_than_open_loop(block, comp, ranks: RankMap, fitted: dict[str, LowRankLinear], comp_h, kwargs,
                          dense_out) -> bool:
    """Whether the block with its `fitted` layers (installed) is further from the dense block's outputs on the
    held-out batches than with its open-loop factors. A margin of 1e-9 of the dense outputs' energy (float32
    rounding is about 1e-14) keeps blocks that both reproduce (full rank) from flipping on rounding."""
    def error() -> float:
        return sum(float((run_block(block, h, kw).double() - d.double()).square().sum())
                   for h, kw, d in zip(comp_h, kwargs, dense_out))

    with_refit = error()
    for lid in fitted:
        comp.install(lid, comp.open_loop(lid, ranks[lid]))
    with_open = error()
    for lid, module in fitted.items():
        comp.install(lid, module)
    energy = sum(float(d.double().square().sum()) for d in dense_out)
    return with_refit > with_open + 1e-9 * energy


def _read_block(store: BlockStore, block: int, comp) -> dict[str, LowRankLinear]:
    """The cached refitted layers of `block`, as modules."""
    adapter, saved = comp.adapter, store.read(block)
    out = {}
    for lid in [l for lids in adapter.block_records(block).values() for l in lids]:
        t = parse_linear_id(lid)[1]
        parts = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == t}
        if parts:
            out[lid] = _module(parts, comp.dense(lid), adapter.linears[lid].bias)
    return out


def _pair_stats(adapter, block, first_lid: str, comp_h, kwargs, dense_inputs, device) -> PairStats:
    """Run the block on the compressed stream up to the record's first linear (the layers before it already
    refitted) and accumulate its inputs paired with the dense ones."""
    acc = PairAccumulator(adapter.linears[first_lid].d_in, device)
    seen = []

    def stop(_m, a):
        seen.append(a[0])
        raise _Stop

    hook = adapter.module(first_lid).register_forward_pre_hook(stop)
    try:
        for h, kw, x in zip(comp_h, kwargs, dense_inputs):
            try:
                run_block(block, h, kw)
            except _Stop:
                pass
            acc.add(x, seen.pop())
    finally:
        hook.remove()
    return acc.stats()
