"""Closed-loop refit (docs/design.md, "The closed-loop refit"): fit the layers of a chosen level map to the inputs
they really see in the compressed model.

Open-loop layers are built from the dense model's statistics; at serving time each layer sees the *compressed*
model's inputs, and errors add up over depth. The refit walks the blocks with two streams of hidden states, the
dense model's (x) and the compressed model's (x~, earlier blocks already refitted). In each block the records are
visited in order (q/k/v, then o, then gate/up, then down); every layer its method names as a refit target (the
per-matrix factors, the structured MLP's down, the structured V/O's o) is fitted to map the inputs it receives,
given the layers before it, to the dense layer's outputs. The other layers stay as their method built them.

For a dense layer y = W x + b whose replacement reads t (x~ itself, or the part of it that it reads), with
A = Cov(x, t) and S = Cov(t), the least-squares map is shrunk towards a prior P (the dense W where t has x's
coordinates, else the open-loop layer's weight):
    W* = argmin E||W x - W' t||^2 + lam ||W' - P||^2 = (W A + lam P)(S + lam I)^-1,  lam = ridge x mean var(t).
With t = x this is W (or the open-loop layer) for every lam. With S + lam I = L L^T:
- per-matrix factors (reduced-rank regression): Q_k = top-k eigenvectors of W* S W*^T, the covariance of the fitted
  outputs; down = Q_k^T W*, up = Q_k, bias = W mu + b - up down mu_t (the output mean is kept exactly);
- structured layers: W* itself, bias = W mu + b - W* mu_t;
- uncentred methods: second moments in place of covariances, the bias b unchanged.
Statistics are float64 sums of float32 chunk products. The fitted layers are cached per block under a key of
(model, calibration, level map, methods, ridge) and resume.

A regression fitted on a few thousand tokens can fit them and miss the rest: on some maps (a massive
attention-sink activation in the stream) it lowered every block's calibration error and multiplied held-out
perplexity a hundredfold. So every 8th calibration sequence is held out, and a block whose refitted output is
further from the dense block's on those sequences than its open-loop output keeps its open-loop layers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter
from ..calibrate import ShiftedSums, cache_key, capture_block_inputs, execution_device, input_of, on_device, run_block
from ..errors import BolacoError
from ..layers import ColumnsLinear, LowRankLinear, NarrowLinear
from ..store import BlockStore, key_hash
from .budget import LevelMap
from .methods.factors import input_root, left_singular

REFIT_FORMAT = 5   # 5: structured layers; every unit's layers built by its method
HOLDOUT = 8        # every 8th calibration sequence judges the refit instead of fitting it


@dataclass(frozen=True)
class PairStats:
    """Paired statistics of the dense input x and the compressed model's input t of one layer."""
    mean_x: torch.Tensor     # (d_x,) float64
    mean_t: torch.Tensor     # (d_t,)
    cross: torch.Tensor      # Cov(x, t) = E[(x - mu_x)(t - mu_t)^T], (d_x, d_t)
    cov_t: torch.Tensor      # Cov(t), (d_t, d_t)
    count: int

    def uncentred(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x t^T], E[t t^T])."""
        return (self.cross + torch.outer(self.mean_x, self.mean_t), self.cov_t + torch.outer(self.mean_t, self.mean_t))


class PairAccumulator:
    def __init__(self, dim_x: int, dim_t: int, device: torch.device):
        self.pair, self.own = ShiftedSums(dim_x, dim_t, device), ShiftedSums(dim_t, None, device)

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.pair.add(x, t)
        self.own.add(t)

    def stats(self) -> PairStats:
        mean_x, mean_t = self.pair.means()
        return PairStats(mean_x, mean_t, self.pair.cov(), self.own.cov(), self.pair.n)


def fit_linear(weight: torch.Tensor, bias: torch.Tensor | None, stats: PairStats, rank: int | None,
               centred: bool, ridge: float, prior: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The refitted layer in float64: {down, up, bias} at `rank`, or {weight, bias} without a rank; `bias` is
    absent when the layer gets none. `prior`: what the fit shrinks towards (default: `weight`, same inputs)."""
    w = weight.to(stats.cross.device, torch.float64)
    b = None if bias is None else bias.to(w)
    a, s = (stats.cross, stats.cov_t) if centred else stats.uncentred()
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
    p = w if prior is None else prior.to(w)
    # W* = (W A + lam P)(S + lam I)^-1, through the triangular factors: (L^-T (L^-1 (W A + lam P)^T))^T
    w_star = torch.linalg.solve_triangular(
        root.T, torch.linalg.solve_triangular(root, (w @ a + lam * p).T, upper=False), upper=True).T
    out_mean = (w @ stats.mean_x + (b if b is not None else 0)) if centred else None
    if rank is None:
        result = {"weight": w_star}
        if centred:
            result["bias"] = out_mean - w_star @ stats.mean_t
        elif b is not None:
            result["bias"] = b
        return result
    # the principal directions of the fitted outputs W* t, whose covariance is W* S W*^T (S without the ridge)
    q = left_singular(w_star @ input_root(s))[0][:, :rank]
    down = q.T @ w_star
    result = {"down": down, "up": q}
    if centred:
        result["bias"] = out_mean - q @ (down @ stats.mean_t)
    elif b is not None:
        result["bias"] = b
    return result


def fit_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `module` computes from, given the input it is called with."""
    return x.index_select(-1, module.index) if isinstance(module, ColumnsLinear) else x


def fitted_module(module: nn.Module, dense: nn.Linear, stats: PairStats, centred: bool, ridge: float) -> nn.Module:
    """A layer of `module`'s kind and shape, fitted by `fit_linear` to reproduce `dense` from the paired inputs."""
    dt, dev = dense.weight.dtype, dense.weight.device

    def fitted(f: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return f[name].to(dev, dt).contiguous()

    def bias(f: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return fitted(f, "bias") if "bias" in f else None

    if isinstance(module, LowRankLinear):
        f = fit_linear(dense.weight, dense.bias, stats, module.rank, centred, ridge)
        return LowRankLinear.from_factors(fitted(f, "down"), fitted(f, "up"), bias(f), module.dense_bias)
    if isinstance(module, ColumnsLinear):
        f = fit_linear(dense.weight, dense.bias, stats, None, centred, ridge, prior=module.linear.weight.detach())
        return ColumnsLinear.wrap(fitted(f, "weight"), bias(f), module.index, module.in_features,
                                          module.dense_bias)
    if isinstance(module, NarrowLinear):
        f = fit_linear(dense.weight, dense.bias, stats, None, centred, ridge, prior=module.weight.detach())
        return NarrowLinear.from_weight(fitted(f, "weight"), bias(f), module.dense_in, module.dense_out,
                                        module.dense_bias)
    raise TypeError(f"the refit cannot fit a {type(module).__name__}")


def refit_key(model, calibration: torch.Tensor, levels: LevelMap, methods: str, ridge: float, holdout: int) -> dict:
    return {"base": cache_key(model, calibration, 1), "methods": methods, "ridge": ridge, "format": REFIT_FORMAT,
            "holdout": holdout, "levels": hashlib.sha256(json.dumps(sorted(levels.items())).encode()).hexdigest()}


@dataclass
class Stream:
    """Hidden states of a list of batches entering the current block, and the block arguments of each batch."""
    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]           # kwargs[block][batch]
    outputs: list[torch.Tensor] = field(default_factory=list)

    def run(self, block, b: int) -> list[torch.Tensor]:
        return [run_block(block, h, kw) for h, kw in zip(self.hidden, self.kwargs[b])]


class _Refit:
    """One refit run: the model, the level map, the streams, the targets per record."""

    def __init__(self, comp, levels: LevelMap, ridge: float, device: torch.device):
        self.comp, self.levels, self.ridge, self.device = comp, levels, ridge, device
        self.adapter: Adapter = comp.adapter
        decomposition = comp.decomposition
        self.targets: dict[str, bool] = {}   # linear id -> its method is centred
        for uid in levels:
            method = decomposition.method_of(uid)
            for lid in method.refit_targets(decomposition.units[uid]):
                self.targets[lid] = method.centred

    def block_units(self, b: int) -> list[str]:
        return [u.id for u in self.comp.decomposition.block_units(b) if u.id in self.levels]

    def install_open_loop(self, b: int) -> dict[str, nn.Module]:
        built = {}
        for uid in self.block_units(b):
            built.update(self.comp.open_loop(uid, self.levels[uid]))
        for lid, module in built.items():
            self.comp.install(lid, module)
        return built

    def dense_inputs(self, block, b: int, fit: Stream) -> dict[str, list[torch.Tensor]]:
        """The dense block on the fitting batches: the inputs of every record that has a refit target."""
        records = {r: lids[0] for r, lids in self.adapter.block_records(b).items()
                   if any(lid in self.targets for lid in lids)}
        seen: dict[str, list[torch.Tensor]] = {r: [] for r in records}
        hooks = [self.adapter.module(lid).register_forward_pre_hook(lambda _m, a, r=r: seen[r].append(a[0]))
                 for r, lid in records.items()]
        try:
            fit.outputs = fit.run(block, b)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def fit_block(self, block, b: int, fit: Stream, dense_in: dict[str, list[torch.Tensor]]) -> dict[str, nn.Module]:
        """Every refit target of block b, record after record, each fitted to the inputs that the layers before
        it (already refitted) produce; returns the fitted layers (installed)."""
        fitted = {}
        for record, lids in self.adapter.block_records(b).items():
            targets = [lid for lid in lids if lid in self.targets]
            if not targets:
                continue
            seen = [input_of(self.adapter.module(lids[0]), block, h, kw) for h, kw in zip(fit.hidden, fit.kwargs[b])]
            for lid in targets:
                module = self.adapter.module(lid)
                acc = PairAccumulator(dense_in[record][0].shape[-1], fit_input(module, seen[0]).shape[-1],
                                      self.device)
                for x, t in zip(dense_in[record], seen):
                    acc.add(x, fit_input(module, t))
                fitted[lid] = fitted_module(module, self.comp.dense(lid), acc.stats(), self.targets[lid], self.ridge)
                self.comp.install(lid, fitted[lid])
        return fitted

    def worse_than_open_loop(self, block, b: int, held: Stream, dense_out: list[torch.Tensor],
                             fitted: dict[str, nn.Module], open_loop: dict[str, nn.Module]) -> bool:
        """Whether the block with its fitted layers (installed), run on the compressed held-out batches, is further
        from the dense block's outputs than with its open-loop layers. A margin of 1e-9 of the dense outputs'
        energy (float32 rounding is about 1e-14) keeps blocks that both reproduce (full rank) from flipping on
        rounding."""
        def error() -> float:
            return sum(float((out.double() - d.double()).square().sum())
                       for out, d in zip(held.run(block, b), dense_out))

        with_refit = error()
        for lid in fitted:
            self.comp.install(lid, open_loop[lid])
        with_open = error()
        for lid, module in fitted.items():
            self.comp.install(lid, module)
        energy = sum(float(d.double().square().sum()) for d in dense_out)
        return with_refit > with_open + 1e-9 * energy


def _split(calibration: torch.Tensor, holdout: int, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(fitting batches, held-out batches): every `holdout`-th sequence is held out when there are enough."""
    held = (torch.arange(len(calibration)) % holdout == holdout - 1) if holdout and len(calibration) >= 2 * holdout \
        else torch.zeros(len(calibration), dtype=torch.bool)
    cut = lambda rows: [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]   # noqa: E731
    return cut(calibration[~held]), cut(calibration[held])


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _read_block(store: BlockStore, b: int, run: _Refit) -> dict[str, nn.Module]:
    """The cached fitted layers of block b: the open-loop layers with the fitted tensors loaded into them."""
    saved = store.read(b)
    out = {}
    for uid in run.block_units(b):
        for lid, module in run.comp.open_loop(uid, run.levels[uid]).items():
            prefix = lid.split(".")[1] + "."
            state = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
            if state:
                dense = run.comp.dense(lid)
                module.load_state_dict({k: v.to(dense.weight.device) for k, v in state.items()}, assign=True)
                out[lid] = module
    return out


def _block_layers(run: _Refit, store: BlockStore | None, block, b: int, compressed: list[Stream],
                  dense: list[Stream], dense_in: dict[str, list[torch.Tensor]], open_loop: dict[str, nn.Module],
                  guard: bool) -> dict[str, nn.Module]:
    """Block b's refitted layers, installed: read from the cache, or fitted and checked on the held-out stream
    (`guard`); {} when the open-loop layers stay."""
    if store is not None and store.has(b):
        fitted = _read_block(store, b, run)
        for lid, module in fitted.items():
            run.comp.install(lid, module)
        return fitted
    fitted = run.fit_block(block, b, compressed[0], dense_in)
    if fitted and guard and run.worse_than_open_loop(block, b, compressed[1], dense[1].outputs, fitted, open_loop):
        for lid in fitted:
            run.comp.install(lid, open_loop[lid])
        fitted = {}
    if store is not None:
        store.write(b, {f"{lid.split('.')[1]}.{k}": v for lid, m in fitted.items() for k, v in _state(m).items()})
    return fitted


def refit(comp, levels: LevelMap, calibration: torch.Tensor, ridge: float = 0.1, batch_size: int = 8,
          cache_root: str | Path | None = None, device: str | torch.device | None = None,
          progress: bool = True, holdout: int = HOLDOUT) -> dict[str, nn.Module]:
    """Refitted layers {linear id: module} for `levels`, fitted on `calibration` (N, seq_len); apply them with
    `comp.apply(levels, refitted)`. Every `holdout`-th sequence is held out (when N >= 2 x holdout; 0: none): a
    block whose refitted output is further from the dense block's on those sequences than its open-loop output
    keeps its open-loop layers (they are absent from the result). Each block is dense again once the streams are
    past it, so the model is dense on return. With
    `cache_root`, finished blocks are cached and a rerun resumes."""
    adapter: Adapter = comp.adapter
    model = adapter.model
    comp.restore()
    device = execution_device(model, device)
    run = _Refit(comp, levels, ridge, device)
    store = None
    if cache_root is not None:
        key = refit_key(model, calibration, levels, comp.decomposition.describe(), ridge, holdout)
        store = BlockStore(Path(cache_root) / f"refit-{key_hash(key)}", key, adapter.n_blocks, "refit")
    refitted: dict[str, nn.Module] = {}
    if store is not None and store.complete:   # all cached: nothing to run
        for b in range(adapter.n_blocks):
            refitted.update(_read_block(store, b, run))
        return refitted
    fit_batches, held_batches = _split(calibration, holdout, batch_size)
    kept_open = 0
    with tqdm(total=adapter.n_blocks, desc="refit", unit="block", disable=not progress) as bar, \
            torch.inference_mode():
        try:
            dense = [Stream(*capture_block_inputs(model, adapter, batches, device))
                     for batches in (fit_batches, held_batches)]
            compressed = [Stream(list(s.hidden), s.kwargs) for s in dense]
            changed = False          # whether the compressed stream differs from the dense one yet
            for b, block in enumerate(adapter.blocks):
                with on_device(model, block, device):
                    # block b is still dense here (earlier blocks carry their final layers)
                    dense_in = run.dense_inputs(block, b, dense[0])
                    dense[1].outputs = dense[1].run(block, b)
                    open_loop = run.install_open_loop(b)
                    fitted = _block_layers(run, store, block, b, compressed, dense, dense_in, open_loop,
                                           bool(held_batches))
                    refitted.update(fitted)
                    kept_open += any(lid in run.targets for lid in open_loop) and not fitted
                    changed |= bool(open_loop)
                    for s, d in zip(compressed, dense):
                        s.hidden = s.run(block, b) if changed else list(d.outputs)
                        d.hidden = d.outputs
                    for lid in open_loop:    # the streams are past block b: dense again, so that memory holds
                        comp.install(lid, comp.dense(lid))   # one block's open-loop layers besides the result
                bar.update(1)
                bar.set_postfix(open_loop=kept_open)
        finally:
            comp.restore()
    return refitted

