"""Decompose (DESIGN 2.4): per-linear bases, cached, and rank maps applied in place by slicing.

For a linear y = W x + b and rank k every method writes y ~ Q_k (Q_k^T W) x + b_k, and differs only
in the orthonormal basis Q of the output space:
- feature (centred, Bolaco): eigenvectors of Cov(y) = W Sigma W^T; the mean of the discarded
  directions is kept as a bias, b_k = (I - Q_k Q_k^T)(W mu + b) + Q_k Q_k^T b.
- feature-uncentred: eigenvectors of W E[xx^T] W^T, b unchanged (the minimiser of ||(W - W')X||_F
  over rank-k W', the SVD-LLM closed form).
- weight: left singular vectors of W (truncated SVD, SFSD's baseline).
Bases are computed once per linear in float64 on the model's device (CPU as fallback), sorted descending,
and cached up to the largest rank that saves parameters, together with Q^T W (and Q^T W mu). For
d_out <= d_in, Q comes from eigh(W C W^T) (d_out x d_out); for wider outputs (gate, up) from the SVD of
W L with C = L L^T (d_out x d_in, one Cholesky factor per record), the same Q at a fraction of the cost.
A compressor loads the cached factors once into device (or pinned host) memory, so that applying a rank
map slices the first k rows of each and computes nothing but the bias (a d_out x k matrix-vector product).
"""

from __future__ import annotations

import warnings
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, parse_linear_id
from .budget import Budget, RankMap
from ..calibrate import CovarianceCache, check_disk
from ..errors import BolacoError
from ..layers import LowRankLinear
from ..store import BlockStore, key_hash
from ..study import METHODS

BASES_FORMAT = 2


def adds_bias(method: str) -> bool:
    return method == "feature"


def make_budget(adapter: Adapter, method: str, multiple: int = 8) -> Budget:
    return Budget(adapter.linears, adds_bias=adds_bias(method), multiple=multiple)


def input_root(moment: torch.Tensor) -> torch.Tensor:
    """L with L L^T = moment (float64): Cholesky, or the symmetric square root when the moment is singular."""
    m = moment.double()
    root, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return root
    evals, evecs = torch.linalg.eigh(m)
    return evecs * evals.clamp(min=0).sqrt()


def left_singular(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of b and the squared singular values, descending: eigh of b b^T when b is not tall,
    the thin SVD of b when it is (LAPACK's SVD of a wide matrix is many times slower than either)."""
    if b.shape[0] <= b.shape[1]:
        evals, evecs = torch.linalg.eigh(b @ b.T)
        return evecs.flip(-1), evals.flip(-1).clamp(min=0)
    u, s, _ = torch.linalg.svd(b, full_matrices=False)
    return u, s.square()


def output_basis(weight: torch.Tensor, input_moment: torch.Tensor | None,
                 root: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, spectrum) in float64, sorted descending: eigenvectors of W C W^T for an input moment C
    (covariance or second moment), or the left singular vectors of W when C is None (weight method).
    With d_out > d_in, Q is taken from the thin SVD of W L (L L^T = C, `root` if given): same Q, smaller
    problem. The spectrum is the eigenvalues of W C W^T (or the singular values of W)."""
    w = weight.double()
    if input_moment is None:
        q, s2 = left_singular(w)
        return q, s2.sqrt()
    if w.shape[0] > w.shape[1]:
        return left_singular(w @ (root if root is not None else input_root(input_moment)).to(w))
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


def _block_bases(adapter: Adapter, cov: CovarianceCache, method: str, block: int, budget: Budget,
                 device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for record, lids in adapter.block_records(block).items():
        moment = root = moments = None
        if method != "weight":
            moments = cov.moments(block, record)
            moment = (moments.cov if method == "feature" else moments.second).to(device)
            if any(adapter.linears[l].d_out > adapter.linears[l].d_in for l in lids):
                root = input_root(moment)
        for lid in lids:
            type_ = parse_linear_id(lid)[1]
            w = cast(nn.Linear, adapter.module(lid)).weight.detach().to(device, torch.float64)
            q, spectrum = output_basis(w, moment, root)
            w_mean = w @ moments.mean.to(w) if method == "feature" and moments is not None else None
            parts = factor_parts(w, q[:, :budget.max_rank(lid)], w_mean)
            for name, t in parts.items():   # factors in the model's dtype (float32 at least), the bias terms in float64
                tensors[f"{type_}.{name}"] = (t.to(dtype) if name in ("down", "up_t") else t).cpu()
            tensors[f"{type_}.spectrum"] = spectrum.cpu()
    return tensors


def bases_bytes(adapter: Adapter, budget: Budget) -> int:
    """Bytes of the bases cache: Q^T W and Q^T up to the break-even rank (4 bytes per value at most), the bias terms
    and the spectrum in float64."""
    return sum(budget.max_rank(l) * (li.d_in + li.d_out) * 4 + 3 * li.d_out * 8 for l, li in adapter.linears.items())


def build_bases(adapter: Adapter, cov: CovarianceCache, method: str, progress: bool = True,
                device: str | torch.device | None = None) -> "Bases":
    """Compute (or resume, or reuse) the cached bases of every decomposable linear for `method`, in float64 on
    `device` (default: the model's), falling back to the CPU if the device cannot (memory, missing kernels)."""
    if method not in METHODS:
        raise BolacoError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    budget = make_budget(adapter, method, 1)
    key = bases_key(cov, method)
    folder = cov.root / f"bases-{method}-{key_hash(key)[:8]}"
    if not (folder / "manifest.json").exists():
        check_disk(folder, bases_bytes(adapter, budget), f"{method} bases cache")
    store = BlockStore(folder, key, adapter.n_blocks, f"{method} bases")
    todo = [b for b in range(adapter.n_blocks) if not store.has(b)]
    device = torch.device(device) if device is not None else next(adapter.model.parameters()).device
    model_dtype = next(adapter.model.parameters()).dtype
    dtype = model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float32
    with tqdm(todo, desc=f"bases ({method})", unit="block", disable=not progress or not todo) as bar:
        for b in bar:
            try:
                tensors = _block_bases(adapter, cov, method, b, budget, device, dtype)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if device.type == "cpu":
                    raise
                first_line = str(exc).splitlines()[0][:120]
                warnings.warn(f"bases of block {b} on {device} failed ({first_line}); using the CPU", stacklevel=2)
                tensors = _block_bases(adapter, cov, method, b, budget, torch.device("cpu"), dtype)
            store.write(b, tensors)
    return Bases(store, method)


class Bases:
    """Access to the cached bases of one method: memory-mapped until `load` puts every factor in memory."""

    def __init__(self, store: BlockStore, method: str):
        self.store, self.method = store, method
        self._handles: dict[int, object] = {}
        self._loaded: dict[str, dict[str, torch.Tensor]] | None = None
        self.location = "disk (memory-mapped)"

    def _handle(self, block: int):
        if block not in self._handles:
            self._handles[block] = self.store.open(block)
        return self._handles[block]

    def _names(self) -> tuple[str, ...]:
        return ("down", "up_t", "w_mean", "proj_mean") if adds_bias(self.method) else ("down", "up_t")

    def load(self, device: torch.device, linears) -> str:
        """Read every factor once into `device` memory if it fits in half of what is free there, else into
        (pinned, when a GPU is used) host memory; returns where they went."""
        need = sum(_nbytes(self._handle(b), k) for b in range(self.store.n_blocks) for k in self._handle(b).keys())
        target = torch.device("cpu")
        if device.type == "cuda" and need < 0.5 * torch.cuda.mem_get_info(device)[0]:
            target = device
        pin = device.type == "cuda" and target.type == "cpu"
        loaded = {}
        for lid in linears:
            block, type_ = parse_linear_id(lid)
            h = self._handle(block)
            parts = {}
            for name in self._names():
                t = h.get_tensor(f"{type_}.{name}").to(target)
                parts[name] = t.pin_memory() if pin else t
            loaded[lid] = parts
        self._loaded = loaded
        self.location = f"{target}" + (" (pinned)" if pin else "")
        return self.location

    def parts(self, lid: str, k: int) -> dict[str, torch.Tensor]:
        """The factor parts of `lid` cut to rank k: views of the loaded factors, or the first k rows from disk."""
        if self._loaded is not None:
            p = self._loaded[lid]
            return {name: (t if name == "w_mean" else t[:k]) for name, t in p.items()}
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


def _nbytes(handle, key: str) -> int:
    sl = handle.get_slice(key)
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 4)


class Compressor:
    """Applies rank maps to a loaded model in place and restores the dense layers exactly.

    The dense nn.Linear objects are kept aside (no copy, no deep copy of the model), so restoring
    puts back the very same tensors."""

    def __init__(self, adapter: Adapter, bases: Bases, budget: Budget):
        self.adapter, self.bases, self.budget = adapter, bases, budget
        self._dense: dict[str, nn.Linear] = {}

    @property
    def ranks(self) -> RankMap:
        return {lid: m.rank for lid in self._dense if isinstance(m := self.adapter.module(lid), LowRankLinear)}

    def dense(self, lid: str) -> nn.Linear:
        """The model's original layer `lid` (whether or not it is replaced now)."""
        return self._dense.get(lid) or cast(nn.Linear, self.adapter.module(lid))

    def factors(self, lid: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dense = self.dense(lid)
        bias = dense.bias.detach() if dense.bias is not None else None
        device = dense.weight.device
        parts = {name: t.to(device, non_blocking=True) for name, t in self.bases.parts(lid, k).items()}
        down, up, b = truncate(parts, None if bias is None else bias.to(device), dense.weight.dtype)
        return down, up, b

    def open_loop(self, lid: str, k: int) -> LowRankLinear:
        return LowRankLinear.from_factors(*self.factors(lid, k), dense_bias=self.adapter.linears[lid].bias)

    def install(self, lid: str, module: nn.Module) -> None:
        """Put `module` in the place of `lid`, keeping the original dense layer for `restore`."""
        old = self.adapter.replace(lid, module)
        self._dense.setdefault(lid, cast(nn.Linear, old))

    def apply(self, ranks: RankMap, refitted: dict[str, nn.Module] | None = None) -> None:
        """Make the model carry exactly `ranks` (previous low-rank layers are restored first): the factors of the
        bases, or the `refitted` layers (bolaco.refit) where given, which may also replace dense layers."""
        self.budget.check(ranks)
        self.restore()
        refitted = refitted or {}
        with torch.no_grad():
            for lid, k in ranks.items():
                self.install(lid, refitted[lid] if lid in refitted else self.open_loop(lid, k))
            for lid, module in refitted.items():
                if lid not in ranks:
                    self.install(lid, module)

    def restore(self) -> None:
        for lid, dense in self._dense.items():
            self.adapter.replace(lid, dense)
        self._dense.clear()
