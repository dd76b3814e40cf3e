"""Structured attention (docs/design.md, "Structured modules"; after MoDeGPT): per-head Q/K and V/O decompositions.

qk, level m = head dimensions kept in every head (whole rotary pairs, i and i + head_dim/2): the attention score
reads q and k only through the same dimensions, so dropping a dimension from every query head of a key/value group
and from its key head removes those rows of q and k and nothing else. Pairs are ranked per group by
sum over the group's query heads of sqrt(E[q_i^2] E[k_i^2]) summed over the pair (MoDeGPT's CR score), from the
second moment of the attention input (E[q q^T] = W_q E[x x^T] W_q^T, exactly). No bias is added.

vo, level k = rank per key/value group: the group's value head v_g = W_V,g x feeds the output through
sum_h W_O,h z_h, z_h the attention-weighted values of query head h. A shared map v' = U_k^T G^1/2 v_g with
W_O,h' = W_O,h G^-1/2 U_k (G = sum_h W_O,h^T W_O,h) keeps k dimensions; U are the top eigenvectors of
G^1/2 Sigma G^1/2, Sigma the summed covariance of the group's attention outputs z_h (the `o_in` statistics: the
inputs' covariance would weigh every token alike, while attention averages them, and measured 4x worse held out).
This minimises sum_h E||W_O,h (z_h - z_h')||^2 when the heads' covariances agree (exactly for one query head per
group). Softmax weights sum to one, so the mean of the dropped directions passes attention unchanged: o's bias
keeps it, b_o' = b_o + sum_h W_O,h (I - P_k) E[z_h].

The architecture's attention code runs unchanged: q, k and v become RowsLinear layers that leave the dropped head
dimensions zero, o a ColumnsLinear that reads the kept ones (bolaco.layers).
"""

from __future__ import annotations

import torch

from ...arch import linear_id
from ...layers import ColumnsLinear, RowsLinear
from ..budget import Unit
from .base import METHODS, DenseLayer, Method

PAIR = 2     # head dimensions move in rotary pairs


def _sym_pow(m: torch.Tensor, power: float) -> torch.Tensor:
    """A power of a symmetric positive semi-definite matrix (eigenvalues floored at 1e-12 of the largest)."""
    evals, evecs = torch.linalg.eigh(m)
    evals = evals.clamp(min=float(evals.max()) * 1e-12)
    return (evecs * evals.pow(power)) @ evecs.T


class _Heads(Method):
    FORMAT = 1

    def _linears(self, block: int):
        return [self.adapter.linears[linear_id(block, t)] for t in self.types]

    def _unit(self, block: int, per_level: int, fixed: int) -> Unit:
        lis = self._linears(block)
        dense = sum(li.d_in * li.d_out + (li.d_out if li.bias else 0) for li in lis)
        return Unit(linear_id(block, self.name), block, self.name, tuple(li.id for li in lis), dense, fixed,
                    per_level, PAIR, self.adapter.heads.head_dim)

    def _head_rows(self, heads: int, kept: torch.Tensor, group_of) -> torch.Tensor:
        """Row (or column) indices of the kept dimensions `kept[g]` of every head, head h in group group_of(h)."""
        hd = self.adapter.heads.head_dim
        return torch.cat([h * hd + kept[group_of(h)] for h in range(heads)])


@METHODS.register("qk")
class HeadDimsQK(_Heads):
    name = "qk"
    module = "qk"
    centred = False

    def units(self, block):
        q, k = self._linears(block)
        heads = self.adapter.heads
        per_dim = heads.n_heads * (q.d_in + q.bias) + heads.n_kv * (k.d_in + k.bias)
        return [self._unit(block, per_dim, 0)]

    def prepared_bytes(self):
        heads = self.adapter.heads
        return self.adapter.n_blocks * heads.n_kv * heads.head_dim // 2 * 8

    def prepare(self, stats, block, device, dtype):
        q, k = self._linears(block)
        heads = self.adapter.heads
        moments = stats.moments(block, self.adapter.record_of(q.type))
        second, mean = moments.second.to(device), moments.mean.to(device)

        def energy(li, n):   # E[y_i^2] of every output dimension, per head, summed over each rotary pair
            layer = self.adapter.module(li.id)
            w = layer.weight.detach().to(device, torch.float64)
            e = ((w @ second) * w).sum(1)
            if layer.bias is not None:
                b = layer.bias.detach().to(w)
                e = e + 2 * b * (w @ mean) + b * b
            e = e.view(n, heads.head_dim)
            half = heads.head_dim // 2
            return e[:, :half] + e[:, half:]

        eq, ek = energy(q, heads.n_heads), energy(k, heads.n_kv)
        per = heads.per_group
        score = torch.stack([(eq[g * per:(g + 1) * per] * ek[g]).clamp(min=0).sqrt().sum(0)
                             for g in range(heads.n_kv)])
        return {"qk.order": score.argsort(dim=1, descending=True).cpu()}

    def build(self, unit, level, parts, dense: DenseLayer):
        heads = self.adapter.heads
        half = heads.head_dim // 2
        pairs = parts["order"][:, :level // 2]
        kept = torch.cat([pairs, pairs + half], dim=1)               # first halves, then their partners
        out = {}
        for li, n, group_of in ((self._linears(unit.block)[0], heads.n_heads, lambda h: h // heads.per_group),
                                (self._linears(unit.block)[1], heads.n_kv, lambda g: g)):
            layer = dense(li.id)
            rows = self._head_rows(n, kept, group_of).to(layer.weight.device)
            bias = layer.bias.detach()[rows] if layer.bias is not None else None
            out[li.id] = RowsLinear.wrap(layer.weight.detach()[rows], bias, rows, li.d_out, li.bias)
        return out


@METHODS.register("vo")
class HeadRankVO(_Heads):
    name = "vo"
    module = "vo"

    def units(self, block):
        v, o = self._linears(block)
        heads = self.adapter.heads
        return [self._unit(block, heads.n_kv * (v.d_in + v.bias) + heads.n_heads * o.d_out, o.d_out)]

    def prepared_bytes(self):
        v, o = self._linears(0)
        return self.adapter.n_blocks * (v.d_out * v.d_in + o.d_out * o.d_in) * 4 + 3 * o.d_in * 8

    def prepare(self, stats, block, device, dtype):
        v_li, o_li = self._linears(block)
        heads = self.adapter.heads
        hd, per = heads.head_dim, heads.per_group
        attn_out = stats.moments(block, self.adapter.record_of(o_li.type))
        cov, mean = attn_out.cov.to(device), attn_out.mean.to(device)
        v_layer, o_layer = self.adapter.module(v_li.id), self.adapter.module(o_li.id)
        wv = v_layer.weight.detach().to(device, torch.float64)
        bv = v_layer.bias.detach().to(wv) if v_layer.bias is not None else None
        wo = o_layer.weight.detach().to(device, torch.float64)
        new_v, new_o = torch.zeros_like(wv), torch.zeros_like(wo)
        new_bv = torch.zeros(wv.shape[0], dtype=torch.float64, device=device)
        coords = torch.zeros(heads.n_heads, hd, dtype=torch.float64, device=device)
        base = wo @ mean + (o_layer.bias.detach().to(wo) if o_layer.bias is not None else 0)
        for g in range(heads.n_kv):
            group = range(g * per, (g + 1) * per)
            rows = slice(g * hd, (g + 1) * hd)
            o_heads = [wo[:, h * hd:(h + 1) * hd] for h in group]
            gram = sum(oh.T @ oh for oh in o_heads)
            root, inv_root = _sym_pow(gram, 0.5), _sym_pow(gram, -0.5)
            sigma = sum(cov[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] for h in group)
            basis = torch.linalg.eigh(root @ sigma @ root)[1].flip(-1)
            to_kept = basis.T @ root                                  # v' = U^T G^1/2 v
            new_v[rows] = to_kept @ wv[rows]
            if bv is not None:
                new_bv[rows] = to_kept @ bv[rows]
            for h, oh in zip(group, o_heads):
                new_o[:, h * hd:(h + 1) * hd] = oh @ inv_root @ basis
                coords[h] = to_kept @ mean[h * hd:(h + 1) * hd]
        parts = {"vo.v": new_v.float().cpu(), "vo.o": new_o.float().cpu(), "vo.coords": coords.cpu(),
                 "vo.base": base.cpu()}
        if bv is not None:
            parts["vo.v_bias"] = new_bv.cpu()
        return parts

    def build(self, unit, level, parts, dense: DenseLayer):
        heads = self.adapter.heads
        v_li, o_li = self._linears(unit.block)
        v_layer = dense(v_li.id)
        device, dtype = v_layer.weight.device, v_layer.weight.dtype
        p = {name: t.to(device, non_blocking=True) for name, t in parts.items()}
        kept = torch.arange(level, device=device).expand(heads.n_kv, level)
        v_rows = self._head_rows(heads.n_kv, kept, lambda g: g)
        v_bias = p["v_bias"][v_rows].to(dtype) if "v_bias" in p else None
        v = RowsLinear.wrap(p["v"][v_rows].to(dtype), v_bias, v_rows, v_li.d_out, v_li.bias)
        o_cols = self._head_rows(heads.n_heads, kept, lambda h: h // heads.per_group)
        weight = p["o"][:, o_cols]
        bias = p["base"] - weight.double() @ p["coords"][:, :level].reshape(-1)
        o = ColumnsLinear.wrap(weight.to(dtype), bias.to(dtype), o_cols, o_li.d_in, o_li.bias)
        return {v_li.id: v, o_li.id: o}

    def refit_targets(self, unit):
        return (unit.linears[-1],)
