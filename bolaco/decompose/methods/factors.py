"""Per-matrix factors (docs/design.md, "Per-matrix factors"): every projection is a unit, replaced by a LowRankLinear.

For a linear y = W x + b and rank k every variant writes y ~ Q_k (Q_k^T W) x + b_k, and they differ only in the
orthonormal basis Q of the output space:
- feature (centred, Bolaco): eigenvectors of Cov(y) = W Sigma W^T; the mean of the discarded directions is kept
  as a bias, b_k = (I - Q_k Q_k^T)(W mu + b) + Q_k Q_k^T b.
- feature-uncentred: eigenvectors of W E[xx^T] W^T, b unchanged (the minimiser of ||(W - W')X||_F over rank-k W',
  the SVD-LLM closed form).
- weight: left singular vectors of W (truncated SVD, SFSD's baseline).
Bases are computed once per linear in float64 on the model's device (CPU as fallback), sorted descending, and
cached up to the largest rank that saves parameters, together with Q^T W (and Q^T W mu). For d_out <= d_in, Q
comes from eigh(W C W^T) (d_out x d_out); for wider outputs (gate, up) from the SVD of W L with C = L L^T
(d_out x d_in, one Cholesky factor per record), the same Q at a fraction of the cost. Applying rank k slices the
first k rows of each and computes nothing but the bias (a d_out x k matrix-vector product).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ...arch import linear_id
from ...layers import LowRankLinear
from ..budget import Unit
from .base import METHODS, DenseLayer, Method


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


def truncate(parts: dict[str, torch.Tensor], k: int, bias: torch.Tensor | None,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(down, up, bias) at rank k. With W mu present the bias keeps the mean of the discarded directions:
    b_k = (I - Q_k Q_k^T)(W mu + b) + Q_k Q_k^T b = W mu + b - Q_k (Q_k^T W mu)."""
    down, up = parts["down"][:k].to(dtype), parts["up_t"][:k].T.to(dtype).contiguous()   # as loaded from a file
    if "w_mean" not in parts:
        return down, up, bias
    w_mean = parts["w_mean"].double()
    b64 = bias.double() if bias is not None else torch.zeros_like(w_mean)
    return down, up, (w_mean + b64 - parts["up_t"][:k].double().T @ parts["proj_mean"][:k].double()).to(dtype)


class Factors(Method):
    """Per-matrix factors in a feature-space (or weight-space) basis; see the module docstring."""
    basis: ClassVar[str] = "covariance"      # covariance, second (moment), or weight

    def units(self, block: int) -> list[Unit]:
        out = []
        for t in self.types:
            li = self.adapter.linears[linear_id(block, t)]
            bias = li.d_out if (li.bias or self.centred) else 0
            out.append(Unit(li.id, block, t, (li.id,), li.d_in * li.d_out + (li.d_out if li.bias else 0), bias,
                            li.d_in + li.d_out, self.multiple, min(li.d_in, li.d_out)))
        return out

    def prepared_bytes(self) -> int:
        total = 0
        for li in self.adapter.linears.values():
            if li.type in self.types:
                u = self.units(li.block)[self.types.index(li.type)]
                total += u.max_level(1) * (li.d_in + li.d_out) * 4 + 3 * li.d_out * 8
        return total

    def prepare(self, stats, block, device, dtype):
        tensors = {}
        units = {u.type: u for u in self.units(block)}
        for record, lids in self.adapter.block_records(block).items():
            lids = [lid for lid in lids if lid.split(".")[1] in self.types]
            if not lids:
                continue
            moment = root = moments = None
            if self.basis != "weight":
                moments = stats.moments(block, record)
                moment = (moments.cov if self.basis == "covariance" else moments.second).to(device)
                if any(self.adapter.linears[lid].d_out > self.adapter.linears[lid].d_in for lid in lids):
                    root = input_root(moment)
            for lid in lids:
                type_ = lid.split(".")[1]
                w = self.adapter.module(lid).weight.detach().to(device, torch.float64)
                q, spectrum = output_basis(w, moment, root)
                w_mean = w @ moments.mean.to(w) if self.centred and moments is not None else None
                parts = factor_parts(w, q[:, :units[type_].max_level(1)], w_mean)
                for name, t in parts.items():   # factors in the model's dtype (float32 at least); bias terms float64
                    tensors[f"{type_}.{name}"] = (t.to(dtype) if name in ("down", "up_t") else t).cpu()
                tensors[f"{type_}.spectrum"] = spectrum.cpu()
        return tensors

    def build(self, unit, level, parts, dense: DenseLayer):
        layer = dense(unit.id)
        bias = layer.bias.detach() if layer.bias is not None else None
        device = layer.weight.device
        parts = {name: t.to(device, non_blocking=True) for name, t in parts.items() if name != "spectrum"}
        down, up, b = truncate(parts, level, bias, layer.weight.dtype)
        return {unit.id: LowRankLinear.from_factors(down, up, b, dense_bias=self.adapter.linears[unit.id].bias)}

    def refit_targets(self, unit):
        return unit.linears


@METHODS.register("feature")
class Feature(Factors):
    name = "feature"


@METHODS.register("feature-uncentred")
class FeatureUncentred(Factors):
    name = "feature-uncentred"
    centred = False
    basis = "second"


@METHODS.register("weight")
class Weight(Factors):
    name = "weight"
    centred = False
    basis = "weight"
