"""The structured MLP (docs/design.md, "Structured modules"; MoDeGPT's Nystrom MLP): keep k neurons.

For h = act(W_G x) * (W_U x) (d_int wide) and y = W_D h + b, keeping the neurons S makes gate and up lose the
other rows and down the other columns, so the block stays an ordinary MLP of width k (3 d k parameters instead of
the 2 k (d_in + d_out) of per-matrix factors at the same saving). Down is refitted in closed form on the kept
features, the least-squares map from h_S to W_D h over the calibration statistics (centred: the mean of what the
dropped neurons contributed becomes down's bias):
    W_D' = W_D C[:, S] C[S, S]^-1,    b' = W_D mu + b - W_D' mu_S,    C = Cov(h), mu = E[h].
Neurons are ranked once, by greedy backward elimination with that refit (optimal brain surgeon on the output
error): from all neurons, drop the chunk of neurons whose single removal costs least, ||W'[:, j]||^2 / [C_S^-1]_jj
with W' the current refitted down, then refit W' and downdate C_S^-1 in closed form and repeat. Unlike a ranking
of the features alone (MoDeGPT's ridge leverage), it weighs each neuron by what down reads from it: 2-17 % less
output error at the same k on SmolLM2's blocks. The kept sets are nested, so one Cholesky factor in that order
serves every k: with C_perm = L L^T, W_D' = (W_D[:, order] L)[:, :k] (L^-1)[:k, :k], a d x k x k product per
trial instead of a solve.
"""

from __future__ import annotations

import torch

from ...arch import linear_id
from ...layers import NarrowLinear
from ..budget import Unit
from .base import METHODS, DenseLayer, Method

CHOLESKY_RIDGE = 1e-6     # keeps the factor of a (near-)singular covariance finite; grown tenfold while it fails
ELIMINATION_STEPS = 96    # chunks of the greedy order: one neuron at a time up to 96 neurons, then n / 96 at a time


@METHODS.register("mlp")
class NeuronMLP(Method):
    name = "mlp"
    module = "mlp"
    FORMAT = 2       # 2: the greedy output-aware order (1 ranked by leverage)

    def _linears(self, block: int):
        return [self.adapter.linears[linear_id(block, t)] for t in self.types]   # the input projections, then down

    def units(self, block):
        lis = self._linears(block)
        down, width = lis[-1], lis[-1].d_in
        dense = sum(li.d_in * li.d_out + (li.d_out if li.bias else 0) for li in lis)
        # one neuron: a row of every input projection (gate and up, or both halves of a fused gate_up) and a
        # column of down; down keeps a bias of d_out
        per_level = sum((li.d_in + li.bias) * (li.d_out // width) for li in lis[:-1]) + down.d_out
        return [Unit(linear_id(block, "mlp"), block, "mlp", tuple(li.id for li in lis), dense, down.d_out,
                     per_level, self.multiple, width)]

    def prepared_bytes(self):
        total = 0
        for b in range(self.adapter.n_blocks):
            down = self._linears(b)[-1]
            total += (down.d_in * down.d_in + down.d_out * down.d_in) * 4 + (down.d_in + down.d_out) * 16
        return total

    def prepare(self, stats, block, device, dtype):
        down = self._linears(block)[-1]
        moments = stats.moments(block, self.adapter.record_of(down.type))
        cov, mu = moments.cov.to(device), moments.mean.to(device)
        n = cov.shape[0]
        eye = torch.eye(n, dtype=torch.float64, device=device)
        scale = float(cov.diagonal().mean().clamp(min=1e-30))
        w = self.adapter.module(down.id).weight.detach().to(device, torch.float64)
        b = self.adapter.module(down.id).bias
        order = _elimination_order(cov, w, scale)
        chol = _cholesky(cov[order][:, order], scale)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        w_mean = w @ mu + (b.detach().to(w) if b is not None else 0)
        return {"mlp.order": order.cpu(), "mlp.m": (w[:, order] @ chol).float().cpu(),
                "mlp.chol_inv": chol_inv.float().cpu(), "mlp.w_mean": w_mean.cpu(), "mlp.mu": mu[order].cpu()}

    def build(self, unit, level, parts, dense: DenseLayer):
        lis = self._linears(unit.block)
        width, out = lis[-1].d_in, {}
        device, dtype = dense(lis[-1].id).weight.device, dense(lis[-1].id).weight.dtype
        p = {name: t.to(device, non_blocking=True) for name, t in parts.items()}
        kept = p["order"][:level]
        for li in lis[:-1]:          # rows of the kept neurons (in both halves of a fused gate_up)
            layer = dense(li.id)
            rows = torch.cat([kept + width * j for j in range(li.d_out // width)])
            bias = layer.bias.detach()[rows] if layer.bias is not None else None
            out[li.id] = NarrowLinear.from_weight(layer.weight.detach()[rows], bias, li.d_in, li.d_out, li.bias)
        weight = p["m"][:, :level] @ p["chol_inv"][:level, :level]
        bias = p["w_mean"] - weight.double() @ p["mu"][:level]
        down = lis[-1]
        out[down.id] = NarrowLinear.from_weight(weight.to(dtype), bias.to(dtype), down.d_in, down.d_out, down.bias)
        return out

    def refit_targets(self, unit):
        return (unit.linears[-1],)


def _cholesky(cov: torch.Tensor, scale: float) -> torch.Tensor:
    """The Cholesky factor of cov + ridge I, the ridge grown tenfold (up to 1 % of the mean variance) while the
    covariance is too rank-deficient for it: fewer calibration tokens than features leave float rounding below
    zero in the null space."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    ridge = CHOLESKY_RIDGE
    while True:
        chol, info = torch.linalg.cholesky_ex(cov + ridge * scale * eye)
        if int(info) == 0 or ridge >= 1e-2:
            return torch.linalg.cholesky(cov + ridge * scale * eye) if int(info) else chol
        ridge *= 10


def _elimination_order(cov: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """Neurons from most to least needed: the reverse of greedy backward elimination under the least-squares refit
    of down (block OBS). Removing the set R from the kept set S raises the output error by
    tr(W'_R P_RR^-1 W'_R^T), P = C_S^-1, and leaves W'_S - W'_R P_RR^-1 P_RS and P_SS - P_SR P_RR^-1 P_RS; the
    dropped rows and columns of P become zero in place, so nothing is copied per step."""
    n = cov.shape[0]
    chol = _cholesky(cov, scale)
    inv = torch.cholesky_inverse(chol)
    refit = w.clone()
    alive = torch.ones(n, dtype=torch.bool, device=cov.device)
    chunk = max(1, -(-n // ELIMINATION_STEPS))
    dropped = []
    for start in range(0, n, chunk):
        cost = refit.square().sum(0) / inv.diagonal().clamp(min=torch.finfo(inv.dtype).tiny)
        cost[~alive] = float("inf")
        r = cost.argsort()[:min(chunk, n - start)]
        sol = torch.linalg.solve(inv[r][:, r], inv[r])          # P_RR^-1 P_R,: (dropped columns of P are zero)
        refit.addmm_(refit[:, r], sol, alpha=-1)             # in place: no n x n temporary per step
        inv.addmm_(inv[:, r], sol, alpha=-1)
        alive[r] = False
        refit[:, r], inv[r], inv[:, r] = 0, 0, 0
        dropped.append(r)
    return torch.cat(dropped).flip(0)
