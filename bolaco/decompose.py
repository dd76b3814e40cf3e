"""Decompose (DESIGN 2.4): per-linear bases, cached, and rank maps applied in place by slicing.

For a linear y = W x + b and rank k every method writes y ~ Q_k (Q_k^T W) x + b_k, and differs only
in the orthonormal basis Q of the output space:
- feature (centred, Bolaco): eigenvectors of Cov(y) = W Sigma W^T; the mean of the discarded
  directions is kept as a bias, b_k = (I - Q_k Q_k^T)(W mu + b) + Q_k Q_k^T b.
- feature-uncentred: eigenvectors of W E[xx^T] W^T, b unchanged (the minimiser of ||(W - W')X||_F
  over rank-k W', the SVD-LLM closed form).
- weight: left singular vectors of W (truncated SVD, SFSD's baseline).
Bases are computed once per linear in float64 (eigh / svd, sorted descending) and cached up to the
largest rank that saves parameters, together with Q^T W (and Q^T W mu), so that applying a rank map
reads the first k rows of each and computes nothing but the bias (a d_out x k matrix-vector product).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter, parse_linear_id
from .budget import Budget, RankMap
from .collect import CovarianceCache
from .errors import BolacoError
from .store import BlockStore, key_hash

METHODS = ("feature", "feature-uncentred", "weight")
BASES_FORMAT = 2


def adds_bias(method: str) -> bool:
    return method == "feature"


def make_budget(adapter: Adapter, method: str, multiple: int = 8) -> Budget:
    return Budget(adapter.linears, adds_bias=adds_bias(method), multiple=multiple)


def _wrap_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around existing tensors, skipping nn.Linear.__init__'s random initialisation."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
    return lin


class LowRankLinear(nn.Module):
    """y = up(down(x)): down is k x d_in, up is d_out x k with the (optional) bias. Both are plain nn.Linear,
    so peft can target them by name. `dense_bias` records whether the layer it replaces had a bias."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, dense_bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.dense_bias = dense_bias
        self.down = nn.Linear(d_in, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, d_out, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                     dense_bias: bool = False) -> "LowRankLinear":
        """Wrap existing tensors: no copy and no random initialisation, since applying a rank map must be cheap."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.dense_bias = dense_bias
        m.down, m.up = _wrap_linear(down, None), _wrap_linear(up, bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def output_basis(weight: torch.Tensor, input_moment: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, spectrum) in float64, sorted descending: eigenvectors of W C W^T for an input moment C
    (covariance or second moment), or the left singular vectors of W when C is None (weight method)."""
    w = weight.double()
    if input_moment is None:
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
        return u, s
    evals, evecs = torch.linalg.eigh(w @ input_moment.to(w) @ w.T)
    return evecs.flip(-1), evals.flip(-1)


def factor_parts(weight: torch.Tensor, q: torch.Tensor, w_mean: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Everything needed to build the factors at any rank k <= q.shape[1] by taking the first k rows:
    down = Q^T W, up_t = Q^T and, for the centred method, W mu and Q^T W mu (for the bias)."""
    parts = {"down": q.T @ weight.to(q), "up_t": q.T.contiguous()}
    if w_mean is not None:
        parts["w_mean"] = w_mean
        parts["proj_mean"] = q.T @ w_mean.to(q)
    return parts


def truncate(parts: dict[str, torch.Tensor], bias: torch.Tensor | None,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(down, up, bias) from factor parts already cut to k rows. With W mu present the bias keeps the mean of
    the discarded directions: b_k = (I - Q_k Q_k^T)(W mu + b) + Q_k Q_k^T b = W mu + b - Q_k (Q_k^T W mu)."""
    down, up = parts["down"].to(dtype), parts["up_t"].T.to(dtype)   # a transposed view: x @ up^T reads Q^T rows
    if "w_mean" not in parts:
        return down, up, bias
    w_mean = parts["w_mean"].double()
    b64 = bias.double() if bias is not None else torch.zeros_like(w_mean)
    return down, up, (w_mean + b64 - parts["up_t"].double().T @ parts["proj_mean"].double()).to(dtype)


def bases_key(cov: CovarianceCache, method: str) -> dict:
    return {"covariance": cov.store.key, "method": method, "format": BASES_FORMAT}


def build_bases(adapter: Adapter, cov: CovarianceCache, method: str, progress: bool = True) -> "Bases":
    """Compute (or resume, or reuse) the cached bases of every decomposable linear for `method`."""
    if method not in METHODS:
        raise BolacoError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    budget = make_budget(adapter, method, 1)
    key = bases_key(cov, method)
    store = BlockStore(cov.root / f"bases-{method}-{key_hash(key)[:8]}", key, adapter.n_blocks, f"{method} bases")
    todo = [b for b in range(adapter.n_blocks) if not store.has(b)]
    for b in tqdm(todo, desc=f"bases ({method})", unit="block", disable=not progress or not todo):
        tensors = {}
        for record, lids in adapter.block_records(b).items():
            moment = None
            if method != "weight":
                moments = cov.moments(b, record)
                moment = moments.cov if method == "feature" else moments.second
            for lid in lids:
                type_ = parse_linear_id(lid)[1]
                w = adapter.module(lid).weight.detach().cpu().double()
                q, spectrum = output_basis(w, moment)
                w_mean = w @ moments.mean if method == "feature" else None
                parts = factor_parts(w, q[:, :budget.max_rank(lid)], w_mean)
                for name, t in parts.items():   # factors in float32, the bias terms in float64
                    tensors[f"{type_}.{name}"] = t.float() if name in ("down", "up_t") else t
                tensors[f"{type_}.spectrum"] = spectrum
        store.write(b, tensors)
    return Bases(store, method)


class Bases:
    """Lazy, memory-mapped access to the cached bases of one method."""

    def __init__(self, store: BlockStore, method: str):
        self.store, self.method = store, method
        self._handles: dict[int, object] = {}

    def _handle(self, block: int):
        if block not in self._handles:
            self._handles[block] = self.store.open(block)
        return self._handles[block]

    def parts(self, lid: str, k: int) -> dict[str, torch.Tensor]:
        """The factor parts of `lid` cut to rank k: only the first k rows are read from disk."""
        block, type_ = parse_linear_id(lid)
        h = self._handle(block)
        out = {name: h.get_slice(f"{type_}.{name}")[:k] for name in ("down", "up_t")}
        if adds_bias(self.method):
            out["w_mean"] = h.get_tensor(f"{type_}.w_mean")
            out["proj_mean"] = h.get_slice(f"{type_}.proj_mean")[:k]
        return out

    def spectrum(self, lid: str) -> torch.Tensor:
        block, type_ = parse_linear_id(lid)
        return self._handle(block).get_tensor(f"{type_}.spectrum")


class Compressor:
    """Applies rank maps to a loaded model in place and restores the dense layers exactly.

    The dense nn.Linear objects are kept aside (no copy, no deep copy of the model), so restoring
    puts back the very same tensors."""

    def __init__(self, adapter: Adapter, bases: Bases, budget: Budget):
        self.adapter, self.bases, self.budget = adapter, bases, budget
        self._dense: dict[str, nn.Linear] = {}

    @property
    def ranks(self) -> RankMap:
        return {lid: self.adapter.module(lid).rank for lid in self._dense}

    def factors(self, lid: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dense = self._dense.get(lid) or self.adapter.module(lid)
        bias = dense.bias.detach() if dense.bias is not None else None
        down, up, b = truncate(self.bases.parts(lid, k), bias, dense.weight.dtype)
        device = dense.weight.device
        return down.to(device), up.to(device), None if b is None else b.to(device)

    def apply(self, ranks: RankMap) -> None:
        """Make the model carry exactly `ranks` (previous low-rank layers are restored first)."""
        self.budget.check(ranks)
        self.restore()
        with torch.no_grad():
            for lid, k in ranks.items():
                layer = LowRankLinear.from_factors(*self.factors(lid, k), dense_bias=self.adapter.linears[lid].bias)
                self._dense[lid] = self.adapter.replace(lid, layer)

    def restore(self) -> None:
        for lid, dense in self._dense.items():
            self.adapter.replace(lid, dense)
        self._dense.clear()
